"""Step 3's logic: LoRA deltas from the adapter files, compared with the task vector tensor by tensor.

Sets of tensors:
- shared: adapted by the LoRA and present in the task vector, compared element by element;
- lora_only: adapted by the LoRA but missing from the task vector;
- task_vector_only: in the task vector, not adapted by the LoRA; each is `zero`, a `rounding_artifact`
  (non-zero only because a low-precision merge rounded the base) or `changed`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from common.adapter import LoraAdapter, LoraTarget
from common.errors import UserError
from common.lora import lora_delta
from common.metrics import PERFECT_COSINE, TensorComparison, add_rounding_check, compare_tensor
from common.precision import dtype_from_name, is_rounding_artifact_of_delta, short_name
from common.safetensors_io import CheckpointIndex, SafetensorsWriter, TensorSpec

UNCLASSIFIED = "unclassified"


@dataclass
class Comparison:
    tolerance: float
    merge_dtype: torch.dtype | None
    shared: list[TensorComparison] = field(default_factory=list)
    lora_only: list[str] = field(default_factory=list)
    task_vector_only: dict[str, str] = field(default_factory=dict)  # name -> zero | rounding_artifact | ...

    def only_count(self, status: str) -> int:
        return sum(1 for s in self.task_vector_only.values() if s == status)


@dataclass
class Verdict:
    equivalent: bool
    reason: str


def compare_adapter(
    adapter: LoraAdapter,
    task_vector: CheckpointIndex,
    deltas_writer: SafetensorsWriter,
    device: torch.device,
    tolerance: float,
    base: CheckpointIndex | None = None,
    known_status: dict[str, str] | None = None,
    on_tensor: Callable[[str], None] = lambda line: None,
) -> Comparison:
    """Compute each Δ in float64, save it (fp32) and compare it with τ; classify τ-only tensors."""
    check_plain_lora(adapter)
    merge_dtype = dtype_from_name(task_vector.metadata.get("finetuned_dtype", ""))
    comparison = Comparison(tolerance=tolerance, merge_dtype=merge_dtype)
    for name, target in adapter.targets.items():
        factors = [f.to(device) for f in adapter.factors(target)]
        delta = lora_delta(target, *factors, compute_dtype=torch.float64)
        deltas_writer.write(name, delta.float())
        if name not in task_vector:
            comparison.lora_only.append(name)
            continue
        tau = task_vector.read(name).to(device)
        result = compare_tensor(name, delta, tau)
        if base is not None and merge_dtype is not None and name in base:
            add_rounding_check(result, base.read(name).to(device), delta, tau, merge_dtype, target.rank)
        result.status = "match" if result.max_abs_diff <= tolerance else "mismatch"
        comparison.shared.append(result)
        on_tensor(f"{name}: cosine {result.cosine:.6f}, max |τ−Δ| {result.max_abs_diff:.2e}, {result.status}")
    for name in task_vector.names():
        if name not in adapter.targets:
            comparison.task_vector_only[name] = classify_other(name, task_vector, base, merge_dtype, known_status)
    return comparison


def check_plain_lora(adapter: LoraAdapter) -> None:
    """Compare rebuilds Δ = scaling·B@A; other changes (DoRA, biases, copies) need the base and are not done yet."""
    other = [c for cs in adapter.changes.values() for c in cs if not isinstance(c, LoraTarget) or c.magnitude_key]
    if other:
        kinds = sorted({"DoRA" if isinstance(c, LoraTarget) else type(c).__name__ for c in other})
        raise UserError(
            f"adapter {adapter.folder}: compare handles plain LoRA updates only so far, and this adapter also "
            f"holds {', '.join(kinds)} changes ({len(other)} tensors); merge and extract work for it"
        )


def lora_delta_specs(adapter: LoraAdapter) -> list[TensorSpec]:
    """The shapes of `lora_deltas.safetensors`, known before any delta is computed."""
    return [TensorSpec(name, torch.float32, target.shape) for name, target in adapter.targets.items()]


def classify_other(
    name: str,
    task_vector: CheckpointIndex,
    base: CheckpointIndex | None,
    merge_dtype: torch.dtype | None,
    known_status: dict[str, str] | None,
) -> str:
    """zero / rounding_artifact / changed for a tensor the adapter does not touch.

    The extraction's own classification is used when available; otherwise τ is read, and telling a
    rounding artifact from a change needs the base weights and the merge dtype.
    """
    status = (known_status or {}).get(name)
    if status is not None:
        return "zero" if status == "unchanged" else status
    tau = task_vector.read(name)
    if not torch.count_nonzero(tau):
        return "zero"
    if base is None or merge_dtype is None or name not in base:
        return UNCLASSIFIED
    if merge_dtype != torch.float32 and is_rounding_artifact_of_delta(base.read(name), tau, merge_dtype):
        return "rounding_artifact"
    return "changed"


def verdict(comparison: Comparison) -> Verdict:
    """Equivalent when every shared tensor is within tolerance and nothing else changed; else why not."""
    failing = [c for c in comparison.shared if c.status != "match"]
    changed = [n for n, s in comparison.task_vector_only.items() if s == "changed"]
    unclassified = [n for n, s in comparison.task_vector_only.items() if s == UNCLASSIFIED]
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
    if all(c.within_rounding for c in failing) and dtype is not None:
        return f"{count}, all within {short_name(dtype)} rounding of the merged weights: merge at fp32 to remove it"
    scales = [c.scale for c in comparison.shared]
    mean_cosine = statistics.fmean(c.cosine for c in comparison.shared)
    if min(c.cosine for c in comparison.shared) > PERFECT_COSINE and max(scales) - min(scales) < 1e-3 * max(scales):
        return f"{count}: τ = {statistics.fmean(scales):.6g}·Δ everywhere, a scaling mismatch ({_scale_hint(scales)})"
    if abs(mean_cosine) < 0.1:
        return f"{count}, with cosine near 0 (mean {mean_cosine:.3f}): the task vector is of another adapter or model"
    if dtype is not None and dtype != torch.float32:
        return f"{count}; the task vector comes from a {short_name(dtype)} merge: pass --base_model to check rounding"
    return count


def _scale_hint(scales: list[float]) -> str:
    c = statistics.fmean(scales)
    return f"c² = {c * c:.4g}: c = √r means alpha/√r (rsLoRA) was used where alpha/r was meant, 1/√r the reverse"
