"""The streaming merge: `W' = W + scaling · B @ A`, one base tensor (or row chunk) at a time.

It reproduces what `PeftModel.merge_and_unload()` computes on the same device: the base weight is
first cast to the output precision (as `from_pretrained(dtype=...)` does), then the fp32 delta is
added in place (`W.data += Δ`), which rounds once: `W' = round(W.float() + Δ)`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.adapter import LoraAdapter, check_targets_match, lora_delta
from common.errors import UserError
from common.precision import short_name
from common.safetensors_io import CheckpointIndex, ShardedWriter, TensorSpec, iter_row_chunks

CHUNK_BYTES = 64 * 1024 * 1024
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
    merged: list[str] = field(default_factory=list)
    non_finite: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def merged_dtype(stored: torch.dtype, precision: torch.dtype) -> torch.dtype:
    """Floating tensors take the output precision; integer and bool buffers keep their dtype."""
    return precision if stored.is_floating_point else stored


def merge_checkpoint(
    base: CheckpointIndex,
    adapter: LoraAdapter,
    out_dir: Path,
    precision: torch.dtype,
    device: torch.device,
    chunk_bytes: int = CHUNK_BYTES,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    on_tensor: Callable[[str], None] = lambda name: None,
) -> MergeSummary:
    """Write the merged weights of every base tensor into `out_dir` as safetensors shards."""
    check_targets_match(adapter, base.shapes(), f"base model {base.source}")
    names = base.names()
    specs = [TensorSpec(n, merged_dtype(base.info(n).dtype, precision), base.info(n).shape) for n in names]
    writer = ShardedWriter(out_dir, specs, max_shard_bytes, {"format": "pt"})
    summary = MergeSummary(tensors=len(names), files=[f for f, _ in writer.shards])
    try:
        for spec in specs:
            merge_tensor(base, adapter, spec, device, chunk_bytes, writer, summary)
            on_tensor(spec.name)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    if summary.non_finite:
        raise UserError(
            f"the merge at {short_name(precision)} overflows in {len(summary.non_finite)} tensors "
            f"({', '.join(summary.non_finite[:3])}); merge at fp32 or bf16"
        )
    return summary


def merge_tensor(
    base: CheckpointIndex,
    adapter: LoraAdapter,
    spec: TensorSpec,
    device: torch.device,
    chunk_bytes: int,
    writer: ShardedWriter,
    summary: MergeSummary,
) -> None:
    """Cast one base tensor to its output dtype, chunk by chunk, adding rows of its LoRA delta if it has one.

    The delta is computed whole, exactly as peft computes it, then sliced: bitwise peft's at any chunk size.
    """
    target = adapter.targets.get(spec.name)
    delta = lora_delta(target, *(f.to(device) for f in adapter.factors(target))) if target else None
    finite = True
    for start, stop in iter_row_chunks(spec.shape, base.info(spec.name).dtype, chunk_bytes):
        weight = base.read_rows(spec.name, start, stop).to(device).to(spec.dtype)
        if delta is not None:
            weight += delta[start:stop]
            finite = finite and bool(torch.isfinite(weight).all())
        writer.write(spec.name, weight)
    writer.tensor_done(spec.name)
    if target is not None:
        summary.merged.append(spec.name)
        if not finite:
            summary.non_finite.append(spec.name)


def write_model_files(base_dir: Path, adapter_dir: Path, out_dir: Path, precision: torch.dtype) -> list[str]:
    """config.json (recording the dtype written), generation config and tokenizer files beside the weights."""
    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"base model {base_dir}: no config.json")
    config = json.loads(config_path.read_text())
    dtype_name = str(precision).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = ["config.json"]
    for name in ("generation_config.json", *TOKENIZER_FILES):
        source = adapter_dir / name if (adapter_dir / name).is_file() else base_dir / name
        if source.is_file():
            shutil.copyfile(source, out_dir / name)
            copied.append(name)
    return copied
