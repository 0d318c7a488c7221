"""Task vectors `τ = W_finetuned − W_base`, streamed tensor by tensor, with an exact account of each tensor.

Every tensor is classified without thresholds:
- `unchanged`: τ is exactly zero;
- `rounding_artifact`: the finetuned tensor is the base tensor cast to the finetuned dtype, bit for bit
  (a merge at fp16/bf16 rounds every base tensor, so τ is non-zero though nothing was learned);
- `changed`: anything else. Its `elements_beyond_rounding` counts the elements that differ from the base
  rounded to the finetuned dtype: the ones rounding cannot explain.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import torch

from common.errors import UserError
from common.io.safetensors_io import CHUNK_BYTES, CheckpointIndex, Scratch, ShardedWriter, TensorSpec, iter_row_chunks
from common.io.tensor_source import TensorSource
from common.model.layout import HEAD, tied_embedding
from common.numerics.finite import count_in_checkpoint, json_number, strict_json
from common.numerics.precision import is_rounding_artifact_of_delta, short_name

log = logging.getLogger("lora_tv")

STATS_FILE = "task_vector_stats.json"


class TauStatus(str, Enum):  # noqa: UP042 (enum.StrEnum needs Python 3.11; 3.10 is supported)
    """What τ of one tensor holds: the one vocabulary of task_vector_stats.json, comparison_report.json and
    analysis.json."""

    CHANGED = "changed"  # non-zero, beyond what rounding the base to the finetuned dtype explains
    ROUNDING_ARTIFACT = "rounding_artifact"  # finetuned == base cast to the finetuned dtype, bit for bit
    UNCHANGED = "unchanged"  # τ is exactly zero
    UNCLASSIFIED = "unclassified"  # non-zero, with neither the base nor the extraction's stats to tell which


def task_vector(
    finetuned: torch.Tensor, base: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """τ = W_finetuned − W_base (Ilharco et al. 2023), in `dtype`: both upcast exactly, one rounding in the
    subtraction. `out`, when given, is a buffer of τ's shape and dtype to reuse."""
    if out is None:
        return finetuned.to(dtype) - base.to(dtype)
    if finetuned.dtype == base.dtype == dtype:
        return torch.sub(finetuned, base, out=out)
    return out.copy_(finetuned).sub_(base)  # the base is upcast exactly inside the subtraction


def tensor_status(non_zero: int, beyond_rounding: int, dtype_changed: bool) -> TauStatus:
    """A tensor's status from its counts: zero everywhere, or non-zero only where the base was rounded."""
    if non_zero == 0:
        return TauStatus.UNCHANGED
    if beyond_rounding == 0 and dtype_changed:
        return TauStatus.ROUNDING_ARTIFACT
    return TauStatus.CHANGED


def stored_status(
    name: str,
    tau_file: TensorSource,
    base: CheckpointIndex | None,
    merge_dtype: torch.dtype | None,
    known: Mapping[str, str] | None,
) -> TauStatus:
    """The status of a tensor of a τ file: the extraction's own (`known`, from task_vector_stats.json) when there
    is one, else read off τ; telling a rounding artifact from a change then needs the base and the merge dtype."""
    if (known or {}).get(name) is not None:
        return TauStatus(known[name])
    weight = base.read(name) if base is not None and name in base else None
    return status_of(tau_file.read(name), weight, merge_dtype)


def status_of(tau: torch.Tensor, base_weight: torch.Tensor | None, merge_dtype: torch.dtype | None) -> TauStatus:
    """A tensor's status read off τ itself: zero, or (with the base weight and the merge dtype) the base rounded
    to that dtype and nothing else, or a change; unclassified when non-zero and the base is not there."""
    if not torch.count_nonzero(tau):
        return TauStatus.UNCHANGED
    if base_weight is None or merge_dtype is None or base_weight.shape != tau.shape:
        return TauStatus.UNCLASSIFIED
    if merge_dtype != torch.float32 and is_rounding_artifact_of_delta(base_weight, tau, merge_dtype):
        return TauStatus.ROUNDING_ARTIFACT
    return TauStatus.CHANGED


@dataclass(frozen=True)
class TensorPair:
    """One task-vector tensor: the base and finetuned tensors it is the difference of, and its rows."""

    name: str
    base_name: str
    finetuned_name: str
    rows: int | None  # fewer than both have, with --allow_shape_mismatch


@dataclass
class TensorStats:
    """What the task vector of one tensor holds."""

    name: str
    status: TauStatus
    shape: list[int]
    base_dtype: str
    finetuned_dtype: str
    norm: float = 0.0
    max_abs: float = 0.0
    changed_fraction: float = 0.0
    elements_beyond_rounding: int = 0
    skipped: bool = False  # left out of the file by --skip_unchanged
    base_max_abs: float = 0.0  # max |W_base| where τ ≠ 0: the magnitude a merge's rounding is measured at


@dataclass
class Extraction:
    """Every tensor's statistics, and the tensors that could not be subtracted (and why)."""

    tensors: list[TensorStats] = field(default_factory=list)
    only_in_base: list[str] = field(default_factory=list)
    only_in_finetuned: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    non_float: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)
    base_dtype: str = "?"  # the most common dtype of the subtracted tensors in each model
    finetuned_dtype: str = "?"

    def counts(self) -> dict[str, int]:
        counted = Counter(t.status for t in self.tensors)
        statuses = (TauStatus.CHANGED, TauStatus.ROUNDING_ARTIFACT, TauStatus.UNCHANGED)
        return {status.value: counted.get(status, 0) for status in statuses}

    def summary_line(self) -> str:
        c = self.counts()
        return (
            f"{len(self.tensors)} tensors: {c['changed']} changed, {c['rounding_artifact']} rounding artifacts "
            f"({self.base_dtype} base -> {self.finetuned_dtype} finetuned), {c['unchanged']} unchanged"
        )

    def left_out(self) -> dict[str, list[str]]:
        """Tensors not in the task vector, by reason."""
        return {
            "only in the base": self.only_in_base,
            "only in the finetuned model": self.only_in_finetuned,
            "with different shapes": self.shape_mismatch,
            "not floating point": self.non_float,
        }

    def left_out_lines(self) -> list[str]:
        """A line per reason tensors are not in the task vector (the first names of each), and per tied head."""
        lines = []
        for reason, names in self.left_out().items():
            if names:
                listing = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
                lines.append(f"{len(names)} tensors {reason}, not in the task vector: {listing}")
        return lines + [f"tied weights: {line}" for line in self.tied]


def header_metadata(
    sources: dict[str, str], extraction: Extraction, compute_dtype: torch.dtype, base_config: dict
) -> dict[str, str]:
    """τ's header: the models as the user named them (`sources`), both models' dtypes, τ's dtype and the base's
    model type: what compare and analyze read back."""
    return {
        **sources,
        "base_dtype": extraction.base_dtype,
        "finetuned_dtype": extraction.finetuned_dtype,
        "compute_dtype": short_name(compute_dtype),
        **({"model_type": str(base_config["model_type"])} if base_config.get("model_type") else {}),
    }


def check_same_architecture(base_config: dict, finetuned_config: dict) -> None:
    """Refuse two models whose config.json name different architectures."""
    types = [c.get("model_type") for c in (base_config, finetuned_config)]
    if None not in types and types[0] != types[1]:
        raise UserError(f"base is a {types[0]} model but finetuned is a {types[1]} model: not the same architecture")


def plan_extraction(
    base: CheckpointIndex,
    finetuned: CheckpointIndex,
    configs: tuple[dict, dict] = ({}, {}),
    allow_shape_mismatch: bool = False,
) -> tuple[list[TensorPair], Extraction]:
    """The tensor pairs to subtract (in base storage order); the rest sorted out, with reasons."""
    extraction = Extraction()
    pairs = []
    for name in base.names():
        if name not in finetuned:
            extraction.only_in_base.append(name)
        elif pair := _pair(base, finetuned, name, name, allow_shape_mismatch, extraction):
            pairs.append(pair)
    extraction.only_in_finetuned = [n for n in finetuned.names() if n not in base]
    pairs += _tied_head_pairs(base, finetuned, configs, extraction, allow_shape_mismatch)
    if not pairs:
        raise UserError(f"{base.source} and {finetuned.source} have no tensors in common: not the same model")
    extraction.base_dtype = _most_common_dtype(base, [p.base_name for p in pairs])
    extraction.finetuned_dtype = _most_common_dtype(finetuned, [p.finetuned_name for p in pairs])
    return pairs, extraction


def _pair(
    base: CheckpointIndex, finetuned: CheckpointIndex, base_name: str, ft_name: str, allow: bool, out: Extraction
) -> TensorPair | None:
    b, f = base.info(base_name), finetuned.info(ft_name)
    if not (b.dtype.is_floating_point and f.dtype.is_floating_point):
        out.non_float.append(base_name)
        return None
    if b.shape == f.shape:
        return TensorPair(ft_name, base_name, ft_name, None)
    mismatch = f"{ft_name} {list(b.shape)} vs {list(f.shape)}"
    if allow and len(b.shape) == len(f.shape) >= 1 and b.shape[1:] == f.shape[1:]:
        rows = min(b.shape[0], f.shape[0])
        out.shape_mismatch.append(f"{mismatch} (first {rows} rows compared)")
        return TensorPair(ft_name, base_name, ft_name, rows)
    out.shape_mismatch.append(mismatch)
    return None


def _tied_head_pairs(
    base: CheckpointIndex, finetuned: CheckpointIndex, configs: tuple[dict, dict], out: Extraction, allow: bool
) -> list[TensorPair]:
    """An output head saved in one model and tied to the embedding in the other: subtract the embedding."""
    base_embedding, ft_embedding = tied_embedding(base, configs[0]), tied_embedding(finetuned, configs[1])
    if HEAD in out.only_in_finetuned and base_embedding:
        out.only_in_finetuned.remove(HEAD)
        out.tied.append(f"{HEAD}: the base ties it to {base_embedding}")
        pair = _pair(base, finetuned, base_embedding, HEAD, allow, out)
    elif HEAD in out.only_in_base and ft_embedding:
        out.only_in_base.remove(HEAD)
        out.tied.append(f"{HEAD}: the finetuned model ties it to {ft_embedding}")
        pair = _pair(base, finetuned, HEAD, ft_embedding, allow, out)
        pair = pair and TensorPair(HEAD, HEAD, ft_embedding, pair.rows)
    else:
        return []
    return [pair] if pair else []


def _most_common_dtype(checkpoint: CheckpointIndex, names: list[str]) -> str:
    counted = Counter(short_name(checkpoint.info(n).dtype) for n in names)
    return counted.most_common(1)[0][0]


def task_vector_specs(base: CheckpointIndex, pairs: list[TensorPair], compute_dtype: torch.dtype) -> list[TensorSpec]:
    """The shapes of the task vector file, known before any tensor is read."""
    specs = []
    for pair in pairs:
        shape = base.info(pair.base_name).shape
        specs.append(TensorSpec(pair.name, compute_dtype, shape if pair.rows is None else (pair.rows, *shape[1:])))
    return specs


def extract_task_vector(
    base: CheckpointIndex,
    finetuned: CheckpointIndex,
    pairs: list[TensorPair],
    extraction: Extraction,
    writer: ShardedWriter,
    device: torch.device,
    compute_dtype: torch.dtype = torch.float32,
    skip_unchanged: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    on_tensor: Callable[..., None] = lambda line, amount=1: None,
) -> Extraction:
    """Write τ for every pair (in `compute_dtype`) and classify each tensor."""
    buffers = ChunkBuffers(device)
    for pair, spec in zip(pairs, task_vector_specs(base, pairs, compute_dtype), strict=True):
        stats = task_vector_tensor(base, finetuned, pair, spec, buffers, chunk_bytes, writer)
        if skip_unchanged and stats.status == TauStatus.UNCHANGED:
            writer.discard(pair.name)
            stats.skipped = True
        writer.tensor_done(pair.name)
        extraction.tensors.append(stats)
        on_tensor(f"{pair.name}: {stats.status} (|τ| = {stats.norm:.3e})", spec.nbytes)
    return extraction


class ChunkBuffers:
    """The memory one chunk of τ is computed in, reused from chunk to chunk (pinned for CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base, self.finetuned = Scratch(device.type == "cuda"), Scratch(device.type == "cuda")
        self.tau = Scratch()

    def task_vector(self, w_finetuned: torch.Tensor, w_base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """τ of one chunk (`task_vector`): on the device, or on the CPU into the reused buffer."""
        if self.device.type != "cpu":
            w_finetuned, w_base = (w.to(self.device, non_blocking=True) for w in (w_finetuned, w_base))
            return task_vector(w_finetuned, w_base, dtype)
        return task_vector(w_finetuned, w_base, dtype, out=self.tau.take(tuple(w_base.shape), dtype))


@dataclass
class RunningStats:
    """‖τ‖², max |τ|, non-zero count, elements beyond rounding and max |W_base| where τ ≠ 0, chunk by chunk."""

    sum_sq: float = 0.0
    max_abs: float = 0.0
    changed: int = 0
    beyond: int = 0
    base_max_abs: float = 0.0

    def add(self, tau: torch.Tensor, w_finetuned: torch.Tensor, w_base: torch.Tensor) -> int:
        """Count one chunk in; returns its number of non-zero elements (0: τ is zero there)."""
        changed = int(torch.count_nonzero(tau))
        if changed == 0:  # finetuned == base here, so nothing is beyond rounding either
            return 0
        self.changed += changed
        self.beyond += int(torch.count_nonzero(w_finetuned.to(tau.device) != w_base.to(tau.device, w_finetuned.dtype)))
        low, high = torch.aminmax(tau)
        self.max_abs = max(self.max_abs, float(-low), float(high))
        low, high = torch.aminmax(w_base)  # where τ is zero the base's magnitude does not matter
        self.base_max_abs = max(self.base_max_abs, float(-low), float(high))
        norm = torch.linalg.vector_norm(tau)  # fp32 with blocked sums; fp64 only if that overflowed
        if not torch.isfinite(norm) and tau.dtype != torch.float64:
            norm = torch.linalg.vector_norm(tau, dtype=torch.float64)
        self.sum_sq += float(norm) ** 2
        return changed


def task_vector_tensor(
    base: CheckpointIndex,
    finetuned: CheckpointIndex,
    pair: TensorPair,
    spec: TensorSpec,
    buffers: ChunkBuffers,
    chunk_bytes: int,
    writer: ShardedWriter,
) -> TensorStats:
    """τ of one tensor, chunk by chunk, with its exact classification. Chunks where τ is zero, bit for bit,
    become holes in the file (nothing written)."""
    b_dtype, f_dtype = base.info(pair.base_name).dtype, finetuned.info(pair.finetuned_name).dtype
    running = RunningStats()
    for start, stop in iter_row_chunks(spec.shape, spec.dtype, chunk_bytes):
        w_base = base.read_rows(pair.base_name, start, stop, buffers.base)
        w_finetuned = finetuned.read_rows(pair.finetuned_name, start, stop, buffers.finetuned)
        tau = buffers.task_vector(w_finetuned, w_base, spec.dtype)
        if running.add(tau, w_finetuned, w_base) == 0 and not torch.count_nonzero(_bits(tau)):
            writer.write_zeros(pair.name, spec.dtype, tau.numel() * tau.element_size())
        else:
            writer.write(pair.name, tau)
    return TensorStats(
        name=pair.name,
        status=tensor_status(running.changed, running.beyond, f_dtype != b_dtype),
        shape=list(spec.shape),
        base_dtype=short_name(b_dtype),
        finetuned_dtype=short_name(f_dtype),
        norm=running.sum_sq**0.5,
        max_abs=running.max_abs,
        changed_fraction=running.changed / max(1, spec.numel),
        elements_beyond_rounding=running.beyond,
        base_max_abs=running.base_max_abs,
    )


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers of its width: non-zero wherever its bytes are (−0.0 included)."""
    return tensor.view({8: torch.int64, 4: torch.int32, 2: torch.int16}.get(tensor.element_size(), torch.uint8))


def write_stats(extraction: Extraction, path: Path, sources: dict[str, str]) -> None:
    """task_vector_stats.json: a summary, one entry per tensor, and the tensors left out."""
    report = {
        "summary": {
            **sources,
            "tensors": len(extraction.tensors),
            **extraction.counts(),
            "skipped_unchanged": sum(t.skipped for t in extraction.tensors),
            "base_dtype": extraction.base_dtype,
            "finetuned_dtype": extraction.finetuned_dtype,
        },
        "tensors": [{k: json_number(v) for k, v in asdict(t).items()} for t in extraction.tensors],
        "only_in_base": extraction.only_in_base,
        "only_in_finetuned": extraction.only_in_finetuned,
        "shape_mismatch": extraction.shape_mismatch,
        "non_float": extraction.non_float,
        "tied": extraction.tied,
    }
    path.write_text(strict_json(report))


@dataclass
class ExtractionRecord:
    """What the extraction recorded beside τ (task_vector_stats.json): each tensor's status, and the base's
    magnitude where τ is non-zero. Empty when there is no stats file."""

    status: dict[str, str] = field(default_factory=dict)
    base_max_abs: dict[str, float] = field(default_factory=dict)


FINGERPRINTS = ("base_fingerprint", "finetuned_fingerprint")  # in τ's header and the stats file's summary


def stats_beside(task_vector: CheckpointIndex, task_vector_path: Path) -> ExtractionRecord:
    """The extraction's record of each tensor, from the stats file beside a task vector (empty if none), used only
    when it is proven to be this τ's: both files record the same two models (model_layout.fingerprint). A stats file
    of another extraction is refused; one that cannot be told (written without fingerprints) is not used, and the
    statuses are read off τ instead."""
    folder = task_vector_path if task_vector_path.is_dir() else task_vector_path.parent
    path = folder / STATS_FILE
    if not path.is_file():
        return ExtractionRecord()
    summary = _stats_summary(path)
    recorded = {key: (task_vector.metadata.get(key), summary.get(key)) for key in FINGERPRINTS}
    if all(a and b for a, b in recorded.values()):
        if any(a != b for a, b in recorded.values()):
            ours, theirs = (" / ".join(str(pair[i]) for pair in recorded.values()) for i in (0, 1))
            raise UserError(
                f"{path} belongs to another extraction than {task_vector.source} (their models' fingerprints: "
                f"{theirs} against {ours}): a stale stats file? Extract again, or remove it"
            )
        return read_stats(path)
    log.warning(
        f"note: {path} cannot be shown to belong to {task_vector.source} (no model fingerprints in one of them): "
        "not used; each tensor's status is read off τ"
    )
    return ExtractionRecord()


def _stats_summary(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text()).get("summary")
    except (ValueError, RecursionError, AttributeError) as e:  # ValueError: invalid JSON or UTF-8
        raise UserError(f"{path}: not a task_vector_stats.json ({e})") from None
    if not isinstance(summary, dict):
        raise UserError(f"{path}: not a task_vector_stats.json (no summary)")
    return summary


def read_stats(path: Path) -> ExtractionRecord:
    """The record of a task_vector_stats.json, or an empty one when there is none."""
    if not path.is_file():
        return ExtractionRecord()
    try:
        tensors = json.loads(path.read_text())["tensors"]
        status = {t["name"]: t["status"] for t in tensors}
        magnitudes = {t["name"]: float(t["base_max_abs"]) for t in tensors if t.get("base_max_abs") is not None}
    except (ValueError, RecursionError, KeyError, TypeError) as e:  # ValueError: invalid JSON or UTF-8
        raise UserError(f"{path}: not a task_vector_stats.json ({e})") from None
    return ExtractionRecord(status, magnitudes)


def non_finite_task_vector_warnings(
    base: CheckpointIndex, finetuned: CheckpointIndex, pairs: list[TensorPair], extraction: Extraction
) -> list[str]:
    """A line per tensor whose τ is not finite (its norm says so), with the NaN and Inf each model holds there."""
    norms = {t.name: t.norm for t in extraction.tensors}
    lines = []
    for pair in pairs:
        if math.isfinite(norms.get(pair.name, 0.0)):
            continue
        counts = {
            "base": count_in_checkpoint(base, pair.base_name, pair.rows),
            "finetuned": count_in_checkpoint(finetuned, pair.finetuned_name, pair.rows),
        }
        held = ", ".join(f"the {model} model holds {c}" for model, c in counts.items() if c) or "overflow"
        lines.append(f"warning: τ of {pair.name} is not finite: {held}")
    return lines
