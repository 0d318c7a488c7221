"""NaN and Inf in a merge or a LoRA delta, traced back to the inputs they come from (the base tensor, the
adapter's factors), or named as an overflow."""

from __future__ import annotations

import torch

from common.errors import UserError
from common.io.safetensors_io import CheckpointIndex
from common.lora.adapter import (
    BiasUpdate,
    Change,
    LoraAdapter,
    LoraTarget,
    ParameterPiece,
    Replacement,
    TokenRows,
)
from common.numerics.finite import SHOWN, count_in_checkpoint, count_non_finite


def change_keys(change: Change) -> list[str]:
    """The adapter tensors a change is computed from."""
    match change:
        case LoraTarget():
            return [k for k in (change.key_a, change.key_b, change.magnitude_key) if k is not None]
        case ParameterPiece():
            return [change.target.key_a, change.target.key_b]
        case BiasUpdate() | Replacement() | TokenRows():
            return [change.key]
    raise TypeError(f"no adapter tensors known for a {type(change).__name__}")


def non_finite_inputs(
    source: str, changes: list[Change], adapter: LoraAdapter, base: CheckpointIndex | None
) -> list[str]:
    """Which inputs of one changed tensor hold NaN or Inf, with the counts (empty: they are all finite)."""
    found = []
    if base is not None and (counts := count_in_checkpoint(base, source)):
        found.append(f"the base tensor holds {counts}")
    for change in changes:
        for key in change_keys(change):
            if counts := count_non_finite(adapter.read(key)):
                found.append(f"the adapter's {key} holds {counts}")
    return found


def non_finite_merge(
    names: list[str],
    precision: str,
    sources: dict[str, str],
    changes: dict[str, list[Change]],
    adapter: LoraAdapter,
    base: CheckpointIndex,
) -> UserError:
    """The error for a merge that would write NaN or Inf: per tensor, the inputs that hold them, or overflow."""
    described = []
    for name in names[:SHOWN]:
        found = non_finite_inputs(sources[name], changes.get(name, []), adapter, base)
        advice = ": merge at fp32 or bf16" if precision == "fp16" else ""
        why = "; ".join(found) if found else f"overflow at {precision}{advice}"
        described.append(f"{name} ({why})")
    more = " ..." if len(names) > SHOWN else ""
    return UserError(
        f"the merge at {precision} gives non-finite values in {len(names)} tensors: {', '.join(described)}{more}; "
        "nothing was written"
    )


def require_finite_delta(
    delta: torch.Tensor,
    name: str,
    source: str,
    changes: list[Change],
    adapter: LoraAdapter,
    base: CheckpointIndex | None,
) -> None:
    """Refuse a LoRA delta holding NaN or Inf, naming the inputs they come from."""
    counts = count_non_finite(delta)
    if counts:
        found = non_finite_inputs(source, changes, adapter, base) or ["overflow in float64"]
        raise UserError(f"adapter {adapter.folder}: the LoRA delta of {name} holds {counts} ({'; '.join(found)})")
