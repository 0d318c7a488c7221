"""What the analysis reads τ from: a τ file (`CheckpointIndex`) or τ computed from two models (`TaskVectorOfModels`).

Both satisfy `TensorSource`; tests/test_platform.py checks that each has every member, with the same parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TensorLayout(Protocol):
    """One tensor's name, dtype and shape, known without reading it (`TensorInfo`, `TensorSpec`)."""

    @property
    def name(self) -> str: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


@runtime_checkable
class TensorSource(Protocol):
    """Named tensors read one at a time, in a stable order, with a header's string metadata."""

    @property
    def source(self) -> Path | str:
        """Where the tensors come from, as said in messages."""
        ...

    @property
    def metadata(self) -> dict[str, str]:
        """The header's metadata (for τ: what extract recorded of the models and the merge)."""
        ...

    def __contains__(self, name: str) -> bool: ...

    def __len__(self) -> int: ...

    def names(self) -> list[str]:
        """Every tensor's name, in reading order."""
        ...

    def info(self, name: str) -> TensorLayout:
        """A tensor's dtype and shape, without reading it."""
        ...

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def read(self, name: str) -> torch.Tensor:
        """One whole tensor, a tensor of its own."""
        ...
