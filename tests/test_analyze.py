"""analyze_lora_vs_task_vector_math.py: the spectral facts of τ against Δ, checked against the maths."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_user_error, run_script

from common.spectra import largest_principal_angle, numerical_rank


@pytest.fixture(scope="module")
def analyses(tiny, pipeline, tmp_path_factory):
    """analysis.json of the fp32 and fp16 pipelines."""
    reports = {}
    for precision in ("fp32", "fp16"):
        root = tmp_path_factory.mktemp(f"analysis_{precision}")
        run = pipeline(precision)
        cmp_args = [
            "--lora_path",
            tiny.adapter,
            "--task_vector_path",
            run.task_vector_file,
            "--output_dir",
            root / "cmp",
        ]
        assert run_script("compare_lora_task_vector.py", *cmp_args).returncode in (0, 1)
        args = ["--lora_file", root / "cmp" / "lora_deltas.safetensors", "--task_vector_file", run.task_vector_file]
        result = run_script("analyze_lora_vs_task_vector_math.py", *args, "--output_dir", root / "out")
        assert result.returncode == 0, result.stderr
        reports[precision] = (json.loads((root / "out" / "analysis.json").read_text()), root / "out", result.stdout)
    return reports


def test_fp32_task_vector_has_the_lora_rank_and_subspace(analyses):
    report, _, stdout = analyses["fp32"]
    assert len(report["tensors"]) == 8
    for t in report["tensors"]:
        assert t["rank_lora"] == 8 and t["rank_task_vector"] == 8, t["name"]
        assert t["principal_angle_deg"] < 1e-3
        assert t["energy_in_lora_rank"] > 1 - 1e-12
        assert -1 <= t["cosine"] <= 1 and t["rel_error"] < 1e-6
    assert "All 8 task-vector tensors have exactly the numerical rank" in stdout


def test_fp16_task_vector_is_lifted_to_full_rank_by_rounding(analyses):
    report, _, _ = analyses["fp16"]
    for t in report["tensors"]:
        assert t["rank_lora"] == 8
        assert t["rank_task_vector"] > 8 + 0.75 * (min(t["shape"]) - 8), t["name"]
        assert t["principal_angle_deg"] < 1.0  # the LoRA subspace still dominates
        assert 1e-6 < t["sigma_tail_ratio"] < 1e-2
    assert report["summary"]["task_vector_only_zero"] == 0 and len(report["summary"]["task_vector_only_nonzero"]) == 27


def test_reports_and_plot_are_written(analyses):
    report, out, _ = analyses["fp16"]
    markdown = (out / "report.md").read_text()
    assert "## Findings" in markdown and "singular_value_spectra.png" in markdown
    for plot in ("singular_value_spectra", "relative_error_heatmap", "lora_norm_heatmap", "principal_angle_heatmap"):
        assert (out / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"({plot}.png)" in markdown
    assert set(report["by_module"]) == {"q_proj", "k_proj", "v_proj", "o_proj"} and set(report["by_layer"]) == {
        "0",
        "1",
    }


def test_numerical_rank_and_principal_angle_on_known_matrices():
    torch.manual_seed(0)
    u = torch.linalg.qr(torch.randn(50, 5, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(40, 5, dtype=torch.float64)).Q
    low_rank = u @ torch.diag(torch.tensor([5.0, 4, 3, 2, 1], dtype=torch.float64)) @ v.T
    assert numerical_rank(torch.linalg.svdvals(low_rank), (50, 40), torch.float32) == 5
    x = torch.randn(50, 1, dtype=torch.float64)
    w = x - u @ (u.T @ x)
    w = w / torch.linalg.vector_norm(w)  # orthogonal to span(u)
    for degrees in (90.0, 1.0, 1e-5):
        theta = torch.tensor(degrees * torch.pi / 180, dtype=torch.float64)
        tilted = torch.cat([u[:, :4], torch.cos(theta) * u[:, 4:] + torch.sin(theta) * w], dim=1)
        assert abs(largest_principal_angle(u, tilted) - degrees) < 1e-9 * max(1.0, degrees) + 1e-12
    assert largest_principal_angle(u, u) < 1e-12


def test_files_of_different_models_are_a_user_error(tiny, tmp_path, pipeline):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"unrelated.weight": torch.ones(2, 2)}, other)
    args = [
        "--lora_file",
        other,
        "--task_vector_file",
        pipeline("fp32").task_vector_file,
        "--output_dir",
        tmp_path / "o",
    ]
    assert_user_error(run_script("analyze_lora_vs_task_vector_math.py", *args), "not the same model")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("shape", [(1024, 768), (768, 2048)])
def test_randomized_svd_matches_the_full_svd_on_the_top_r_values(shape):
    from common.spectra import top_singular

    torch.manual_seed(1)
    m, n = shape
    delta = torch.randn(m, 16, dtype=torch.float64) @ torch.randn(16, n, dtype=torch.float64) * 1e-3
    # A low-precision merge: round W and W + Δ to fp16 and subtract, as the task vector is made.
    weight = torch.randn(m, n, dtype=torch.float64) * 0.02
    tau = (weight.half().double() + delta).half().double() - weight
    exact = torch.linalg.svdvals(tau)[:16]
    _, fast, is_exact = top_singular(tau, 16, full=False)
    assert not is_exact
    torch.testing.assert_close(fast, exact, rtol=1e-6, atol=0)


def test_fp16_noise_floor_is_within_a_factor_two_of_the_prediction(analyses):
    report, _, stdout = analyses["fp16"]
    for t in report["tensors"]:
        assert 0.5 < t["sigma_next_task_vector"] / t["predicted_noise_floor"] < 2.0, t["name"]
    assert "noise floor predicted from the residual" in stdout
