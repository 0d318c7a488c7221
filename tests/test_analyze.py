"""analyze_lora_vs_task_vector_math.py: the spectral facts of τ against Δ, checked against the maths."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_user_error, run_main

from common.numerics.spectra import largest_principal_angle, numerical_rank


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
        assert run_main("compare_lora_task_vector.py", *cmp_args).returncode in (0, 1)
        args = ["--lora_file", root / "cmp" / "lora_deltas.safetensors", "--task_vector_file", run.task_vector_file]
        result = run_main("analyze_lora_vs_task_vector_math.py", *args, "--output_dir", root / "out")
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
    assert (
        report["summary"]["task_vector_only_unchanged"] == 0
        and len(report["summary"]["task_vector_only_nonzero"]) == 27
    )


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
    assert_user_error(run_main("analyze_lora_vs_task_vector_math.py", *args), "not the same model")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("shape", [(1024, 768), (768, 2048)])
def test_randomized_svd_matches_the_full_svd_on_the_top_r_values(shape):
    from common.numerics.spectra import top_singular

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


@pytest.mark.parametrize("shape", [(256, 3072), (3072, 256), (42, 500), (64, 64)])
@pytest.mark.parametrize("rank", [None, 16])
def test_thin_svd_is_lapacks_svd_through_a_qr(shape, rank):
    from common.numerics.spectra import thin_svd

    torch.manual_seed(2)
    m, n = shape
    matrix = torch.randn(m, n, dtype=torch.float64)
    if rank:  # rank-deficient, as a LoRA update is
        matrix = torch.randn(m, rank, dtype=torch.float64) @ torch.randn(rank, n, dtype=torch.float64)
    u, s, vh = thin_svd(matrix)
    expected = torch.linalg.svdvals(matrix)
    assert u.shape == (m, min(m, n)) and vh.shape == (min(m, n), n)
    torch.testing.assert_close(s, expected, rtol=0, atol=1e-13 * float(expected[0]))
    torch.testing.assert_close(u * s @ vh, matrix, rtol=0, atol=1e-12 * float(expected[0]))
    eye = torch.eye(min(m, n), dtype=torch.float64)
    torch.testing.assert_close(u.T @ u, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(vh @ vh.T, eye, rtol=0, atol=1e-12)


def spectrum_down_to(smallest: float, m: int, n: int) -> torch.Tensor:
    """An m × n float64 matrix with singular values spread geometrically from 1 down to `smallest`."""
    left, _ = torch.linalg.qr(torch.randn(m, min(m, n), dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(n, min(m, n), dtype=torch.float64))
    return left * torch.logspace(0, math.log10(smallest), min(m, n), dtype=torch.float64) @ right.T


@pytest.mark.parametrize("shape", [(512, 128), (128, 512), (200, 200)])
def test_gram_svd_gives_every_singular_value_to_1e_6_or_hands_over_to_the_qr(shape):
    from common.numerics.spectra import GRAM_MIN_RATIO, Decomposition, gram_svd

    torch.manual_seed(3)
    matrix = spectrum_down_to(1.5 * GRAM_MIN_RATIO, *shape)
    u, s, vh = gram_svd(matrix)
    assert (u is None) == (shape[0] >= shape[1]) and (vh is None) == (shape[0] < shape[1])  # the long side: later
    expected = torch.linalg.svdvals(matrix)
    torch.testing.assert_close(s, expected, rtol=1.1e-6, atol=0)
    dec = Decomposition(u, s, vh, True, float(matrix.square().sum()), matrix)
    for k in (1, 7, min(shape)):
        u_k, s_k, vh_k = dec.top(k)
        short = vh_k.T if shape[0] >= shape[1] else u_k  # the eigenvectors: orthonormal, so U_k Σ_k V_kᵀ projects
        torch.testing.assert_close(short.T @ short, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
        residual = float((matrix - u_k * s_k @ vh_k).square().sum())  # Eckart–Young: what the top k leave
        assert residual == pytest.approx(float(expected[k:].square().sum()), rel=1e-6, abs=1e-13)
        transposed = dec.transposed().top(k)
        torch.testing.assert_close(transposed[0] * transposed[1] @ transposed[2], (u_k * s_k @ vh_k).T)
    assert gram_svd(spectrum_down_to(0.5 * GRAM_MIN_RATIO, *shape)) is None  # not to 1e-6 that way
    assert gram_svd(torch.zeros(shape, dtype=torch.float64)) is None


def test_fp16_noise_floor_is_within_a_factor_two_of_the_prediction(analyses):
    report, _, stdout = analyses["fp16"]
    for t in report["tensors"]:
        assert 0.5 < t["sigma_next_task_vector"] / t["predicted_noise_floor"] < 2.0, t["name"]
    assert "noise floor predicted from the residual" in stdout


@pytest.fixture(scope="module")
def from_adapter(tiny, pipeline, analyses, tmp_path_factory):
    """analysis.json of the fp16 pipeline with Δ from the adapter itself and the base weights."""
    out = tmp_path_factory.mktemp("analysis_adapter") / "out"
    args = ["--lora_path", tiny.adapter, "--base_model", tiny.base, "--output_dir", out]
    result = run_main(
        "analyze_lora_vs_task_vector_math.py", *args, "--task_vector_file", pipeline("fp16").task_vector_file
    )
    assert result.returncode == 0, result.stderr
    return json.loads((out / "analysis.json").read_text()), out, result.stdout


def test_lora_path_gives_the_same_spectra_from_the_factors(analyses, from_adapter):
    by_file, _, _ = analyses["fp16"]
    report, _, stdout = from_adapter
    assert report["summary"]["lora_source"] == "lora_path" and report["summary"]["lora_spectra_from_factors"] == 8
    dense = {t["name"]: t for t in by_file["tensors"]}
    for t in report["tensors"]:
        assert t["lora_spectrum_from_factors"] and not dense[t["name"]]["lora_spectrum_from_factors"]
        assert t["rank_lora"] == dense[t["name"]]["rank_lora"] == 8
        # the file holds Δ rounded to fp32: its values agree to fp32 precision with the exact ones
        torch.testing.assert_close(
            torch.tensor(t["singular_values_lora"][:8]),
            torch.tensor(dense[t["name"]]["singular_values_lora"][:8]),
            rtol=1e-6,
            atol=0,
        )
        assert abs(t["effective_rank_lora"] - dense[t["name"]]["effective_rank_lora"]) < 1e-5
        assert 1 < t["effective_rank_lora"] <= 8
    assert "8 of its SVDs exactly from the factors" in stdout


def test_base_model_gives_the_residual_in_ulps_within_the_fp16_rounding(from_adapter):
    report, out, stdout = from_adapter
    for t in report["tensors"]:
        assert 0.5 < t["residual_max_ulps"] <= 1.0 + 1e-3, t["name"]  # two roundings of ½ ulp each
        assert 0.1 < t["residual_rms_ulps"] < t["residual_max_ulps"]
        assert t["within_rounding"] is True
    assert "every element within the rounding bound of an fp16 merge" in stdout
    assert (out / "residual_ulp_histogram.png").read_bytes()[:4] == b"\x89PNG"
    assert "(residual_ulp_histogram.png)" in (out / "report.md").read_text()


def test_factor_spectrum_and_effective_rank_on_known_matrices():
    from common.numerics.spectra import effective_rank, factor_spectrum

    torch.manual_seed(2)
    left, right = torch.randn(300, 6, dtype=torch.float64), torch.randn(200, 6, dtype=torch.float64)
    u, s = factor_spectrum(left, right, -0.5)
    u_full, s_full, _ = torch.linalg.svd(-0.5 * left @ right.T)
    torch.testing.assert_close(s, s_full[:6], rtol=1e-12, atol=0)
    assert largest_principal_angle(u, u_full[:, :6]) < 1e-9
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert 1 < effective_rank(torch.tensor([4.0, 2.0, 1.0])) < 3


def test_rounding_bound_covers_cancellation_in_b_at_a_only_with_the_factors():
    """fp32 B @ A errs by ~ulps of |B|@|A|, which dwarfs |Δ| where the r products cancel."""
    from common.numerics.metrics import rounding_bound

    torch.manual_seed(3)
    a, b = torch.randn(16, 400), torch.randn(300, 16)
    exact = b.double() @ a.double()
    error = ((b @ a).double() - exact).abs()  # what an fp32 merge adds to τ − Δ on top of its roundings
    weight = torch.zeros(300, 400, dtype=torch.float64)
    magnitude = b.double().abs() @ a.double().abs()
    assert (error <= rounding_bound(weight, exact, torch.float32, 16, magnitude)).all()
    assert not (error <= rounding_bound(weight, exact, torch.float32, 16)).all()  # the check can fail


RANK_PATTERN = {
    "r": 8,
    "rank_pattern": {"k_proj": 2, "layers.1.self_attn.q_proj": 6},
    "target_modules": ["q_proj", "k_proj"],
}


def test_lora_file_reports_each_tensors_configured_rank(analyses, tiny, pipeline, peft_adapters, tmp_path):
    """compare records each Δ's configured r (rank_pattern included) in lora_deltas.safetensors' header, and analyze
    --lora_file reports it as --lora_path does (the README's step 4 gave `lora_rank: null`)."""
    for precision in ("fp32", "fp16"):
        assert [t["lora_rank"] for t in analyses[precision][0]["tensors"]] == [8] * 8
    adapter = peft_adapters(tiny.base, **RANK_PATTERN)
    tau = pipeline("fp32").task_vector_file  # of another adapter: the ranks are the adapter's, whatever τ is
    compare_args = ["--lora_path", adapter, "--task_vector_path", tau, "--output_dir", tmp_path / "cmp"]
    assert run_main("compare_lora_task_vector.py", *compare_args).returncode == 1
    ranks = {}
    for source in (["--lora_file", tmp_path / "cmp" / "lora_deltas.safetensors"], ["--lora_path", adapter]):
        out = tmp_path / source[0].lstrip("-")
        result = run_main(
            "analyze_lora_vs_task_vector_math.py", *source, "--task_vector_file", tau, "--output_dir", out,
            "--skip_plots", "--intruder_k", "0",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        ranks[source[0]] = {
            t["name"]: t["lora_rank"] for t in json.loads((out / "analysis.json").read_text())["tensors"]
        }
    expected = {
        f"model.layers.{i}.self_attn.{p}_proj.weight": 2 if p == "k" else 6 if i == 1 else 8
        for i in (0, 1)
        for p in "qk"
    }
    assert ranks["--lora_file"] == ranks["--lora_path"] == expected


@pytest.mark.parametrize("recorded", ["[8]", '{"a": 0}', '{"a": true}', "{"])
def test_corrupt_recorded_ranks_are_one_line_errors(pipeline, tmp_path, recorded):
    from safetensors.torch import save_file

    name = "model.layers.0.self_attn.q_proj.weight"
    save_file({name: torch.zeros(64, 64)}, tmp_path / "lora_deltas.safetensors", metadata={"lora_ranks": recorded})
    args = ["--lora_file", tmp_path / "lora_deltas.safetensors", "--output_dir", tmp_path / "out"]
    result = run_main(
        "analyze_lora_vs_task_vector_math.py", *args, "--task_vector_file", pipeline("fp32").task_vector_file
    )
    assert_user_error(result, "corrupt lora_ranks metadata")


def test_lora_file_and_lora_path_together_are_a_usage_error(tiny, tmp_path, pipeline):
    args = ["--lora_file", tmp_path / "x.safetensors", "--lora_path", tiny.adapter]
    result = run_main(
        "analyze_lora_vs_task_vector_math.py", *args, "--task_vector_file", pipeline("fp32").task_vector_file
    )
    assert_user_error(result, "--lora_file and --lora_path exclude each other")
