"""Step 3's logic: LoRA deltas from the adapter files, compared with the task vector tensor by tensor.

Sets of tensors:
- shared: adapted by the LoRA and present in the task vector, compared element by element;
- lora_only: adapted by the LoRA but missing from the task vector;
- task_vector_only: in the task vector, not adapted by the LoRA, each with its status (task_vector.TauStatus).

Each shared tensor gets the evidence the diagnosis (common/compare/diagnosis.py) reads: the metrics, the scale fit, what
τ holds there, the most a merge at the recorded dtype can round, and (with the base) the element-wise check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from common.compare.quantized_merge import QuantizedMerge
from common.errors import UserError
from common.io.safetensors_io import CheckpointIndex, SafetensorsWriter
from common.lora.adapter import BiasUpdate, Change, LoraAdapter, LoraTarget, ParameterPiece
from common.lora.arithmetic import apply_changes, common_rows, product_magnitude
from common.lora.config import AdapterConfig, ModuleScaling
from common.lora.deltas import DeltaPlan, exact_delta, rounded_at_dtype
from common.model.layout import fingerprint
from common.model.quantization import FourBit
from common.numerics.finite import require_finite
from common.numerics.metrics import TensorComparison, compare_tensor, max_abs, rounding_bound, rounding_residual
from common.numerics.precision import dtype_from_name
from common.taskvec.task_vector import ExtractionRecord, TauStatus, status_of, stored_status


@dataclass(frozen=True)
class BaseIdentity:
    """The base τ was extracted against (τ's header) and the one given with --base_model, by name and
    fingerprint (model_layout.fingerprint)."""

    recorded: str | None = None
    recorded_fingerprint: str | None = None
    given: str | None = None
    given_fingerprint: str | None = None
    recorded_finetuned_fingerprint: str | None = None

    @property
    def swapped(self) -> bool:
        """The base given is the model τ calls finetuned (and τ's two models are told apart): τ was extracted as
        base − finetuned."""
        told_apart = self.recorded_finetuned_fingerprint != self.recorded_fingerprint
        return (
            bool(self.given_fingerprint)
            and told_apart
            and self.given_fingerprint == self.recorded_finetuned_fingerprint
        )

    @property
    def differs(self) -> bool:
        known = bool(self.recorded_fingerprint and self.given_fingerprint)
        return known and self.recorded_fingerprint != self.given_fingerprint and not self.swapped


@dataclass
class Comparison:
    tolerance: float
    merge_dtype: torch.dtype | None
    config: AdapterConfig  # the adapter's: its lora_alpha, alpha_pattern and use_rslora name a scale factor
    identity: BaseIdentity = field(default_factory=BaseIdentity)
    shared: list[TensorComparison] = field(default_factory=list)
    scalings: dict[str, ModuleScaling] = field(default_factory=dict)  # each shared tensor's own LoRA scale, if any
    lora_only: list[str] = field(default_factory=list)
    lora_only_status: dict[str, str] = field(default_factory=dict)  # the extraction's status of those, if any
    task_vector_only: dict[str, TauStatus] = field(default_factory=dict)
    ulp_errors: list[torch.Tensor] = field(default_factory=list)  # per tensor, a sample of (τ − Δ) in ulps
    with_base: bool = False
    quantized: QuantizedMerge | None = None  # τ of a merge into a 4-bit base (common/compare/quantized_merge.py)
    base_4bit: str | None = None  # the 4-bit base τ was extracted against (its header), described

    def only_count(self, status: TauStatus) -> int:
        return sum(1 for s in self.task_vector_only.values() if s == status)


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
    record: ExtractionRecord | None = None,
    on_tensor: Callable[[str], None] = lambda line: None,
    base_name: str | None = None,
) -> Comparison:
    """Compute each Δ in float64, save it (fp32) and compare it with τ; classify τ-only tensors."""
    record = record or ExtractionRecord()
    comparison = new_comparison(adapter, task_vector, base, base_name, tolerance)
    merge_dtype = comparison.merge_dtype
    check_task_vector_shapes(plan, task_vector)
    for spec in plan.specs:
        delta, weight = exact_delta(spec.name, plan, adapter, base, device, merge_dtype)
        deltas_writer.write(spec.name, delta.float())
        if spec.name not in task_vector:
            comparison.lora_only.append(spec.name)
            if spec.name in record.status:  # left out of τ by --skip_unchanged: the stats still say what it holds
                comparison.lora_only_status[spec.name] = record.status[spec.name]
            continue
        tau = task_vector.read(spec.name).to(device)
        require_finite(tau, f"{task_vector.source}: task vector tensor {spec.name}")
        result = compare_pair(comparison, spec.name, delta, tau, weight, plan.changes[spec.name], adapter, record)
        on_tensor(f"{spec.name}: cosine {result.cosine:.6f}, max |τ−Δ| {result.max_abs_diff:.2e}, {result.status}")
    for name in task_vector.names():
        if name not in plan.changes:
            comparison.task_vector_only[name] = stored_status(name, task_vector, base, merge_dtype, record.status)
    return comparison


def new_comparison(
    adapter: LoraAdapter,
    task_vector: CheckpointIndex,
    base: CheckpointIndex | None,
    base_name: str | None,
    tolerance: float,
) -> Comparison:
    """An empty comparison of this τ with this adapter: the merge dtype and the 4-bit base τ's header records, the
    adapter's config, and the identities of the base τ records and of the one given."""
    merge_dtype = dtype_from_name(task_vector.metadata.get("finetuned_dtype", ""))
    identity = BaseIdentity(
        recorded=task_vector.metadata.get("base_model"),
        recorded_fingerprint=task_vector.metadata.get("base_fingerprint"),
        given=base_name,
        given_fingerprint=fingerprint(base) if base is not None else None,
        recorded_finetuned_fingerprint=task_vector.metadata.get("finetuned_fingerprint"),
    )
    comparison = Comparison(tolerance, merge_dtype, adapter.config, identity, with_base=base is not None)
    four_bit = FourBit.recorded(task_vector.metadata)
    comparison.base_4bit = four_bit.describe() if four_bit else None
    return comparison


def compare_pair(
    comparison: Comparison,
    name: str,
    delta: torch.Tensor,
    tau: torch.Tensor,
    weight: torch.Tensor | None,
    changes: list[Change],
    adapter: LoraAdapter,
    record: ExtractionRecord,
) -> TensorComparison:
    """One adapted tensor's evidence (the metrics, τ's status, the rounding check or floor), added to the
    comparison: what compare reports and analyze's headline reads, from the same Δ and τ."""
    merge_dtype = comparison.merge_dtype
    result = compare_tensor(name, delta, tau)
    known = record.status.get(name)
    result.tau_status = (TauStatus(known) if known else status_of(tau, weight, merge_dtype)).value
    if weight is not None and merge_dtype is not None:
        check_rounding(result, comparison, weight, delta, tau, changes, adapter)
    elif merge_dtype is not None and name in record.base_max_abs:
        magnitude = product_magnitude(changes, adapter, delta)
        result.rounding_floor = rounding_floor(record.base_max_abs[name], delta, magnitude, merge_dtype, changes)
    result.status = "match" if result.max_abs_diff <= comparison.tolerance else "mismatch"
    comparison.shared.append(result)
    scaling = module_scaling(changes, comparison.config.use_rslora)
    if scaling is not None:
        comparison.scalings[name] = scaling
    return result


def module_scaling(changes: list[Change], use_rslora: bool) -> ModuleScaling | None:
    """The rank, alpha and scaling of the LoRA layer that changes this tensor (its rank_pattern and alpha_pattern
    entries applied), None for a tensor no LoRA product or bias scales."""
    for change in changes:
        match change:
            case LoraTarget() | BiasUpdate():
                return ModuleScaling(change.rank, change.alpha, use_rslora)
            case ParameterPiece():
                return ModuleScaling(change.target.rank, change.target.alpha, use_rslora)
    return None


def rounding_floor(
    base_max_abs: float, delta: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype, changes: list[Change]
) -> float:
    """The most a merge at `dtype` can round one element of this tensor: metrics.rounding_bound at the largest
    magnitudes (|W| from the extraction's record or the base, |Δ|, the product magnitude); it grows with each, so
    no element's bound exceeds it."""
    w = torch.tensor([base_max_abs], dtype=torch.float64)
    largest = torch.tensor([max_abs(delta)], dtype=torch.float64)
    product = torch.tensor([float(magnitude.max()) if magnitude.numel() else 0.0], dtype=torch.float64)
    rounded = rounded_at_dtype(changes, w, largest, product)
    return float(rounding_bound(w, largest, dtype, _rank(changes), product, rounded)[0])


def _rank(changes: list[Change]) -> int:
    return max((c.rank for c in changes if isinstance(c, LoraTarget | ParameterPiece)), default=1)


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
    magnitude = product_magnitude(changes, adapter, delta, weight)
    rounded = rounded_at_dtype(changes, weight, delta, magnitude)
    residual = rounding_residual(weight, delta, tau, dtype, _rank(changes), magnitude, rounded)
    result.within_rounding, result.max_diff_ulps = residual.within_rounding, residual.max_ulps
    result.rounding_floor = rounding_floor(max_abs(weight), delta, magnitude, dtype, changes)
    result.reproduces_merge = reproduces_merge(weight, tau, dtype, changes, adapter)
    comparison.ulp_errors.append(residual.ulp_sample)


def reproduces_merge(
    weight: torch.Tensor, tau: torch.Tensor, dtype: torch.dtype, changes: list[Change], adapter: LoraAdapter
) -> bool:
    """Is τ bit for bit what merging this tensor at `dtype` gives, on this device or on the CPU? A GPU's matmul may
    round B @ A otherwise than the CPU's (measured on an H200: 3 of 4096 fp32 elements one rounding apart), so a τ
    merged on the CPU and compared on cuda:0 is tried on the CPU too: the same verdict on every device."""
    devices = [weight.device] + ([torch.device("cpu")] if weight.device.type != "cpu" else [])
    for device in devices:
        on_device = weight.to(device)
        merged = common_rows(apply_changes(on_device.to(dtype, copy=True), changes, adapter), on_device)  # in place
        if torch.equal(merged.to(tau.dtype) - on_device.to(tau.dtype), tau.to(device)):
            return True
    return False
