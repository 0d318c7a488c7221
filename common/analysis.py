"""Step 4's logic: the spectral analysis of every LoRA-adapted tensor, aggregated by module and layer."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from common.adapter import LoraAdapter, LoraTarget
from common.compare import DeltaPlan, exact_delta, rounded_at_dtype
from common.errors import UserError
from common.export import LoraExport, export_findings, export_report
from common.finite import require_finite
from common.lora import product_magnitude
from common.metrics import evenly_spaced, residual_ulps, rounding_bound
from common.precision import dtype_from_name
from common.safetensors_io import CheckpointIndex
from common.spectra import TensorSpectrum, analyze_tensor, factor_spectrum


@dataclass
class Analysis:
    tensors: list[TensorSpectrum] = field(default_factory=list)
    lora_only: list[str] = field(default_factory=list)
    not_matrices: list[str] = field(default_factory=list)  # biases and other vectors: no spectrum to analyse
    task_vector_only_nonzero: list[str] = field(default_factory=list)
    task_vector_only_zero: int = 0
    merge_dtype: str | None = None
    lora_source: str = "lora_file"  # or "lora_path": Δ computed from the adapter in float64
    ulp_samples: list[torch.Tensor] = field(default_factory=list)  # per tensor, (τ − Δ) in ulps (with a base)
    export: LoraExport | None = None  # --export_lora: τ as a LoRA adapter


@dataclass
class LoraDelta:
    """One Δ to analyse: its values, the base weight it changes (when known) and its SVD (when cheap)."""

    name: str
    delta: torch.Tensor
    base_weight: torch.Tensor | None = None
    spectrum: tuple[torch.Tensor, torch.Tensor] | None = None
    product_magnitude: torch.Tensor | None = None  # |s|·(|B| @ |A|): bounds B @ A's fp32 rounding
    rounded_at_dtype: torch.Tensor | None = None  # an intermediate the merge rounds (see metrics.rounding_bound)


def deltas_from_file(
    lora_deltas: CheckpointIndex, base: CheckpointIndex | None, device: torch.device
) -> Iterator[LoraDelta]:
    """Δ as compare saved it (fp32), with the base weight of the same name when a base is given."""
    for name in lora_deltas.names():
        weight = base.read(name).to(device) if base is not None and name in base else None
        delta = lora_deltas.read(name).to(device)
        require_finite(delta, f"{lora_deltas.source}: tensor {name}")
        yield LoraDelta(name, delta, weight)


def deltas_from_adapter(
    adapter: LoraAdapter, plan: DeltaPlan, base: CheckpointIndex | None, device: torch.device
) -> Iterator[LoraDelta]:
    """Δ from the adapter in float64 as the merge computes it; a plain LoRA's SVD from its factors."""
    for spec in plan.specs:
        delta, weight = exact_delta(spec.name, plan, adapter, base, device)
        changes = plan.changes[spec.name]
        target = changes[0] if len(changes) == 1 and isinstance(changes[0], LoraTarget) else None
        spectrum = None
        if target is not None and target.magnitude_key is None and target.init is None:
            lora_a, lora_b = (f.to(device) for f in adapter.factors(target))
            transposed = target.fan_in_fan_out or target.embedding  # Δ = s·(B@A)ᵀ
            left, right = (lora_a.T, lora_b) if transposed else (lora_b, lora_a.T)
            spectrum = factor_spectrum(left, right, target.scaling)
        magnitude = product_magnitude(changes, adapter, delta, weight)
        rounded = rounded_at_dtype(changes, weight, delta, magnitude) if weight is not None else None
        yield LoraDelta(spec.name, delta, weight, spectrum, magnitude, rounded)


def analyze_files(
    deltas: Iterable[LoraDelta],
    task_vector: CheckpointIndex,
    device: torch.device,
    on_tensor: Callable[[str], None] = lambda line: None,
    full_svd: bool = False,
    known_status: dict[str, str] | None = None,
    on_matrix: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
) -> Analysis:
    """Analyze every matrix Δ against τ; count τ's other tensors that are non-zero.

    The extraction's stats (`known_status`) say which of τ's other tensors are zero without reading them.
    `on_matrix(name, Δ, τ)` gets every analysed pair while it is in memory (the LoRA export).
    """
    analysis = Analysis(merge_dtype=task_vector.metadata.get("finetuned_dtype"))
    merge_dtype = dtype_from_name(analysis.merge_dtype or "")
    seen = set()
    for item in deltas:
        seen.add(item.name)
        if item.name not in task_vector:
            analysis.lora_only.append(item.name)
            continue
        if item.delta.dim() != 2:
            analysis.not_matrices.append(item.name)
            continue
        tau = task_vector.read(item.name).to(device)
        require_finite(tau, f"{task_vector.source}: tensor {item.name}")
        if item.delta.shape != tau.shape:
            raise UserError(
                f"{item.name}: LoRA delta {list(item.delta.shape)} and task vector {list(tau.shape)} do not match"
            )
        spectrum = analyze_tensor(item.name, item.delta, tau, torch.float32, full_svd, item.spectrum)
        if item.base_weight is not None and merge_dtype is not None and item.base_weight.shape == tau.shape:
            analysis.ulp_samples.append(add_residual_in_ulps(spectrum, item, tau, merge_dtype))
        analysis.tensors.append(spectrum)
        if on_matrix is not None:
            on_matrix(item.name, item.delta, tau)
        on_tensor(
            f"{item.name}: rank Δ {spectrum.rank_lora}, rank τ {spectrum.rank_task_vector}, "
            f"angle {spectrum.principal_angle_deg:.2e}°, rel. error {spectrum.rel_error:.2e}"
        )
    if not analysis.tensors:
        raise UserError("no LoRA-adapted tensor is in the task vector file: not the same model")
    for name in task_vector.names():
        if name not in seen:
            status = (known_status or {}).get(name)
            if status not in ("unchanged", None) or (status is None and torch.count_nonzero(task_vector.read(name))):
                analysis.task_vector_only_nonzero.append(name)
            else:
                analysis.task_vector_only_zero += 1
    return analysis


def add_residual_in_ulps(
    spectrum: TensorSpectrum, item: LoraDelta, tau: torch.Tensor, merge_dtype: torch.dtype
) -> torch.Tensor:
    """τ − Δ in ulps of the merge dtype (max, RMS, a sample for the histogram returned); with the factors,
    whether every element is within the rounding a merge at that dtype can make."""
    ulps = residual_ulps(item.base_weight, item.delta, tau, merge_dtype)
    spectrum.residual_max_ulps = float(ulps.abs().max())
    spectrum.residual_rms_ulps = float(ulps.square().mean().sqrt())
    if item.product_magnitude is not None:
        rank = max(spectrum.rank_lora, 1)
        bound = rounding_bound(
            item.base_weight, item.delta, merge_dtype, rank, item.product_magnitude, item.rounded_at_dtype
        )
        spectrum.within_rounding = bool(((tau.double() - item.delta.double()).abs() <= bound).all())
    return evenly_spaced(ulps)


def aggregate(spectra: list[TensorSpectrum], key: Callable[[TensorSpectrum], object]) -> dict[str, dict]:
    """Medians and extremes of the main per-tensor figures, grouped by `key` (module type or layer)."""
    groups: dict[str, list[TensorSpectrum]] = defaultdict(list)
    for s in spectra:
        groups[str(key(s))].append(s)
    return {
        group: {
            "tensors": len(items),
            "median_rel_error": statistics.median(s.rel_error for s in items),
            "max_rel_error": max(s.rel_error for s in items),
            "max_principal_angle_deg": max(s.principal_angle_deg for s in items),
            "median_norm_lora": statistics.median(s.norm_lora for s in items),
            "min_energy_in_lora_rank": min(s.energy_in_lora_rank for s in items),
            "ranks_task_vector": sorted({s.rank_task_vector for s in items}),
            "median_effective_rank_lora": statistics.median(s.effective_rank_lora for s in items),
            "max_residual_ulps": max(
                (s.residual_max_ulps for s in items if s.residual_max_ulps is not None), default=None
            ),
        }
        for group, items in sorted(groups.items())
    }


def findings(analysis: Analysis) -> list[str]:
    """The report's conclusions, in plain language, from the numbers alone."""
    spectra = analysis.tensors
    n = len(spectra)
    lora_ranks = sorted({s.rank_lora for s in spectra})
    same_rank = sum(s.rank_task_vector == s.rank_lora for s in spectra)
    lines = [f"{n} LoRA-adapted tensors analysed; Δ has numerical rank {_listing(lora_ranks)}."]
    if analysis.lora_source == "lora_path":
        factored = sum(s.lora_spectrum_from_factors for s in spectra)
        lines[0] += f" Δ computed from the adapter in float64; {factored} of its SVDs exactly from the factors."
    if same_rank == n:
        lines.append(f"All {n} task-vector tensors have exactly the numerical rank of their LoRA delta.")
    else:
        bound = (
            ", a lower bound from the randomized SVD" if any(s.rank_task_vector_is_lower_bound for s in spectra) else ""
        )
        lines.append(
            f"{n - same_rank} of {n} task-vector tensors have a higher numerical rank than Δ "
            f"(up to {max(s.rank_task_vector for s in spectra)}{bound})"
            ": full-rank noise on top of the LoRA update"
            + (f", as a {analysis.merge_dtype} merge's rounding produces." if analysis.merge_dtype != "fp32" else ".")
        )
    angle = max(s.principal_angle_deg for s in spectra)
    energy = min(s.energy_in_lora_rank for s in spectra)
    lines.append(
        f"The top-r singular subspaces of τ and Δ differ by at most {angle:.2e}°; "
        f"τ's top-r directions hold at least {100 * energy:.6f}% of its energy."
    )
    errors = [s.rel_error for s in spectra]
    lines.append(
        f"‖τ − Δ‖/‖Δ‖: median {statistics.median(errors):.2e}, max {max(errors):.2e}; "
        f"σ_(r+1)(τ)/σ₁(τ) at most {max(s.sigma_tail_ratio for s in spectra):.2e}."
    )
    ratios = [s.sigma_next_task_vector / s.predicted_noise_floor for s in spectra if s.predicted_noise_floor > 0]
    if ratios:
        lines.append(
            f"σ_(r+1)(τ) is {min(ratios):.2f}–{max(ratios):.2f}× the noise floor predicted from the residual, "
            "RMS(τ − Δ)·(√m + √n): what lies under the LoRA subspace is unstructured rounding noise."
        )
    effective = statistics.median(s.effective_rank_lora for s in spectra)
    lines.append(
        f"Effective rank (exp of the spectral entropy) of Δ: median {effective:.2f} of rank {_listing(lora_ranks)}: "
        "how evenly the adapter spreads its update over its directions."
    )
    with_base = [s for s in spectra if s.residual_max_ulps is not None]
    if with_base:
        worst = max(s.residual_max_ulps for s in with_base)
        checked = [s for s in with_base if s.within_rounding is not None]
        beyond = sum(not s.within_rounding for s in checked)
        if not checked:
            reading = "pass --lora_path to check it against the rounding bound of the merge"
        elif not beyond:
            reading = f"every element within the rounding bound of a {analysis.merge_dtype} merge"
        else:
            reading = f"{beyond} tensors beyond what the rounding of a {analysis.merge_dtype} merge explains"
        lines.append(
            f"With the base weights: τ − Δ is at most {worst:.3g} ulp of {analysis.merge_dtype} at the merged weight "
            f"(RMS up to {max(s.residual_rms_ulps for s in with_base):.3g} ulp) over {len(with_base)} tensors; "
            f"{reading}."
        )
    others = len(analysis.task_vector_only_nonzero)
    lines.append(
        f"Tensors in τ that the adapter does not touch: {others + analysis.task_vector_only_zero} "
        f"({analysis.task_vector_only_zero} exactly zero, {others} non-zero)."
    )
    if analysis.export is not None:
        lines += export_findings(analysis.export)
    return lines


def _listing(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def analysis_report(analysis: Analysis) -> dict:
    """The content of analysis.json."""
    return {
        "summary": {
            "tensors": len(analysis.tensors),
            "merge_dtype": analysis.merge_dtype,
            "lora_source": analysis.lora_source,
            "lora_spectra_from_factors": sum(s.lora_spectrum_from_factors for s in analysis.tensors),
            "lora_only": analysis.lora_only,
            "not_matrices": analysis.not_matrices,
            "task_vector_only_zero": analysis.task_vector_only_zero,
            "task_vector_only_nonzero": analysis.task_vector_only_nonzero,
            "findings": findings(analysis),
        },
        "by_module": aggregate(analysis.tensors, lambda s: s.module),
        "by_layer": aggregate(analysis.tensors, lambda s: s.layer),
        "tensors": [asdict(s) for s in analysis.tensors],
        **({"export_lora": export_report(analysis.export)} if analysis.export is not None else {}),
    }
