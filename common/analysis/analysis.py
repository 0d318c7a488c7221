"""Step 4's logic: the spectral analysis of every LoRA-adapted tensor against τ, and of τ's other changed
matrices on their own (with no LoRA: of all of them), aggregated by module and layer; each changed tensor is
handed to the LoRA export while it is in memory."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from common.analysis.export import LoraExport, LoraExporter
from common.compare.comparison import compare_pair, new_comparison
from common.compare.diagnosis import Diagnosis, diagnose
from common.compare.quantized_merge import QuantizedMerge, quantized_pattern
from common.errors import UserError
from common.io.safetensors_io import CheckpointIndex
from common.io.tensor_source import TensorSource
from common.lora.adapter import Change, LoraAdapter, LoraTarget, ParameterPiece
from common.lora.arithmetic import product_magnitude
from common.lora.deltas import DeltaPlan, exact_delta, rounded_at_dtype
from common.model.quantization import FourBit
from common.numerics.finite import require_finite
from common.numerics.intruders import EPSILON, TOP_K, intruder_dimensions
from common.numerics.metrics import rounding_residual, squared_norm
from common.numerics.precision import dtype_from_name
from common.numerics.spectra import (
    TaskVectorSpectrum,
    TensorSpectrum,
    analyze_task_vector,
    analyze_tensor,
    factor_spectrum,
)
from common.taskvec.task_vector import ExtractionRecord, TauStatus, stored_status


@dataclass
class Measurements:
    """What the analysis loop measures, tensor by tensor (`analyze_files` fills it)."""

    tensors: list[TensorSpectrum] = field(default_factory=list)
    task_vector_tensors: list[TaskVectorSpectrum] = field(default_factory=list)  # τ's other changed matrices
    lora_only: list[str] = field(default_factory=list)
    not_matrices: list[str] = field(default_factory=list)  # biases and other vectors: no spectrum to analyse
    task_vector_only_nonzero: list[str] = field(default_factory=list)
    task_vector_only_unchanged: int = 0
    merge_dtype: str | None = None
    energy: dict[str, float] = field(default_factory=dict)  # ‖τ‖²_F of every non-zero tensor
    residual_energy: float = 0.0  # Σ ‖τ − Δ‖²_F over τ's tensors (Δ = 0 where the adapter does not reach)
    ulp_samples: list[torch.Tensor] = field(default_factory=list)  # per tensor, (τ − Δ) in ulps (with a base)


@dataclass(frozen=True)
class Analysis:
    """analyze's result, made once when everything is known: the measurements, where Δ came from, and what was
    concluded from them (compare's verdict, the 4-bit base found, the LoRA export)."""

    measured: Measurements
    lora_source: str | None = None  # lora_file, lora_path (Δ computed from the adapter in float64), or None (τ alone)
    quantized_base: str | None = None  # τ of a merge into this 4-bit base (compare's check), described
    verdict: Diagnosis | None = None  # compare's diagnosis of τ against Δ, from the same evidence (with an adapter)
    export: LoraExport | None = None  # --export_lora: τ as a LoRA adapter


class VerdictEvidence:
    """compare's evidence gathered while the analysis holds each Δ and τ (compare.compare_pair), and compare's
    diagnosis of it at the end: analyze's headline is compare's verdict, not a second one (tolerance: compare's
    default, 1e-5)."""

    TOLERANCE = 1e-5

    def __init__(
        self,
        adapter: LoraAdapter,
        plan: DeltaPlan,
        task_vector: TensorSource,
        base: CheckpointIndex | None,
        base_name: str | None,
        record: ExtractionRecord,
    ):
        self.adapter, self.plan, self.record = adapter, plan, record
        self.comparison = new_comparison(adapter, task_vector, base, base_name, self.TOLERANCE)

    def add(self, name: str, delta: torch.Tensor, tau: torch.Tensor, weight: torch.Tensor | None) -> None:
        if name in self.plan.changes:
            changes = self.plan.changes[name]
            compare_pair(self.comparison, name, delta, tau, weight, changes, self.adapter, self.record)

    def diagnose(
        self,
        task_vector: TensorSource,
        base: CheckpointIndex | None,
        known: Mapping[str, str],
        quantized: QuantizedMerge | None,
    ) -> Diagnosis:
        c = self.comparison
        c.lora_only = [s.name for s in self.plan.specs if s.name not in task_vector]
        c.lora_only_status = {n: known[n] for n in c.lora_only if n in known}
        for name in task_vector.names():
            if name not in self.plan.changes:
                c.task_vector_only[name] = stored_status(name, task_vector, base, c.merge_dtype, known)
        if quantized is not None:
            c.quantized = quantized
        elif base is None and FourBit.recorded(task_vector.metadata) is None:
            c.quantized = quantized_pattern(task_vector, c.task_vector_only)
        return diagnose(c)


@dataclass
class LoraDelta:
    """One Δ to analyse: its values, the base weight it changes (when known) and its SVD (when cheap)."""

    name: str
    delta: torch.Tensor
    base_weight: torch.Tensor | None = None
    spectrum: tuple[torch.Tensor, torch.Tensor] | None = None
    product_magnitude: torch.Tensor | None = None  # |s|·(|B| @ |A|): bounds B @ A's fp32 rounding
    rounded_at_dtype: torch.Tensor | None = None  # an intermediate the merge rounds (see metrics.rounding_bound)
    lora_rank: int | None = None  # the adapter's configured r (rank_pattern included), with --lora_path


LORA_RANKS = "lora_ranks"  # lora_deltas.safetensors' metadata: JSON of {tensor: the adapter's configured r}


def configured_rank(changes: list[Change]) -> int | None:
    """The adapter's configured r on one tensor (rank_pattern included), summed over the LoRAs that change it;
    None when none does (a bias, a replacement)."""
    ranks = [c.rank for c in changes if isinstance(c, LoraTarget | ParameterPiece)]
    return sum(ranks) if ranks else None


def ranks_metadata(plan: DeltaPlan) -> dict[str, str]:
    """lora_deltas.safetensors' header metadata: each Δ's configured rank, which analyze --lora_file reports."""
    ranks = {spec.name: configured_rank(plan.changes[spec.name]) for spec in plan.specs}
    return {LORA_RANKS: json.dumps({name: rank for name, rank in ranks.items() if rank is not None})}


def recorded_ranks(lora_deltas: CheckpointIndex) -> dict[str, int]:
    """The configured ranks compare recorded in lora_deltas.safetensors' header (none in a file that lacks them)."""
    text = lora_deltas.metadata.get(LORA_RANKS)
    if text is None:
        return {}
    try:
        ranks = json.loads(text)
    except (ValueError, RecursionError):
        ranks = None
    if not isinstance(ranks, dict) or not all(type(r) is int and r > 0 for r in ranks.values()):
        raise UserError(f"{lora_deltas.source}: corrupt {LORA_RANKS} metadata (not an object of tensors to ranks)")
    return ranks


def deltas_from_file(
    lora_deltas: CheckpointIndex, base: CheckpointIndex | None, device: torch.device
) -> Iterator[LoraDelta]:
    """Δ as compare saved it (fp32), with the base weight of the same name when a base is given, and the adapter's
    configured rank compare recorded."""
    ranks = recorded_ranks(lora_deltas)
    for name in lora_deltas.names():
        weight = base.read(name).to(device) if base is not None and name in base else None
        delta = lora_deltas.read(name).to(device)
        require_finite(delta, f"{lora_deltas.source}: tensor {name}")
        yield LoraDelta(name, delta, weight, lora_rank=ranks.get(name))


def deltas_from_adapter(
    adapter: LoraAdapter,
    plan: DeltaPlan,
    base: CheckpointIndex | None,
    device: torch.device,
    merge_dtype: torch.dtype | None = None,
) -> Iterator[LoraDelta]:
    """Δ from the adapter in float64 as the merge (at `merge_dtype`) computes it; a plain LoRA's SVD from its
    factors."""
    for spec in plan.specs:
        delta, weight = exact_delta(spec.name, plan, adapter, base, device, merge_dtype)
        changes = plan.changes[spec.name]
        target = changes[0] if len(changes) == 1 and isinstance(changes[0], LoraTarget) else None
        spectrum = None
        if target is not None and not target.dora and target.init is None:
            lora_a, lora_b = (f.to(device) for f in adapter.factors(target))
            transposed = target.fan_in_fan_out or target.embedding  # Δ = s·(B@A)ᵀ
            left, right = (lora_a.T, lora_b) if transposed else (lora_b, lora_a.T)
            spectrum = factor_spectrum(left, right, target.scaling)
        magnitude = product_magnitude(changes, adapter, delta, weight)
        rounded = rounded_at_dtype(changes, weight, delta, magnitude) if weight is not None else None
        yield LoraDelta(spec.name, delta, weight, spectrum, magnitude, rounded, configured_rank(changes))


def analyze_files(
    deltas: Iterable[LoraDelta] | None,
    task_vector: TensorSource,
    device: torch.device,
    on_tensor: Callable[[str], None] = lambda line: None,
    full_svd: bool = False,
    known_status: Mapping[str, str] | None = None,
    exporter: LoraExporter | None = None,
    base: CheckpointIndex | None = None,
    intruders: tuple[int, float] = (TOP_K, EPSILON),
    quantization: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
    verdict: VerdictEvidence | None = None,
) -> Measurements:
    """Analyze every matrix Δ against τ (none when `deltas` is None: τ alone), then τ's other changed matrices on
    their own; hand every changed tensor to `exporter`.

    The extraction's stats (`known_status`) say which of τ's other tensors are zero without reading them.
    """
    measured = Measurements(merge_dtype=task_vector.metadata.get("finetuned_dtype"))
    merge_dtype = dtype_from_name(measured.merge_dtype or "")
    seen = set()
    for item in deltas or []:
        seen.add(item.name)
        if item.name not in task_vector:
            measured.lora_only.append(item.name)
            continue
        tau = task_vector.read(item.name).to(device)
        require_finite(tau, f"{task_vector.source}: tensor {item.name}")
        if item.delta.shape != tau.shape:
            raise UserError(
                f"{item.name}: LoRA delta {list(item.delta.shape)} and task vector {list(tau.shape)} do not match"
            )
        if verdict is not None:
            verdict.add(item.name, item.delta, tau, item.base_weight)
        if item.delta.dim() != 2:
            _count_energy(measured, item.name, squared_norm(tau), squared_norm(tau, item.delta))
            measured.not_matrices.append(item.name)
            if exporter is not None:
                exporter.add(item.name, tau, item.base_weight, item.delta)
            continue
        spectrum, decomposition = analyze_tensor(
            item.name, item.delta, tau, torch.float32, full_svd, item.spectrum, item.base_weight
        )
        spectrum.lora_rank = item.lora_rank
        _count_energy(measured, item.name, decomposition.energy, spectrum.residual_rms**2 * tau.numel())
        spectrum.intruder_dimensions = count_intruders(item.base_weight, tau, intruders)
        if quantization is not None and item.base_weight is not None:
            add_quantization(spectrum, quantization(item.name, item.base_weight), item.delta, tau)
        if item.base_weight is not None and merge_dtype is not None and item.base_weight.shape == tau.shape:
            measured.ulp_samples.append(add_residual_in_ulps(spectrum, item, tau, merge_dtype))
        measured.tensors.append(spectrum)
        if exporter is not None:
            exporter.add(item.name, tau, item.base_weight, item.delta, decomposition)
        on_tensor(
            f"{item.name}: rank Δ {spectrum.rank_lora}, rank τ {spectrum.rank_task_vector}, "
            f"angle {spectrum.principal_angle_deg:.2e}°, rel. error {spectrum.rel_error:.2e}"
        )
    if deltas is not None and not measured.tensors:
        raise UserError("no LoRA-adapted tensor is in the task vector file: not the same model")
    for name in task_vector.names():
        if name not in seen:
            analyze_other(
                measured, name, task_vector, device, full_svd, known_status, exporter, base, on_tensor, intruders
            )
    if not measured.tensors and not measured.task_vector_tensors and exporter is None:
        raise UserError(f"{task_vector.source}: no tensor of τ changed: nothing to analyse")
    return measured


def analyze_other(
    measured: Measurements,
    name: str,
    task_vector: TensorSource,
    device: torch.device,
    full_svd: bool,
    known_status: Mapping[str, str] | None,
    exporter: LoraExporter | None,
    base: CheckpointIndex | None,
    on_tensor: Callable[[str], None],
    intruders: tuple[int, float] = (TOP_K, EPSILON),
) -> None:
    """A tensor of τ the LoRA does not reach: counted when zero; else its energy, and for a changed matrix its rank
    profile (analyze_task_vector); handed to the export unless it is only the base's rounding."""
    merge_dtype = dtype_from_name(measured.merge_dtype or "")
    status = stored_status(name, task_vector, None, merge_dtype, known_status)
    if status == TauStatus.UNCHANGED:
        measured.task_vector_only_unchanged += 1
        return
    measured.task_vector_only_nonzero.append(name)
    tau = task_vector.read(name).to(device)
    require_finite(tau, f"{task_vector.source}: tensor {name}")
    energy = squared_norm(tau)
    _count_energy(measured, name, energy, energy)
    if status == TauStatus.ROUNDING_ARTIFACT:
        if exporter is not None:
            exporter.skip(name, "only the base's rounding to the merge's dtype: nothing learned", tau)
        return
    decomposition = None
    weight = base.read(name).to(device) if base is not None and name in base else None
    if tau.dim() == 2 and min(tau.shape) > 1:
        spectrum, decomposition = analyze_task_vector(name, tau, torch.float32, full_svd)
        spectrum.intruder_dimensions = count_intruders(weight, tau, intruders)
        measured.task_vector_tensors.append(spectrum)
        on_tensor(f"{name}: rank τ {spectrum.rank}, 90% of ‖τ‖² in {spectrum.energy_rank_90} directions")
    if exporter is not None:
        exporter.add(name, tau, weight, None, decomposition)


def add_quantization(
    spectrum: TensorSpectrum, quantization: torch.Tensor | None, delta: torch.Tensor, tau: torch.Tensor
) -> None:
    """A QLoRA merge's quantization q = deq(Q(W)) − W against Δ (‖q‖/‖Δ‖) and the share of ‖τ − Δ‖² it explains,
    1 − ‖τ − Δ − q‖²/‖τ − Δ‖² (float64)."""
    if quantization is None:
        return
    q, residual = quantization.double(), tau.double() - delta.double()
    spectrum.quantization_ratio = float(q.norm() / delta.double().norm()) if delta.any() else None
    left = float((residual - q).square().sum())
    whole = float(residual.square().sum())
    spectrum.quantization_explained = 1 - left / whole if whole else None


def count_intruders(weight: torch.Tensor | None, tau: torch.Tensor, settings: tuple[int, float]) -> int | None:
    """Intruder dimensions of W₀ + τ (common/numerics/intruders.py), with the base weight and k > 0; else None."""
    k, epsilon = settings
    if weight is None or k <= 0 or weight.shape != tau.shape or tau.dim() != 2:
        return None
    return intruder_dimensions(weight, tau, k, epsilon).count


def _count_energy(measured: Measurements, name: str, energy: float, residual_energy: float) -> None:
    """‖τ‖²_F of this tensor, and ‖τ − Δ‖²_F: what the adapter leaves of it (all of it where Δ does not reach)."""
    measured.energy[name] = energy
    measured.residual_energy += residual_energy


def add_residual_in_ulps(
    spectrum: TensorSpectrum, item: LoraDelta, tau: torch.Tensor, merge_dtype: torch.dtype
) -> torch.Tensor:
    """τ − Δ in ulps of the merge dtype (max, RMS, a sample for the histogram returned); with the factors,
    whether every element is within the rounding a merge at that dtype can make."""
    rank = max(spectrum.rank_lora, 1)
    residual = rounding_residual(
        item.base_weight, item.delta, tau, merge_dtype, rank, item.product_magnitude, item.rounded_at_dtype
    )
    spectrum.residual_max_ulps, spectrum.residual_rms_ulps = residual.max_ulps, residual.rms_ulps
    spectrum.within_rounding = residual.within_rounding
    return residual.ulp_sample
