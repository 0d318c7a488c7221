"""Δ = merged − base for compare and analyze, from the merge's own arithmetic: `plan_deltas` lists the tensors the
adapter changes (from the merge plan when the base is given), `exact_delta` applies the changes in float64 and
subtracts the base."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import UserError
from common.io.safetensors_io import CheckpointIndex, TensorSpec
from common.lora.adapter import KIND_NAMES, Change, LoraAdapter, LoraTarget, names_in_checkpoint
from common.lora.arithmetic import apply_changes, base_free_delta, common_rows, is_base_free, sum_of
from common.lora.merge_plan import plan_merge
from common.lora.non_finite import require_finite_delta


@dataclass(frozen=True)
class DeltaPlan:
    """The LoRA deltas to compute: their shapes, and for each the base tensor and changes it comes from."""

    specs: list[TensorSpec]
    sources: dict[str, str]
    changes: dict[str, list[Change]]


def plan_deltas(
    adapter: LoraAdapter, base: CheckpointIndex | None, config: dict, task_vector_names: set[str]
) -> DeltaPlan:
    """Every tensor the adapter changes (a tied head included, as the merge treats it), with its shape."""
    if base is not None:
        plan = plan_merge(base, adapter, torch.float32, config)
        specs = [_delta_spec(s, base.info(plan.sources[s.name]).shape) for s in plan.specs if s.name in plan.changes]
        return DeltaPlan(specs, plan.sources, {s.name: plan.changes[s.name] for s in specs})
    needs_base = [c for cs in adapter.changes.values() for c in cs if not is_base_free(c)]
    if needs_base:
        kinds = sorted({_needs_base_kind(c) for c in needs_base})
        raise UserError(
            f"adapter {adapter.folder} holds {', '.join(kinds)} ({len(needs_base)} tensors): the change they make "
            "depends on the base weights, so pass --base_model"
        )
    changes = names_in_checkpoint(adapter.changes, task_vector_names)
    specs = [TensorSpec(n, torch.float32, adapter.expected_shape(cs[0])) for n, cs in changes.items()]
    return DeltaPlan(specs, {s.name: s.name for s in specs}, changes)


def _delta_spec(merged: TensorSpec, base_shape: tuple[int, ...]) -> TensorSpec:
    """Δ's shape: the merged tensor's, cut to the base's rows where a resized vocabulary added some."""
    if merged.shape and base_shape and merged.shape[0] > base_shape[0]:
        return TensorSpec(merged.name, merged.dtype, (base_shape[0], *merged.shape[1:]))
    return merged


def _needs_base_kind(change: Change) -> str:
    if isinstance(change, LoraTarget):
        return f"{change.init.upper()}-initialised LoRA updates" if change.init else "DoRA magnitudes"
    return KIND_NAMES[type(change)]


def exact_delta(
    name: str,
    plan: DeltaPlan,
    adapter: LoraAdapter,
    base: CheckpointIndex | None,
    device: torch.device,
    merge_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Δ in float64 (and the base tensor when there is one): merged − base, computed as the merge does (at
    `merge_dtype`, where it matters: the initial factors of PiSSA / OLoRA)."""
    changes = plan.changes[name]
    weight = None if base is None else base.read(plan.sources[name]).to(device)
    if all(is_base_free(c) for c in changes):  # Δ itself, not (W + Δ) − W rounded in float64
        delta = sum_of(base_free_delta(c, adapter, device) for c in changes)
        delta = delta if weight is None else common_rows(delta, weight)
    else:
        exact = weight.double()
        merged = apply_changes(exact.clone(), changes, adapter, torch.float64, merge_dtype)
        delta = common_rows(merged, exact) - exact
    require_finite_delta(delta, name, plan.sources[name], changes, adapter, base)
    return delta, weight


def rounded_at_dtype(
    changes: list[Change], weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor
) -> torch.Tensor | None:
    """The magnitude of what a merge rounds to its dtype besides W, Δ and W + Δ (metrics.rounding_bound): the
    PiSSA / OLoRA residual W − s·B₀A₀, at most |W| + |s|·|B₀|@|A₀| (within the product magnitude)."""
    if any(isinstance(c, LoraTarget) and c.init for c in changes):
        return weight.double().abs() + magnitude
    return None
