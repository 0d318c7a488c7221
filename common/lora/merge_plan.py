"""The merge plan: every output tensor, the base tensor it starts from, the changes it gets, its shape and dtype.

`plan_merge` fits the adapter to the base checkpoint (`fit_adapter`): names, shapes, a tied output head, a
resized vocabulary, the checkpoint tensors that hold a `target_parameters` parameter — or says the real reason it
does not fit. compare and analyze plan their Δ from the same plan (common/lora/arithmetic.py: `plan_deltas`).

`fit_adapter` takes the adapter's changes by tensor name and the checkpoint's shapes, and returns the changes
keyed by the checkpoint's own tensors with every tensor's shape after the merge:
- a LoRA on a model parameter that the checkpoint stores in parts (Mixtral's experts as `…experts.{e}.w1.weight`
  and `…w3.weight`, fused on load into `…experts.gate_up_proj`) becomes one `ParameterPiece` per part;
- trained copies of the embedding and output head with more rows (tokens added, then `resize_token_embeddings`)
  resize those tensors, provided every vocabulary tensor is resized the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.errors import UserError
from common.io.safetensors_io import CheckpointIndex, TensorSpec
from common.lora.adapter import (
    ORDER,
    BiasUpdate,
    Change,
    LoraAdapter,
    LoraTarget,
    ParameterPiece,
    ParameterTarget,
    PieceDeltas,
    Replacement,
    TokenRows,
    names_in_checkpoint,
)
from common.model.layout import EMBEDDING_SUFFIXES, HEAD, kept_in_fp32, tied_embedding
from common.numerics.precision import short_name

HEAD_SUFFIXES = ("lm_head.weight", "lm_head.bias", "embed_out.weight", "embed_out.bias")
VOCABULARY_SUFFIXES = EMBEDDING_SUFFIXES + HEAD_SUFFIXES
SHOWN = 3


@dataclass
class Fit:
    """The adapter's changes on the checkpoint's tensors, and the shapes the merge gives them."""

    changes: dict[str, list[Change]]
    shapes: dict[str, tuple[int, ...]]
    vocabulary: tuple[int, int] | None = None  # rows before and after, when the adapter resizes the vocabulary
    groups: list[list[str]] = field(default_factory=list)  # the checkpoint tensors of one adapted parameter


@dataclass
class MergePlan:
    """What to write: every output tensor, the base tensor it starts from, and the changes it gets."""

    specs: list[TensorSpec]
    sources: dict[str, str]  # output name -> base tensor name
    changes: dict[str, list[Change]]
    untied: bool = False
    vocabulary: tuple[int, int] | None = None  # rows before and after, when the adapter resizes the vocabulary


def merged_dtype(name: str, stored: torch.dtype, precision: torch.dtype, kept_fp32: re.Pattern | None) -> torch.dtype:
    """Floating tensors take the output precision, but for those the model class keeps in fp32 (see
    `kept_in_fp32`); integer and bool buffers keep their dtype."""
    if not stored.is_floating_point:
        return stored
    return torch.float32 if kept_fp32 is not None and kept_fp32.search(name) else precision


def plan_merge(base: CheckpointIndex, adapter: LoraAdapter, precision: torch.dtype, config: dict) -> MergePlan:
    """Match the adapter's changes to base tensors (by name and shape), untying a tied head if needed.

    Tensors come in the base's order, except that the checkpoint tensors holding one adapted parameter (a stack of
    experts) come one after the other: its Δ is computed once, whole, and cut into them.
    """
    embedding = tied_embedding(base, config)
    shapes = base.shapes()
    changes = names_in_checkpoint(adapter.changes, set(shapes))
    if embedding is not None:
        shapes[HEAD] = shapes[embedding]
        changes = _tied_changes(changes, embedding)
    fit = fit_adapter(
        adapter, changes, shapes, f"base model {base.source}", base.source if base.source.is_dir() else None
    )
    changes = fit.changes
    sources = {name: name for name in _grouped(base.names(), fit.groups)}
    untied = embedding is not None and changes.get(HEAD, []) != changes.get(embedding, [])
    if untied:
        sources[HEAD] = embedding
    elif embedding is not None:
        changes.pop(HEAD, None)  # still tied: the head is the embedding, written once
    for name, source in sources.items():
        stored = base.info(source).dtype
        if changes.get(name) and not stored.is_floating_point:
            raise UserError(
                f"base model {base.source}: {source} is stored as {short_name(stored)}, and the adapter changes it: "
                "only floating-point weights can be merged (a quantized base? merge into the unquantized one)"
            )
    kept_fp32 = kept_in_fp32(config, precision)
    specs = [
        TensorSpec(out, merged_dtype(out, base.info(src).dtype, precision, kept_fp32), fit.shapes[out])
        for out, src in sources.items()
    ]
    return MergePlan(specs=specs, sources=sources, changes=changes, untied=untied, vocabulary=fit.vocabulary)


def _grouped(names: list[str], groups: list[list[str]]) -> list[str]:
    """`names` in order, each group's members moved up to where its first member is."""
    group_of = {name: group for group in groups for name in group}
    ordered, placed = [], set()
    for name in names:
        if name not in placed:
            members = [n for n in names if n in group_of[name]] if name in group_of else [name]
            ordered += members
            placed.update(members)
    return ordered


def _tied_changes(changes: dict[str, list[Change]], embedding: str) -> dict[str, list[Change]]:
    """Changes to the shared parameter itself (a reloaded base layer, trainable tokens) reach both names."""

    def shared(change: Change) -> bool:
        return isinstance(change, TokenRows) or (isinstance(change, Replacement) and change.shared)

    both = [c for name in (HEAD, embedding) for c in changes.get(name, []) if shared(c)]
    tied = dict(changes)
    for name in (HEAD, embedding):
        own = [c for c in changes.get(name, []) if not shared(c)]
        merged = sorted(both + own, key=lambda c: ORDER[type(c)])
        if merged:
            tied[name] = merged
    return tied


def fit_adapter(
    adapter: LoraAdapter,
    changes: dict[str, list[Change]],
    shapes: dict[str, tuple[int, ...]],
    what: str,
    model_dir: Path | None = None,
) -> Fit:
    """Check that every change lands on a tensor of `what` of the right shape; cut parameters into their pieces.
    `model_dir` (the base's folder) lets transformers say what the checkpoint calls a tensor the model renames."""
    changes = renamed_for_checkpoint(adapter, changes, shapes, model_dir)
    changes, groups = split_parameters(adapter, changes, shapes, what)
    resized = resized_vocabulary(adapter, changes, shapes)
    after = {**shapes, **resized}
    check_targets_match(adapter, after, what, changes)
    vocabulary = None
    if resized:
        vocabulary = (shapes[next(iter(resized))][0], next(iter(resized.values()))[0])
    return Fit(changes=changes, shapes=after, vocabulary=vocabulary, groups=groups)


def renamed_for_checkpoint(
    adapter: LoraAdapter,
    changes: dict[str, list[Change]],
    shapes: dict[str, tuple[int, ...]],
    model_dir: Path | None,
) -> dict[str, list[Change]]:
    """Tensors the model calls otherwise than its checkpoint (transformers 5 renames some on load: GPT-NeoX's
    `lm_head` is saved as `embed_out`), under the checkpoint's name, as transformers' own save conversion says."""
    missing = [n for n, cs in changes.items() if n not in shapes and not isinstance(cs[0], ParameterTarget)]
    if not missing or model_dir is None or not (Path(model_dir) / "config.json").is_file():
        return changes
    structure = adapter.structure
    if structure is None:
        from common.model.structure import ModelStructure

        try:
            structure = ModelStructure(Path(model_dir))
        except UserError:  # a model transformers cannot build: the names stay as they are
            return changes
    renamed: dict[str, list[Change]] = {}
    for name, name_changes in changes.items():
        saved = structure.saved_names(name) if name in missing else []
        new_name = saved[0] if len(saved) == 1 and saved[0] in shapes else name
        renamed.setdefault(new_name, []).extend(name_changes)
    return {n: sorted(cs, key=lambda c: ORDER[type(c)]) for n, cs in renamed.items()}


def split_parameters(
    adapter: LoraAdapter, changes: dict[str, list[Change]], shapes: dict[str, tuple[int, ...]], what: str
) -> tuple[dict[str, list[Change]], list[list[str]]]:
    """Each `ParameterTarget` as `ParameterPiece`s on the checkpoint tensors that hold its parameter: the
    parameter itself when the checkpoint has it, else the tensors transformers saves it as. The pieces share one
    `PieceDeltas`, which keeps the cut Δ of the parameter asked for last."""
    out: dict[str, list[Change]] = {}
    groups = []
    deltas = PieceDeltas()
    for name, name_changes in changes.items():
        for change in name_changes:
            if not isinstance(change, ParameterTarget):
                out.setdefault(name, []).append(change)
            elif tuple(shapes.get(name, ())) == change.shape:
                out.setdefault(name, []).append(ParameterPiece(name, change, split=False))
            else:
                pieces = _pieces_in_checkpoint(adapter, change, shapes, what)
                for piece in pieces:
                    out.setdefault(piece, []).append(ParameterPiece(piece, change, split=True, deltas=deltas))
                groups.append(pieces)
    return {n: sorted(cs, key=lambda c: ORDER[type(c)]) for n, cs in out.items()}, groups


def _pieces_in_checkpoint(
    adapter: LoraAdapter, target: ParameterTarget, shapes: dict[str, tuple[int, ...]], what: str
) -> list[str]:
    name = target.base_name
    pieces = adapter.structure.checkpoint_pieces(name)
    if name in pieces:  # saved under its own name, but the checkpoint has another shape there
        raise UserError(
            f"adapter {adapter.folder} adapts {name} {list(target.shape)}, which is {list(shapes.get(name, []))} in "
            f"{what} (built for another model?)"
        )
    absent = [p for p in pieces if p not in shapes]
    if absent:
        raise UserError(
            f"adapter {adapter.folder} adapts {name} {list(target.shape)}, which {what} holds neither under that "
            f"name nor as the tensors transformers saves it as ({absent[0]} is missing): another model or format?"
        )
    wrong = [f"{p} {list(shapes[p])} vs {list(shape)}" for p, shape in pieces.items() if tuple(shapes[p]) != shape]
    if wrong:
        raise UserError(f"adapter {adapter.folder} does not fit {what} where it adapts {name}: {'; '.join(wrong[:3])}")
    return list(pieces)


def resized_vocabulary(
    adapter: LoraAdapter,
    changes: dict[str, list[Change]],
    shapes: dict[str, tuple[int, ...]],
) -> dict[str, tuple[int, ...]]:
    """The new shapes of vocabulary tensors (embedding, output head) whose trained copies have another number of
    rows. Every vocabulary tensor of the base must be resized alike: peft saves them all when the vocabulary was
    resized (a tied output head included), and rows the adapter does not hold cannot be made up."""
    rows = {s[0] for n, s in shapes.items() if n.endswith(EMBEDDING_SUFFIXES) and len(s) == 2}
    resized = {}
    for name, name_changes in changes.items():
        copies = [c for c in name_changes if isinstance(c, Replacement)]
        if not copies or name not in shapes or not name.endswith(VOCABULARY_SUFFIXES):
            continue
        old, new = tuple(shapes[name]), adapter.weights.shape(copies[-1].key)
        if new != old and old[0] in rows and new[1:] == old[1:]:
            resized[name] = new
    if not resized:
        return {}
    counts = sorted({s[0] for s in resized.values()})
    old_rows = shapes[next(iter(resized))][0]
    if len(counts) > 1:
        listing = ", ".join(f"{n} to {s[0]}" for n, s in resized.items())
        raise UserError(f"adapter {adapter.folder} resizes the vocabulary inconsistently: {listing}")
    left = [
        n for n, s in shapes.items() if n.endswith(VOCABULARY_SUFFIXES) and s[:1] == (old_rows,) and n not in resized
    ]
    if left:
        raise UserError(
            f"adapter {adapter.folder} resizes the vocabulary from {old_rows} to {counts[0]} rows but holds no "
            f"resized {left[0]}: merge it into the resized base model (the one saved after resize_token_embeddings)"
        )
    return resized


def check_targets_match(
    adapter: LoraAdapter,
    shapes: dict[str, tuple[int, ...]],
    what: str,
    changes: dict[str, list[Change]] | None = None,
) -> None:
    """Every changed tensor must exist in `what` under the same name and shape; when not, say why."""
    changes = adapter.changes if changes is None else changes
    missing = [name for name in changes if name not in shapes]
    biasless = [n for n in missing if all(isinstance(c, BiasUpdate) for c in changes[n])]
    if biasless:
        raise UserError(
            f"adapter {adapter.folder} has lora_bias=True on {len(biasless)} layer{'s' * (len(biasless) > 1)} "
            f"without a bias in {what} "
            f"({', '.join(biasless[:SHOWN])}): peft cannot merge it either (the base layer has no bias)"
        )
    if missing:
        raise UserError(f"adapter {adapter.folder} changes {_missing_reason(missing, changes, what)}")
    wrong = [
        (name, change)
        for name, name_changes in changes.items()
        for change in name_changes
        if not _fits(adapter, change, tuple(shapes[name]))
    ]
    if wrong:
        listing = "; ".join(f"{n} {list(shapes[n])} vs {_needed(adapter, c)}" for n, c in wrong[:SHOWN])
        low_rank = [n for n, cs in changes.items() if any(isinstance(c, LoraTarget) for c in cs)]
        if low_rank and all(any(n == w for w, _ in wrong) for n in low_rank):
            why = "none of its LoRA layers has the base's shape: built for another model?"
        else:
            why = f"{len(wrong)} of {len(changes)} changed tensors have another shape: another variant of the model?"
        raise UserError(f"adapter {adapter.folder} does not fit {what} ({why}): {listing}")


def _missing_reason(missing: list[str], changes: dict[str, list[Change]], what: str) -> str:
    listing = ", ".join(missing[:SHOWN]) + (" ..." if len(missing) > SHOWN else "")
    if 2 * len(missing) >= len(changes):
        return f"{len(missing)} of {len(changes)} tensors that are not in {what} (built for another model?): {listing}"
    return (
        f"{len(missing)} of {len(changes)} tensors that are not in {what} (the others are there: another revision "
        f"or variant of the model?): {listing}"
    )


def _fits(adapter: LoraAdapter, change: Change, shape: tuple[int, ...]) -> bool:
    if isinstance(change, TokenRows):
        rows = adapter.weights.shape(change.key)
        return (
            len(shape) == len(rows) == 2
            and shape[1] == rows[1]
            and rows[0] == len(change.indices)
            and max(change.indices) < shape[0]
        )
    if isinstance(change, ParameterPiece):
        return True  # checked against the pieces' own shapes by split_parameters
    return shape == adapter.expected_shape(change)


def _needed(adapter: LoraAdapter, change: Change) -> str:
    if isinstance(change, TokenRows):
        return f"rows {list(change.indices)} as {list(adapter.weights.shape(change.key))}"
    return str(list(adapter.expected_shape(change)))
