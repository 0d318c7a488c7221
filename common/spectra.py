"""Spectral anatomy of τ against Δ: numerical ranks, singular values, subspace angles, energy.

All decompositions run in float64. The numerical rank counts singular values above
`σ₁ · max(m, n) · eps(dtype)` (the LAPACK / numpy `matrix_rank` rule) for the dtype the matrix was
stored in; a low-precision merge adds full-rank rounding noise that lifts τ's rank to full.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from common.metrics import compare_tensor

TOP_SINGULAR_VALUES = 24


@dataclass
class TensorSpectrum:
    """The per-tensor record of analysis.json."""

    name: str
    module: str
    layer: int | None
    shape: list[int]
    rank_lora: int
    rank_task_vector: int
    cosine: float
    rel_error: float
    max_abs_diff: float
    scale: float
    norm_lora: float
    norm_task_vector: float
    energy_in_lora_rank: float  # share of ‖τ‖² in its top-r singular directions, r = rank of Δ
    principal_angle_deg: float  # largest angle between the top-r column spaces of Δ and τ
    sigma_tail_ratio: float  # σ_{r+1}(τ) / σ_1(τ): the floor under the LoRA subspace
    stable_rank_task_vector: float  # ‖τ‖_F² / σ₁²
    singular_values_lora: list[float] = field(default_factory=list)
    singular_values_task_vector: list[float] = field(default_factory=list)


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Count of σᵢ > σ₁ · max(m, n) · eps(dtype)."""
    if singular_values.numel() == 0 or singular_values[0] == 0:
        return 0
    tol = singular_values[0] * max(shape) * torch.finfo(dtype).eps
    return int((singular_values > tol).sum())


def largest_principal_angle(u: torch.Tensor, v: torch.Tensor) -> float:
    """Largest principal angle (degrees) between the column spaces of orthonormal u and v (same width).

    Its sine is ‖(I − v vᵀ) u‖₂, which stays accurate for tiny angles where arccos of a cosine does not.
    """
    if u.shape[1] == 0 or v.shape[1] == 0:
        return 0.0
    sine = float(torch.linalg.matrix_norm(u - v @ (v.T @ u), ord=2))
    return math.degrees(math.asin(min(1.0, sine)))


def module_and_layer(name: str) -> tuple[str, int | None]:
    """('q_proj', 3) for model.layers.3.self_attn.q_proj.weight."""
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "bias") else parts[-1]
    layer = re.search(r"\.(?:layers|h|blocks|layer)\.(\d+)\.", name)
    return module, int(layer.group(1)) if layer else None


def analyze_tensor(
    name: str, lora_delta: torch.Tensor, task_vector: torch.Tensor, stored_dtype: torch.dtype
) -> TensorSpectrum:
    """Everything analysis.json says about one LoRA-adapted tensor."""
    delta, tau = lora_delta.double(), task_vector.double()
    u_delta, s_delta, _ = torch.linalg.svd(delta, full_matrices=False)
    u_tau, s_tau, _ = torch.linalg.svd(tau, full_matrices=False)
    rank = numerical_rank(s_delta, tuple(delta.shape), stored_dtype)
    metrics = compare_tensor(name, delta, tau)
    energy = float(s_tau.square().sum())
    module, layer = module_and_layer(name)
    return TensorSpectrum(
        name=name,
        module=module,
        layer=layer,
        shape=list(delta.shape),
        rank_lora=rank,
        rank_task_vector=numerical_rank(s_tau, tuple(tau.shape), stored_dtype),
        cosine=metrics.cosine,
        rel_error=metrics.rel_error,
        max_abs_diff=metrics.max_abs_diff,
        scale=metrics.scale,
        norm_lora=metrics.norm_lora,
        norm_task_vector=metrics.norm_task_vector,
        energy_in_lora_rank=float(s_tau[:rank].square().sum()) / energy if energy else 1.0,
        principal_angle_deg=largest_principal_angle(u_delta[:, :rank], u_tau[:, :rank]),
        sigma_tail_ratio=float(s_tau[rank] / s_tau[0]) if rank < len(s_tau) and s_tau[0] > 0 else 0.0,
        stable_rank_task_vector=energy / float(s_tau[0]) ** 2 if s_tau[0] > 0 else 0.0,
        singular_values_lora=s_delta[:TOP_SINGULAR_VALUES].tolist(),
        singular_values_task_vector=s_tau[:TOP_SINGULAR_VALUES].tolist(),
    )
