"""Per-tensor agreement between a task vector τ and a LoRA delta Δ, in float64.

A cosine is at most 1 in exact arithmetic; it is computed in float64 and clamped to [−1, 1] so that
rounding can never report more (the original write-up's 1.225 was a bug).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.precision import ulp

PERFECT_COSINE = 0.9999


@dataclass
class TensorComparison:
    """How one LoRA-adapted tensor's task vector agrees with its LoRA delta."""

    name: str
    cosine: float
    max_abs_diff: float
    rel_error: float  # ‖τ − Δ‖ / ‖Δ‖
    norm_lora: float
    norm_task_vector: float
    scale: float  # least-squares fit of τ ≈ scale·Δ: ⟨τ,Δ⟩/⟨Δ,Δ⟩, 1.0 when the scaling is right
    scale_sigma: float  # the spread of `scale` that independent noise of τ's residual gives: ‖τ − cΔ‖/(‖Δ‖√n)
    fit_residual: float  # ‖τ − cΔ‖ / ‖τ − Δ‖: 0 when τ is exactly c·Δ, 1 when the scale explains nothing
    max_abs_fit_residual: float  # max |τ − cΔ|
    max_diff_ulps: float | None = None  # max |τ − Δ| in ulps of the merge dtype at the merged weight
    within_rounding: bool | None = None  # every |τ − Δ| within the rounding a merge at that dtype can make
    reproduces_merge: bool | None = None  # τ is bit for bit what merging this adapter at that dtype gives
    rounding_floor: float | None = None  # the most a merge at that dtype can round, at the tensor's magnitudes
    tau_status: str = ""  # what τ holds on this adapted tensor (task_vector.TauStatus)
    status: str = ""


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """⟨x,y⟩ / (‖x‖‖y‖) in float64, clamped to [−1, 1]; 1 for two zero tensors, 0 for one."""
    x, y = x.double().flatten(), y.double().flatten()
    nx, ny = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    if nx == 0 or ny == 0:
        return 1.0 if nx == ny else 0.0
    return float(torch.clamp(torch.dot(x, y) / (nx * ny), -1.0, 1.0))


def compare_tensor(name: str, lora_delta: torch.Tensor, task_vector: torch.Tensor) -> TensorComparison:
    """Cosine, max |τ − Δ|, relative error, norms, and the least-squares scale c with how well τ ≈ c·Δ fits, all
    in float64."""
    delta, tau = lora_delta.double(), task_vector.double()
    diff = tau - delta
    norm_delta = float(torch.linalg.vector_norm(delta))
    delta_sq = norm_delta**2
    scale = float(torch.dot(tau.flatten(), delta.flatten())) / delta_sq if delta_sq else float("nan")
    fit = tau - scale * delta if delta_sq else tau
    norm_diff, norm_fit = float(torch.linalg.vector_norm(diff)), float(torch.linalg.vector_norm(fit))
    return TensorComparison(
        name=name,
        cosine=cosine(delta, tau),
        max_abs_diff=float(diff.abs().max()) if diff.numel() else 0.0,
        rel_error=norm_diff / norm_delta if norm_delta else float("inf"),
        norm_lora=norm_delta,
        norm_task_vector=float(torch.linalg.vector_norm(tau)),
        scale=scale,
        scale_sigma=norm_fit / (norm_delta * max(1, delta.numel()) ** 0.5) if norm_delta else float("inf"),
        fit_residual=norm_fit / norm_diff if norm_diff else 0.0,
        max_abs_fit_residual=float(fit.abs().max()) if fit.numel() else 0.0,
    )


def rounding_bound(
    base: torch.Tensor,
    lora_delta: torch.Tensor,
    dtype: torch.dtype,
    rank: int,
    product_magnitude: torch.Tensor | None = None,
    rounded_at_dtype: torch.Tensor | None = None,
) -> torch.Tensor:
    """Element-wise bound on |τ − Δ| that a merge at `dtype` can produce (float64).

    τ − Δ = (round(W) − W) + (round(round(W) + Δ) − (round(W) + Δ)) + (fp32 errors), so each element is
    within ½ ulp of W plus ½ ulp of the merged weight (at `dtype`), plus the fp32 arithmetic of the
    delta and of the subtraction. B @ A in fp32 errs by up to about r ulps of |s|·(|B| @ |A|)
    (`product_magnitude`), which exceeds |Δ| by orders of magnitude where the r products cancel.
    Any correct merge at a lower precision is covered, not only peft's: one that casts Δ to `dtype` before adding
    it (peft's safe_merge, its embeddings and target_parameters) adds ½ ulp of |Δ|; one that adds in fp32 and
    rounds once stays within ½ ulp of the merged weight. A merge that rounds one more intermediate to `dtype`
    (`rounded_at_dtype`, its magnitude: the PiSSA / OLoRA residual) adds ½ ulp of it.
    """
    w, delta = base.double(), lora_delta.double()
    merged = (w.abs() + delta.abs()).clamp_min(w.abs())
    magnitude = merged if product_magnitude is None else torch.maximum(merged, product_magnitude.double())
    fp32_slack = (rank + 2) * ulp(magnitude, torch.float32)
    extra = 0.0 if rounded_at_dtype is None else 0.5 * ulp(rounded_at_dtype.double(), dtype)
    if dtype == torch.float32:
        return 0.5 * ulp(merged, dtype) + fp32_slack + extra
    return 0.5 * ulp(w, dtype) + 0.5 * ulp(merged, dtype) + 0.5 * ulp(delta.abs(), dtype) + fp32_slack + extra


def add_rounding_check(
    result: TensorComparison,
    base: torch.Tensor,
    lora_delta: torch.Tensor,
    task_vector: torch.Tensor,
    dtype: torch.dtype,
    rank: int,
    product_magnitude: torch.Tensor | None = None,
    rounded_at_dtype: torch.Tensor | None = None,
) -> None:
    """Record whether every difference is explained by rounding at the merge dtype, and the worst in ulps."""
    diff = (task_vector.double() - lora_delta.double()).abs()
    bound = rounding_bound(base, lora_delta, dtype, rank, product_magnitude, rounded_at_dtype)
    result.within_rounding = bool((diff <= bound).all())
    ulps = residual_ulps(base, lora_delta, task_vector, dtype)
    result.max_diff_ulps = float(ulps.abs().max()) if ulps.numel() else 0.0


def residual_ulps(
    base: torch.Tensor, lora_delta: torch.Tensor, task_vector: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(τ − Δ) element by element in ulps of `dtype` at the merged weight's magnitude |W| + |Δ| (float64)."""
    delta = lora_delta.double()
    return (task_vector.double() - delta) / ulp(base.double().abs() + delta.abs(), dtype)


def ulp_sample(
    base: torch.Tensor, lora_delta: torch.Tensor, task_vector: torch.Tensor, dtype: torch.dtype, size: int = 20000
) -> torch.Tensor:
    """Up to `size` evenly spaced elements of (τ − Δ) in ulps of `dtype` at the merged weight (float32, CPU)."""
    return evenly_spaced(residual_ulps(base, lora_delta, task_vector, dtype), size)


def evenly_spaced(values: torch.Tensor, size: int = 20000) -> torch.Tensor:
    """Up to `size` evenly spaced elements of a tensor, flattened (float32, CPU): a histogram's sample."""
    flat = values.flatten()
    return flat[:: max(1, flat.numel() // size)].float().cpu()
