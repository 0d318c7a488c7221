"""Step 4's logic: the spectral analysis of every LoRA-adapted tensor, aggregated by module and layer."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from common.errors import UserError
from common.safetensors_io import CheckpointIndex
from common.spectra import TensorSpectrum, analyze_tensor


@dataclass
class Analysis:
    tensors: list[TensorSpectrum] = field(default_factory=list)
    lora_only: list[str] = field(default_factory=list)
    not_matrices: list[str] = field(default_factory=list)  # biases and other vectors: no spectrum to analyse
    task_vector_only_nonzero: list[str] = field(default_factory=list)
    task_vector_only_zero: int = 0
    merge_dtype: str | None = None


def analyze_files(
    lora_deltas: CheckpointIndex,
    task_vector: CheckpointIndex,
    device: torch.device,
    on_tensor: Callable[[str], None] = lambda line: None,
    full_svd: bool = False,
    known_status: dict[str, str] | None = None,
) -> Analysis:
    """Analyze every matrix of `lora_deltas` against τ; count τ's other tensors that are non-zero.

    The extraction's stats (`known_status`) say which of τ's other tensors are zero without reading them.
    """
    analysis = Analysis(merge_dtype=task_vector.metadata.get("finetuned_dtype"))
    for name in lora_deltas.names():
        if name not in task_vector:
            analysis.lora_only.append(name)
            continue
        if len(lora_deltas.info(name).shape) != 2:
            analysis.not_matrices.append(name)
            continue
        delta, tau = lora_deltas.read(name).to(device), task_vector.read(name).to(device)
        if delta.shape != tau.shape:
            raise UserError(f"{name}: LoRA delta {list(delta.shape)} and task vector {list(tau.shape)} do not match")
        spectrum = analyze_tensor(name, delta, tau, lora_deltas.info(name).dtype, full_svd)
        analysis.tensors.append(spectrum)
        on_tensor(
            f"{name}: rank Δ {spectrum.rank_lora}, rank τ {spectrum.rank_task_vector}, "
            f"angle {spectrum.principal_angle_deg:.2e}°, rel. error {spectrum.rel_error:.2e}"
        )
    if not analysis.tensors:
        raise UserError("no tensor of the LoRA deltas file is in the task vector file: not the same model")
    for name in task_vector.names():
        if name not in lora_deltas:
            status = (known_status or {}).get(name)
            if status not in ("unchanged", None) or (status is None and torch.count_nonzero(task_vector.read(name))):
                analysis.task_vector_only_nonzero.append(name)
            else:
                analysis.task_vector_only_zero += 1
    return analysis


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
    others = len(analysis.task_vector_only_nonzero)
    lines.append(
        f"Tensors in τ that the adapter does not touch: {others + analysis.task_vector_only_zero} "
        f"({analysis.task_vector_only_zero} exactly zero, {others} non-zero)."
    )
    return lines


def _listing(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def analysis_report(analysis: Analysis) -> dict:
    """The content of analysis.json."""
    return {
        "summary": {
            "tensors": len(analysis.tensors),
            "merge_dtype": analysis.merge_dtype,
            "lora_only": analysis.lora_only,
            "not_matrices": analysis.not_matrices,
            "task_vector_only_zero": analysis.task_vector_only_zero,
            "task_vector_only_nonzero": analysis.task_vector_only_nonzero,
            "findings": findings(analysis),
        },
        "by_module": aggregate(analysis.tensors, lambda s: s.module),
        "by_layer": aggregate(analysis.tensors, lambda s: s.layer),
        "tensors": [asdict(s) for s in analysis.tensors],
    }
