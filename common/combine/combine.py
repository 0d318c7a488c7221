"""The streaming combination: every base tensor read, each input's term added, written, one tensor at a time.

Two roundings (docs/combine.md):
- `peft`: what peft computes for the adapters loaded into one model, `set_scale(name, wᵢ)` on each LoRA layer and
  `merge_and_unload(adapter_names=[…])`: W cast to the output dtype, then each adapter's Δ̂ (scaled as set_scale
  scales it) added in place, in input order, in peft's arithmetic (common/lora/arithmetic.py); then the task
  vectors as mergekit's `task_arithmetic` adds them: S = Σ wᵢ·τᵢ in fp32, left to right, and W += S.
- `exact`: W + Σ wᵢ·Δᵢ in float64 (Δᵢ as compare and analyze compute it), rounded once to the output dtype.

Memory holds the base tensor, the running sum and one input's term at a time, whatever the number of inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from common.combine.plan import AdapterInput, CombinationInput, CombinationPlan, TaskVectorInput, Term
from common.combine.rounding import round_once
from common.errors import UserError
from common.io.safetensors_io import CHUNK_BYTES, CheckpointIndex, Scratch, ShardedWriter, TensorSpec
from common.lora.adapter import BiasUpdate, Change, LoraAdapter, LoraTarget, ParameterPiece, ParameterTarget
from common.lora.arithmetic import adapter_dtype, apply_changes, base_free_delta, sum_of
from common.lora.merge import MAX_SHARD_BYTES, write_cast
from common.lora.non_finite import non_finite_inputs
from common.numerics.finite import SHOWN, all_finite, count_in_checkpoint
from common.numerics.precision import short_name


@dataclass
class CombinationSummary:
    tensors: int = 0
    changed: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def combine_checkpoint(
    base: CheckpointIndex,
    inputs: list[CombinationInput],
    plan: CombinationPlan,
    out_dir: Path,
    rounding: str,
    device: torch.device,
    chunk_bytes: int = CHUNK_BYTES,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    on_tensor: Callable[[str, int], None] = lambda name, nbytes: None,
) -> CombinationSummary:
    """Write θ₀ + Σ wᵢ·Δᵢ for every base tensor into `out_dir` as safetensors shards."""
    scratch = Scratch(pinned=device.type == "cuda"), Scratch()
    non_finite = []
    with ShardedWriter(out_dir, plan.specs, max_shard_bytes, {"format": "pt"}) as writer:
        summary = CombinationSummary(len(plan.specs), files=[f for f, _ in writer.shards])
        for spec in plan.specs:
            terms, source = plan.terms.get(spec.name, []), plan.sources[spec.name]
            if terms:
                weight, moved = combined(base, source, spec, terms, inputs, rounding, device, scratch[0])
                writer.write(spec.name, weight)
                finite = all_finite(weight)
                summary.changed += [spec.name] if moved else []
            else:
                finite = write_cast(base, source, spec, chunk_bytes, writer, scratch)
            if not finite:
                non_finite.append(spec.name)
            writer.tensor_done(spec.name)
            on_tensor(spec.name, spec.nbytes)
    if non_finite:
        dtype = next(s.dtype for s in plan.specs if s.name == non_finite[0])
        raise non_finite_combination(non_finite, short_name(dtype), plan, inputs, base)
    return summary


def combined(
    base: CheckpointIndex,
    source: str,
    spec: TensorSpec,
    terms: list[Term],
    inputs: list[CombinationInput],
    rounding: str,
    device: torch.device,
    scratch: Scratch,
) -> tuple[torch.Tensor, bool]:
    """One output tensor: its base tensor read whole, and every term added with the rounding asked for; and whether
    any term moves it (an adapter's change, or a τ not zero throughout)."""
    stored = base.info(source).shape
    weight = base.read_rows(source, 0, stored[0] if stored else 1, scratch).to(device)
    if rounding == "exact":
        exact, moved = exact_sum(weight.double(), terms, inputs, spec.dtype)
        return round_once(exact, spec.dtype), moved
    return peft_sum(weight.to(spec.dtype), terms, inputs)


def peft_sum(weight: torch.Tensor, terms: list[Term], inputs: list[CombinationInput]) -> tuple[torch.Tensor, bool]:
    """The adapters' changes one after the other as peft merges them, then the task vectors' S = Σ wᵢ·τᵢ (fp32,
    left to right, as mergekit's task_arithmetic) added once. `weight` is already at the output dtype."""
    tau_sum, moved = None, False
    for term in terms:
        x = inputs[term.index]
        if isinstance(x, AdapterInput):
            weight = apply_changes(weight, [peft_scaled(c, term.weight, x.adapter) for c in term.changes], x.adapter)
            moved = True
            continue
        tau = adapter_dtype(x.task_vector.read(term.key)).to(weight.device)
        moved = moved or bool(torch.count_nonzero(tau))
        product = tau.mul_(torch.tensor(term.weight, dtype=tau.dtype))  # the weight in τ's dtype, as mergekit's
        tau_sum = product if tau_sum is None else tau_sum.add_(product)
        del tau, product  # let go before the next input's is read (unless it is the sum)
    if tau_sum is not None:
        weight += tau_sum
    return weight, moved


def peft_scaled(change: Change, weight: float, adapter: LoraAdapter) -> Change:
    """A change with its scaling as peft's `LoraLayer.set_scale(adapter, weight)` sets it: `weight · alpha / r`
    (`/ √r` with rsLoRA), evaluated left to right in double. Other changes are not scaled by it."""
    match change:
        case ParameterPiece():
            return replace(change, target=peft_scaled(change.target, weight, adapter))
        case LoraTarget() | BiasUpdate() | ParameterTarget():
            divisor = math.sqrt(change.rank) if adapter.config.use_rslora else change.rank
            return replace(change, scaling=weight * change.alpha / divisor)
        case _:
            return change


def exact_sum(
    exact: torch.Tensor, terms: list[Term], inputs: list[CombinationInput], dtype: torch.dtype
) -> tuple[torch.Tensor, bool]:
    """W + Σ wᵢ·Δᵢ in float64. A change that is not a difference (weight 1, the tensor's only term: plan.py) is
    applied in float64 as compare's exact Δ applies it."""
    moved = False
    for term in terms:
        x = inputs[term.index]
        if isinstance(x, TaskVectorInput):
            tau = x.task_vector.read(term.key).to(exact.device, torch.float64)
            moved = moved or bool(torch.count_nonzero(tau))
            exact.add_(tau, alpha=term.weight)
            del tau  # let go before the next input's is read
            continue
        moved = True
        if term.additive:  # Δ is let go before the next input's is formed
            exact.add_(sum_of(base_free_delta(c, x.adapter, exact.device) for c in term.changes), alpha=term.weight)
        else:
            exact = apply_changes(exact, list(term.changes), x.adapter, torch.float64, dtype)
    return exact, moved


def non_finite_combination(
    names: list[str], precision: str, plan: CombinationPlan, inputs: list[CombinationInput], base: CheckpointIndex
) -> UserError:
    """The error for a combination that would write NaN or Inf: per tensor, the inputs that hold them, or overflow."""
    described = []
    for name in names[:SHOWN]:
        source = plan.sources[name]
        found = [f"the base tensor holds {c}"] if (c := count_in_checkpoint(base, source)) else []
        for term in plan.terms.get(name, []):
            x = inputs[term.index]
            if isinstance(x, AdapterInput):
                found += [f"{x.label}: {f}" for f in non_finite_inputs(source, list(term.changes), x.adapter, None)]
            elif counts := count_in_checkpoint(x.task_vector, term.key):
                found.append(f"{x.label} holds {counts}")
        described.append(f"{name} ({'; '.join(found) if found else f'overflow at {precision}'})")
    more = " ..." if len(names) > SHOWN else ""
    return UserError(
        f"the combination gives non-finite values in {len(names)} tensors: {', '.join(described)}{more}; "
        "nothing was written"
    )
