"""The report of several inputs' interference: JSON, the findings a person reads first, and three plots."""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.analysis.interference import InterferenceAnalysis, TensorInterference, cosines  # noqa: E402
from common.analysis.plots import save  # noqa: E402

NEARLY_ORTHOGONAL = 0.1  # |cos| below it: "nearly orthogonal" (random directions in n dims: |cos| ~ 1/√n)


def pairs(analysis: InterferenceAnalysis) -> list[tuple[int, int]]:
    return list(combinations(range(len(analysis.labels)), 2))


def pair_name(analysis: InterferenceAnalysis, i: int, j: int) -> str:
    return f"{analysis.labels[i]} × {analysis.labels[j]}"


def tensor_cosine(t: TensorInterference, i: int, j: int) -> float:
    return float(cosines(t.gram)[i, j])


def layer_ranges(layers: list[int | None]) -> str:
    """'20–29, 31' for [20, …, 29, 31]; tensors outside layers are 'outside layers'."""
    numbers = sorted({layer for layer in layers if layer is not None})
    runs: list[list[int]] = []
    for layer in numbers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    parts = [f"{r[0]}–{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs]
    if None in layers:
        parts.append("outside layers")
    return ", ".join(parts)


def _matrix(values) -> list[list[float | None]]:
    return [[None if isinstance(v, float) and math.isnan(v) else v for v in row] for row in values.tolist()]


def conflict_summary(counts, analysis: InterferenceAnalysis) -> dict:
    return {
        "coordinates": counts.coordinates,
        "kept": counts.kept.tolist(),
        "pair_conflict_rate": {pair_name(analysis, i, j): counts.pair_rate(i, j) for i, j in pairs(analysis)},
        "contested": counts.contested,
        "conflicting": counts.conflicting,
        "conflict_rate": counts.conflict_rate,
        "dropped_by_elected_sign": counts.dropped,
        "dropped_share": counts.dropped / max(1, int(counts.kept.sum())),
        "ties_left_out": counts.ties_left_out,
    }


def scope_report(analysis: InterferenceAnalysis, layer: int | None | str) -> dict:
    g = analysis.gram(layer)
    report = {"gram": _matrix(g), "cosines": _matrix(cosines(g))}
    report["sign_conflicts"] = {
        str(d): conflict_summary(analysis.conflicts(d, layer), analysis) for d in analysis.densities
    }
    return report


def tensor_row(analysis: InterferenceAnalysis, t: TensorInterference) -> dict:
    c = cosines(t.gram)
    row = {"name": t.name, "module": t.module, "layer": t.layer, "norms": t.gram.diagonal().sqrt().tolist()}
    row["cosines"] = {pair_name(analysis, i, j): float(c[i, j]) for i, j in pairs(analysis)}
    row["pair_conflict_rate"] = {
        str(d): {pair_name(analysis, i, j): counts.pair_rate(i, j) for i, j in pairs(analysis)}
        for d, counts in t.conflicts.items()
    }
    for side, overlaps in (("column_space", t.columns), ("row_space", t.rows)):
        row[side] = {pair_name(analysis, i, j): {"phi": o.phi, "angles": o.angles} for (i, j), o in overlaps.items()}
    if t.merged_inner is not None:
        norms = t.gram.diagonal().tolist()
        row["retention"] = [m / n if n else None for m, n in zip(t.merged_inner, norms, strict=True)]
    return row


def mean_phi(analysis: InterferenceAnalysis, side: str = "columns") -> np.ndarray:
    """The k × k matrix of φ averaged over the matrices both inputs change (1 on the diagonal; NaN: none)."""
    k = len(analysis.labels)
    phi = np.eye(k)
    for i, j in pairs(analysis):
        values = [getattr(t, side)[i, j].phi for t in changed_by_both(analysis, i, j) if (i, j) in getattr(t, side)]
        phi[i, j] = phi[j, i] = float(np.mean(values)) if values else np.nan
    return phi


def changed_by_both(analysis: InterferenceAnalysis, i: int, j: int) -> list[TensorInterference]:
    return [t for t in analysis.tensors if t.gram[i, i] > 0 and t.gram[j, j] > 0]


def random_phi(analysis: InterferenceAnalysis, i: int, j: int) -> float | None:
    """φ two random subspaces of these dimensions would have on average: max(rᵢ, rⱼ)/m (E‖UᵢᵀUⱼ‖²_F = rᵢrⱼ/m)."""
    values = [
        max(t.columns[i, j].widths) / t.columns[i, j].dimension
        for t in changed_by_both(analysis, i, j)
        if (i, j) in t.columns and min(t.columns[i, j].widths) > 0
    ]
    return float(np.mean(values)) if values else None


def interference_report(analysis: InterferenceAnalysis) -> dict:
    report = {
        "inputs": analysis.labels,
        "merged": analysis.merged_label,
        "densities": list(analysis.densities),
        "overlap_rank": analysis.overlap_rank,
        "tensors": len(analysis.tensors),
        "model": scope_report(analysis, "all"),
        "mean_phi_column_space": _matrix(mean_phi(analysis, "columns")),
        "mean_phi_row_space": _matrix(mean_phi(analysis, "rows")),
        "layers": {
            "outside" if layer is None else str(layer): scope_report(analysis, layer) for layer in analysis.layers()
        },
        "per_tensor": [tensor_row(analysis, t) for t in analysis.tensors],
    }
    if (retention := analysis.retention()) is not None:
        report["retention"] = dict(zip(analysis.labels, retention, strict=True))
    return report


def interference_findings(analysis: InterferenceAnalysis) -> list[str]:
    """One paragraph per pair of inputs, then the merge's retention."""
    changed = sum(1 for t in analysis.tensors if bool((t.gram.diagonal() > 0).any()))
    found = [f"{len(analysis.labels)} inputs, {changed} tensors changed by at least one of them."]
    model = cosines(analysis.gram())
    for i, j in pairs(analysis):
        found.append(_pair_finding(analysis, i, j, float(model[i, j])))
    if (retention := analysis.retention()) is not None:
        kept = ", ".join(
            f"{label} {r:.3f}" for label, r in zip(analysis.labels, retention, strict=True) if r is not None
        )
        found.append(
            f"Retention in {analysis.merged_label} (⟨τ_m, τᵢ⟩/‖τᵢ‖² over the model; 1 = all of τᵢ kept if the inputs "
            f"are orthogonal): {kept}."
        )
    return found


def _pair_finding(analysis: InterferenceAnalysis, i: int, j: int, model_cosine: float) -> str:
    name = pair_name(analysis, i, j)
    both = changed_by_both(analysis, i, j)
    if not both:
        return f"{name}: no tensor is changed by both."
    aligned = [t for t in both if abs(tensor_cosine(t, i, j)) >= NEARLY_ORTHOGONAL]
    text = f"{name}: cosine {model_cosine:+.3f} over the whole model; "
    groups = "; ".join(_group_description(analysis, group, i, j) for group in _groups(aligned, i, j))
    if not aligned:
        text += f"nearly orthogonal (|cos| < {NEARLY_ORTHOGONAL}) in all {len(both)} tensors both change"
    elif len(aligned) == len(both):
        text += f"|cos| ≥ {NEARLY_ORTHOGONAL} in all {len(both)} tensors both change: {groups}"
    else:
        text += f"nearly orthogonal in {len(both) - len(aligned)} of {len(both)} tensors both change, except {groups}"
    density = analysis.densities[0] if analysis.densities else None
    if density is not None and (counts := analysis.conflicts(density)) is not None:
        rate = counts.pair_rate(i, j)
        if rate is not None:
            text += (
                f". Of the coordinates both keep in their top {density:.0%}, {rate:.1%} differ in sign "
                "(independent signs: 50%)"
            )
    phi, baseline = mean_phi(analysis)[i, j], random_phi(analysis, i, j)
    if not np.isnan(phi):
        text += f"; column spaces overlap φ = {phi:.3f} on average (1: one holds the other, 0: orthogonal"
        text += f"; random subspaces of these dimensions: {baseline:.3f})" if baseline is not None else ")"
    return text + "."


def _groups(tensors: list[TensorInterference], i: int, j: int) -> list[list[TensorInterference]]:
    """The tensors by module, then modules changed in the same layers with cosines of one sign put together."""
    modules: dict[str, list[TensorInterference]] = {}
    for t in tensors:
        modules.setdefault(t.module, []).append(t)
    merged: dict[tuple, list[TensorInterference]] = {}
    for group in modules.values():
        key = (tuple(t.layer or -1 for t in group), tensor_cosine(group[0], i, j) > 0)
        merged.setdefault(key, []).extend(group)
    return sorted(merged.values(), key=len, reverse=True)


def _group_description(analysis: InterferenceAnalysis, group: list[TensorInterference], i: int, j: int) -> str:
    cos = [tensor_cosine(t, i, j) for t in group]
    modules = ", ".join(sorted({t.module for t in group}))
    spread = f"{min(cos):+.2f}" if max(cos) - min(cos) < 0.005 else f"{min(cos):+.2f} to {max(cos):+.2f}"
    text = f"layers {layer_ranges([t.layer for t in group])}'s {modules} (cosine {spread}"
    density = analysis.densities[0] if analysis.densities else None
    if density is not None:
        counts = [t.conflicts[density] for t in group]
        total = sum(counts[1:], counts[0])
        if (rate := total.pair_rate(i, j)) is not None:
            text += f", {rate:.0%} of coordinates both keep conflict in sign"
    return text + ")"


def interference_plots(analysis: InterferenceAnalysis, folder: Path) -> list[str]:
    written = []
    if pairs(analysis):
        cosine_heatmaps(analysis, folder / "interference_cosines.png")
        written.append("interference_cosines.png")
    if analysis.densities and pairs(analysis):
        conflict_rates_by_layer(analysis, folder / "sign_conflicts_by_layer.png")
        written.append("sign_conflicts_by_layer.png")
    overlap_matrix(analysis, folder / "overlap_matrix.png")
    written.append("overlap_matrix.png")
    return written


def cosine_heatmaps(analysis: InterferenceAnalysis, path: Path) -> None:
    """Per pair of inputs, a layer × module grid of the cosine (−1 blue, 0 white, +1 red)."""
    layers = analysis.layers()
    modules = sorted({t.module for t in analysis.tensors})
    chosen = pairs(analysis)
    fig, axes = plt.subplots(1, len(chosen), figsize=(1.0 * len(modules) * len(chosen) + 3, 0.28 * len(layers) + 2.8))
    axes = np.atleast_1d(axes)
    for ax, (i, j) in zip(axes, chosen, strict=True):
        grid = np.full((len(layers), len(modules)), np.nan)
        for t in analysis.tensors:
            if t.gram[i, i] > 0 and t.gram[j, j] > 0:
                grid[layers.index(t.layer), modules.index(t.module)] = tensor_cosine(t, i, j)
        cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="lightgrey")
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
        ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), ["–" if layer is None else str(layer) for layer in layers])
        ax.set(xlabel="module", ylabel="layer", title=f"cos({pair_name(analysis, i, j)})")
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    fig.suptitle("Cosine of the inputs per tensor (white: orthogonal; grey: not changed by both)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def conflict_rates_by_layer(analysis: InterferenceAnalysis, path: Path) -> None:
    """Per layer, the share of coordinates two inputs both keep where their signs differ, at the first density."""
    density = analysis.densities[0]
    layers = [layer for layer in analysis.layers() if layer is not None]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, j in pairs(analysis):
        rates = [analysis.conflicts(density, layer).pair_rate(i, j) for layer in layers]
        ax.plot(layers, [np.nan if r is None else 100 * r for r in rates], marker="o", label=pair_name(analysis, i, j))
    ax.axhline(50, color="grey", ls="--", lw=1, label="independent signs (50%)")
    ax.set(
        xlabel="layer",
        ylabel="sign conflicts (% of coordinates both keep)",
        title=f"Sign conflicts among each input's top {density:.0%} magnitudes, by layer",
        ylim=(0, 100),
    )
    ax.legend()
    save(fig, path)


def overlap_matrix(analysis: InterferenceAnalysis, path: Path) -> None:
    """Left: the model-wide cosine matrix. Right: φ of the column spaces, averaged over tensors."""
    k = len(analysis.labels)
    fig, (left, right) = plt.subplots(1, 2, figsize=(6 + 2 * k, 2.5 + 0.9 * k))
    for ax, matrix, title, limits, cmap in (
        (left, cosines(analysis.gram()).numpy(), "cosine, whole model", (-1, 1), "RdBu_r"),
        (right, mean_phi(analysis), "column-space overlap φ, mean over tensors", (0, 1), "viridis"),
    ):
        image = ax.imshow(matrix, vmin=limits[0], vmax=limits[1], cmap=cmap)
        for (r, c), value in np.ndenumerate(matrix):
            dark = not np.isnan(value) and (abs(value) > 0.6 if cmap == "RdBu_r" else value < 0.5)
            label = "–" if np.isnan(value) else f"{value:.2f}"
            ax.text(c, r, label, ha="center", va="center", fontsize=10, color="white" if dark else "black")
        ax.set_xticks(range(k), analysis.labels, rotation=30, ha="right")
        ax.set_yticks(range(k), analysis.labels)
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8)
    save(fig, path, "How alike the inputs are (1 on the diagonal: each with itself)")


def interference_markdown(report: dict, findings: list[str], plots: list[str]) -> str:
    """interference_report.md: findings, the model's cosine matrix, the plots, then per tensor the cosines."""
    labels = report["inputs"]
    lines = ["# Interference of the inputs", "", "## Findings", "", *[f"- {line}" for line in findings]]
    lines += ["", "## Cosines over the whole model", "", "| | " + " | ".join(labels) + " |"]
    lines.append("|---" * (len(labels) + 1) + "|")
    for label, row in zip(labels, report["model"]["cosines"], strict=True):
        lines.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:+.4f}" for v in row) + " |")
    lines += (["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]) if plots else []
    if report["per_tensor"] and report["per_tensor"][0]["cosines"]:
        names = list(report["per_tensor"][0]["cosines"])
        lines += ["", "## Per tensor: cosines", "", "| tensor | " + " | ".join(names) + " |"]
        lines.append("|---" * (len(names) + 1) + "|")
        for row in report["per_tensor"]:
            lines.append(f"| {row['name']} | " + " | ".join(f"{row['cosines'][n]:+.4f}" for n in names) + " |")
    return "\n".join(lines) + "\n"
