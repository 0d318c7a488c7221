"""τ = finetuned − base of two checkpoints, computed tensor by tensor when the analysis reads it: the same fp32 τ
and the same status per tensor as extract_task_vectors.py writes, without writing or reading a τ file."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from common.io.safetensors_io import CheckpointIndex, TensorSpec
from common.model.layout import read_config
from common.taskvec.task_vector import (
    RunningStats,
    check_same_architecture,
    header_metadata,
    plan_extraction,
    task_vector,
    task_vector_specs,
    tensor_status,
)

COMPUTE_DTYPE = torch.float32  # extract's default --compute_dtype


class TaskVectorOfModels:
    """τ of a base and a finetuned checkpoint, read like a τ file's CheckpointIndex: both are a `TensorSource`
    (common/io/tensor_source.py); `statuses` is the extraction's status of each tensor. One tensor is held at a
    time."""

    def __init__(self, base: CheckpointIndex, finetuned: CheckpointIndex, sources: dict[str, str]):
        """`sources`: the base and finetuned models as the user named them (hub ids or folders), as extract records
        them in τ's header."""
        configs = (read_config(base.source, required=False), read_config(finetuned.source, required=False))
        check_same_architecture(*configs)
        self.base, self.finetuned = base, finetuned
        pairs, self.extraction = plan_extraction(base, finetuned, configs)
        self.pairs = {pair.name: pair for pair in pairs}
        specs = task_vector_specs(base, pairs, COMPUTE_DTYPE)  # as extract writes them
        self.specs: dict[str, TensorSpec] = {spec.name: spec for spec in specs}
        self.source = f"{finetuned.source} − {base.source}"
        self.metadata = header_metadata(sources, self.extraction, COMPUTE_DTYPE, configs[0])
        self.statuses = Statuses(self)
        self._held: tuple[str, torch.Tensor, str] | None = None  # the last tensor read, its τ and status

    def __contains__(self, name: str) -> bool:
        return name in self.pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def names(self) -> list[str]:
        return list(self.pairs)

    def info(self, name: str) -> TensorSpec:
        """τ's dtype and shape, as τ's file would hold them."""
        return self.specs[name]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(spec.shape) for name, spec in self.specs.items()}

    def read(self, name: str) -> torch.Tensor:
        """τ of one tensor, a tensor of its own (as a file's `read` gives): held no longer once read."""
        tau = self._compute(name)[0]
        self._held = None
        return tau

    def status(self, name: str) -> str:
        return self._compute(name)[1]

    def _compute(self, name: str) -> tuple[torch.Tensor, str]:
        """τ of one tensor in COMPUTE_DTYPE (`task_vector`) and its status (`tensor_status`), as extract finds them."""
        if self._held is None or self._held[0] != name:
            pair = self.pairs[name]
            w_base, w_finetuned = self.base.read(pair.base_name), self.finetuned.read(pair.finetuned_name)
            tau = task_vector(w_finetuned, w_base, COMPUTE_DTYPE)
            running = RunningStats()
            running.add(tau, w_finetuned, w_base)
            status = tensor_status(running.changed, running.beyond, w_finetuned.dtype != w_base.dtype)
            self._held = (name, tau, status.value)
        return self._held[1], self._held[2]


class Statuses(Mapping):
    """Each tensor's status, computed with its τ when first asked for (what task_vector_stats.json records)."""

    def __init__(self, task_vector: TaskVectorOfModels):
        self.task_vector = task_vector

    def __getitem__(self, name: str) -> str:
        if name not in self.task_vector:
            raise KeyError(name)
        return self.task_vector.status(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.task_vector.names())

    def __len__(self) -> int:
        return len(self.task_vector)
