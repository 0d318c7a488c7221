"""Step 3's logic: LoRA deltas from the adapter files, compared with the task vector tensor by tensor.

Sets of tensors:
- shared: adapted by the LoRA and present in the task vector, compared element by element;
- lora_only: adapted by the LoRA but missing from the task vector;
- task_vector_only: in the task vector, not adapted by the LoRA; each is `zero`, a `rounding_artifact`
  (non-zero only because a low-precision merge rounded the base) or `changed`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from common.adapter import (
    Change,
    LoraAdapter,
    LoraTarget,
    ParameterPiece,
    lora_scaling,
)
from common.errors import UserError
from common.finite import require_finite
from common.lora import DeltaPlan, apply_changes, common_rows, exact_delta, product_magnitude, rounded_at_dtype
from common.metrics import PERFECT_COSINE, TensorComparison, add_rounding_check, compare_tensor, ulp_sample
from common.precision import dtype_from_name, short_name
from common.safetensors_io import CheckpointIndex, SafetensorsWriter
from common.task_vector import TauStatus, stored_status


@dataclass
class Comparison:
    tolerance: float
    merge_dtype: torch.dtype | None
    scaling: tuple[float, int, bool]  # the adapter's lora_alpha, r and use_rslora, to read a scale factor
    shared: list[TensorComparison] = field(default_factory=list)
    lora_only: list[str] = field(default_factory=list)
    task_vector_only: dict[str, TauStatus] = field(default_factory=dict)
    ulp_errors: list[torch.Tensor] = field(default_factory=list)  # per tensor, a sample of (τ − Δ) in ulps

    def only_count(self, status: TauStatus) -> int:
        return sum(1 for s in self.task_vector_only.values() if s == status)


@dataclass
class Verdict:
    equivalent: bool
    reason: str


def check_task_vector_shapes(plan: DeltaPlan, task_vector: CheckpointIndex) -> None:
    """Every Δ must have the shape of the τ it is compared with (an adapter of another model has not)."""
    wrong = [
        f"{s.name} {list(task_vector.info(s.name).shape)} vs Δ {list(s.shape)}"
        for s in plan.specs
        if s.name in task_vector and task_vector.info(s.name).shape != tuple(s.shape)
    ]
    if wrong:
        raise UserError(
            f"{task_vector.source}: {len(wrong)} tensors do not have the shape of the adapter's deltas "
            f"(built for another model?): {'; '.join(wrong[:3])}"
        )


def compare_adapter(
    adapter: LoraAdapter,
    plan: DeltaPlan,
    task_vector: CheckpointIndex,
    deltas_writer: SafetensorsWriter,
    device: torch.device,
    tolerance: float,
    base: CheckpointIndex | None = None,
    known_status: dict[str, str] | None = None,
    on_tensor: Callable[[str], None] = lambda line: None,
) -> Comparison:
    """Compute each Δ in float64, save it (fp32) and compare it with τ; classify τ-only tensors."""
    merge_dtype = dtype_from_name(task_vector.metadata.get("finetuned_dtype", ""))
    config = adapter.config
    scaling = (config.get("lora_alpha", 8), config.get("r", 8), bool(config.get("use_rslora", False)))
    comparison = Comparison(tolerance=tolerance, merge_dtype=merge_dtype, scaling=scaling)
    check_task_vector_shapes(plan, task_vector)
    for spec in plan.specs:
        delta, weight = exact_delta(spec.name, plan, adapter, base, device, merge_dtype)
        deltas_writer.write(spec.name, delta.float())
        if spec.name not in task_vector:
            comparison.lora_only.append(spec.name)
            continue
        tau = task_vector.read(spec.name).to(device)
        require_finite(tau, f"{task_vector.source}: task vector tensor {spec.name}")
        result = compare_tensor(spec.name, delta, tau)
        if weight is not None and merge_dtype is not None:
            check_rounding(result, comparison, weight, delta, tau, plan.changes[spec.name], adapter)
        result.status = "match" if result.max_abs_diff <= tolerance else "mismatch"
        comparison.shared.append(result)
        on_tensor(f"{spec.name}: cosine {result.cosine:.6f}, max |τ−Δ| {result.max_abs_diff:.2e}, {result.status}")
    for name in task_vector.names():
        if name not in plan.changes:
            comparison.task_vector_only[name] = stored_status(name, task_vector, base, merge_dtype, known_status)
    return comparison


def check_rounding(
    result: TensorComparison,
    comparison: Comparison,
    weight: torch.Tensor,
    delta: torch.Tensor,
    tau: torch.Tensor,
    changes: list[Change],
    adapter: LoraAdapter,
) -> None:
    """Is τ − Δ what a merge at the recorded dtype makes? Both by the rounding bound and by redoing that merge."""
    dtype = comparison.merge_dtype
    rank = max((c.rank for c in changes if isinstance(c, LoraTarget | ParameterPiece)), default=1)
    magnitude = product_magnitude(changes, adapter, delta, weight)
    rounded = rounded_at_dtype(changes, weight, delta, magnitude)
    add_rounding_check(result, weight, delta, tau, dtype, rank, magnitude, rounded)
    merged = common_rows(apply_changes(weight.to(dtype, copy=True), changes, adapter), weight)  # adds in place
    result.reproduces_merge = torch.equal(merged.to(tau.dtype) - weight.to(tau.dtype), tau)
    comparison.ulp_errors.append(ulp_sample(weight, delta, tau, dtype))


def verdict(comparison: Comparison) -> Verdict:
    """Equivalent when every shared tensor is within tolerance and nothing else changed; else why not."""
    failing = [c for c in comparison.shared if c.status != "match"]
    changed = [n for n, s in comparison.task_vector_only.items() if s == TauStatus.CHANGED]
    unclassified = [n for n, s in comparison.task_vector_only.items() if s == TauStatus.UNCLASSIFIED]
    if not comparison.shared:
        return Verdict(False, "no LoRA-adapted tensor is in the task vector: is it from another model?")
    if failing:
        return Verdict(False, _why_different(comparison, failing))
    if changed:
        return Verdict(
            False,
            f"{len(changed)} tensors the adapter does not touch changed too (e.g. {changed[0]}): "
            "the finetuned model holds more than this adapter",
        )
    if unclassified:
        return Verdict(
            False,
            f"{len(unclassified)} tensors the adapter does not touch are non-zero (e.g. {unclassified[0]}); "
            "pass --base_model (or keep task_vector_stats.json beside the task vector) to tell rounding "
            "artifacts from real changes",
        )
    if comparison.lora_only:
        return Verdict(False, f"{len(comparison.lora_only)} adapted tensors are missing from the task vector")
    return Verdict(True, "LoRA and Task Vectors are mathematically equivalent!")


def _why_different(comparison: Comparison, failing: list[TensorComparison]) -> str:
    count = f"{len(failing)}/{len(comparison.shared)} tensors differ by more than {comparison.tolerance:g}"
    dtype = comparison.merge_dtype
    if dtype is not None and all(c.within_rounding or c.reproduces_merge for c in failing):
        exact = all(c.reproduces_merge for c in comparison.shared)
        how = f"; τ is bit for bit what a {short_name(dtype)} merge of this adapter gives" if exact else ""
        return (
            f"{count}, all within {short_name(dtype)} rounding of the merged weights{how}: merge at fp32 to remove it"
        )
    scales = [c.scale for c in comparison.shared]
    mean_cosine = statistics.fmean(c.cosine for c in comparison.shared)
    if min(c.cosine for c in comparison.shared) > PERFECT_COSINE and max(scales) - min(scales) < 1e-3 * max(scales):
        return f"{count}: {_scale_reading(statistics.fmean(scales), *comparison.scaling)}"
    if abs(mean_cosine) < 0.1:
        return f"{count}, with cosine near 0 (mean {mean_cosine:.3f}): the task vector is of another adapter or model"
    if dtype is not None and dtype != torch.float32:
        return f"{count}; the task vector comes from a {short_name(dtype)} merge: pass --base_model to check rounding"
    return count


def _scale_reading(c: float, alpha: float, rank: int, use_rslora: bool) -> str:
    """τ = c·Δ in every tensor: say which scaling the merge must have used."""
    reading = (
        f"τ = {c:.6g}·Δ in every tensor, a scaling mismatch: the merge scaled B@A by {c:.4g}× the adapter's "
        f"{'alpha/√r' if use_rslora else 'alpha/r'} = {lora_scaling(alpha, rank, use_rslora):.6g}, "
        f"as if lora_alpha were {c * alpha:.6g} instead of {alpha:g}"
    )
    root = math.sqrt(rank)
    if abs(c - root) < 1e-3 * root or abs(c - 1 / root) < 1e-3 / root:
        reading += f"; c = {'√r' if c > 1 else '1/√r'} for r = {rank}: alpha/√r (rsLoRA) and alpha/r were mixed up"
    return reading
