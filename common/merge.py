"""The streaming merge: every base tensor read, changed as peft would change it, written, one at a time.

It reproduces what `PeftModel.merge_and_unload()` computes on the same device: each base tensor is
first cast to the output precision (as `from_pretrained(dtype=...)` does), then the adapter's changes
are applied in peft's arithmetic (common/lora.py). Tensors the adapter does not touch are copied by the
kernel when their dtype stays (else cast in row chunks) and scanned for NaN/Inf in row chunks, so memory
holds at most one changed tensor or one chunk.

Tied embeddings: when the output head shares the input embedding's weight and the adapter changes
one but not the other (LoRA on `embed_tokens`, `modules_to_save=["lm_head"]` …), the unmerged model
uses different weights for the two; peft's merge would write the change into both. The output is
untied instead (`lm_head.weight` written, `tie_word_embeddings: false`), so it computes what the
unmerged model computes.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.adapter import ORDER, Change, LoraAdapter, Replacement, TokenRows, names_in_checkpoint
from common.adapter_fit import fit_adapter
from common.finite import non_finite_merge
from common.lora import apply_changes
from common.model_layout import HEAD, kept_in_fp32, tied_embedding
from common.precision import all_finite, short_name
from common.safetensors_io import CHUNK_BYTES, CheckpointIndex, Scratch, ShardedWriter, TensorSpec, iter_row_chunks

log = logging.getLogger("lora_tv")
MAX_SHARD_BYTES = 5 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


@dataclass
class MergePlan:
    """What to write: every output tensor, the base tensor it starts from, and the changes it gets."""

    specs: list[TensorSpec]
    sources: dict[str, str]  # output name -> base tensor name
    changes: dict[str, list[Change]]
    untied: bool = False
    vocabulary: tuple[int, int] | None = None  # rows before and after, when the adapter resizes the vocabulary


@dataclass
class MergeSummary:
    tensors: int = 0
    changed: list[str] = field(default_factory=list)
    non_finite: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    untied: bool = False
    vocabulary: tuple[int, int] | None = None


def merged_dtype(name: str, stored: torch.dtype, precision: torch.dtype, kept_fp32: re.Pattern | None) -> torch.dtype:
    """Floating tensors take the output precision, but for those the model class keeps in fp32 (see
    `kept_in_fp32`); integer and bool buffers keep their dtype."""
    if not stored.is_floating_point:
        return stored
    return torch.float32 if kept_fp32 is not None and kept_fp32.search(name) else precision


def plan_merge(base: CheckpointIndex, adapter: LoraAdapter, precision: torch.dtype, config: dict) -> MergePlan:
    """Match the adapter's changes to base tensors (by name and shape), untying a tied head if needed.

    Tensors come in the base's order, except that the checkpoint tensors holding one adapted parameter (a stack of
    experts) come one after the other: its Δ is computed once, whole, and cut into them.
    """
    embedding = tied_embedding(base, config)
    shapes = base.shapes()
    changes = names_in_checkpoint(adapter.changes, set(shapes))
    if embedding is not None:
        shapes[HEAD] = shapes[embedding]
        changes = _tied_changes(changes, embedding)
    fit = fit_adapter(
        adapter, changes, shapes, f"base model {base.source}", base.source if base.source.is_dir() else None
    )
    changes = fit.changes
    sources = {name: name for name in _grouped(base.names(), fit.groups)}
    untied = embedding is not None and changes.get(HEAD, []) != changes.get(embedding, [])
    if untied:
        sources[HEAD] = embedding
    elif embedding is not None:
        changes.pop(HEAD, None)  # still tied: the head is the embedding, written once
    kept_fp32 = kept_in_fp32(config, precision)
    specs = [
        TensorSpec(out, merged_dtype(out, base.info(src).dtype, precision, kept_fp32), fit.shapes[out])
        for out, src in sources.items()
    ]
    return MergePlan(specs=specs, sources=sources, changes=changes, untied=untied, vocabulary=fit.vocabulary)


def _grouped(names: list[str], groups: list[list[str]]) -> list[str]:
    """`names` in order, each group's members moved up to where its first member is."""
    group_of = {name: group for group in groups for name in group}
    ordered, placed = [], set()
    for name in names:
        if name not in placed:
            members = [n for n in names if n in group_of[name]] if name in group_of else [name]
            ordered += members
            placed.update(members)
    return ordered


def _tied_changes(changes: dict[str, list[Change]], embedding: str) -> dict[str, list[Change]]:
    """Changes to the shared parameter itself (a reloaded base layer, trainable tokens) reach both names."""

    def shared(change: Change) -> bool:
        return isinstance(change, TokenRows) or (isinstance(change, Replacement) and change.shared)

    both = [c for name in (HEAD, embedding) for c in changes.get(name, []) if shared(c)]
    tied = dict(changes)
    for name in (HEAD, embedding):
        own = [c for c in changes.get(name, []) if not shared(c)]
        merged = sorted(both + own, key=lambda c: ORDER[type(c)])
        if merged:
            tied[name] = merged
    return tied


def merge_checkpoint(
    base: CheckpointIndex,
    adapter: LoraAdapter,
    out_dir: Path,
    precision: torch.dtype,
    device: torch.device,
    config: dict,
    chunk_bytes: int = CHUNK_BYTES,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    on_tensor: Callable[[str, int], None] = lambda name, nbytes: None,
) -> MergeSummary:
    """Write the merged weights of every base tensor into `out_dir` as safetensors shards."""
    plan = plan_merge(base, adapter, precision, config)
    writer = ShardedWriter(out_dir, plan.specs, max_shard_bytes, {"format": "pt"})
    summary = MergeSummary(
        tensors=len(plan.specs), files=[f for f, _ in writer.shards], untied=plan.untied, vocabulary=plan.vocabulary
    )
    scratch = Scratch(pinned=device.type == "cuda"), Scratch()
    try:
        for spec in plan.specs:
            changes = plan.changes.get(spec.name, [])
            source = plan.sources[spec.name]
            if changes:
                finite = write_changed(base, source, spec, changes, adapter, device, writer, scratch[0])
                summary.changed.append(spec.name)
            else:
                finite = write_cast(base, source, spec, chunk_bytes, writer, scratch)
            if not finite:
                summary.non_finite.append(spec.name)
            writer.tensor_done(spec.name)
            on_tensor(spec.name, spec.nbytes)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    if summary.non_finite:
        raise non_finite_merge(summary.non_finite, short_name(precision), plan.sources, plan.changes, adapter, base)
    return summary


def write_cast(
    base: CheckpointIndex,
    source: str,
    spec: TensorSpec,
    chunk_bytes: int,
    writer: ShardedWriter,
    scratch: tuple[Scratch, Scratch],
) -> bool:
    """A tensor the adapter does not touch: its bytes copied by the kernel when the dtype stays, else cast in
    row chunks (on the CPU: a cast rounds the same on every device). True when the output is finite (checked in
    row chunks read into a reused buffer, also for a copy)."""
    stored = base.info(source).dtype
    copied = stored == spec.dtype
    if copied:
        writer.copy_from(spec.name, spec.dtype, *base.byte_range(source), spec.nbytes)
    finite = True
    for start, stop in iter_row_chunks(spec.shape, stored, chunk_bytes):
        chunk = base.read_rows(source, start, stop, scratch[0])
        output = chunk if copied else scratch[1].take(tuple(chunk.shape), spec.dtype).copy_(chunk)
        finite = finite and all_finite(output)  # NaN or Inf in the base, or a cast that overflowed
        if not copied:
            writer.write(spec.name, output)
    return finite


def write_changed(
    base: CheckpointIndex,
    source: str,
    spec: TensorSpec,
    changes: list[Change],
    adapter: LoraAdapter,
    device: torch.device,
    writer: ShardedWriter,
    scratch: Scratch,
) -> bool:
    """A tensor the adapter changes: whole, cast, then every change in peft's order. True when finite."""
    stored = base.info(source).shape
    weight = base.read_rows(source, 0, stored[0] if stored else 1, scratch)
    weight = apply_changes(weight.to(device).to(spec.dtype), changes, adapter)
    writer.write(spec.name, weight)
    return all_finite(weight)


def write_model_files(
    config: dict,
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    precision: torch.dtype,
    untied: bool,
    vocabulary: tuple[int, int] | None = None,
) -> list[str]:
    """config.json (recording the dtype written and a resized vocabulary), generation config and tokenizer files
    (the adapter's own when it has them: a resized vocabulary comes with its tokenizer) beside the weights."""
    config = dict(config)
    dtype_name = str(precision).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    if untied:
        config["tie_word_embeddings"] = False
    if vocabulary is not None:
        config["vocab_size"] = vocabulary[1]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [
        "config.json",
        *copy_side_files(base_dir, adapter_dir, out_dir, ("generation_config.json", *TOKENIZER_FILES)),
    ]


def copy_side_files(base_dir: Path, adapter_dir: Path, out_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Copy each file from the adapter folder when it has one (a tokenizer trained along), else from the base."""
    copied = []
    for name in names:
        source = adapter_dir / name if (adapter_dir / name).is_file() else base_dir / name
        if source.is_file():
            shutil.copyfile(source, out_dir / name)
            copied.append(name)
    return copied


def merge_with_peft(
    base_dir: Path, adapter_dir: Path, out_dir: Path, precision: torch.dtype, device: torch.device
) -> None:
    """The reference path: transformers load, `PeftModel.from_pretrained`, `merge_and_unload`, `save_pretrained`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=precision).to(device)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    copy_side_files(base_dir, adapter_dir, out_dir, TOKENIZER_FILES)
