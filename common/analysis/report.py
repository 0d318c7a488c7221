"""analyze's reports: analysis.json (summary, findings, aggregates, per tensor, the LoRA export) and report.md.

Every sentence of the findings is computed from a number that analysis.json also holds; the schema is in
docs/reports.md.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict

from common.analysis.analysis import Analysis, Measurements
from common.analysis.export import FOLDER, LoraExport
from common.numerics.finite import json_number
from common.numerics.precision import a_dtype
from common.numerics.spectra import TensorSpectrum


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
            "median_energy_in_lora_subspace": statistics.median(s.energy_in_lora_subspace for s in items),
            "intruder_dimensions": _total(s.intruder_dimensions for s in items),
        }
        for group, items in sorted(groups.items())
    }


def _total(values) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def findings(analysis: Analysis) -> list[str]:
    """The report's conclusions, in plain language, from the numbers alone."""
    measured = analysis.measured
    lines = verdict_findings(analysis) + quantization_findings(analysis)
    if measured.tensors:
        lines += rank_findings(analysis) + subspace_findings(analysis) + base_findings(measured)
        others = len(measured.task_vector_only_nonzero)
        lines.append(
            f"Tensors in τ that the adapter does not touch: {others + measured.task_vector_only_unchanged} "
            f"({measured.task_vector_only_unchanged} unchanged, {others} non-zero)."
        )
        lines.append(reproduced_finding(measured))
        lines += subspace_share_findings(measured)
    lines += task_vector_findings(measured)
    lines += intruder_findings(measured)
    if analysis.export is not None:
        lines += export_findings(analysis.export)
    return lines


def verdict_findings(analysis: Analysis) -> list[str]:
    """The headline: what τ is against Δ, compare's diagnosis of the same evidence (with an adapter)."""
    if analysis.verdict is None:
        return []
    return [f"Verdict ({analysis.verdict.cause}, as compare gives it): {analysis.verdict.reason}."]


def reproduced_finding(measured: Measurements) -> str:
    """The share of ‖τ‖² the adapter reproduces: 1 − Σ‖τ − Δ‖² / Σ‖τ‖² over every tensor of τ — a share only when
    it is one (Δ pointing elsewhere makes ‖τ − Δ‖ exceed ‖τ‖)."""
    total = sum(measured.energy.values())
    share = 1 - measured.residual_energy / total if total else 1.0
    if share < 0:
        return (
            f"Δ explains none of τ: Σ‖τ − Δ‖² is {measured.residual_energy / total:.3g}× Σ‖τ‖²_F (‖τ − Δ‖ exceeds "
            "‖τ‖: subtracting the adapter's update moves τ further from zero)."
        )
    return f"The adapter reproduces {100 * share:.6g}% of ‖τ‖²_F (1 − Σ‖τ − Δ‖² / Σ‖τ‖² over every tensor of τ)."


def subspace_share_findings(measured: Measurements) -> list[str]:
    """How much of τ lies where Δ acts, and how strongly Δ amplifies directions W₀ barely uses (Hu et al. 2021)."""
    spectra = measured.tensors
    shares = [s.energy_in_lora_subspace for s in spectra]
    lines = [
        f"Inside Δ's column space lies a median {100 * statistics.median(shares):.4g}% of each tensor's ‖τ‖²_F "
        f"(min {100 * min(shares):.4g}%): the rest is change the adapter does not span."
    ]
    amplification = [s.amplification for s in spectra if s.amplification is not None]
    amplification = [a for a in amplification if math.isfinite(a)]
    if amplification:
        median = statistics.median(amplification)
        lines.append(
            f"Δ amplifies directions W₀ barely uses: ‖Δ‖_F / ‖U_rᵀW₀V_r‖_F median {median:.3g} "
            f"({min(amplification):.3g}–{max(amplification):.3g}; Hu et al. 2021 §7.3)."
        )
    return lines


def intruder_findings(measured: Measurements) -> list[str]:
    """Intruder dimensions: new directions among the finetuned weight's top singular vectors."""
    spectra = [*measured.tensors, *measured.task_vector_tensors]
    counted = [s for s in spectra if s.intruder_dimensions is not None]
    if not counted:
        return []
    with_intruders = [s for s in counted if s.intruder_dimensions]
    total = sum(s.intruder_dimensions for s in counted)
    where = f" (most in {max(with_intruders, key=lambda s: s.intruder_dimensions).name})" if with_intruders else ""
    return [
        f"Intruder dimensions (Shuttleworth et al. 2024): {total} among the top singular vectors of W₀ + τ in "
        f"{len(with_intruders)} of {len(counted)} matrices{where}: directions the base weights did not have."
    ]


def task_vector_findings(measured: Measurements) -> list[str]:
    """τ's changed matrices the adapter does not reach (all of them with no adapter): how low-rank they are."""
    spectra = measured.task_vector_tensors
    if not spectra:
        return []
    where = "the adapter does not reach" if measured.tensors else "of τ"
    ranks90 = [s.energy_rank_90 for s in spectra if s.energy_rank_90 is not None]
    fractions = [s.energy_rank_90 / min(s.shape) for s in spectra if s.energy_rank_90 is not None]
    return [
        f"{len(spectra)} changed matrices {where}: 90% of each one's ‖τ‖²_F lies in "
        f"{_listing(sorted(ranks90))} singular directions (median {statistics.median(ranks90):g}, "
        f"{100 * statistics.median(fractions):.3g}% of min(m, n)); stable rank median "
        f"{statistics.median(s.stable_rank for s in spectra):.3g}."
    ]


def rank_findings(analysis: Analysis) -> list[str]:
    """Numerical ranks of Δ and τ: equal, or τ carries full-rank noise on top."""
    spectra = analysis.measured.tensors
    n = len(spectra)
    lora_ranks = sorted({s.rank_lora for s in spectra})
    same_rank = sum(s.rank_task_vector == s.rank_lora for s in spectra)
    lines = [f"{n} LoRA-adapted tensors analysed; Δ has numerical rank {_listing(lora_ranks)}."]
    if analysis.lora_source == "lora_path":
        factored = sum(s.lora_spectrum_from_factors for s in spectra)
        lines[0] += f" Δ computed from the adapter in float64; {factored} of its SVDs exactly from the factors."
    if same_rank == n:
        lines.append(f"All {n} task-vector tensors have exactly the numerical rank of their LoRA delta.")
        return lines
    bound = ", a lower bound from the randomized SVD" if any(s.rank_task_vector_is_lower_bound for s in spectra) else ""
    lines.append(
        f"{n - same_rank} of {n} task-vector tensors have a higher numerical rank than Δ "
        f"(up to {max(s.rank_task_vector for s in spectra)}{bound})"
        f": full-rank noise on top of the LoRA update{_said(_noise_source(analysis))}."
    )
    return lines


def _said(source: str) -> str:
    return f" — {source}" if source else ""


def _noise_source(analysis: Analysis) -> str:
    """What the residual's noise is, as far as the numbers show it: the 4-bit quantization (measured), a merge's
    rounding (proven with the base), or not said."""
    if analysis.quantized_base:
        return "the 4-bit quantization of a QLoRA merge"
    measured = analysis.measured
    checked = [s.within_rounding for s in measured.tensors if s.within_rounding is not None]
    if checked and all(checked) and measured.merge_dtype != "fp32":
        return f"the rounding of {a_dtype(measured.merge_dtype)} merge, every element within its bound"
    if checked:
        return "more than rounding explains"
    return ""


def quantization_findings(analysis: Analysis) -> list[str]:
    """τ of a merge into a 4-bit base: how large the quantization is against Δ, and how much of τ − Δ it explains."""
    spectra = [s for s in analysis.measured.tensors if s.quantization_explained is not None]
    if not analysis.quantized_base or not spectra:
        return []
    ratios = [s.quantization_ratio for s in spectra if s.quantization_ratio is not None]
    explained = [s.quantization_explained for s in spectra]
    return [
        f"τ is of a merge into the {analysis.quantized_base} 4-bit base (QLoRA): on the {len(spectra)} adapted "
        f"tensors the quantization deq(Q(W)) − W is ‖·‖/‖Δ‖ median {statistics.median(ratios):.3g} "
        f"({min(ratios):.3g}–{max(ratios):.3g}) of the adapter's update and explains a median "
        f"{100 * statistics.median(explained):.4g}% of ‖τ − Δ‖²_F (min {100 * min(explained):.4g}%): the floor under "
        "the LoRA subspace is the quantization, not rounding."
    ]


def subspace_findings(analysis: Analysis) -> list[str]:
    """Angles between the top-r subspaces, the relative error, the noise floor and the effective rank."""
    spectra = analysis.measured.tensors
    angle = max(s.principal_angle_deg for s in spectra)
    energy = min(s.energy_in_lora_rank for s in spectra)
    errors = [s.rel_error for s in spectra]
    lines = [
        f"The top-r singular subspaces of τ and Δ differ by at most {angle:.2e}°; "
        f"τ's top-r directions hold at least {100 * energy:.6f}% of its energy.",
        f"‖τ − Δ‖/‖Δ‖: median {statistics.median(errors):.2e}, max {max(errors):.2e}; "
        f"σ_(r+1)(τ)/σ₁(τ) at most {max(s.sigma_tail_ratio for s in spectra):.2e}.",
    ]
    ratios = [s.sigma_next_task_vector / s.predicted_noise_floor for s in spectra if s.predicted_noise_floor > 0]
    if ratios:
        lines.append(
            f"σ_(r+1)(τ) is {min(ratios):.2f}–{max(ratios):.2f}× the noise floor predicted from the residual, "
            f"RMS(τ − Δ)·(√m + √n): {_floor_reading(analysis, ratios)}"
        )
    lora_ranks = sorted({s.rank_lora for s in spectra})
    effective = statistics.median(s.effective_rank_lora for s in spectra)
    lines.append(
        f"Effective rank (exp of the spectral entropy) of Δ: median {effective:.2f} of rank {_listing(lora_ranks)}: "
        "how evenly the adapter spreads its update over its directions."
    )
    return lines


NOISE_LIKE = (0.5, 1.5)  # σ_(r+1) of an unstructured residual sits near RMS·(√m + √n) (measured 0.8–1.0)


def _floor_reading(analysis: Analysis, ratios: list[float]) -> str:
    """What the ratio says: near 1, the residual under Δ's subspace is unstructured noise (of what, when the numbers
    show it); far below, the residual is not noise but lies in few directions (inside Δ's subspace or beside it)."""
    if NOISE_LIKE[0] <= min(ratios) and max(ratios) <= NOISE_LIKE[1]:
        return f"what lies under the LoRA subspace is unstructured noise{_said(_noise_source(analysis))}."
    if max(ratios) < NOISE_LIKE[0]:
        return (
            "far below what unstructured noise gives: τ − Δ is not noise but lies in a few directions (a scaled "
            "or another update, not rounding)."
        )
    return "not the ratio unstructured noise gives in every tensor: τ − Δ is structured in some of them."


def base_findings(measured: Measurements) -> list[str]:
    """With the base weights: τ − Δ in ulps, and whether it is within the rounding bound of the merge."""
    with_base = [s for s in measured.tensors if s.residual_max_ulps is not None]
    if not with_base:
        return []
    worst = max(s.residual_max_ulps for s in with_base)
    checked = [s for s in with_base if s.within_rounding is not None]
    beyond = sum(not s.within_rounding for s in checked)
    if not checked:
        reading = "pass --lora_path to check it against the rounding bound of the merge"
    elif not beyond:
        reading = f"every element within the rounding bound of {a_dtype(measured.merge_dtype)} merge"
    else:
        reading = f"{beyond} tensors beyond what the rounding of {a_dtype(measured.merge_dtype)} merge explains"
    return [
        f"With the base weights: τ − Δ is at most {worst:.3g} ulp of {measured.merge_dtype} at the merged weight "
        f"(RMS up to {max(s.residual_rms_ulps for s in with_base):.3g} ulp) over {len(with_base)} tensors; "
        f"{reading}."
    ]


def _listing(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def analysis_report(analysis: Analysis) -> dict:
    """The content of analysis.json."""
    measured = analysis.measured
    total = sum(measured.energy.values())
    return {
        "summary": {
            "tensors": len(measured.tensors),
            "task_vector_tensors": len(measured.task_vector_tensors),
            "task_vector_energy": total,
            "reproduced_energy_share": (1 - measured.residual_energy / total if total else None)
            if analysis.lora_source
            else None,
            "merge_dtype": measured.merge_dtype,
            "lora_source": analysis.lora_source,
            "lora_spectra_from_factors": sum(s.lora_spectrum_from_factors for s in measured.tensors),
            "lora_only": measured.lora_only,
            "not_matrices": measured.not_matrices,
            "task_vector_only_unchanged": measured.task_vector_only_unchanged,
            "intruder_dimensions_total": _intruders_total(measured),
            "task_vector_only_nonzero": measured.task_vector_only_nonzero,
            "findings": findings(analysis),
            **verdict_summary(analysis),
        },
        "by_module": aggregate(measured.tensors, lambda s: s.module),
        "by_layer": aggregate(measured.tensors, lambda s: s.layer),
        "tensors": [asdict(s) for s in measured.tensors],
        "task_vector_tensors": [asdict(s) for s in measured.task_vector_tensors],
        **({"export_lora": export_report(analysis.export)} if analysis.export is not None else {}),
    }


def verdict_summary(analysis: Analysis) -> dict:
    """compare's cause, causes, reason and evidence, as its comparison_report.json's summary holds them."""
    verdict = analysis.verdict
    if verdict is None:
        return {"cause": None, "causes": [], "reason": None, "evidence": {}}
    evidence = {k: json_number(v) for k, v in verdict.evidence.items()}
    return {"cause": verdict.cause, "causes": verdict.causes, "reason": verdict.reason, "evidence": evidence}


def _intruders_total(measured: Measurements) -> int | None:
    counts = [t.intruder_dimensions for t in [*measured.tensors, *measured.task_vector_tensors]]
    known = [c for c in counts if c is not None]
    return sum(known) if known else None


def export_report(export: LoraExport) -> dict:
    """analysis.json's export_lora section."""
    request = export.request
    return {
        "folder": FOLDER,
        "rank": request.rank,
        "energy": request.energy,
        "auto": request.auto,
        "max_rank": request.cap if request.rank is None else None,
        "seconds": round(export.seconds, 3),
        "exported_share": sum(t.share for t in export.tensors),
        "kept_share": sum(t.share * t.kept_energy for t in export.tensors),
        "skipped": {
            name: {"reason": why, "share": export.skipped_share.get(name)} for name, why in export.skipped.items()
        },
        "tensors": [asdict(t) for t in export.tensors],
    }


def export_findings(export: LoraExport) -> list[str]:
    """The export's lines in the findings."""
    factored = [t for t in export.tensors if t.form == "lora"]
    lines = [_export_summary(export)]
    if factored:
        errors = [t.rel_error for t in factored if t.rel_error is not None]
        lines.append(
            f"{len(factored)} matrices as LoRA factors, truncated SVD at {_rank_rule(export, factored)}: "
            f"‖τ − BA‖/‖τ‖ median {statistics.median(errors):.2e}, max {max(errors):.2e}; the energy left out, "
            f"1 − Σ_(i≤k) σᵢ²/‖τ‖², at most {max(0.0, *(1 - t.kept_energy for t in factored)):.2e} "
            "(= error²: Eckart–Young)."
        )
    against_lora = [t.rel_error_lora for t in factored if t.rel_error_lora is not None]
    if against_lora:
        lines.append(
            f"The exported LoRA against Δ: ‖Δ − BA‖/‖Δ‖ median {statistics.median(against_lora):.2e}, "
            f"max {max(against_lora):.2e}."
        )
    return lines


def _export_summary(export: LoraExport) -> str:
    exported = sum(t.share for t in export.tensors)
    kept = sum(t.share * t.kept_energy for t in export.tensors)
    forms = Counter(t.form for t in export.tensors)
    listing = ", ".join(f"{n} as {form}" for form, n in sorted(forms.items()))
    skipped = ""
    if export.skipped:
        share = sum(export.skipped_share.values())
        skipped = f"; {len(export.skipped)} not exported ({100 * share:.3g}% of ‖τ‖², listed with why)"
    return (
        f"Exported τ as a peft adapter ({FOLDER}/: {listing}{skipped}): it holds {100 * exported:.6g}% of ‖τ‖²_F's "
        f"tensors and reproduces {100 * kept:.6g}% of ‖τ‖²_F."
    )


def _rank_rule(export: LoraExport, factored: list) -> str:
    ranks = sorted(t.rank for t in factored)
    request = export.request
    if request.rank is not None:
        capped = sum(t.rank < request.rank for t in factored)
        return f"rank {request.rank}" + (f" (min(m, n) in {capped} smaller tensors)" if capped else "")
    spread = f"{ranks[0]}–{ranks[-1]} (median {statistics.median(ranks):g}, cap {request.cap})"
    if request.energy is not None:
        return f"the smallest rank keeping {100 * request.energy:g}% of each tensor's energy, {spread}"
    return f"the singular values above Gavish–Donoho's threshold for the noise each tensor shows, {spread}"


def analysis_markdown(report: dict, plots: list[str]) -> str:
    """report.md: findings, the per-module table, the plots, then every tensor."""
    summary = report["summary"]
    lines = ["# LoRA delta Δ vs task vector τ: mathematical analysis", "", "## Findings", ""]
    lines += [f"- {line}" for line in summary["findings"]]
    if report["tensors"]:
        lines += ["", "## By module type", "", "| module | tensors | median ‖τ−Δ‖/‖Δ‖ | max angle (°) | ranks of τ |"]
        lines.append("|---|---|---|---|---|")
        for module, row in report["by_module"].items():
            lines.append(
                f"| {module} | {row['tensors']} | {row['median_rel_error']:.2e} | "
                f"{row['max_principal_angle_deg']:.2e} | {', '.join(map(str, row['ranks_task_vector']))} |"
            )
    lines += (["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]) if plots else []
    if report["tensors"]:
        lines += ["", "## Tensors", "", "| tensor | rank Δ | rank τ | cosine | ‖τ−Δ‖/‖Δ‖ | angle (°) | σ_(r+1)/σ₁ |"]
        lines.append("|---|---|---|---|---|---|---|")
        for t in report["tensors"]:
            lines.append(
                f"| {t['name']} | {t['rank_lora']} | {t['rank_task_vector']} | {t['cosine']:.6f} | "
                f"{t['rel_error']:.2e} | {t['principal_angle_deg']:.2e} | {t['sigma_tail_ratio']:.2e} |"
            )
    if report["task_vector_tensors"]:
        lines += task_vector_markdown(report["task_vector_tensors"])
    if "export_lora" in report:
        lines += export_markdown(report["export_lora"])
    return "\n".join(lines) + "\n"


def task_vector_markdown(tensors: list[dict]) -> list[str]:
    """report.md's table of τ's matrices analysed on their own: their rank profile."""
    lines = ["", "## τ on its own", "", "| tensor | shape | rank | 90% of ‖τ‖² in | 99% in | stable rank |"]
    lines.append("|---|---|---|---|---|---|")
    for t in tensors:
        bound = "≥ " if t["rank_is_lower_bound"] else ""
        lines.append(
            f"| {t['name']} | {' × '.join(map(str, t['shape']))} | {bound}{t['rank']} | {t['energy_rank_90']} | "
            f"{t['energy_rank_99']} | {t['stable_rank']:.3g} |"
        )
    return lines


def export_markdown(export: dict) -> list[str]:
    """report.md's table of the exported LoRA: rank, kept energy and errors per tensor."""
    lines = ["", f"## Exported LoRA ({export['folder']}/)", ""]
    if export["skipped"]:
        lines += [f"- {name}: not exported, {v['reason']}" for name, v in export["skipped"].items()] + [""]
    lines += [
        "| tensor | form | layout | share of ‖τ‖² | rank | kept energy | ‖τ−BA‖/‖τ‖ | ‖Δ−BA‖/‖Δ‖ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in export["tensors"]:
        against_lora = "–" if t["rel_error_lora"] is None else f"{t['rel_error_lora']:.2e}"
        error = "–" if t["rel_error"] is None else f"{t['rel_error']:.2e}"
        lines.append(
            f"| {t['name']} | {t['form']} | {t['layout']} | {t['share']:.3g} | {t['rank']} | {t['kept_energy']:.9f} | "
            f"{error} | {against_lora} |"
        )
    return lines
