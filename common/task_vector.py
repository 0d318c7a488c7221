"""Task vectors `τ = W_finetuned − W_base`, streamed tensor by tensor, with an exact account of each tensor.

Every tensor is classified without thresholds:
- `unchanged`: τ is exactly zero;
- `rounding_artifact`: the finetuned tensor is the base tensor cast to the finetuned dtype, bit for bit
  (a merge at fp16/bf16 rounds every base tensor, so τ is non-zero though nothing was learned);
- `changed`: anything else.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from common.errors import UserError
from common.precision import short_name
from common.safetensors_io import CheckpointIndex, SafetensorsWriter, TensorSpec, iter_row_chunks

CHUNK_BYTES = 64 * 1024 * 1024
STATUSES = ("changed", "rounding_artifact", "unchanged")


@dataclass
class TensorStats:
    """What the task vector of one tensor holds."""

    name: str
    status: str
    shape: list[int]
    base_dtype: str
    finetuned_dtype: str
    norm: float = 0.0
    max_abs: float = 0.0
    changed_fraction: float = 0.0


@dataclass
class Extraction:
    """Every tensor's statistics, and the tensors that could not be subtracted (and why)."""

    tensors: list[TensorStats] = field(default_factory=list)
    only_in_base: list[str] = field(default_factory=list)
    only_in_finetuned: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    non_float: list[str] = field(default_factory=list)
    base_dtype: str = "?"  # the most common dtype of the subtracted tensors in each model
    finetuned_dtype: str = "?"

    def counts(self) -> dict[str, int]:
        counted = Counter(t.status for t in self.tensors)
        return {status: counted.get(status, 0) for status in STATUSES}

    def summary_line(self) -> str:
        c = self.counts()
        return (
            f"{len(self.tensors)} tensors: {c['changed']} changed, {c['rounding_artifact']} rounding artifacts "
            f"({self.base_dtype} base -> {self.finetuned_dtype} finetuned), {c['unchanged']} unchanged"
        )


def check_same_architecture(base_dir: Path, finetuned_dir: Path) -> None:
    """Refuse two models whose config.json name different architectures."""
    types = [_model_type(d) for d in (base_dir, finetuned_dir)]
    if None not in types and types[0] != types[1]:
        raise UserError(f"base is a {types[0]} model but finetuned is a {types[1]} model: not the same architecture")


def _model_type(folder: Path) -> str | None:
    config = folder / "config.json" if folder.is_dir() else None
    if config is None or not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{config}: invalid JSON") from None


def plan_extraction(base: CheckpointIndex, finetuned: CheckpointIndex) -> tuple[list[str], Extraction]:
    """The tensors both models hold as floats of one shape (in base storage order); the rest, sorted out."""
    extraction = Extraction()
    shared = []
    for name in base.names():
        b = base.info(name)
        f = finetuned.tensors.get(name)
        if f is None:
            extraction.only_in_base.append(name)
        elif not (b.dtype.is_floating_point and f.dtype.is_floating_point):
            extraction.non_float.append(name)
        elif b.shape != f.shape:
            extraction.shape_mismatch.append(f"{name} {list(b.shape)} vs {list(f.shape)}")
        else:
            shared.append(name)
    extraction.only_in_finetuned = [n for n in finetuned.names() if n not in base]
    if not shared:
        raise UserError(f"{base.source} and {finetuned.source} have no tensors in common: not the same model")
    extraction.base_dtype = _most_common_dtype(base, shared)
    extraction.finetuned_dtype = _most_common_dtype(finetuned, shared)
    return shared, extraction


def _most_common_dtype(checkpoint: CheckpointIndex, names: list[str]) -> str:
    counted = Counter(short_name(checkpoint.info(n).dtype) for n in names)
    return counted.most_common(1)[0][0]


def extract_task_vector(
    base: CheckpointIndex,
    finetuned: CheckpointIndex,
    out_file: Path,
    device: torch.device,
    metadata: dict[str, str],
    compute_dtype: torch.dtype = torch.float32,
    chunk_bytes: int = CHUNK_BYTES,
    on_tensor: Callable[[str], None] = lambda line: None,
) -> Extraction:
    """Write τ for every shared tensor to `out_file` (in `compute_dtype`) and classify each one."""
    names, extraction = plan_extraction(base, finetuned)
    specs = [TensorSpec(n, compute_dtype, base.info(n).shape) for n in names]
    header = {
        **metadata,
        "base_dtype": extraction.base_dtype,
        "finetuned_dtype": extraction.finetuned_dtype,
        "compute_dtype": short_name(compute_dtype),
    }
    with SafetensorsWriter(out_file, specs, header) as writer:
        for name in names:
            stats = task_vector_tensor(base, finetuned, name, device, compute_dtype, chunk_bytes, writer)
            extraction.tensors.append(stats)
            on_tensor(f"{name}: {stats.status} (|τ| = {stats.norm:.3e})")
    return extraction


def task_vector_tensor(
    base: CheckpointIndex,
    finetuned: CheckpointIndex,
    name: str,
    device: torch.device,
    compute_dtype: torch.dtype,
    chunk_bytes: int,
    writer: SafetensorsWriter,
) -> TensorStats:
    """τ of one tensor, chunk by chunk, with its exact classification."""
    b_info, f_info = base.info(name), finetuned.info(name)
    sum_sq, max_abs, changed, artifact = 0.0, 0.0, 0, f_info.dtype != b_info.dtype
    for start, stop in iter_row_chunks(b_info.shape, compute_dtype, chunk_bytes):
        w_base = base.read_rows(name, start, stop).to(device)
        w_finetuned = finetuned.read_rows(name, start, stop).to(device)
        tau = w_finetuned.to(compute_dtype) - w_base.to(compute_dtype)
        writer.write(name, tau)
        artifact = artifact and torch.equal(w_base.to(w_finetuned.dtype), w_finetuned)
        sum_sq += float(tau.double().square().sum())
        max_abs = max(max_abs, float(tau.abs().max())) if tau.numel() else max_abs
        changed += int(torch.count_nonzero(tau))
    status = "unchanged" if changed == 0 else "rounding_artifact" if artifact else "changed"
    return TensorStats(
        name=name,
        status=status,
        shape=list(b_info.shape),
        base_dtype=short_name(b_info.dtype),
        finetuned_dtype=short_name(f_info.dtype),
        norm=sum_sq**0.5,
        max_abs=max_abs,
        changed_fraction=changed / max(1, b_info.numel),
    )


def write_stats(extraction: Extraction, path: Path, sources: dict[str, str]) -> None:
    """task_vector_stats.json: a summary, one entry per tensor, and the tensors left out."""
    report = {
        "summary": {
            **sources,
            "tensors": len(extraction.tensors),
            **extraction.counts(),
            "base_dtype": extraction.base_dtype,
            "finetuned_dtype": extraction.finetuned_dtype,
        },
        "tensors": [asdict(t) for t in extraction.tensors],
        "only_in_base": extraction.only_in_base,
        "only_in_finetuned": extraction.only_in_finetuned,
        "shape_mismatch": extraction.shape_mismatch,
        "non_float": extraction.non_float,
    }
    path.write_text(json.dumps(report, indent=2) + "\n")


def read_stats(path: Path) -> dict[str, str]:
    """Tensor name -> status from a task_vector_stats.json, or {} when there is none."""
    if not path.is_file():
        return {}
    try:
        return {t["name"]: t["status"] for t in json.loads(path.read_text())["tensors"]}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a task_vector_stats.json ({e})") from None
