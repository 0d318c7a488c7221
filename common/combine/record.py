"""combination.json: what a combined model was made of, written beside its weights so that it can be checked later.

Every checkpoint named is given with its fingerprint (common/model/layout.py: `fingerprint`): the base, each
adapter's weights, each task vector and the output itself (so a τ later extracted from this model, whose header
records `finetuned_fingerprint`, can be matched to this record).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.combine.plan import AdapterInput, CombinationInput, TaskVectorInput
from common.io.safetensors_io import CheckpointIndex
from common.model.layout import fingerprint
from common.numerics.precision import short_name

RECORD_FILE = "combination.json"
FORMULA = "θ₀ + Σ wᵢ·Δᵢ"


def input_record(x: CombinationInput) -> dict:
    """An input as recorded: its kind, path, weight and fingerprint (and for τ the models it was extracted from)."""
    if isinstance(x, AdapterInput):
        index = x.adapter.weights.index  # None for an adapter_model.bin
        return {
            "kind": "lora",
            "path": x.path,
            "folder": str(x.adapter.folder),
            "weight": x.weight,
            "fingerprint": fingerprint(index) if index is not None else None,
        }
    metadata = x.task_vector.metadata
    return {
        "kind": "task_vector",
        "path": x.path,
        "weight": x.weight,
        "fingerprint": fingerprint(x.task_vector),
        "base_fingerprint": metadata.get("base_fingerprint"),
        "finetuned_fingerprint": metadata.get("finetuned_fingerprint"),
    }


def write_record(
    out_dir: Path,
    base_model: str,
    base: CheckpointIndex,
    inputs: list[CombinationInput],
    rounding: str,
    precision: torch.dtype,
    changed: int,
) -> dict:
    """Write combination.json into `out_dir` (the staged output, whose weights are complete) and return it."""
    with CheckpointIndex(out_dir) as output:
        output_fingerprint = fingerprint(output)
    record = {
        "formula": FORMULA,
        "rounding": rounding,
        "precision": short_name(precision),
        "order": "adapters (--lora_path), then task vectors (--task_vector_path), each in the order given",
        "base_model": {"path": base_model, "fingerprint": fingerprint(base)},
        "inputs": [input_record(x) for x in inputs],
        "tensors_changed": changed,
        "output_fingerprint": output_fingerprint,
    }
    (out_dir / RECORD_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return record


def task_vectors_of_another_base(inputs: list[CombinationInput], base: CheckpointIndex) -> list[str]:
    """The task vectors whose header records another base than this one (by fingerprint), for a note."""
    ours = fingerprint(base)
    return [
        x.path
        for x in inputs
        if isinstance(x, TaskVectorInput) and x.task_vector.metadata.get("base_fingerprint") not in (None, ours)
    ]
