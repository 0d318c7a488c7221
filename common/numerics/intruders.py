"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

Among the top-k left singular vectors yⱼ of the finetuned weight W₀ + τ, an *intruder* is one whose largest
|cosine| with every left singular vector xᵢ of W₀ is below ε: a new direction, not a rotated old one.

The top-k of W₀ + τ come from a randomized SVD (common/numerics/spectra.py). All of W₀'s left singular vectors are
needed: they are the eigenvectors of the smaller Gram matrix (W₀W₀ᵀ when W₀ is wide, else WᵀW, whose eigenvectors V give
U = W₀V/σ), one symmetric eigendecomposition per tensor, in float32 above 512 (its cost dominates: about half an
SVD's), float64 below. The coefficients ⟨yⱼ, xᵢ⟩ are then formed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.numerics.spectra import FULL_SVD_MAX, truncated_svd

TOP_K = 10  # the paper's default
EPSILON = 0.5


@dataclass(frozen=True)
class Intruders:
    """How many of the finetuned weight's top-k left singular vectors are intruders, and their singular values."""

    count: int
    singular_values: list[float]  # of W₀ + τ, for the intruders
    max_cosines: list[float]  # for each of the top-k: max_i |⟨yⱼ, xᵢ⟩|


def intruder_dimensions(
    base_weight: torch.Tensor, task_vector: torch.Tensor, k: int = TOP_K, epsilon: float = EPSILON
) -> Intruders:
    """Intruders among the top-k left singular vectors of W₀ + τ (both as stored, out × in)."""
    w0 = base_weight.double()
    k = min(k, min(w0.shape))
    u_ft, s_ft, _, _ = truncated_svd(w0 + task_vector.double(), k, full=False)
    u_ft, s_ft = u_ft[:, :k], s_ft[:k]
    best = (left_singular_vectors(w0).T @ u_ft).abs().max(dim=0).values
    intruder = best < epsilon
    return Intruders(int(intruder.sum()), s_ft[intruder].tolist(), best.tolist())


def left_singular_vectors(weight: torch.Tensor) -> torch.Tensor:
    """All min(m, n) left singular vectors of a float64 matrix (m × min(m, n)), from the smaller Gram matrix's
    eigenvectors; directions of a zero singular value are left out (no cosine can be taken with them)."""
    m, n = weight.shape
    dtype = torch.float32 if min(m, n) > FULL_SVD_MAX else torch.float64
    if m <= n:
        return torch.linalg.eigh((weight @ weight.T).to(dtype)).eigenvectors.double()
    eigenvalues, v = torch.linalg.eigh((weight.T @ weight).to(dtype))
    sigma = eigenvalues.double().clamp_min(0).sqrt()
    keep = sigma > sigma.max() * max(m, n) * torch.finfo(dtype).eps
    u = weight @ v.double()[:, keep] / sigma[keep]
    return u / torch.linalg.vector_norm(u, dim=0)
