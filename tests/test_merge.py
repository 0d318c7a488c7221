"""merge_lora.py against peft's own merge_and_unload, on tiny real models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import PRECISIONS, assert_user_error, load_weights, peft_merged_state_dict, run_main, run_merge
from safetensors.torch import load_file, save_file

from common.io.safetensors_io import CheckpointIndex
from common.lora.adapter import LoraAdapter
from common.lora.merge import merge_checkpoint
from common.model.layout import read_config


def assert_bitwise_equal_to_peft(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    # A tied lm_head is not saved (save_pretrained leaves it out too); every saved tensor must match bit for bit.
    assert set(reference) - set(ours) <= {"lm_head.weight"}
    assert set(ours) <= set(reference)
    for name, tensor in ours.items():
        assert tensor.dtype == reference[name].dtype, name
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_merge_is_bitwise_peft_merge_and_unload(tiny, pipeline, precision):
    ours = load_weights(pipeline(precision).merged)
    reference = peft_merged_state_dict(tiny.base, tiny.adapter, PRECISIONS[precision])
    assert_bitwise_equal_to_peft(ours, reference)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_row_chunked_merge_is_bitwise_the_same(tiny, pipeline, tmp_path, precision):
    """Chunks of 3 rows, and shards, give the same bits as whole tensors in one file."""
    with CheckpointIndex(tiny.base) as base:
        adapter = LoraAdapter(tiny.adapter)
        dtype, cpu = PRECISIONS[precision], torch.device("cpu")
        summary = merge_checkpoint(
            base, adapter, tmp_path, dtype, cpu, read_config(tiny.base), chunk_bytes=3 * 64 * 4, max_shard_bytes=40_000
        )
    assert len(summary.files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    chunked, whole = load_weights(tmp_path), load_weights(pipeline(precision).merged)
    assert chunked.keys() == whole.keys()
    assert all(torch.equal(chunked[n], whole[n]) for n in whole)


def test_merged_folder_loads_and_matches_unmerged_peft_logits(tiny, pipeline):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = pipeline("fp32").merged
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny.base), tiny.adapter)
    ids = tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = unmerged(ids).logits, merged(ids).logits
    base_logits = AutoModelForCausalLM.from_pretrained(tiny.base)(ids).logits.detach()
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_config_records_the_dtype_written(pipeline, precision):
    config = json.loads((pipeline(precision).merged / "config.json").read_text())
    assert config["dtype"] == str(PRECISIONS[precision]).removeprefix("torch.")
    assert {t.dtype for t in load_weights(pipeline(precision).merged).values()} == {PRECISIONS[precision]}
    assert (pipeline(precision).merged / "tokenizer.json").is_file()
    assert (pipeline(precision).merged / "generation_config.json").is_file()


SCALING_VARIANTS = {
    "rslora": {"r": 4, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
    "rank_alpha_patterns_and_mlp": {
        "r": 8,
        "lora_alpha": 16,
        "rank_pattern": {"k_proj": 2, "layers.1.self_attn.q_proj": 6},
        "alpha_pattern": {"o_proj": 5, "c_fc": 3},
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"],
    },
}


def _peft_adapter(base, folder, **config):
    """An adapter saved by peft itself, with random (non-zero) B so no training is needed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **config)
    get_peft_model(model, lora).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scaling_adapters(tiny, tmp_path_factory):
    """Each SCALING_VARIANTS adapter, built once for the three precisions (seeded: the same bits every time)."""
    root = tmp_path_factory.mktemp("scaling_adapters")
    return {name: _peft_adapter(tiny.base, root / name, **config) for name, config in SCALING_VARIANTS.items()}


@pytest.mark.parametrize("variant", list(SCALING_VARIANTS))
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_scaling_variants_are_bitwise_peft(tiny, scaling_adapters, tmp_path, variant, precision):
    adapter = scaling_adapters[variant]
    out = tmp_path / "merged"
    run_merge(tiny.base, adapter, out, "--precision", precision)
    assert_bitwise_equal_to_peft(load_weights(out), peft_merged_state_dict(tiny.base, adapter, PRECISIONS[precision]))


def test_adapter_for_another_model_is_refused(tiny, tmp_path):
    adapter = tmp_path / "wrong"
    shutil.copytree(tiny.adapter, adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("q_proj.lora_B.weight"))
    weights[key] = torch.zeros(96, weights[key].shape[1])
    save_file(weights, adapter / "adapter_model.safetensors")
    out = tmp_path / "out"
    result = run_main("merge_lora.py", "--base_model", tiny.base, "--lora_path", adapter, "--output_dir", out)
    assert_user_error(result, "does not fit", "q_proj")
    assert not out.exists()


def test_fp16_overflow_fails_and_writes_nothing(tiny, tmp_path):
    adapter = tmp_path / "huge"
    shutil.copytree(tiny.adapter, adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in weights if "layers.1.self_attn.v_proj.lora_B" in k)
    weights[key] = weights[key] * 1e7
    save_file(weights, adapter / "adapter_model.safetensors")
    out = tmp_path / "out"
    args = ["--base_model", tiny.base, "--lora_path", adapter, "--output_dir", out, "--precision", "fp16"]
    result = run_main("merge_lora.py", *args)
    assert_user_error(result, "overflow", "layers.1.self_attn.v_proj.weight")
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_adapter_model_bin_is_read_with_weights_only(tiny, pipeline, tmp_path):
    adapter = tmp_path / "bin_adapter"
    adapter.mkdir()
    shutil.copy(tiny.adapter / "adapter_config.json", adapter)
    torch.save(load_file(tiny.adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    out = tmp_path / "out"
    run_merge(tiny.base, adapter, out)
    merged, expected = load_weights(out), load_weights(pipeline("fp32").merged)
    assert all(torch.equal(merged[n], expected[n]) for n in expected)


class _Payload:
    """Unpickling this runs code: it creates the file named in its argument."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickles_are_never_executed(tiny, tmp_path):
    checkpoint = tmp_path / "checkpoint-5"
    shutil.copytree(tiny.adapter, checkpoint)
    marker = tmp_path / "code_ran"
    torch.save(_Payload(marker), checkpoint / "training_args.bin")  # a Trainer file: never to be loaded
    out = tmp_path / "out"
    run_merge(tiny.base, checkpoint, out)
    assert not marker.exists()
    # An adapter_model.bin that is a pickle of code is refused by weights_only, with a plain message.
    (checkpoint / "adapter_model.safetensors").unlink()
    torch.save({"w": _Payload(marker)}, checkpoint / "adapter_model.bin")
    result = run_main(
        "merge_lora.py", "--base_model", tiny.base, "--lora_path", checkpoint, "--output_dir", tmp_path / "o2"
    )
    assert_user_error(result, "adapter_model.bin", "cannot be read safely")
    assert not marker.exists()


@pytest.mark.parametrize(
    "quantization, says",
    [
        ({"quant_method": "gptq", "bits": 4}, "a gptq-quantized checkpoint, which is not read"),
        (
            {"quant_method": "bitsandbytes", "load_in_4bit": True},
            "config.json says it is 4-bit, but its weights are not",
        ),
    ],
)
def test_quantized_base_that_cannot_be_read_is_refused(tiny, tmp_path, quantization, says):
    base = tmp_path / "quantized"
    shutil.copytree(tiny.base, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = quantization
    (base / "config.json").write_text(json.dumps(config))
    result = run_main(
        "merge_lora.py", "--base_model", base, "--lora_path", tiny.adapter, "--output_dir", tmp_path / "o"
    )
    assert_user_error(result, says)


def test_final_line_reports_changes_time_and_peak_memory(tiny, tmp_path):
    last = run_merge(tiny.base, tiny.adapter, tmp_path / "o").stdout.strip().splitlines()[-1]
    assert (
        last.startswith("8 of 35 tensors changed at fp32 on cpu") and " s, peak memory " in last and last.endswith("GB")
    )
