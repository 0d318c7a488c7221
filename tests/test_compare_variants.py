"""compare on every adapter variant: Δ computed as the merge computes it, in float64, against real merges."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_user_error, build_peft_adapter, run_script
from hypothesis import given, settings
from hypothesis import strategies as st
from test_merge_variants import STARCODER2_VARIANTS

import compare_lora_task_vector
import extract_task_vectors
import merge_lora
from common.metrics import compare_tensor, cosine


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_variants")
    return {name: build_peft_adapter(tiny.base, root / name, **config) for name, config in STARCODER2_VARIANTS.items()}


def merge_extract_compare(tiny, adapter, root, precision, *compare_flags):
    merged, tvs, out = root / "merged", root / "tv", root / "cmp"
    assert merge_lora.main([*map(str, ["--base_model", tiny.base, "--lora_path", adapter, "--output_dir", merged])]
                           + ["--precision", precision, "--device", "cpu"]) == 0  # fmt: skip
    assert (
        extract_task_vectors.main(
            [
                *map(str, ["--base_model", tiny.base, "--finetuned_model", merged, "--output_dir", tvs]),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    args = ["--lora_path", adapter, "--task_vector_path", tvs / "task_vector.safetensors", "--output_dir", out]
    code = compare_lora_task_vector.main([*map(str, args), "--device", "cpu", *compare_flags])
    return code, json.loads((out / "comparison_report.json").read_text())


@pytest.mark.parametrize("variant", sorted(STARCODER2_VARIANTS))
def test_every_variant_is_equivalent_at_fp32(tiny, adapters, tmp_path, variant):
    code, report = merge_extract_compare(tiny, adapters[variant], tmp_path, "fp32", "--base_model", str(tiny.base))
    summary = report["summary"]
    assert code == 0, summary["reason"]
    assert summary["task_vector_only_changed"] == 0 and summary["lora_only"] == 0
    shared = [row for row in report["tensors"] if row["status"] in ("match", "mismatch")]
    assert shared and all(row["reproduces_merge"] for row in shared)


@pytest.mark.parametrize("variant", sorted(STARCODER2_VARIANTS))
def test_every_variant_at_fp16_fails_within_fp16_rounding(tiny, adapters, tmp_path, variant):
    code, report = merge_extract_compare(tiny, adapters[variant], tmp_path, "fp16", "--base_model", str(tiny.base))
    reason = report["summary"]["reason"]
    assert code == 1
    assert "differ by more than 1e-05, all within fp16 rounding" in reason, reason
    assert "bit for bit what an fp16 merge of this adapter gives" in reason


def test_base_dependent_changes_need_the_base(tiny, adapters, tmp_path, pipeline):
    args = ["--lora_path", adapters["dora"], "--task_vector_path", pipeline("fp32").task_vector_file]
    result = run_script("compare_lora_task_vector.py", *args, "--output_dir", tmp_path / "out")
    assert_user_error(result, "DoRA magnitudes", "pass --base_model")
    assert not (tmp_path / "out").exists()


def test_lora_bias_needs_no_base(tiny, adapters, tmp_path):
    code, report = merge_extract_compare(tiny, adapters["lora_bias"], tmp_path, "fp32")
    assert code == 0, report["summary"]["reason"]
    assert any(row["name"].endswith("q_proj.bias") for row in report["tensors"] if row["status"] == "match")


def test_doubled_alpha_reports_the_scale_and_the_alpha_reading(tiny, tmp_path, pipeline):
    import shutil

    doubled = tmp_path / "doubled"
    shutil.copytree(tiny.adapter, doubled)
    config = json.loads((doubled / "adapter_config.json").read_text())
    config["lora_alpha"] = 2 * config["lora_alpha"]
    (doubled / "adapter_config.json").write_text(json.dumps(config))
    args = ["--lora_path", doubled, "--task_vector_path", pipeline("fp32").task_vector_file, "--base_model", tiny.base]
    result = run_script("compare_lora_task_vector.py", *args, "--output_dir", tmp_path / "out")
    assert result.returncode == 1
    reason = result.stdout.strip().splitlines()[-3]
    assert "τ = 0.5·Δ in every adapted tensor, a scaling mismatch" in reason
    assert f"as if lora_alpha were {config['lora_alpha'] // 2} instead of {config['lora_alpha']}" in reason


def test_another_adapter_has_cosine_near_zero(tiny, tmp_path, pipeline):
    args = ["--lora_path", tiny.other_adapter, "--task_vector_path", pipeline("fp32").task_vector_file]
    result = run_script("compare_lora_task_vector.py", *args, "--output_dir", tmp_path / "out", "--json")
    summary = json.loads(result.stdout)
    assert result.returncode == 1 and abs(summary["mean_cosine"]) < 0.1
    assert "another adapter or model" in summary["reason"]


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)
vectors = st.lists(finite, min_size=1, max_size=64)


@settings(max_examples=300, deadline=None)
@given(vectors, vectors)
def test_cosine_is_always_within_minus_one_and_one(x, y):
    n = min(len(x), len(y))
    value = cosine(torch.tensor(x[:n]), torch.tensor(y[:n]))
    assert -1.0 <= value <= 1.0


@settings(max_examples=300, deadline=None)
@given(vectors, st.floats(min_value=-1e3, max_value=1e3, allow_nan=False).filter(lambda c: abs(c) > 1e-3))
def test_scale_fit_is_exact_for_a_multiple(delta, c):
    delta = torch.tensor(delta, dtype=torch.float64)
    if not torch.count_nonzero(delta):
        return
    result = compare_tensor("t", delta, c * delta)
    assert result.scale == pytest.approx(c, rel=1e-12)
    assert abs(result.cosine) == pytest.approx(1.0, abs=1e-12) and -1 <= result.cosine <= 1


def test_analyze_skips_vectors_and_uses_the_extraction_stats(tiny, adapters, tmp_path):
    import analyze_lora_vs_task_vector_math as analyze

    code, _ = merge_extract_compare(tiny, adapters["lora_bias"], tmp_path, "fp32")
    assert code == 0
    args = ["--lora_file", tmp_path / "cmp" / "lora_deltas.safetensors", "--task_vector_file", tmp_path / "tv"]
    assert analyze.main([*map(str, args), "--output_dir", str(tmp_path / "analysis"), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "analysis" / "analysis.json").read_text())["summary"]
    assert sorted(summary["not_matrices"]) == [
        f"model.layers.{i}.self_attn.{m}.bias" for i in (0, 1) for m in ("q_proj", "v_proj")
    ]
    assert summary["task_vector_only_unchanged"] == 35 - 8 and summary["task_vector_only_nonzero"] == []
