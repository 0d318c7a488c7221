"""Per-tensor agreement between a task vector τ and a LoRA delta Δ, in float64.

A cosine is at most 1 in exact arithmetic; it is computed in float64 and clamped to [−1, 1] so that
rounding can never report more (the original write-up's 1.225 was a bug).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.numerics.precision import ulp

PERFECT_COSINE = 0.9999


def chunk_elements(device: torch.device) -> int:
    """Elements per chunk of an element-wise pass: on a CPU 2¹⁶ (512 KB of float64 per temporary, which stays in
    cache, is recycled by malloc and still splits across two threads; chunks of 2¹⁴ pay Python's overhead per op,
    chunks of 2²⁰ run 2–3× slower on a 2-core machine), on a GPU 2²⁴ (few kernel launches)."""
    return 1 << 16 if device.type == "cpu" else 1 << 24


def max_abs(x: torch.Tensor) -> float:
    """max |x| (0 for an empty tensor), without a copy of |x|."""
    if not x.numel():
        return 0.0
    low, high = torch.aminmax(x)
    return max(-float(low), float(high))


def squared_norm(x: torch.Tensor, minus: torch.Tensor | None = None) -> float:
    """‖x‖²_F, or ‖x − y‖²_F, in float64 over chunks (no float64 copy of the whole tensor)."""
    flat, other = x.reshape(-1), None if minus is None else minus.reshape(-1)
    size, total = chunk_elements(flat.device), torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), size):
        part = flat[start : start + size].double()
        if other is not None:
            part = part - other[start : start + size].double()
        total += part.dot(part)
    return float(total)


@dataclass
class TensorComparison:
    """How one LoRA-adapted tensor's task vector agrees with its LoRA delta."""

    name: str
    cosine: float
    max_abs_diff: float
    rel_error: float  # ‖τ − Δ‖ / ‖Δ‖
    norm_lora: float
    norm_task_vector: float
    norm_diff: float  # ‖τ − Δ‖
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
    return cosine_of(float(x.dot(y)), float(x.dot(x)) ** 0.5, float(y.dot(y)) ** 0.5)


def compare_tensor(name: str, lora_delta: torch.Tensor, task_vector: torch.Tensor) -> TensorComparison:
    """Cosine, max |τ − Δ|, relative error, norms, and the least-squares scale c with how well τ ≈ c·Δ fits, all
    in float64, in two chunked passes (sums as dot products): the sums and c, then τ − cΔ."""
    delta, tau = lora_delta.reshape(-1), task_vector.reshape(-1)
    size = chunk_elements(delta.device)
    sums = torch.zeros(5, dtype=torch.float64, device=delta.device)  # ‖Δ‖², ‖τ‖², ⟨τ,Δ⟩, ‖τ−Δ‖², max|τ−Δ|
    for start in range(0, delta.numel(), size):
        d, t = delta[start : start + size].double(), tau[start : start + size].double()
        diff = t - d
        part = torch.stack([d.dot(d), t.dot(t), t.dot(d), diff.dot(diff), diff.abs().max()])
        sums[:4] += part[:4]
        sums[4] = torch.maximum(sums[4], part[4])
    delta_sq, tau_sq, inner, diff_sq, max_diff = sums.tolist()
    scale = inner / delta_sq if delta_sq else float("nan")
    fit_sums = torch.zeros(2, dtype=torch.float64, device=delta.device)  # ‖τ − cΔ‖², max|τ − cΔ|
    for start in range(0, delta.numel(), size):
        t = tau[start : start + size].double()
        fit = t - scale * delta[start : start + size].double() if delta_sq else t
        fit_sums[0] += fit.dot(fit)
        fit_sums[1] = torch.maximum(fit_sums[1], fit.abs().max())
    fit_sq, max_fit = fit_sums.tolist()
    norm_delta, norm_tau, norm_diff, norm_fit = (math.sqrt(x) for x in (delta_sq, tau_sq, diff_sq, fit_sq))
    return TensorComparison(
        name=name,
        cosine=cosine_of(inner, norm_delta, norm_tau),
        max_abs_diff=max_diff,
        rel_error=norm_diff / norm_delta if norm_delta else float("inf"),
        norm_lora=norm_delta,
        norm_task_vector=norm_tau,
        norm_diff=norm_diff,
        scale=scale,
        scale_sigma=norm_fit / (norm_delta * max(1, delta.numel()) ** 0.5) if norm_delta else float("inf"),
        fit_residual=norm_fit / norm_diff if norm_diff else 0.0,
        max_abs_fit_residual=max_fit,
    )


def cosine_of(inner: float, norm_x: float, norm_y: float) -> float:
    """⟨x,y⟩ / (‖x‖‖y‖) clamped to [−1, 1]; 1 for two zero tensors, 0 for one."""
    if norm_x == 0 or norm_y == 0:
        return 1.0 if norm_x == norm_y else 0.0
    return min(1.0, max(-1.0, inner / (norm_x * norm_y)))


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
    w_abs, delta_abs = base.double().abs(), lora_delta.double().abs()
    merged = (w_abs + delta_abs).clamp_min(w_abs)
    return bound_at(w_abs, delta_abs, merged, ulp(merged, dtype), dtype, rank, product_magnitude, rounded_at_dtype)


def bound_at(
    w_abs: torch.Tensor,
    delta_abs: torch.Tensor,
    merged: torch.Tensor,
    merged_ulp: torch.Tensor,
    dtype: torch.dtype,
    rank: int,
    product_magnitude: torch.Tensor | None,
    rounded_at_dtype: torch.Tensor | None,
) -> torch.Tensor:
    """rounding_bound's formula from |W|, |Δ|, the merged magnitude and its ulp at `dtype` (float64), for callers
    that already hold them (rounding_residual, chunk by chunk)."""
    magnitude = merged if product_magnitude is None else torch.maximum(merged, product_magnitude.double())
    fp32_slack = (rank + 2) * ulp(magnitude, torch.float32)
    extra = 0.0 if rounded_at_dtype is None else 0.5 * ulp(rounded_at_dtype.double(), dtype)
    if dtype == torch.float32:
        return 0.5 * merged_ulp + fp32_slack + extra
    return 0.5 * ulp(w_abs, dtype) + 0.5 * merged_ulp + 0.5 * ulp(delta_abs, dtype) + fp32_slack + extra


@dataclass
class RoundingResidual:
    """τ − Δ measured against the rounding of a merge at some dtype, element by element."""

    max_ulps: float  # max |τ − Δ| in ulps of the dtype at the merged weight's magnitude |W| + |Δ|
    rms_ulps: float
    ulp_sample: torch.Tensor  # (τ − Δ) in those ulps at every ⌊n / sample_size⌋-th element (float32, CPU)
    within_rounding: bool | None  # every |τ − Δ| within rounding_bound; None without the product magnitude


def rounding_residual(
    base: torch.Tensor,
    lora_delta: torch.Tensor,
    task_vector: torch.Tensor,
    dtype: torch.dtype,
    rank: int,
    product_magnitude: torch.Tensor | None = None,
    rounded_at_dtype: torch.Tensor | None = None,
    sample_size: int = 20000,
) -> RoundingResidual:
    """(τ − Δ) / ulp_dtype(|W| + |Δ|) and |τ − Δ| ≤ rounding_bound, element by element in one pass over
    contiguous chunks, with the same float64 expressions as rounding_bound (so the same value for every element),
    |W|, |Δ| and the merged weight's ulp computed once. The bound is only a bound with the product magnitude (the
    fp32 rounding of B @ A), so without it `within_rounding` is None."""
    w, delta, tau = base.reshape(-1), lora_delta.reshape(-1), task_vector.reshape(-1)
    magnitude = None if product_magnitude is None else product_magnitude.reshape(-1)
    rounded = None if rounded_at_dtype is None else rounded_at_dtype.expand_as(base).reshape(-1)
    count, step, size = w.numel(), max(1, w.numel() // sample_size), chunk_elements(w.device)
    zero = torch.zeros((), dtype=torch.float64, device=w.device)
    worst, square_sum, beyond, samples = zero, zero, zero, []
    for start in range(0, count, size):
        part = slice(start, start + size)
        w_abs, delta_part = w[part].double().abs(), delta[part].double()
        diff = tau[part].double() - delta_part
        delta_abs = delta_part.abs()
        merged = w_abs + delta_abs  # ≥ |W|, as rounding_bound's clamp makes sure
        merged_ulp = ulp(merged, dtype)
        ulps = diff / merged_ulp
        worst = torch.maximum(worst, ulps.abs().max())
        square_sum = square_sum + torch.dot(ulps, ulps)
        samples.append(ulps[-start % step :: step].float())
        if magnitude is not None:
            extra = None if rounded is None else rounded[part]
            bound = bound_at(w_abs, delta_abs, merged, merged_ulp, dtype, rank, magnitude[part], extra)
            beyond = beyond + (diff.abs() > bound).sum()
    return RoundingResidual(
        max_ulps=float(worst),
        rms_ulps=(float(square_sum) / count) ** 0.5 if count else 0.0,
        ulp_sample=torch.cat(samples).cpu() if samples else torch.empty(0),
        within_rounding=None if magnitude is None else not bool(beyond),
    )
