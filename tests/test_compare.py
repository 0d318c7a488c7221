"""compare_lora_task_vector.py: exact metrics, the verdict, its reason and its exit code."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from conftest import assert_user_error, run_main
from safetensors.torch import load_file

from common.lora.adapter import LoraAdapter
from common.lora.arithmetic import lora_delta
from common.numerics.metrics import compare_tensor, cosine

SUMMARY_KEYS = {
    "shared", "lora_only", "task_vector_only", "artifacts", "mean_cosine", "min_cosine",
    "max_abs_diff", "perfect_matches", "equivalent", "tolerance",
}  # fmt: skip
TENSOR_KEYS = {"name", "cosine", "max_abs_diff", "rel_error", "norm_lora", "norm_task_vector", "status"}


def compare(tiny, tmp_path, task_vector_file, *extra, adapter=None):
    out = tmp_path / "cmp"
    args = ["--lora_path", adapter or tiny.adapter, "--task_vector_path", task_vector_file, "--output_dir", out]
    result = run_main("compare_lora_task_vector.py", *args, *extra)
    report = json.loads((out / "comparison_report.json").read_text()) if result.returncode in (0, 1) else None
    return result, report, out


def test_matching_adapter_is_equivalent_exit_0(tiny, tmp_path, pipeline):
    result, report, out = compare(tiny, tmp_path, pipeline("fp32").task_vector_file, "--base_model", tiny.base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "VALIDATION SUCCESSFUL" in result.stdout and "Analyzing 8 shared tensors" in result.stdout
    summary = report["summary"]
    assert SUMMARY_KEYS <= set(summary) and summary["equivalent"] is True
    assert summary["shared"] == 8 and summary["task_vector_only"] == 27 and summary["artifacts"] == 0
    assert summary["perfect_matches"] == 8 and summary["max_abs_diff"] < 1e-6
    assert all(TENSOR_KEYS <= set(row) for row in report["tensors"])
    for row in report["tensors"][:8]:
        assert row["status"] == "match" and -1 <= row["cosine"] <= 1 and abs(row["scale"] - 1) < 1e-5
    with open(out / "comparison_report.csv") as f:
        assert len(list(csv.DictReader(f))) == 35
    assert (out / "norm_distribution_comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_lora_deltas_file_holds_scaling_B_A_under_base_names(tiny, tmp_path, pipeline):
    _, _, out = compare(tiny, tmp_path, pipeline("fp32").task_vector_file)
    deltas = load_file(out / "lora_deltas.safetensors")
    adapter = LoraAdapter(tiny.adapter)
    assert set(deltas) == set(adapter.targets)
    for name, target in adapter.targets.items():
        a, b = adapter.factors(target)
        expected = (b.double() @ a.double() * (target.alpha / target.rank)).float()
        assert deltas[name].dtype == torch.float32
        torch.testing.assert_close(deltas[name], expected, rtol=0, atol=0)


def test_wrong_adapter_is_not_equivalent_exit_1(tiny, tmp_path, pipeline):
    result, report, _ = compare(tiny, tmp_path, pipeline("fp32").task_vector_file, adapter=tiny.other_adapter)
    assert result.returncode == 1, result.stderr
    assert report["summary"]["equivalent"] is False and "VALIDATION FAILED" in result.stdout
    assert abs(report["summary"]["mean_cosine"]) < 0.5


def test_fp16_merge_fails_within_rounding_and_counts_artifacts(tiny, tmp_path, pipeline):
    result, report, _ = compare(tiny, tmp_path, pipeline("fp16").task_vector_file, "--base_model", tiny.base)
    assert result.returncode == 1
    summary = report["summary"]
    assert summary["artifacts"] == 27 and summary["task_vector_only_changed"] == 0
    assert "within fp16 rounding" in summary["reason"] and "merge at fp32" in summary["reason"]
    assert all(row["within_rounding"] for row in report["tensors"] if row["status"] in ("match", "mismatch"))


def test_fp16_merge_passes_at_a_tolerance_above_its_rounding(tiny, tmp_path, pipeline):
    result, _, _ = compare(
        tiny, tmp_path, pipeline("fp16").task_vector_file, "--base_model", tiny.base, "--tolerance", "1e-3"
    )
    assert result.returncode == 0, result.stdout


def test_doubled_alpha_is_diagnosed_as_a_scaling_mismatch(tiny, tmp_path, pipeline):
    doubled = tmp_path / "doubled"
    shutil.copytree(tiny.adapter, doubled)
    config = json.loads((doubled / "adapter_config.json").read_text())
    config["lora_alpha"] *= 2
    (doubled / "adapter_config.json").write_text(json.dumps(config))
    result, report, _ = compare(
        tiny, tmp_path, pipeline("fp32").task_vector_file, "--base_model", tiny.base, adapter=doubled
    )
    assert result.returncode == 1
    assert "scaling mismatch" in report["summary"]["reason"]
    assert all(abs(row["scale"] - 0.5) < 1e-5 for row in report["tensors"][:8])


def test_without_base_or_stats_artifacts_cannot_be_told_apart(tiny, tmp_path, pipeline):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(pipeline("fp16").task_vector_file, alone)
    result, report, _ = compare(tiny, tmp_path, alone / "task_vector.safetensors", "--tolerance", "1e-3")
    assert result.returncode == 1
    assert report["summary"]["task_vector_only_unclassified"] == 27 and "--base_model" in report["summary"]["reason"]
    # ...and with the base they are rounding artifacts, found from the base and τ alone (no stats file).
    result, report, _ = compare(
        tiny, tmp_path / "b", alone / "task_vector.safetensors", "--tolerance", "1e-3", "--base_model", tiny.base
    )
    assert result.returncode == 0 and report["summary"]["artifacts"] == 27


def test_json_flag_prints_the_summary(tiny, tmp_path, pipeline):
    result, report, _ = compare(tiny, tmp_path, pipeline("fp32").task_vector_file, "--json")
    assert json.loads(result.stdout) == report["summary"]


def test_missing_task_vector_is_a_user_error(tiny, tmp_path):
    result, _, out = compare(tiny, tmp_path, tmp_path / "nope.safetensors")
    assert_user_error(result, "nope.safetensors")
    assert not out.exists()


def test_cosine_never_exceeds_one():
    torch.manual_seed(0)
    for scale in (1e-30, 1.0, 1e30):
        x = torch.randn(257, 129, dtype=torch.float32) * scale
        assert cosine(x, x) <= 1.0 and cosine(x, -x) >= -1.0
        assert cosine(x, x * 3) <= 1.0
        assert compare_tensor("t", x, x + 1e-7 * scale).cosine <= 1.0
    assert cosine(torch.zeros(3), torch.zeros(3)) == 1.0 and cosine(torch.zeros(3), torch.ones(3)) == 0.0


def test_compare_metrics_are_exact_on_a_known_case():
    delta = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    tau = 2 * delta
    result = compare_tensor("t", delta, tau)
    assert result.cosine == 1.0 and result.scale == 2.0
    assert result.norm_lora == 5.0 and result.norm_task_vector == 10.0
    assert result.max_abs_diff == 4.0 and result.rel_error == 1.0


@pytest.mark.parametrize("rows", [1, 5])
def test_lora_delta_in_float64_is_scaling_b_a(rows):
    from common.lora.adapter import LoraTarget

    torch.manual_seed(1)
    a, b = torch.randn(4, 6), torch.randn(rows, 4)
    target = LoraTarget("m", "m.weight", "a", "b", rank=4, alpha=8, scaling=2.0, fan_in_fan_out=False, shape=(rows, 6))
    assert torch.equal(lora_delta(target, a, b, torch.float64), (b.double() @ a.double()) * 2.0)


@pytest.fixture(scope="module")
def tau_with_a_changed_mlp(tiny, pipeline, tmp_path_factory):
    """τ of the fp32 merge with one MLP weight changed as well: compare must say changes_outside_adapter."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("mlp_changed")
    merged = root / "merged"
    shutil.copytree(pipeline("fp32").merged, merged)
    name = "model.layers.0.mlp.c_fc.weight"
    for shard in merged.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name] = tensors[name] + 0.01
            save_file(tensors, shard, metadata={"format": "pt"})
    args = ["--base_model", tiny.base, "--finetuned_model", merged, "--output_dir", root / "tv", "--device", "cpu"]
    assert run_main("extract_task_vectors.py", *args).returncode == 0
    return root / "tv"


def test_a_stale_stats_file_never_makes_a_verdict(tiny, tmp_path, pipeline, tau_with_a_changed_mlp):
    """An older task_vector_stats.json beside a new τ (issue: compare said `equivalent`, exit 0, and analyze
    "reproduces 100%"): refused in one line naming both files, with and without the base."""
    tv = tmp_path / "tv"
    shutil.copytree(tau_with_a_changed_mlp, tv)
    result, report, _ = compare(tiny, tmp_path, tv / "task_vector.safetensors")
    assert result.returncode == 1 and report["summary"]["cause"] == "changes_outside_adapter"
    shutil.copy(pipeline("fp32").task_vectors / "task_vector_stats.json", tv)  # the older extraction's stats
    for extra in ([], ["--base_model", tiny.base]):
        result, _, _ = compare(tiny, tmp_path, tv / "task_vector.safetensors", *extra, "--overwrite")
        assert_user_error(result, str(tv / "task_vector_stats.json"), "belongs to another extraction", "stale")
    args = ["--task_vector_file", tv / "task_vector.safetensors", "--output_dir", tmp_path / "a", "--skip_plots"]
    result = run_main("analyze_lora_vs_task_vector_math.py", *args, "--lora_path", tiny.adapter)
    assert_user_error(result, "belongs to another extraction")


def test_a_stats_file_without_fingerprints_is_not_used(tiny, tmp_path, tau_with_a_changed_mlp):
    """A stats file that cannot be shown to be τ's (no fingerprints) is set aside: statuses are read off τ."""
    tv = tmp_path / "tv"
    shutil.copytree(tau_with_a_changed_mlp, tv)
    stats = json.loads((tv / "task_vector_stats.json").read_text())
    for key in ("base_fingerprint", "finetuned_fingerprint"):
        del stats["summary"][key]
    for entry in stats["tensors"]:
        entry["status"] = "unchanged"  # what a stale file could claim
    (tv / "task_vector_stats.json").write_text(json.dumps(stats))
    result, report, _ = compare(tiny, tmp_path, tv / "task_vector.safetensors", "--base_model", tiny.base)
    assert result.returncode == 1 and report["summary"]["cause"] == "changes_outside_adapter"
    assert "cannot be shown to belong to" in result.stdout
