"""analyze over several inputs (task vectors and adapters): their interference, streamed tensor by tensor, written
as interference.json, interference_report.md and three plots (common/analysis/interference.py)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from common.analysis.interference import Input, adapter_input, analyze_interference, task_vector_input
from common.analysis.interference_report import (
    interference_findings,
    interference_markdown,
    interference_plots,
    interference_report,
)
from common.errors import UserError
from common.io.outputs import check_output_dir, staged_output_dir
from common.io.safetensors_io import CheckpointIndex
from common.lora.adapter import LoraAdapter
from common.lora.deltas import plan_deltas
from common.model.layout import read_config
from common.numerics.finite import strict_json

log = logging.getLogger("lora_tv")


def labels_of(paths: list[Path]) -> list[str]:
    """A short name per input: its folder's name (τ files are all called task_vector.safetensors), made unique."""
    names = [p.parent.name if p.is_file() or p.suffix == ".safetensors" else p.name for p in paths]
    return [n if names.count(n) == 1 else f"{i + 1}:{n}" for i, n in enumerate(names)]


def check_same_shapes(inputs: list[Input]) -> None:
    """Inputs of one model: every tensor two inputs both hold has one shape."""
    for name in sorted(set().union(*(i.names for i in inputs))):
        shapes = {i.label: tuple(i.shape(name)) for i in inputs if name in i.names}
        if len(set(shapes.values())) > 1:
            described = ", ".join(f"{label} {list(shape)}" for label, shape in shapes.items())
            raise UserError(f"{name} has different shapes in the inputs ({described}): inputs of different models?")


def analyze_several(
    task_vectors: list[Path],
    adapters: list[Path],
    base_dir: Path | None,
    merged: Path | None,
    output_dir: Path,
    densities: tuple[float, ...],
    overlap_rank: int,
    device: torch.device,
    overwrite: bool,
    skip_plots: bool,
) -> list[str]:
    """Every measure over the inputs; returns the findings."""
    labels = labels_of([*task_vectors, *adapters])
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(CheckpointIndex(base_dir)) if base_dir else None
        inputs = []
        for label, path in zip(labels, task_vectors, strict=False):
            inputs.append(task_vector_input(label, stack.enter_context(CheckpointIndex(path))))
        for label, path in zip(labels[len(task_vectors) :], adapters, strict=True):
            adapter = LoraAdapter(path, base_dir)
            stack.callback(adapter.close)
            names = set(base.names()) if base is not None else set().union(*(i.names for i in inputs))
            plan = plan_deltas(adapter, base, read_config(base_dir) if base_dir else {}, names)
            inputs.append(adapter_input(label, adapter, plan, base, device))
        merged_input = None
        if merged is not None:
            merged_input = task_vector_input(merged.parent.name, stack.enter_context(CheckpointIndex(merged)))
        check_same_shapes(inputs + ([merged_input] if merged_input else []))
        check_output_dir(output_dir, [*task_vectors, *adapters, *([merged] if merged else [])], overwrite)
        staging = stack.enter_context(staged_output_dir(output_dir, overwrite))
        analysis = analyze_interference(inputs, densities, overlap_rank, merged_input)
        report = interference_report(analysis)
        findings = interference_findings(analysis)
        report["findings"] = findings
        (staging / "interference.json").write_text(strict_json(report))
        plots = [] if skip_plots else interference_plots(analysis, staging)
        (staging / "interference_report.md").write_text(interference_markdown(report, findings, plots))
    log.info("FINDINGS:")
    for line in findings:
        log.info(f"   {line}")
    log.info(f"\n{', '.join(['interference.json', 'interference_report.md', *plots])} in {output_dir}/")
    return findings
