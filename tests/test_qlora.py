"""QLoRA: the merge into the 4-bit base a QLoRA adapter was trained on, against the real path.

The real path is transformers' 4-bit load (BitsAndBytesConfig), peft's PeftModel and merge_and_unload, and
transformers' dequantize(), from fresh loads (no forward pass: it repacks the weights on some CPUs): `--engine peft`
runs it, and conftest's `qlora_merges` builds it by hand. The streaming merge must give the same bits.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_user_error, build_peft_adapter, load_weights, run_main
from test_architectures import ARCHITECTURES, build_base

VARIANTS = [(q, d, r) for q in ("nf4", "fp4") for d in (True, False) for r in (False, True)]
EVERYDAY = {("nf4", True, False), ("nf4", True, True), ("fp4", False, False)}


def four_bit_flags(quant_type: str, double_quant: bool, requantize: bool) -> list[str]:
    flags = ["--bnb_4bit_quant_type", quant_type]
    return flags + ["--bnb_4bit_use_double_quant"] * double_quant + ["--requantize"] * requantize


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora_llama")
    base = build_base(ARCHITECTURES["llama"], root / "base")
    return base, build_peft_adapter(base, root / "adapter", seed=2, r=4, target_modules="all-linear")


def merged(base, adapter, out, precision, engine, flags) -> dict[str, torch.Tensor]:
    args = ["--base_model", base, "--lora_path", adapter, "--output_dir", out, "--precision", precision]
    result = run_main("merge_lora.py", *args, "--engine", engine, "--device", "cpu", *flags)
    assert result.returncode == 0, result.stderr
    return load_weights(out)


def assert_bitwise(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    assert [name for name, tensor in theirs.items() if not torch.equal(tensor, ours[name])] == []


@pytest.mark.parametrize(
    "variant",
    [v if v in EVERYDAY else pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS],
    ids=[f"{q}-{'double' if d else 'single'}-{'requantized' if r else 'dequantized'}" for q, d, r in VARIANTS],
)
@pytest.mark.parametrize("architecture", ["starcoder2", "llama"])
def test_qlora_merge_is_bitwise_the_real_path(tiny, llama, tmp_path, architecture, variant):
    base, adapter = (tiny.base, tiny.adapter) if architecture == "starcoder2" else llama
    flags = four_bit_flags(*variant)
    ours = merged(base, adapter, tmp_path / "stream", "bf16", "stream", flags)
    assert_bitwise(ours, merged(base, adapter, tmp_path / "peft", "bf16", "peft", flags))
    plain = merged(base, adapter, tmp_path / "plain", "bf16", "stream", [])
    quantized = [n for n in ours if not torch.equal(ours[n], plain[n])]
    assert quantized and all(n.endswith("proj.weight") or ".c_" in n for n in quantized)  # the Linear weights only


def test_the_merge_into_the_dequantized_base_is_conftest_s_hand_built_one(tiny, tmp_path, qlora_merges):
    """Against the fixture that builds (c) with transformers and peft directly, not through merge_lora.py."""
    flags = four_bit_flags("nf4", True, False)
    ours = merged(tiny.base, tiny.adapter, tmp_path / "stream", "bf16", "stream", flags)
    from safetensors.torch import load_file

    theirs = {}
    for shard in (qlora_merges["c"].parent.parent / "merged_c").glob("*.safetensors"):
        theirs |= load_file(shard)
    assert [name for name, tensor in theirs.items() if not torch.equal(tensor, ours[name])] == []


@pytest.mark.parametrize("architecture", ["llama", "starcoder2", pytest.param("gemma2", marks=pytest.mark.slow),
                                          pytest.param("gpt_neox", marks=pytest.mark.slow),
                                          pytest.param("phi3", marks=pytest.mark.slow),
                                          pytest.param("mixtral", marks=pytest.mark.slow),
                                          pytest.param("gpt2", marks=pytest.mark.slow)])  # fmt: skip
def test_the_layers_quantized_are_the_ones_transformers_quantizes(tmp_path, architecture):
    from transformers import AutoModelForCausalLM

    from common.model_layout import read_config
    from common.quantization import FourBit, bnb_config, quantized_weights
    from common.safetensors_io import CheckpointIndex

    base = build_base(ARCHITECTURES[architecture], tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.bfloat16, quantization_config=bnb_config(FourBit("nf4", True), torch.bfloat16)
    )
    theirs = {name for name, param in model.named_parameters() if type(param).__name__ == "Params4bit"}
    with CheckpointIndex(base) as checkpoint:
        ours = quantized_weights(base, checkpoint, read_config(base))
    assert theirs and set(ours) == theirs


def test_gpt2_conv1d_weights_keep_the_checkpoint_s_layout(tmp_path):
    """transformers quantizes a Conv1D weight transposed (out × in), and its dequantize() makes an nn.Linear, which
    save_pretrained writes out × in under the Conv1D's name (a checkpoint GPT-2 cannot load); ours keeps in × out.
    The values are the same."""
    base = build_base(ARCHITECTURES["gpt2"], tmp_path / "base")
    adapter = build_peft_adapter(base, tmp_path / "adapter", seed=1, r=4, target_modules=["c_attn", "c_fc"])
    flags = four_bit_flags("nf4", True, False)
    ours = merged(base, adapter, tmp_path / "stream", "bf16", "stream", flags)
    theirs = merged(base, adapter, tmp_path / "peft", "bf16", "peft", flags)
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor.T if name.endswith(conv1d) else tensor), name


def test_four_bit_flags_refused_where_they_do_not_apply(tiny, tmp_path, peft_adapters):
    args = ["--base_model", tiny.base, "--lora_path", tiny.adapter, "--output_dir", tmp_path / "o"]
    assert_user_error(run_main("merge_lora.py", *args, "--requantize"), "--requantize needs --bnb_4bit_quant_type")
    dora = peft_adapters(tiny.base, seed=4, r=4, target_modules=["q_proj"], use_dora=True)
    args = ["--base_model", tiny.base, "--lora_path", dora, "--output_dir", tmp_path / "o"]
    result = run_main("merge_lora.py", *args, *four_bit_flags("nf4", True, True))
    assert_user_error(result, "--requantize", "DoRA", "merge without --requantize")
    assert not (tmp_path / "o").exists()
