"""compare's check for a QLoRA merge: τ of a model merged into the 4-bit base (common/model/quantization.py).

A merge into deq(Q(W)) changes every weight transformers quantizes, the adapter's and the others, by the
quantization: τ = deq(Q(W)) − W outside the adapter, and τ = (deq(Q(W)) − W) + Δ (plus rounding) on it. Both are
tested directly, with the base: each quantization (nf4 / fp4, double quantization on and off) is redone on one
changed weight outside the adapter until one gives τ bit for bit, then on every other; the adapted tensors are merged
again into that deq(Q(W)), as the dequantized-base merge and as the re-quantizing one, and compared bit for bit.
Without the base the pattern alone is read (likely): exactly the quantizable weights outside the adapter changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.errors import UserError
from common.io.safetensors_io import CheckpointIndex
from common.lora.adapter import LoraAdapter
from common.lora.arithmetic import apply_changes, common_rows
from common.lora.deltas import DeltaPlan
from common.model.layout import EMBEDDING_SUFFIXES, HEAD, read_config
from common.model.quantization import QUANT_TYPES, FourBit, dequantized, quantized_weights, requantized
from common.numerics.precision import dtype_from_name
from common.taskvec.task_vector import TauStatus, stored_status, task_vector

CANDIDATES = [FourBit(q, d) for q in QUANT_TYPES for d in (True, False)]  # QLoRA's own recipe first


@dataclass
class QuantizedMerge:
    """What compare found: the quantization, where τ is deq(Q(W)) − W bit for bit, and which merge reproduces the
    adapted tensors (None: not reproduced, or not checked without the base)."""

    four_bit: FourBit | None  # None without the base: the pattern only
    outside: list[str] = field(default_factory=list)  # quantized weights outside the adapter, τ = deq(Q(W)) − W
    weights: dict[str, bool] = field(default_factory=dict)  # every weight a 4-bit load quantizes (Conv1D?)
    merge: str | None = None  # "dequantized" (into deq(Q(W))) | "requantized" (re-quantized after the merge)
    adapted: int = 0  # adapted tensors that merge reproduces bit for bit

    @property
    def proven(self) -> bool:
        return self.four_bit is not None


def changed_outside(task_vector_only: dict[str, TauStatus]) -> list[str]:
    return [n for n, s in task_vector_only.items() if s in (TauStatus.CHANGED, TauStatus.UNCLASSIFIED)]


def find_quantized_merge(
    tau: CheckpointIndex,
    base: CheckpointIndex,
    base_dir: Path,
    config: dict,
    task_vector_only: dict[str, TauStatus],
    adapter: LoraAdapter,
    plan: DeltaPlan,
    merge_dtype: torch.dtype,
    device: torch.device,
) -> QuantizedMerge | None:
    """The quantization that makes τ's changes outside the adapter deq(Q(W)) − W bit for bit, if any."""
    outside = changed_outside(task_vector_only)
    quantized = quantized_weights(base_dir, base, config)
    if not outside or any(name not in quantized for name in outside):
        return None  # nothing changed outside, or something a 4-bit load does not quantize changed too

    def gives_tau(name: str, four_bit: FourBit) -> bool:  # τ = deq(Q(W)) − W bit for bit
        weight = base.read(name).to(device)
        deq = dequantized(weight.to(merge_dtype), four_bit, quantized[name])
        stored = tau.read(name).to(device)
        return torch.equal(task_vector(deq, weight, stored.dtype), stored)

    four_bit = next((fb for fb in CANDIDATES if gives_tau(outside[0], fb)), None)
    if four_bit is None or not all(gives_tau(name, four_bit) for name in outside[1:]):
        return None
    found = QuantizedMerge(four_bit, outside, quantized)
    adapted = [s.name for s in plan.specs if s.name in tau and plan.sources[s.name] in quantized]
    for merge in ("dequantized", "requantized"):
        context = (found, tau, base, adapter, plan, merge_dtype, device, quantized)
        if adapted and all(_reproduced(name, merge, *context) for name in adapted):
            found.merge, found.adapted = merge, len(adapted)
            break
    return found


def _reproduced(
    name: str,
    merge: str,
    found: QuantizedMerge,
    tau: CheckpointIndex,
    base: CheckpointIndex,
    adapter: LoraAdapter,
    plan: DeltaPlan,
    merge_dtype: torch.dtype,
    device: torch.device,
    quantized: dict[str, bool],
) -> bool:
    """Does merging this tensor into deq(Q(W)) as `merge` give τ bit for bit?"""
    source = plan.sources[name]
    weight = base.read(source).to(device)
    deq = dequantized(weight.to(merge_dtype), found.four_bit, quantized[source])
    changes = plan.changes[name]
    stored = tau.read(name).to(device)
    if merge == "dequantized":
        candidates = [apply_changes(deq, changes, adapter)]
    else:  # dequantize() casts to the model's dtype; a model saved still 4-bit keeps the fp32 of the re-quantization
        merged32 = apply_changes(deq.float(), changes, adapter)
        again = requantized(merged32, found.four_bit, torch.float32, quantized[source])
        candidates = [again.to(merge_dtype), again]
    return any(torch.equal(task_vector(common_rows(m, weight), weight, stored.dtype), stored) for m in candidates)


def quantized_pattern(tau: CheckpointIndex, task_vector_only: dict[str, TauStatus]) -> QuantizedMerge | None:
    """Without the base: every changed tensor outside the adapter is a linear layer's matrix (what a 4-bit load
    quantizes), and every such matrix changed — the pattern of a merge into a 4-bit base."""
    outside = changed_outside(task_vector_only)
    matrices = [n for n in task_vector_only if n.endswith(".weight") and len(tau.info(n).shape) == 2]
    matrices = [n for n in matrices if not n.endswith(EMBEDDING_SUFFIXES) and n != HEAD]
    if not outside or set(outside) != set(matrices):
        return None
    return QuantizedMerge(None, outside)


def quantization_of(
    task_vector: CheckpointIndex,
    base: CheckpointIndex,
    base_dir: Path,
    known: Mapping[str, str],
    adapter: LoraAdapter,
    plan: DeltaPlan,
    device: torch.device,
) -> tuple[QuantizedMerge | None, Callable[[str, torch.Tensor], torch.Tensor | None] | None]:
    """For analyze: τ of a merge into a 4-bit base, as find_quantized_merge finds it, and a function giving each
    adapted tensor's quantization deq(Q(W)) − W (float64); (None, None) when τ is not one or bitsandbytes is not
    here."""
    merge_dtype = dtype_from_name(task_vector.metadata.get("finetuned_dtype", ""))
    if merge_dtype is None:
        return None, None
    statuses = {
        name: TauStatus(known[name]) if name in known else stored_status(name, task_vector, base, merge_dtype, None)
        for name in task_vector.names()
        if name not in plan.changes
    }
    try:
        found = find_quantized_merge(
            task_vector, base, base_dir, read_config(base_dir), statuses, adapter, plan, merge_dtype, device
        )
    except UserError:
        return None, None
    if found is None:
        return None, None
    weights = found.weights

    def quantization(name: str, weight):
        source = plan.sources.get(name, name)
        if source not in weights:
            return None
        deq = dequantized(weight.to(merge_dtype), found.four_bit, weights[source])
        return deq.double() - weight.double()

    return found, quantization
