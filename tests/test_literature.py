"""The literature's quantities, on planted answers: energy ranks, intruder dimensions, a LoRA against another τ."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import analyze_lora_vs_task_vector_math as analyze
from common.numerics.intruders import intruder_dimensions
from common.numerics.spectra import amplification_factor, analyze_task_vector, analyze_tensor


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def with_spectrum(sigma: list[float], m: int = 96, n: int = 80, seed: int = 0) -> torch.Tensor:
    return (
        orthonormal(m, len(sigma), seed)
        @ torch.diag(torch.tensor(sigma, dtype=torch.float64))
        @ orthonormal(n, len(sigma), seed + 1).T
    )


def test_energy_ranks_are_exact_on_a_planted_spectrum():
    # energies 50, 25, 16, 5, 2, 1, 0.5, 0.5 of 100: 90% first reached at k = 3 (91), 99% at k = 6 (99)
    sigma = [math.sqrt(e) for e in (50, 25, 16, 5, 2, 1, 0.5, 0.5)]
    spectrum, _ = analyze_task_vector("model.layers.0.mlp.up_proj.weight", with_spectrum(sigma), torch.float64)
    assert (spectrum.energy_rank_90, spectrum.energy_rank_99) == (3, 6)
    assert spectrum.rank == 8 and spectrum.stable_rank == pytest.approx(100 / 50)


def test_a_new_direction_above_the_top_singular_value_is_one_intruder_and_a_small_aligned_one_none():
    base = with_spectrum([10.0 - 0.1 * i for i in range(60)], seed=2)
    u, _, vh = torch.linalg.svd(base)
    new = torch.randn(96, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    new -= u[:, :60] @ (u[:, :60].T @ new)  # orthogonal to every direction W₀ uses
    new /= new.norm()
    intruding = 20.0 * torch.outer(new, vh[0])  # larger than W₀'s top singular value (10)
    result = intruder_dimensions(base, intruding)
    assert result.count == 1 and result.singular_values[0] == pytest.approx(math.hypot(20.0, 10.0), rel=1e-6)
    aligned = 0.05 * torch.outer(u[:, 0], vh[0])  # small, along W₀'s own top direction
    assert intruder_dimensions(base, aligned).count == 0


def test_a_lora_against_a_tau_from_its_subspace_plus_orthogonal_noise():
    """Δ spans U_r; τ = (another combination in U_r) + noise orthogonal to U_r, of planted norms."""
    m, n, r = 96, 80, 4
    basis_u, basis_v = orthonormal(m, m, 7), orthonormal(n, n, 8)
    u_r = basis_u[:, :r]
    delta = u_r @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ basis_v[:, :r].T
    inside = u_r @ torch.diag(torch.tensor([5.0, 2.0, 1.5, 1.0], dtype=torch.float64)) @ basis_v[:, r : 2 * r].T
    noise = basis_u[:, r:] @ (0.01 * torch.randn(m - r, n - 2 * r, generator=torch.Generator().manual_seed(9)).double())
    noise = noise @ basis_v[:, 2 * r :].T  # orthogonal to Δ's column space and to the inside part's row space
    tau = inside + noise
    share = float(inside.square().sum() / tau.square().sum())
    spectrum, _ = analyze_tensor("model.layers.0.self_attn.q_proj.weight", delta, tau, torch.float64)
    assert spectrum.energy_in_lora_subspace == pytest.approx(share, rel=1e-9)
    assert len(spectrum.principal_angles_deg) == r and max(spectrum.principal_angles_deg) < 1e-6  # same column space
    assert spectrum.rank_lora == r


def test_amplification_factor_is_hu_et_al_s_ratio():
    base = with_spectrum([5.0, 4.0, 3.0, 2.0, 1.0], seed=3)
    u, s, vh = torch.linalg.svd(base)
    delta = 0.5 * torch.outer(u[:, 4], vh[4])  # along W₀'s weakest direction (σ = 1)
    du, ds, _ = torch.linalg.svd(delta, full_matrices=False)
    assert amplification_factor(delta, base, du[:, :1], ds[:1]) == pytest.approx(0.5 / 1.0, rel=1e-9)


def test_the_script_reports_intruders_and_energy_ranks_from_checkpoints(tmp_path):
    """Through analyze on τ alone with the base: the planted intruder tensor has one, the other none."""
    base = with_spectrum([10.0 - 0.1 * i for i in range(60)], seed=2)
    u, _, vh = torch.linalg.svd(base)
    new = torch.randn(96, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    new -= u[:, :60] @ (u[:, :60].T @ new)
    new /= new.norm()
    tensors = {"model.layers.0.mlp.up_proj.weight": base.float(), "model.layers.1.mlp.up_proj.weight": base.float()}
    tau = {
        "model.layers.0.mlp.up_proj.weight": (20.0 * torch.outer(new, vh[0])).float(),
        "model.layers.1.mlp.up_proj.weight": (0.05 * torch.outer(u[:, 0], vh[0])).float(),
    }
    (tmp_path / "base").mkdir()
    save_file(tensors, tmp_path / "base" / "model.safetensors", {"format": "pt"})
    (tmp_path / "base" / "config.json").write_text("{}")
    save_file(tau, tmp_path / "tau.safetensors", {"format": "pt", "finetuned_dtype": "float32"})
    args = ["--task_vector_file", tmp_path / "tau.safetensors", "--base_model", tmp_path / "base"]
    assert analyze.main([str(a) for a in [*args, "--output_dir", tmp_path / "a", "--device", "cpu"]]) == 0
    report = json.loads((tmp_path / "a" / "analysis.json").read_text())
    counts = {t["name"]: t["intruder_dimensions"] for t in report["task_vector_tensors"]}
    assert counts == {"model.layers.0.mlp.up_proj.weight": 1, "model.layers.1.mlp.up_proj.weight": 0}
    assert report["summary"]["intruder_dimensions_total"] == 1
    assert all(t["energy_rank_90"] == 1 for t in report["task_vector_tensors"])  # rank-1 updates
    assert any("Intruder dimensions" in line for line in report["summary"]["findings"])
    assert (tmp_path / "a" / "intruder_heatmap.png").is_file()
