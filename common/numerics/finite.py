"""NaN and Inf: counted in the inputs, named in the message, refused wherever they would be written or analysed.

A merge that would write a non-finite value fails (the inputs held NaN/Inf, or the sum overflowed the
precision); compare and analyze refuse non-finite Δ or τ (no metric of them means anything); the
extraction writes τ = finetuned − base as it is and warns with the counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from common.errors import UserError
from common.io.safetensors_io import CHUNK_BYTES, CheckpointIndex, iter_row_chunks

SHOWN = 3  # tensors named in one line


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or ±inf in a floating tensor (min and max propagate both; no temporary the tensor's size)."""
    if not tensor.dtype.is_floating_point or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def strict_json(value: object) -> str:
    """A report as strict JSON: every non-finite float, however deep, written as null (allow_nan=False checks)."""

    def clean(item: object) -> object:
        if isinstance(item, dict):
            return {k: clean(v) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [clean(v) for v in item]
        return json_number(item)

    return json.dumps(clean(value), indent=2, allow_nan=False) + "\n"


def json_number(value: object) -> object:
    """JSON has no NaN or ±inf: a non-finite float becomes null (strict parsers such as jq reject `NaN`)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass(frozen=True)
class NonFinite:
    """How many NaN and ±Inf values a tensor (or several) holds; false when none."""

    nan: int = 0
    inf: int = 0

    def __bool__(self) -> bool:
        return bool(self.nan or self.inf)

    def __add__(self, other: NonFinite) -> NonFinite:
        return NonFinite(self.nan + other.nan, self.inf + other.inf)

    def __str__(self) -> str:
        return f"{self.nan} NaN and {self.inf} Inf values"


def count_non_finite(tensor: torch.Tensor) -> NonFinite:
    if all_finite(tensor):  # one pass without temporaries, the common case
        return NonFinite()
    return NonFinite(int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum()))


def count_in_checkpoint(checkpoint: CheckpointIndex, name: str, rows: int | None = None) -> NonFinite:
    """NaN and Inf in a stored tensor (its first `rows` rows), read in row chunks."""
    info = checkpoint.info(name)
    shape = info.shape if rows is None else (rows, *info.shape[1:])
    total = NonFinite()
    for start, stop in iter_row_chunks(shape, info.dtype, CHUNK_BYTES):
        total += count_non_finite(checkpoint.read_rows(name, start, stop))
    return total


def require_finite(tensor: torch.Tensor, what: str) -> None:
    """Refuse a tensor holding NaN or Inf: `<what> holds 2 NaN and 0 Inf values`."""
    counts = count_non_finite(tensor)
    if counts:
        raise UserError(f"{what} holds {counts}")
