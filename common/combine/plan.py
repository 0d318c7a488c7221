"""The combination plan: every output tensor, the base tensor it starts from, and each input's term in it.

Each adapter is fitted to the base by its own merge plan (`plan_merge`: names, shapes, a tied head); each task
vector's tensors must be the base's, with the base's shapes. A tensor changed by only some inputs gets only their
terms. Changes that set values or rescale rows rather than add a difference (modules_to_save copies, trained
biases, trainable tokens, DoRA, PiSSA/OLoRA) are not scaled by peft's `set_scale`: they are taken as that input's
merge makes them, so only with weight 1 and on a tensor no other input changes; anything else is refused by name.
A saved copy equal to the base tensor (peft saves the base's embedding beside an embedding LoRA) changes nothing
and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.errors import UserError
from common.io.safetensors_io import CheckpointIndex, TensorSpec
from common.lora.adapter import KIND_NAMES, Change, LoraAdapter, LoraTarget, Replacement
from common.lora.arithmetic import is_base_free
from common.lora.merge_plan import MergePlan, merged_dtype, plan_merge
from common.model.layout import HEAD, kept_in_fp32, tied_embedding

ROUNDINGS = ("peft", "exact")
SHOWN = 3


@dataclass(frozen=True)
class AdapterInput:
    """A LoRA adapter and its weight."""

    adapter: LoraAdapter
    weight: float
    path: str  # as the user gave it

    @property
    def label(self) -> str:
        return f"adapter {self.path}"


@dataclass(frozen=True)
class TaskVectorInput:
    """A task vector file (τ = finetuned − base, as extract_task_vectors.py writes it) and its weight."""

    task_vector: CheckpointIndex
    weight: float
    path: str

    @property
    def label(self) -> str:
        return f"task vector {self.path}"


CombinationInput = AdapterInput | TaskVectorInput


@dataclass(frozen=True)
class Term:
    """One input's part in one output tensor: an adapter's changes (`changes`) or a τ tensor (`key`), times `weight`."""

    index: int  # the input's position: adapters first, then task vectors, each in the order given
    weight: float
    changes: tuple[Change, ...] = ()
    key: str | None = None

    @property
    def additive(self) -> bool:
        """W + w·Δ: τ, and the changes that add a difference independent of W (LoRA factors, LoRA biases)."""
        return self.key is not None or all(is_base_free(c) for c in self.changes)


@dataclass
class CombinationPlan:
    """What to write: every output tensor, the base tensor it starts from, and the terms it gets, in input order."""

    specs: list[TensorSpec]
    sources: dict[str, str]  # output name -> base tensor name
    terms: dict[str, list[Term]] = field(default_factory=dict)
    untied: bool = False


def plan_combination(
    base: CheckpointIndex, inputs: list[CombinationInput], precision: torch.dtype, config: dict
) -> CombinationPlan:
    """Fit every input to the base and list each output tensor's terms; refuse what cannot be combined."""
    embedding = tied_embedding(base, config)
    shapes = base.shapes()
    if embedding is not None:
        shapes[HEAD] = shapes[embedding]
    plans = {i: _adapter_plan(base, x, precision, config) for i, x in enumerate(inputs) if isinstance(x, AdapterInput)}
    taus = {i: _check_task_vector(base, x, shapes) for i, x in enumerate(inputs) if isinstance(x, TaskVectorInput)}
    untied = embedding is not None and (any(p.untied for p in plans.values()) or any(HEAD in n for n in taus.values()))
    order = list(next(iter(plans.values())).sources) if plans else base.names()  # the first plan groups experts
    sources = {name: name for name in order if name != HEAD}
    if untied:
        sources[HEAD] = embedding
    terms: dict[str, list[Term]] = {}
    for name in sources:
        for i, plan in plans.items():
            changes = plan.changes.get(embedding if name == HEAD and not plan.untied else name, [])
            changes = [c for c in changes if not _base_copy(c, inputs[i], base, sources[name])]
            if changes:
                terms.setdefault(name, []).append(Term(i, inputs[i].weight, changes=tuple(changes)))
        for i, names in taus.items():
            key = name if name in names else embedding if name == HEAD and HEAD not in names else None
            if key in names:
                terms.setdefault(name, []).append(Term(i, inputs[i].weight, key=key))
    for name, name_terms in terms.items():
        _check_combinable(name, name_terms, inputs)
    kept_fp32 = kept_in_fp32(config, precision)
    specs = [
        TensorSpec(out, merged_dtype(out, base.info(src).dtype, precision, kept_fp32), shapes[src])
        for out, src in sources.items()
    ]
    return CombinationPlan(specs=specs, sources=sources, terms=terms, untied=untied)


def _adapter_plan(base: CheckpointIndex, x: AdapterInput, precision: torch.dtype, config: dict) -> MergePlan:
    plan = plan_merge(base, x.adapter, precision, config)
    if plan.vocabulary is not None:
        before, after = plan.vocabulary
        raise UserError(
            f"{x.label} resizes the vocabulary ({before} to {after} rows): the other inputs change the {before}-row "
            "base, so it cannot be combined with them; merge it alone"
        )
    return plan


def _check_task_vector(base: CheckpointIndex, x: TaskVectorInput, shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """τ's tensors, which must be the base's, with the base's shapes and floating point (a τ extracted with
    --allow_shape_mismatch, or from another model, is refused)."""
    tau = x.task_vector
    if not len(tau):
        raise UserError(f"{x.label} holds no tensors")
    foreign = [n for n in tau.names() if n not in shapes]
    if foreign:
        raise UserError(
            f"{x.label} holds {len(foreign)} tensors that base model {base.source} lacks ({_listing(foreign)}): "
            "extracted from another model?"
        )
    wrong = [
        f"{n} {list(tau.info(n).shape)} vs {list(shapes[n])}" for n in tau.names() if tau.info(n).shape != shapes[n]
    ]
    if wrong:
        raise UserError(
            f"{x.label} does not fit base model {base.source}: {len(wrong)} tensors have another shape "
            f"({'; '.join(wrong[:SHOWN])}): extracted from another model, or with --allow_shape_mismatch?"
        )
    not_float = [n for n in tau.names() if not tau.info(n).dtype.is_floating_point]
    if not_float:
        raise UserError(f"{x.label}: {_listing(not_float)} not floating point (not a task vector?)")
    return set(tau.names())


def _check_combinable(name: str, terms: list[Term], inputs: list[CombinationInput]) -> None:
    """A change that is not a difference (see the module docstring) must be its tensor's only non-zero term, with
    weight 1; τ tensors that are zero throughout do not count."""
    for term in terms:
        if term.additive:
            continue
        what = f"{inputs[term.index].label} holds {_kinds(term.changes)} on {name}"
        if term.weight != 1:
            raise UserError(
                f"{what}, which peft's set_scale does not scale (they set values or rescale rows, not add a "
                f"difference): give it weight 1, not {term.weight:g}, or merge it alone and combine its task vector"
            )
        others = [t for t in terms if t is not term and not _zero(t, inputs)]
        if others:
            raise UserError(
                f"{what}, and {inputs[others[0].index].label} changes {name} too: values set or rows rescaled by one "
                "input cannot be combined with another's change of the same tensor (peft keeps one adapter's); "
                "merge each alone and combine their task vectors"
            )


def _base_copy(change: Change, x: AdapterInput, base: CheckpointIndex, source: str) -> bool:
    """A saved copy equal to the base tensor bit for bit, as peft saves the base's embedding beside an embedding LoRA
    (`save_embedding_layers`): loading it changes nothing, so it is left out of the combination."""
    if not isinstance(change, Replacement):
        return False
    info = base.info(source)
    weights = x.adapter.weights
    if weights.shape(change.key) != info.shape or weights.dtype(change.key) != info.dtype:
        return False
    return torch.equal(weights.read(change.key), base.read(source))


def _zero(term: Term, inputs: list[CombinationInput]) -> bool:
    """A τ tensor that is zero throughout (a tensor its fine-tune left as it was)."""
    source = inputs[term.index]
    return isinstance(source, TaskVectorInput) and not torch.count_nonzero(source.task_vector.read(term.key))


def _kinds(changes: tuple[Change, ...]) -> str:
    kinds = []
    for change in changes:
        if is_base_free(change):
            continue
        if isinstance(change, LoraTarget):
            kind = f"a {change.init.upper()}-initialised LoRA" if change.init else "DoRA magnitudes"
        else:
            kind = KIND_NAMES[type(change)]
        kinds += [kind] if kind not in kinds else []
    return " and ".join(kinds)


def _listing(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (" ..." if len(names) > SHOWN else "")
