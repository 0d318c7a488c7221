"""Plots (matplotlib, Agg backend): each one shows a single claim of a report."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.numerics.precision import dtype_from_name  # noqa: E402


def norm_distribution_comparison(rows: list[dict], path: Path, title: str) -> None:
    """Left: ‖τ‖ against ‖Δ‖ per shared tensor (on the diagonal when equal). Right: ‖τ − Δ‖/‖Δ‖ per tensor."""
    shared = [r for r in rows if r["norm_lora"] is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    lora = [r["norm_lora"] for r in shared]
    task = [r["norm_task_vector"] for r in shared]
    left.scatter(lora, task, s=14, alpha=0.7, label="LoRA-adapted tensor")
    if lora:
        low, high = min(lora + task), max(lora + task)
        left.plot([low, high], [low, high], "k--", lw=1, label="‖τ‖ = ‖Δ‖")
    left.set(xlabel="‖Δ‖ (LoRA delta, Frobenius)", ylabel="‖τ‖ (task vector, Frobenius)", title="Norms per tensor")
    left.legend(loc="upper left")
    errors = [max(r["rel_error"] or 0.0, 1e-17) for r in shared]
    colors = ["tab:green" if r["status"] == "match" else "tab:red" for r in shared]
    right.scatter(range(len(errors)), errors, s=14, c=colors)
    right.set_yscale("log")
    right.set(
        xlabel="shared tensor (file order)",
        ylabel="‖τ − Δ‖ / ‖Δ‖",
        title="Relative error per tensor (red: max |τ − Δ| above tolerance)",
    )
    save(fig, path, title)


def save(fig, path: Path, title: str | None = None, unused_axes: list | None = None) -> None:
    """Blank the grid's unused axes, title the figure, save it at 110 dpi and free it."""
    for ax in unused_axes or []:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def singular_value_spectra(spectra: list, path: Path) -> None:
    """Per module type: σᵢ of Δ (solid) and τ (dashed) for every layer, log scale, and the noise floor
    RMS(τ − Δ)·(√m + √n) predicted for each (dotted).

    When τ = Δ the dashed curves lie on the solid ones and drop off after index r; a low-precision
    merge shows as a dashed floor at the dotted line, continuing to the last index.
    """
    modules = sorted({s.module for s in spectra})
    cols = min(4, len(modules))
    rows = -(-len(modules) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, module in zip(axes.flat, modules, strict=False):
        for s in (s for s in spectra if s.module == module):
            floor = max(s.singular_values_task_vector[0] * 1e-18, 1e-300)
            ax.semilogy([max(v, floor) for v in s.singular_values_lora], "-", color="tab:blue", lw=1, alpha=0.6)
            ax.semilogy([max(v, floor) for v in s.singular_values_task_vector], "--", color="tab:orange", lw=1)
            if s.predicted_noise_floor > floor:
                ax.axhline(s.predicted_noise_floor, color="tab:gray", ls=":", lw=1)
        ax.set(title=module, xlabel="index i", ylabel="σᵢ")
    axes.flat[0].plot([], [], "-", color="tab:blue", label="Δ (LoRA delta)")
    axes.flat[0].plot([], [], "--", color="tab:orange", label="τ (task vector)")
    axes.flat[0].plot([], [], ":", color="tab:gray", label="predicted noise floor")
    axes.flat[0].legend(loc="lower left", fontsize=8)
    save(fig, path, "Singular value spectra, one curve per layer", list(axes.flat)[len(modules) :])


def task_vector_spectra(spectra: list, path: Path) -> None:
    """Per module type: σᵢ / σ₁ of τ for every layer (log scale), with the index keeping 90% of ‖τ‖² marked: a
    low-rank change drops steeply, a full-rank one stays flat."""
    modules = sorted({s.module for s in spectra})
    cols = min(4, len(modules))
    rows = -(-len(modules) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, module in zip(axes.flat, modules, strict=False):
        for s in (s for s in spectra if s.module == module and s.singular_values and s.singular_values[0] > 0):
            relative = [max(v / s.singular_values[0], 1e-18) for v in s.singular_values]
            (line,) = ax.semilogy(range(1, len(relative) + 1), relative, "-", lw=1, alpha=0.7)
            if s.energy_rank_90 is not None and s.energy_rank_90 <= len(relative):
                ax.plot(s.energy_rank_90, relative[s.energy_rank_90 - 1], "o", color=line.get_color(), ms=4)
        ax.set(title=module, xlabel="index i", ylabel="σᵢ / σ₁")
    axes.flat[0].plot([], [], "o", color="tab:gray", label="90% of ‖τ‖² reached")
    axes.flat[0].legend(loc="upper right", fontsize=8)
    title = "Singular value spectra of τ, one curve per layer (the first values computed)"
    save(fig, path, title, list(axes.flat)[len(modules) :])


def layer_module_heatmap(values: dict[str, float], title: str, path: Path, log10: bool = True) -> None:
    """A layer × module grid of one per-tensor figure (log10 by default): where it is largest."""
    from common.numerics.spectra import module_and_layer

    cells = {}
    for name, value in values.items():
        module, layer = module_and_layer(name)
        cells[(-1 if layer is None else layer, module)] = np.log10(max(value, 1e-17)) if log10 else value
    layers = sorted({layer for layer, _ in cells})
    modules = sorted({module for _, module in cells})
    grid = np.full((len(layers), len(modules)), np.nan)
    for (layer, module), value in cells.items():
        grid[layers.index(layer), modules.index(module)] = value
    fig, ax = plt.subplots(figsize=(1.2 * len(modules) + 3, 0.3 * len(layers) + 2.5))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), ["other" if layer < 0 else str(layer) for layer in layers])
    ax.set(xlabel="module", ylabel="layer", title=f"log10 {title}" if log10 else title)
    fig.colorbar(image, ax=ax)
    save(fig, path)


def analysis_plots(analysis, folder: Path) -> list[str]:
    """analyze's plots: the spectra, layer × module maps of the error, ‖Δ‖ and the subspace angle, and
    (with the base weights) the residual in ulps; for τ's matrices analysed on their own, their spectra and a
    layer × module map of the rank keeping 90% of ‖τ‖²."""
    written = []
    spectra = analysis.tensors
    if spectra:
        singular_value_spectra(spectra, folder / "singular_value_spectra.png")
        maps = {
            "relative_error_heatmap.png": ({s.name: s.rel_error for s in spectra}, "‖τ − Δ‖ / ‖Δ‖ per tensor"),
            "lora_norm_heatmap.png": ({s.name: s.norm_lora for s in spectra}, "‖Δ‖ per tensor"),
            "principal_angle_heatmap.png": ({s.name: s.principal_angle_deg for s in spectra}, "largest angle (°)"),
        }
        for file, (values, title) in maps.items():
            layer_module_heatmap(values, title, folder / file)
        written += ["singular_value_spectra.png", *maps]
    if analysis.task_vector_tensors:
        task_vector_spectra(analysis.task_vector_tensors, folder / "task_vector_spectra.png")
        ranks = {s.name: s.energy_rank_90 for s in analysis.task_vector_tensors if s.energy_rank_90 is not None}
        layer_module_heatmap(
            ranks, "rank keeping 90% of ‖τ‖² (energy_rank_90)", folder / "energy_rank_heatmap.png", False
        )
        written += ["task_vector_spectra.png", "energy_rank_heatmap.png"]
    intruders = {
        s.name: s.intruder_dimensions
        for s in [*spectra, *analysis.task_vector_tensors]
        if s.intruder_dimensions is not None
    }
    if intruders:
        layer_module_heatmap(intruders, "intruder dimensions per tensor", folder / "intruder_heatmap.png", False)
        written.append("intruder_heatmap.png")
    if analysis.ulp_samples:
        dtype = dtype_from_name(analysis.merge_dtype)
        residual_ulp_histogram(analysis.ulp_samples, dtype, folder / "residual_ulp_histogram.png")
        written.append("residual_ulp_histogram.png")
    return written


def residual_ulp_histogram(samples: list, dtype, path: Path) -> None:
    """Histogram of τ − Δ in ulps of the merge dtype at the merged weight (a sample of every shared tensor).

    A merge at that dtype puts every element within about one ulp; anything wider is not rounding.
    """
    values = np.concatenate([s.numpy() for s in samples])
    limit = max(1.5, float(np.nanmax(np.abs(values))) if values.size else 1.5)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(values, bins=np.linspace(-limit, limit, 121), color="tab:blue")
    ax.set_yscale("log")
    name = str(dtype).removeprefix("torch.")
    ax.set(xlabel=f"(τ − Δ) / ulp of {name} at the merged weight", ylabel="elements", title="Residual in ulps")
    for edge in (-1, 1):
        ax.axvline(edge, color="k", ls="--", lw=1)
    save(fig, path)


def comparison_plots(rows: list[dict], ulp_samples: list, merge_dtype, folder: Path) -> list[str]:
    """compare's plots: norms, the layer × module error map, and (with the base) the residual in ulps."""
    norm_distribution_comparison(rows, folder / "norm_distribution_comparison.png", "LoRA delta Δ vs task vector τ")
    errors = {row["name"]: row["rel_error"] for row in rows if row["rel_error"] is not None}
    layer_module_heatmap(errors, "‖τ − Δ‖ / ‖Δ‖ per tensor", folder / "relative_error_heatmap.png")
    written = ["norm_distribution_comparison.png", "relative_error_heatmap.png"]
    if ulp_samples:
        residual_ulp_histogram(ulp_samples, merge_dtype, folder / "residual_ulp_histogram.png")
        written.append("residual_ulp_histogram.png")
    return written
