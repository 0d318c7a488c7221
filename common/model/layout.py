"""What a checkpoint's layout says about the model: its config, and a tied output head left unsaved."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import logging
import re
from pathlib import Path

import torch

from common.errors import UserError
from common.io.safetensors_io import CheckpointIndex, pread

log = logging.getLogger("lora_tv")

HEAD = "lm_head.weight"
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; anything else is the user's file's problem."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # JSON or UTF-8 errors, an integer of 5000 digits, deep nesting
        raise UserError(f"{path}: invalid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object")
    return data


def read_config(model_dir: Path, required: bool = True) -> dict:
    """config.json of a model folder ({} when absent and not required)."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        if required:
            raise UserError(f"model {model_dir}: no config.json")
        return {}
    return read_json_object(config_path)


def check_base_supported(config: dict, model_dir: Path) -> None:
    """A base saved 4-bit by bitsandbytes is read dequantized (safetensors_io); other quantized checkpoints
    (bitsandbytes' 8-bit, GPTQ, AWQ …) are refused by name."""
    quantization = config.get("quantization_config")
    if not quantization:
        return
    method = quantization.get("quant_method", "quantized") if isinstance(quantization, dict) else "quantized"
    if method == "bitsandbytes" and quantization.get("load_in_4bit"):
        with CheckpointIndex(model_dir) as checkpoint:
            if not checkpoint.four_bit:
                raise UserError(
                    f"base model {model_dir}: config.json says it is 4-bit, but its weights are not (no bitsandbytes "
                    "quantization state): a checkpoint of another model's config?"
                )
        return
    kind = "8-bit (LLM.int8) " if method == "bitsandbytes" else ""
    raise UserError(
        f"base model {model_dir}: a {kind}{method}-quantized checkpoint, which is not read (4-bit bitsandbytes "
        "checkpoints are, dequantized): merge into the unquantized base"
    )


def tied_embedding(checkpoint: CheckpointIndex, config: dict) -> str | None:
    """The input embedding the output head is tied to, when the checkpoint leaves the head out."""
    if HEAD in checkpoint or not config.get("tie_word_embeddings", True):
        return None
    embeddings = [n for n in checkpoint.names() if n.endswith(EMBEDDING_SUFFIXES)]
    return embeddings[0] if len(embeddings) == 1 else None


def kept_in_fp32(config: dict, precision: torch.dtype) -> re.Pattern | None:
    """The tensors transformers keeps in fp32 when it loads the model at `precision` (a regex searched in names).

    A model class lists modules in `_keep_in_fp32_modules` (kept at fp16) and `_keep_in_fp32_modules_strict` (kept
    at fp16 and bf16): GPT-OSS's norms, DeepSeek-V3's router `gate.weight`. peft merges into those fp32 tensors, so
    the merge writes them in fp32 too. None at fp32, or when the class keeps nothing (or transformers has no such
    class: said).
    """
    if precision not in (torch.float16, torch.bfloat16):
        return None
    lists = class_attributes(config, ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"))
    kept = set(lists["_keep_in_fp32_modules_strict"])
    if precision == torch.float16:
        kept |= set(lists["_keep_in_fp32_modules"])
    if not kept:
        return None
    return re.compile("|".join(f"(?:{name.replace('*', '.*')})" for name in sorted(kept)))


def class_attributes(config: dict, names: tuple[str, ...]) -> dict[str, list[str]]:
    """List attributes of the model class config.json names (`architectures`, else the causal LM transformers maps
    its `model_type` to). Read from transformers' source without importing it (importing a model class costs
    seconds): the class in `models/<model_type>/modeling_<model_type>.py`, then its bases defined in that file,
    nearest first, as Python resolves a class attribute. Where the source does not settle it (no such file, the class
    or a base defined elsewhere, a value that is not a literal) the class itself is imported and read; a class
    transformers does not have keeps nothing, and the user is told so."""
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    class_name = _class_name(config, model_type)
    if class_name is None:
        return {name: [] for name in names}
    source = _modeling_source(model_type)
    classes = _classes_in(source) if source is not None else {}
    found = {name: _class_attribute(classes, class_name, name) for name in names}
    if all(value is not None for value in found.values()):
        return {name: value if isinstance(value, list) else [] for name, value in found.items()}
    model_class = _model_class(class_name)
    if model_class is None:
        log.warning(
            f"note: transformers {_transformers_version()} has no model class {class_name}: which modules it keeps "
            "in fp32 is not known here, and every floating-point tensor is written at the output precision"
        )
        return {name: [] for name in names}
    return {name: [str(v) for v in getattr(model_class, name, None) or []] for name in names}


def _class_name(config: dict, model_type: str | None) -> str | None:
    """The model class config.json names, else the causal LM class transformers' auto mapping gives its model_type."""
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        return architectures[0]
    if model_type is None:
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    return name if isinstance(name, str) else None


def _modeling_source(model_type: str | None) -> Path | None:
    """transformers' `models/<model_type>/modeling_<model_type>.py`, where it exists."""
    spec = importlib.util.find_spec("transformers")
    if model_type is None or not re.fullmatch(r"\w+", model_type) or spec is None or not spec.origin:
        return None
    source = Path(spec.origin).parent / "models" / model_type / f"modeling_{model_type}.py"
    return source if source.is_file() else None


def _classes_in(source: Path) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in ast.parse(source.read_text()).body if isinstance(node, ast.ClassDef)}


# Bases that define no module list (PreTrainedModel's are None): a search reaching one of them ends there.
ROOT_CLASSES = {"PreTrainedModel", "GenerationMixin", "Module", "nn.Module", "torch.nn.Module", "object"}
ABSENT = object()  # the attribute is in neither the class nor its bases


def _class_attribute(classes: dict[str, ast.ClassDef], class_name: str, attribute: str) -> list[str] | object | None:
    """A list of strings assigned to `attribute` in a class or, failing that, in its bases (depth first, as Python's
    method resolution order finds it for single inheritance and mixins); ABSENT when none assigns it; None when this
    file does not settle it (the class or a base is defined elsewhere, or the value is not a literal)."""
    node = classes.get(class_name)
    if node is None:
        return None
    for statement in node.body:
        targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == attribute for t in targets):
            return _literal_names(getattr(statement, "value", None))
    for base in node.bases:
        name = ast.unparse(base)
        if name in ROOT_CLASSES:
            continue
        inherited = _class_attribute(classes, name, attribute) if name in classes else None
        if inherited is not ABSENT:
            return inherited
    return ABSENT


def _literal_names(value: ast.expr | None) -> list[str] | None:
    """The strings of a literal list, tuple or set ([] for None); None for anything else (an expression)."""
    if value is None:
        return []
    try:
        literal = ast.literal_eval(value)
    except ValueError:
        return None
    if literal is None:
        return []
    if isinstance(literal, list | tuple | set) and all(isinstance(v, str) for v in literal):
        return list(literal)
    return None


def _model_class(class_name: str) -> type | None:
    """transformers' class of that name, imported (None: transformers has none). A class transformers has but
    cannot import here (a package it needs is missing) is the user's to fix: which tensors stay fp32 is unknown."""
    import transformers

    try:
        model_class = getattr(transformers, class_name, None)
    except (ImportError, RuntimeError) as e:  # transformers' lazy import fails as one or the other
        why = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(
            f"transformers cannot import {class_name} here ({type(e).__name__}: {why}), which says which modules "
            "the model keeps in fp32: install what it needs, or merge at fp32"
        ) from None
    return model_class if isinstance(model_class, type) else None


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


SAMPLE_BYTES = 1024  # read from the start and from the middle of every tensor


def fingerprint(checkpoint: CheckpointIndex) -> str:
    """A short identity of a checkpoint's contents, whatever its files: a hash of every tensor's name, dtype and
    shape, and of 1 KB from the start and the middle of every tensor (2 KB per tensor: about 1 MB for
    StarCoder2-3B's 483). Two copies of a model agree; another revision, the same model with perturbed weights,
    or a merge (a LoRA changes every element of the tensors it adapts) does not."""
    digest = hashlib.sha256()
    for name in sorted(checkpoint.names()):
        info = checkpoint.info(name)
        digest.update(f"{name}|{info.dtype}|{list(info.shape)};".encode())
        fd, offset = checkpoint.byte_range(name)
        for start in (0, info.nbytes // 2):
            digest.update(pread(fd, min(SAMPLE_BYTES, info.nbytes - start), offset + start))
    return digest.hexdigest()[:16]


def stored_dtype(index: CheckpointIndex) -> torch.dtype:
    """The floating dtype most of a checkpoint's weights (by elements) are stored in."""
    counts: dict[torch.dtype, int] = {}
    for name in index.names():
        info = index.info(name)
        if info.dtype.is_floating_point:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    if not counts:
        raise UserError(f"{index.source}: no floating-point weights")
    return max(counts, key=counts.__getitem__)
