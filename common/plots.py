"""Plots (matplotlib, Agg backend): each one shows a single claim of a report."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def singular_value_spectra(spectra: list, path: Path) -> None:
    """Per module type: σᵢ of Δ (solid) and τ (dashed) for every layer, log scale.

    When τ = Δ the dashed curves lie on the solid ones and drop off after index r; a low-precision
    merge shows as a dashed floor that continues to the last index.
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
        ax.set(title=module, xlabel="index i", ylabel="σᵢ")
    for ax in list(axes.flat)[len(modules) :]:
        ax.axis("off")
    axes.flat[0].plot([], [], "-", color="tab:blue", label="Δ (LoRA delta)")
    axes.flat[0].plot([], [], "--", color="tab:orange", label="τ (task vector)")
    axes.flat[0].legend(loc="lower left", fontsize=8)
    fig.suptitle("Singular value spectra, one curve per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
