"""compare names the true cause: each cause built on the tiny StarCoder2, checked by summary.cause and exit code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_weights
from safetensors.torch import save_file

import compare_lora_task_vector
import extract_task_vectors

ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj")


def extract(base: Path, finetuned: Path, out: Path) -> Path:
    args = ["--base_model", base, "--finetuned_model", finetuned, "--output_dir", out, "--device", "cpu"]
    assert extract_task_vectors.main([str(a) for a in args]) == 0
    return out / "task_vector.safetensors"


def compare(adapter: Path, tau: Path, out: Path, *flags: object) -> tuple[int, dict]:
    args = ["--lora_path", adapter, "--task_vector_path", tau, "--output_dir", out, "--device", "cpu", *flags]
    code = compare_lora_task_vector.main([str(a) for a in args])
    summary = json.loads((out / "comparison_report.json").read_text())["summary"]
    return code, summary


def model_like(source: Path, out: Path, edit) -> Path:
    """A copy of a model folder with its tensors edited by `edit(tensors)`, saved as one file."""
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = load_weights(source)
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", {"format": "pt"})
    return out


def edited_adapter(adapter: Path, out: Path, **config) -> Path:
    shutil.copytree(adapter, out)
    data = json.loads((out / "adapter_config.json").read_text())
    data.update(config)
    (out / "adapter_config.json").write_text(json.dumps(data))
    return out


def test_an_fp32_merge_is_equivalent(tiny, pipeline, tmp_path):
    code, summary = compare(tiny.adapter, pipeline("fp32").task_vector_file, tmp_path / "c", "--base_model", tiny.base)
    assert (code, summary["cause"], summary["causes"]) == (0, "equivalent", ["equivalent"])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_low_precision_merge_is_proven_rounding_with_the_base(tiny, pipeline, tmp_path, precision):
    code, summary = compare(
        tiny.adapter, pipeline(precision).task_vector_file, tmp_path / "c", "--base_model", tiny.base
    )
    assert (code, summary["cause"]) == (1, "precision_rounding")
    assert "a correct" in summary["reason"] and "likely" not in summary["reason"]
    assert summary["evidence"]["within_rounding_proven"] is True


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_low_precision_merge_without_the_base_is_likely_rounding(tiny, pipeline, tmp_path, precision):
    code, summary = compare(tiny.adapter, pipeline(precision).task_vector_file, tmp_path / "c")
    assert (code, summary["cause"]) == (1, "precision_rounding")
    assert "likely" in summary["reason"] and "--base_model" in summary["reason"]
    assert summary["evidence"]["rounding_floor"] > summary["evidence"]["max_abs_diff"] > 1e-5
    assert "scaling mismatch" not in summary["reason"]


def test_a_doubled_lora_alpha_is_a_scale_mismatch_with_the_alpha_it_implies(tiny, pipeline, tmp_path):
    adapter = edited_adapter(tiny.adapter, tmp_path / "adapter", lora_alpha=32)
    code, summary = compare(adapter, pipeline("fp32").task_vector_file, tmp_path / "c", "--base_model", tiny.base)
    assert (code, summary["cause"]) == (1, "scale_mismatch")
    assert "as if lora_alpha were 16 instead of 32" in summary["reason"]


def test_alpha_over_r_and_alpha_over_root_r_mixed_up(tiny, pipeline, tmp_path):
    adapter = edited_adapter(tiny.adapter, tmp_path / "adapter", use_rslora=True)
    code, summary = compare(adapter, pipeline("fp32").task_vector_file, tmp_path / "c", "--base_model", tiny.base)
    assert (code, summary["cause"]) == (1, "rslora_mismatch")
    assert "c = 1/√r for r = 8" in summary["reason"]


def test_base_and_finetuned_swapped_is_a_sign_flip(tiny, pipeline, tmp_path):
    tau = extract(pipeline("fp32").merged, tiny.base, tmp_path / "tv")
    code, summary = compare(tiny.adapter, tau, tmp_path / "c", "--base_model", tiny.base)
    assert (code, summary["cause"]) == (1, "sign_flip")


def test_a_copy_of_the_base_as_merged_model_is_not_merged(tiny, tmp_path):
    copy = model_like(tiny.base, tmp_path / "copy", lambda tensors: None)
    tau = extract(tiny.base, copy, tmp_path / "tv")
    code, summary = compare(tiny.adapter, tau, tmp_path / "c")
    assert (code, summary["cause"]) == (1, "not_merged")


def test_half_the_layers_merged_is_partially_merged_and_names_them(tiny, pipeline, tmp_path):
    base = load_weights(tiny.base)

    def unmerge_layer_1(tensors):
        for name in tensors:
            if ".layers.1." in name and any(m in name for m in ADAPTED):
                tensors[name] = base[name]

    merged = model_like(pipeline("fp32").merged, tmp_path / "half", unmerge_layer_1)
    tau = extract(tiny.base, merged, tmp_path / "tv")
    code, summary = compare(tiny.adapter, tau, tmp_path / "c", "--base_model", tiny.base)
    assert (code, summary["cause"]) == (1, "partially_merged")
    assert "4 of 8 adapted tensors" in summary["reason"] and "layers.1" in summary["reason"]


def test_an_mlp_tensor_changed_after_merging_is_a_change_outside_the_adapter(tiny, pipeline, tmp_path):
    def train_the_mlp(tensors):
        name = "model.layers.0.mlp.c_fc.weight"
        tensors[name] = tensors[name] + 1e-3 * torch.randn_like(tensors[name])

    merged = model_like(pipeline("fp32").merged, tmp_path / "more", train_the_mlp)
    tau = extract(tiny.base, merged, tmp_path / "tv")
    code, summary = compare(tiny.adapter, tau, tmp_path / "c", "--base_model", tiny.base)
    assert (code, summary["cause"]) == (1, "changes_outside_adapter")
    assert "model.layers.0.mlp.c_fc.weight" in summary["reason"]


def test_another_adapter_is_unrelated(tiny, pipeline, tmp_path):
    code, summary = compare(tiny.other_adapter, pipeline("fp32").task_vector_file, tmp_path / "c")
    assert (code, summary["cause"]) == (1, "unrelated")


def test_an_fp32_merge_below_its_rounding_floor_says_the_tolerance_is_too_small(tiny, pipeline, tmp_path):
    tau = pipeline("fp32").task_vector_file
    code, summary = compare(tiny.adapter, tau, tmp_path / "c", "--base_model", tiny.base, "--tolerance", "1e-12")
    assert (code, summary["cause"]) == (1, "tolerance_below_rounding")
    floor = summary["evidence"]["rounding_floor"]
    assert summary["evidence"]["max_abs_diff"] <= floor and f"{floor:.3g}" in summary["reason"]
    assert "merge at fp32" not in summary["reason"]


def test_a_task_vector_of_another_base_is_the_wrong_base(tiny, pipeline, tmp_path):
    """τ extracted against a perturbed copy of the base, compared with the real base: its header says so; and
    without --base_model, every tensor moving by a base-like difference says so."""
    generator = torch.Generator().manual_seed(7)

    def perturb(tensors):
        for name, tensor in tensors.items():
            tensors[name] = tensor + 1e-4 * torch.randn(tensor.shape, generator=generator)

    other_base = model_like(tiny.base, tmp_path / "revision", perturb)
    tau = extract(other_base, pipeline("fp32").merged, tmp_path / "tv")
    code, summary = compare(tiny.adapter, tau, tmp_path / "c", "--base_model", tiny.base)
    assert (code, summary["cause"]) == (1, "wrong_base")
    assert summary["evidence"]["base_recorded_fingerprint"] != summary["evidence"]["base_given_fingerprint"]
    code, summary = compare(tiny.adapter, tau, tmp_path / "c2")
    assert (code, summary["cause"]) == (1, "wrong_base")
    assert "the 27 the adapter does not touch included" in summary["reason"]


def test_the_right_task_vector_with_the_wrong_base_model_is_not_equivalent(tiny, pipeline, tmp_path):
    other = model_like(tiny.base, tmp_path / "other", lambda t: t.update({k: v * 1.001 for k, v in t.items()}))
    code, summary = compare(tiny.adapter, pipeline("fp32").task_vector_file, tmp_path / "c", "--base_model", other)
    assert (code, summary["cause"]) == (1, "wrong_base")


def test_a_scale_mismatch_and_fp16_rounding_hold_together(tiny, pipeline, tmp_path):
    adapter = edited_adapter(tiny.adapter, tmp_path / "adapter", lora_alpha=32)
    code, summary = compare(adapter, pipeline("fp16").task_vector_file, tmp_path / "c", "--base_model", tiny.base)
    assert (code, summary["cause"], summary["causes"]) == (
        1,
        "scale_mismatch",
        ["scale_mismatch", "precision_rounding"],
    )


def test_a_base_saved_at_fp16_as_merged_model_is_not_merged(tiny, tmp_path):
    copy = model_like(tiny.base, tmp_path / "copy", lambda t: t.update({k: v.half() for k, v in t.items()}))
    tau = extract(tiny.base, copy, tmp_path / "tv")
    code, summary = compare(tiny.adapter, tau, tmp_path / "c")
    assert (code, summary["cause"]) == (1, "not_merged")
    assert "τ is only the base's rounding to fp16 on all 8" in summary["reason"]


def test_a_merge_made_elsewhere_with_another_rounding_policy_is_a_correct_merge(tiny, pipeline, tmp_path):
    """ "Add in fp32, round once" at bf16 is not bitwise our merge (which rounds the base first, as peft does),
    but it is a correct bf16 merge: proven with the base, said as likely without."""
    rounded_once = model_like(
        pipeline("fp32").merged, tmp_path / "elsewhere", lambda t: t.update({k: v.bfloat16() for k, v in t.items()})
    )
    tau = extract(tiny.base, rounded_once, tmp_path / "tv")
    code, summary = compare(tiny.adapter, tau, tmp_path / "c", "--base_model", tiny.base)
    rows = json.loads((tmp_path / "c" / "comparison_report.json").read_text())["tensors"]
    assert (code, summary["cause"]) == (1, "precision_rounding") and "a correct bf16 merge" in summary["reason"]
    assert not all(r["reproduces_merge"] for r in rows if r["status"] == "mismatch")  # not bitwise ours
    code, summary = compare(tiny.adapter, tau, tmp_path / "c2")
    assert (code, summary["cause"]) == (1, "precision_rounding") and "likely" in summary["reason"]
