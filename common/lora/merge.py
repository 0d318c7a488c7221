"""The streaming merge: every base tensor read, changed as peft would change it, written, one at a time.

It reproduces what `PeftModel.merge_and_unload()` computes on the same device: each base tensor is
first cast to the output precision (as `from_pretrained(dtype=...)` does), then the adapter's changes
are applied in peft's arithmetic (common/lora/arithmetic.py). Tensors the adapter does not touch are copied by the
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
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.errors import UserError
from common.io.safetensors_io import CHUNK_BYTES, CheckpointIndex, Scratch, ShardedWriter, TensorSpec, iter_row_chunks
from common.lora.adapter import Change, LoraAdapter, LoraTarget
from common.lora.arithmetic import apply_changes
from common.lora.merge_plan import plan_merge
from common.lora.non_finite import non_finite_merge
from common.model.quantization import FourBit, bnb_config, dequantized, requantized
from common.numerics.finite import all_finite
from common.numerics.precision import short_name
from common.quiet import quiet_libraries

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
class MergeSummary:
    tensors: int = 0
    changed: list[str] = field(default_factory=list)
    non_finite: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    untied: bool = False
    vocabulary: tuple[int, int] | None = None


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
    four_bit: QuantizedBase | None = None,
) -> MergeSummary:
    """Write the merged weights of every base tensor into `out_dir` as safetensors shards; with `four_bit`, into
    the base a QLoRA adapter was trained on (common/model/quantization.py)."""
    plan = plan_merge(base, adapter, precision, config)
    scratch = Scratch(pinned=device.type == "cuda"), Scratch()
    with ShardedWriter(out_dir, plan.specs, max_shard_bytes, {"format": "pt"}) as writer:
        files = [f for f, _ in writer.shards]
        summary = MergeSummary(len(plan.specs), files=files, untied=plan.untied, vocabulary=plan.vocabulary)
        for spec in plan.specs:
            changes = plan.changes.get(spec.name, [])
            source = plan.sources[spec.name]
            quantized = four_bit is not None and source in four_bit.weights
            if changes or quantized:
                how = (four_bit.four_bit, four_bit.weights[source]) if quantized else None
                finite = write_changed(base, source, spec, changes, adapter, device, writer, scratch[0], how)
                summary.changed += [spec.name] if changes else []
            else:
                finite = write_cast(base, source, spec, chunk_bytes, writer, scratch)
            if not finite:
                summary.non_finite.append(spec.name)
            writer.tensor_done(spec.name)
            on_tensor(spec.name, spec.nbytes)
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
    copied = stored == spec.dtype and source not in base.four_bit  # a saved 4-bit weight is dequantized, not copied
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
    four_bit: tuple[FourBit, bool] | None = None,
) -> bool:
    """A tensor merged whole: cast, then every change in peft's order. A weight a 4-bit load quantizes (`four_bit`:
    the quantization, and whether the weight is a Conv1D's) is first deq(Q(W)) at the merge dtype; with
    `requantize` the changes are merged in fp32 and the result quantized again, as peft's 4-bit merge does. True
    when finite."""
    stored = base.info(source).shape
    weight = base.read_rows(source, 0, stored[0] if stored else 1, scratch).to(device).to(spec.dtype)
    if four_bit is not None:
        weight = dequantized(weight, *four_bit)
    if changes and four_bit is not None and four_bit[0].requantize:
        weight = requantized(apply_changes(weight.float(), changes, adapter), four_bit[0], spec.dtype, four_bit[1])
    elif changes:
        weight = apply_changes(weight, changes, adapter)
    writer.write(spec.name, weight)
    return all_finite(weight)


@dataclass(frozen=True)
class QuantizedBase:
    """The 4-bit quantization a QLoRA adapter was trained with, and the weights it applies to (name: Conv1D?)."""

    four_bit: FourBit
    weights: dict[str, bool]


def check_requantizable(adapter: LoraAdapter, quantized: QuantizedBase) -> None:
    """--requantize follows peft's 4-bit merge (Linear4bit.merge) for plain LoRA factors; its DoRA and LoRA-bias
    arithmetic differ from the ones of an unquantized layer, and are not reproduced: refused by name."""
    if not quantized.four_bit.requantize:
        return
    for name in quantized.weights:
        for change in adapter.changes.get(name, []):
            if isinstance(change, LoraTarget) and (change.dora or change.init):
                raise UserError(f"--requantize: {name} is a DoRA / PiSSA / OLoRA layer: merge without --requantize")
    if adapter.config.lora_bias:
        raise UserError("--requantize: lora_bias (peft's 4-bit merge adds lora_B.bias unscaled): merge without it")


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
    config.pop("quantization_config", None)  # a base saved 4-bit is read dequantized: the output is not quantized
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
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    precision: torch.dtype,
    device: torch.device,
    four_bit: FourBit | None = None,
) -> None:
    """The reference path: transformers load, `PeftModel.from_pretrained`, `merge_and_unload`, `save_pretrained`;
    with `four_bit`, the base loaded 4-bit, dequantized before the merge (or after it, re-quantizing: `requantize`)."""
    from peft import PeftModel
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    with quiet_libraries():
        if four_bit is None:
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=precision).to(device)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                base_dir,
                dtype=precision,
                device_map={"": str(device)},
                quantization_config=bnb_config(four_bit, precision),
            )
            # no forward pass before the dequantize(): see model/quantization.py
            model = model if four_bit.requantize else model.dequantize()
        try:
            merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
            merged = merged.dequantize() if four_bit is not None and four_bit.requantize else merged
        except (ValueError, KeyError, RuntimeError) as e:  # peft's own refusals of an adapter that does not fit
            why = f"it looks for {e.args[0]}, which the adapter's files do not hold" if isinstance(e, KeyError) else e
            raise UserError(f"--engine peft: peft cannot merge {adapter_dir} into {base_dir}: {why}") from None
        try:
            merged.save_pretrained(out_dir)
        except SafetensorError as e:  # safetensors reports an OS error as its own: give it back its errno
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(out_dir / "model.safetensors")) from e
    copy_side_files(base_dir, adapter_dir, out_dir, TOKENIZER_FILES)
