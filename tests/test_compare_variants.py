"""compare on every adapter variant: Δ computed as the merge computes it, in float64, against real merges."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STARCODER2_VARIANTS, assert_user_error, run_main, run_mains_aside
from hypothesis import given, settings
from hypothesis import strategies as st

from common.numerics.metrics import compare_tensor, cosine


@pytest.fixture(scope="module")
def adapters(variant_adapters):
    """The same adapters test_merge_variants merges (built once per session)."""
    return variant_adapters


def chain(tiny, adapter, root, precision, *compare_flags) -> list[list]:
    """merge → extract → compare into `root`, as the scripts' (run_main) arguments."""
    merged, tvs, out = root / "merged", root / "tv", root / "cmp"
    return [
        ["merge_lora.py", "--base_model", tiny.base, "--lora_path", adapter, "--output_dir", merged]
        + ["--precision", precision, "--device", "cpu"],
        ["extract_task_vectors.py", "--base_model", tiny.base, "--finetuned_model", merged, "--output_dir", tvs]
        + ["--device", "cpu"],
        ["compare_lora_task_vector.py", "--lora_path", adapter, "--task_vector_path", tvs / "task_vector.safetensors"]
        + ["--output_dir", out, "--device", "cpu", *compare_flags],
    ]


def verdict(results: list, root) -> tuple[int, dict]:
    """The chain's merge and extraction succeeded; compare's exit code and its report."""
    merge, extract, compare = results
    assert merge.returncode == 0, merge.stderr
    assert extract.returncode == 0, extract.stderr
    assert compare.returncode in (0, 1), compare.stderr
    return compare.returncode, json.loads((root / "cmp" / "comparison_report.json").read_text())


def merge_extract_compare(tiny, adapter, root, precision, *compare_flags):
    """The three scripts' mains in this process (run_main): compare's exit code and its report."""
    return verdict([run_main(*job) for job in chain(tiny, adapter, root, precision, *compare_flags)], root)


# The fresh interpreter `with_the_base` runs the fp16 chains in.
FRESH_PYTHONS = 1


@pytest.fixture(scope="module")
def with_the_base(tiny, adapters, fresh_python, tmp_path_factory):
    """Every variant's chain at fp32 and at fp16, with --base_model: the fp16 ones one after the other in a fresh
    interpreter beside this one (run_mains_aside), the fp32 ones here meanwhile. Each test checks one."""
    root = tmp_path_factory.mktemp("with_the_base")
    folders = {(v, p): root / f"{v}_{p}" for v in sorted(STARCODER2_VARIANTS) for p in ("fp32", "fp16")}
    jobs = {
        key: chain(tiny, adapters[key[0]], folder, key[1], "--base_model", tiny.base) for key, folder in folders.items()
    }
    aside = [key for key in jobs if key[1] == "fp16"]
    aside_results = run_mains_aside(fresh_python, [job for key in aside for job in jobs[key]])
    results = {key: [run_main(*job) for job in jobs[key]] for key in jobs if key not in aside}
    flat = aside_results()
    results |= {key: flat[3 * i : 3 * i + 3] for i, key in enumerate(aside)}
    return {key: (results[key], folders[key]) for key in jobs}


@pytest.mark.parametrize("variant", sorted(STARCODER2_VARIANTS))
def test_every_variant_is_equivalent_at_fp32(with_the_base, variant):
    code, report = verdict(*with_the_base[variant, "fp32"])
    summary = report["summary"]
    assert code == 0, summary["reason"]
    assert summary["task_vector_only_changed"] == 0 and summary["lora_only"] == 0
    shared = [row for row in report["tensors"] if row["status"] in ("match", "mismatch")]
    assert shared and all(row["reproduces_merge"] for row in shared)


@pytest.mark.parametrize("variant", sorted(STARCODER2_VARIANTS))
def test_every_variant_at_fp16_fails_within_fp16_rounding(with_the_base, variant):
    code, report = verdict(*with_the_base[variant, "fp16"])
    reason = report["summary"]["reason"]
    assert code == 1
    assert "differ by more than 1e-05, all within fp16 rounding" in reason, reason
    assert "bit for bit what an fp16 merge of this adapter gives" in reason


def test_base_dependent_changes_need_the_base(tiny, adapters, tmp_path, pipeline):
    args = ["--lora_path", adapters["dora"], "--task_vector_path", pipeline("fp32").task_vector_file]
    result = run_main("compare_lora_task_vector.py", *args, "--output_dir", tmp_path / "out")
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
    result = run_main("compare_lora_task_vector.py", *args, "--output_dir", tmp_path / "out")
    assert result.returncode == 1
    reason = result.stdout.strip().splitlines()[-3]
    assert "τ = 0.5·Δ in every adapted tensor, a scaling mismatch" in reason
    assert f"as if lora_alpha were {config['lora_alpha'] // 2} instead of {config['lora_alpha']}" in reason


def test_another_adapter_has_cosine_near_zero(tiny, tmp_path, pipeline):
    args = ["--lora_path", tiny.other_adapter, "--task_vector_path", pipeline("fp32").task_vector_file]
    result = run_main("compare_lora_task_vector.py", *args, "--output_dir", tmp_path / "out", "--json")
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
    code, _ = merge_extract_compare(tiny, adapters["lora_bias"], tmp_path, "fp32")
    assert code == 0
    args = ["--lora_file", tmp_path / "cmp" / "lora_deltas.safetensors", "--task_vector_file", tmp_path / "tv"]
    result = run_main(
        "analyze_lora_vs_task_vector_math.py",
        *args,
        "--output_dir",
        tmp_path / "analysis",
        "--device",
        "cpu",
        "--skip_plots",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "analysis" / "analysis.json").read_text())["summary"]
    assert sorted(summary["not_matrices"]) == [
        f"model.layers.{i}.self_attn.{m}.bias" for i in (0, 1) for m in ("q_proj", "v_proj")
    ]
    assert summary["task_vector_only_unchanged"] == 35 - 8 and summary["task_vector_only_nonzero"] == []
