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

    from common.io.safetensors_io import CheckpointIndex
    from common.model.layout import read_config
    from common.model.quantization import FourBit, bnb_config, quantized_weights

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


@pytest.fixture(scope="module")
def qlora_taus(tiny, tmp_path_factory, peft_adapters):
    """τ (extracted against the plain base, and against the 4-bit one) of the tiny adapter merged into the nf4
    double-quantized base, dequantized (c) and re-quantized (b), and of a small adapter (B scaled down 100×)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("qlora_taus")
    small = root / "small_adapter"
    small.mkdir()
    for item in tiny.adapter.iterdir():
        if item.name in ("adapter_config.json", "adapter_model.safetensors"):
            (small / item.name).write_bytes(item.read_bytes())
    tensors = load_file(small / "adapter_model.safetensors")
    save_file({k: v * 0.01 if "lora_B" in k else v for k, v in tensors.items()}, small / "adapter_model.safetensors")
    taus = {}
    for name, adapter, requantize in (("c", tiny.adapter, False), ("b", tiny.adapter, True), ("small", small, False)):
        out = root / f"merged_{name}"
        merged(tiny.base, adapter, out, "bf16", "stream", four_bit_flags("nf4", True, requantize))
        for against, flags in (("plain", []), ("4bit", four_bit_flags("nf4", True, False))):
            args = ["--base_model", tiny.base, "--finetuned_model", out, "--output_dir", root / f"tv_{name}_{against}"]
            assert run_main("extract_task_vectors.py", *args, "--device", "cpu", *flags).returncode == 0
            taus[name, against] = (root / f"tv_{name}_{against}" / "task_vector.safetensors", adapter)
    return taus


def compare_report(tiny, tmp_path, tau, adapter, *extra):
    import json

    out = tmp_path / "cmp"
    args = ["--lora_path", adapter, "--task_vector_path", tau, "--output_dir", out, "--device", "cpu", *extra]
    result = run_main("compare_lora_task_vector.py", *args)
    assert result.returncode == 1, result.stderr
    return json.loads((out / "comparison_report.json").read_text())["summary"]


@pytest.mark.parametrize("merge", ["c", "b", "small"])
def test_compare_names_a_qlora_merge_and_proves_it_with_the_base(tiny, tmp_path, qlora_taus, merge):
    """Never `unexplained` or `unrelated` (they said "τ is of another adapter or model" for the small adapter)."""
    tau, adapter = qlora_taus[merge, "plain"]
    summary = compare_report(tiny, tmp_path, tau, adapter, "--base_model", tiny.base)
    assert summary["cause"] == "quantized_base" and summary["causes"] == ["quantized_base"]
    quantization = summary["quantization"]
    assert quantization["proven"] and (quantization["quant_type"], quantization["double_quant"]) == ("nf4", True)
    assert quantization["merge"] == ("requantized" if merge == "b" else "dequantized")
    assert quantization["adapted_reproduced"] == 8 and quantization["weights_outside_the_adapter"] == 4
    assert "deq(Q(W)) − W bit for bit (nf4, double quantization)" in summary["reason"]
    assert "--bnb_4bit_quant_type nf4 --bnb_4bit_use_double_quant" in summary["reason"]
    without = compare_report(tiny, tmp_path / "without", tau, adapter)
    assert without["cause"] == "quantized_base" and not without["quantization"]["proven"]
    assert "likely a merge into a 4-bit (QLoRA) base" in without["reason"]


def test_tau_against_the_4bit_base_verifies_the_qlora_merge_as_a_bf16_merge(tiny, tmp_path, qlora_taus):
    """extract --bnb_4bit_quant_type subtracts deq(Q(W)): outside the adapter τ is zero, and compare proves the
    adapted tensors bit for bit a bf16 merge into that base."""
    import json

    tau, adapter = qlora_taus["c", "4bit"]
    stats = json.loads((tau.parent / "task_vector_stats.json").read_text())
    statuses = {t["name"]: t["status"] for t in stats["tensors"]}
    assert all(statuses[f"model.layers.{i}.mlp.{m}.weight"] == "unchanged" for i in (0, 1) for m in ("c_fc", "c_proj"))
    summary = compare_report(tiny, tmp_path, tau, adapter, "--base_model", tiny.base)
    assert summary["cause"] == "precision_rounding"
    assert "τ is bit for bit what a bf16 merge of this adapter gives" in summary["reason"]
    assert "a correct bf16 merge into the nf4, double quantization 4-bit base" in summary["reason"]


@pytest.fixture(scope="module")
def saved_four_bit(tiny, tmp_path_factory):
    """The tiny base saved 4-bit by transformers (nf4, double quantization), and the tiny adapter merged by peft into
    the 4-bit model and saved still 4-bit (the re-quantizing merge, without dequantize())."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from common.model.quantization import FourBit, bnb_config

    root = tmp_path_factory.mktemp("saved_4bit")
    quantization = bnb_config(FourBit("nf4", True), torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny.base, dtype=torch.bfloat16, quantization_config=quantization)
    model.save_pretrained(root / "base")
    model = AutoModelForCausalLM.from_pretrained(tiny.base, dtype=torch.bfloat16, quantization_config=quantization)
    PeftModel.from_pretrained(model, tiny.adapter).merge_and_unload().save_pretrained(root / "merged")
    return root / "base", root / "merged"


def test_a_base_saved_4bit_is_read_as_transformers_dequantizes_it(tiny, tmp_path, saved_four_bit):
    """Every tensor read as transformers' dequantize() of the loaded 4-bit checkpoint holds it, and merging into it
    is the merge into the dequantized 4-bit base, bit for bit, no flags needed."""
    from transformers import AutoModelForCausalLM

    from common.io.safetensors_io import CheckpointIndex

    base, _ = saved_four_bit
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).dequantize()
    theirs = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    with CheckpointIndex(base) as checkpoint:
        assert len(checkpoint.four_bit) == 12 and not any(".absmax" in n for n in checkpoint.names())
        for name in checkpoint.names():
            assert torch.equal(checkpoint.read(name), theirs[name]), name
    ours = merged(base, tiny.adapter, tmp_path / "from_saved", "bf16", "stream", [])
    assert_bitwise(
        ours, merged(tiny.base, tiny.adapter, tmp_path / "flags", "bf16", "stream", four_bit_flags("nf4", True, False))
    )
    assert "quantization_config" not in (tmp_path / "from_saved" / "config.json").read_text()


def test_a_merge_saved_still_4bit_is_extracted_and_named(tiny, tmp_path, saved_four_bit):
    """Its 4-bit tensors are read, never dropped (extract dropped them), and compare names the re-quantizing merge."""
    _, merged_4bit = saved_four_bit
    args = ["--base_model", tiny.base, "--finetuned_model", merged_4bit, "--output_dir", tmp_path / "tv"]
    assert run_main("extract_task_vectors.py", *args, "--device", "cpu").returncode == 0
    summary = compare_report(tiny, tmp_path, tmp_path / "tv" / "task_vector.safetensors", tiny.adapter,
                             "--base_model", tiny.base)  # fmt: skip
    assert summary["cause"] == "quantized_base" and summary["quantization"]["merge"] == "requantized"


def test_an_8bit_checkpoint_is_refused_by_name(tiny, tmp_path):
    import json
    import shutil

    base = tmp_path / "base8"
    shutil.copytree(tiny.base, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}
    (base / "config.json").write_text(json.dumps(config))
    args = ["--base_model", base, "--lora_path", tiny.adapter, "--output_dir", tmp_path / "o"]
    assert_user_error(run_main("merge_lora.py", *args), "8-bit (LLM.int8) bitsandbytes-quantized checkpoint")


def test_analyze_names_the_quantization_floor_not_rounding(tiny, tmp_path, qlora_taus):
    """analyze blamed "bf16 rounding noise" for a residual 30–55× a bf16 merge's: it is the 4-bit quantization."""
    import json

    tau, adapter = qlora_taus["c", "plain"]
    args = ["--task_vector_file", tau, "--lora_path", adapter, "--base_model", tiny.base, "--skip_plots"]
    result = run_main("analyze_lora_vs_task_vector_math.py", *args, "--output_dir", tmp_path / "a", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    analysis = json.loads((tmp_path / "a" / "analysis.json").read_text())
    findings = analysis["summary"]["findings"]
    assert findings[0].startswith("Verdict (quantized_base, as compare gives it): outside the adapter")
    assert findings[1].startswith("τ is of a merge into the nf4, double quantization 4-bit base (QLoRA)")
    assert not any("rounding noise" in line or "rounding produces" in line for line in findings)
    explained = [t["quantization_explained"] for t in analysis["tensors"]]
    assert len(explained) == 8 and min(explained) > 0.99  # the rest is bf16 rounding


def test_a_base_of_unknown_type_is_refused_for_a_4bit_merge(tiny, tmp_path):
    """Which layers a 4-bit load quantizes comes from the model class: without one, nothing is claimed."""
    import json
    import shutil

    base = tmp_path / "unknown"
    shutil.copytree(tiny.base, base)
    config = json.loads((base / "config.json").read_text()) | {"model_type": "nosuchmodel", "architectures": ["X"]}
    (base / "config.json").write_text(json.dumps(config))
    args = ["--base_model", base, "--lora_path", tiny.adapter, "--output_dir", tmp_path / "o", "--precision", "bf16"]
    result = run_main("merge_lora.py", *args, *four_bit_flags("nf4", True, False))
    assert_user_error(result, "which layers a 4-bit load quantizes comes from its model class")
    assert not (tmp_path / "o").exists()
