"""peft LoRA adapter files: the config, the tensors, and what each tensor does to which base tensor.

Every tensor of `adapter_model.safetensors` becomes one *change* to one base tensor (keys are
`base_model.model.<module path>.<kind>`, the adapter name stripped on save):

| adapter key                                  | change                                            |
|----------------------------------------------|---------------------------------------------------|
| `M.lora_A.weight`, `M.lora_B.weight`         | `LoraTarget`: W += scaling · B @ A (on `M.weight`) |
| `M.lora_embedding_A`, `M.lora_embedding_B`   | `LoraTarget` on an embedding: Δ = scaling·(B@A)ᵀ   |
| `M.lora_magnitude_vector`                    | DoRA magnitude of that `LoraTarget`               |
| `M.lora_B.bias`                              | `BiasUpdate`: b += scaling · lora_B.bias           |
| `M.token_adapter.trainable_tokens_delta`     | `TokenRows`: rows `trainable_token_indices` replaced |
| anything else (`M.base_layer.bias`, `modules_to_save` copies, a saved embedding) | `Replacement`: new values |
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import UserError
from common.model_layout import read_json_object
from common.precision import short_name
from common.safetensors_io import CheckpointIndex

CONFIG_FILE = "adapter_config.json"
ADAPTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PREFIX = "base_model.model."
log = logging.getLogger("lora_tv")
KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector"
    r"|token_adapter\.trainable_tokens_delta)(?:\.(?P<rest>[\w.-]+))?$"
)


@dataclass(frozen=True)
class LoraTarget:
    """A low-rank update of one weight: where its factors are and how peft scales them."""

    module: str  # module path, e.g. model.layers.0.self_attn.q_proj
    base_name: str  # the base tensor it changes, e.g. model.layers.0.self_attn.q_proj.weight
    key_a: str
    key_b: str
    rank: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool
    shape: tuple[int, ...]  # shape of the base weight (out × in; in × out with fan_in_fan_out; vocab × dim)
    embedding: bool = False
    magnitude_key: str | None = None  # DoRA


@dataclass(frozen=True)
class BiasUpdate:
    """`lora_bias=True`: the layer's bias moves by scaling · lora_B.bias."""

    base_name: str
    key: str
    scaling: float


@dataclass(frozen=True)
class Replacement:
    """New values for a whole tensor; `shared` when they replace a layer's own (possibly tied) parameter."""

    base_name: str
    key: str
    shared: bool


@dataclass(frozen=True)
class TokenRows:
    """Trainable tokens: the rows `indices` of an embedding take the stored values."""

    base_name: str
    key: str
    indices: tuple[int, ...]


Change = LoraTarget | BiasUpdate | Replacement | TokenRows
ORDER = {Replacement: 0, LoraTarget: 1, BiasUpdate: 2, TokenRows: 3}  # the order peft applies them in
KIND_NAMES = {
    Replacement: "trained copies (modules_to_save, biases)",
    LoraTarget: "LoRA updates",
    BiasUpdate: "LoRA biases",
    TokenRows: "trainable tokens",
}


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """peft's scaling: `alpha / r`, or `alpha / √r` for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def pattern_value(patterns: dict | None, module: str, default: float) -> float:
    """peft's `rank_pattern` / `alpha_pattern` rule: the first key matching the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraAdapter:
    """A peft LoRA adapter folder (or Trainer `checkpoint-N/` folder): config plus lazily read tensors."""

    def __init__(self, folder: Path):
        self.folder = _adapter_folder(Path(folder))
        self.config = _read_config(self.folder / CONFIG_FILE)
        self.weights = _AdapterWeights(self.folder)
        self.changes = self._find_changes()
        self.targets = {c.base_name: c for cs in self.changes.values() for c in cs if isinstance(c, LoraTarget)}

    def _find_changes(self) -> dict[str, list[Change]]:
        parts: dict[str, dict[str, str]] = {}
        changes: list[Change] = []
        for key in self.weights.names():
            name = key.removeprefix(PREFIX)
            match = KEY.match(name)
            if match is None:
                changes.append(self._replacement(key, name))
                continue
            kind = match["kind"] + (".bias" if (match["rest"] or "").endswith("bias") else "")
            parts.setdefault(match["module"], {})[kind] = key
        for module, keys in sorted(parts.items()):
            changes += self._module_changes(module, keys)
        if not changes:
            raise UserError(f"{self.folder}: the adapter holds no weights")
        by_tensor: dict[str, list[Change]] = {}
        for change in sorted(changes, key=lambda c: ORDER[type(c)]):
            by_tensor.setdefault(change.base_name, []).append(change)
        return by_tensor

    def _replacement(self, key: str, name: str) -> Replacement:
        shared = ".base_layer." in name
        name = re.sub(r"\.modules_to_save\.[\w-]+\.", ".", name).replace(".base_layer.", ".")
        return Replacement(base_name=name, key=key, shared=shared)

    def _module_changes(self, module: str, keys: dict[str, str]) -> list[Change]:
        token_rows: list[Change] = []
        if "token_adapter.trainable_tokens_delta" in keys:
            key = keys.pop("token_adapter.trainable_tokens_delta")
            self._check_dtypes(key)
            token_rows.append(TokenRows(f"{module}.weight", key, self._token_indices(module)))
        if not keys:
            return token_rows
        embedding = "lora_embedding_A" in keys or "lora_embedding_B" in keys
        a, b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a not in keys or b not in keys:
            raise UserError(f"{self.folder}: module {module} lacks {a if a not in keys else b} (incomplete adapter)")
        target = self._target(module, keys[a], keys[b], embedding, keys.get("lora_magnitude_vector"))
        changes: list[Change] = [target, *token_rows]
        if "lora_B.bias" in keys:
            self._check_dtypes(keys["lora_B.bias"])
            changes.append(BiasUpdate(f"{module}.bias", keys["lora_B.bias"], target.scaling))
        return changes

    def _target(self, module: str, key_a: str, key_b: str, embedding: bool, magnitude: str | None) -> LoraTarget:
        shape_a, shape_b = self.weights.shape(key_a), self.weights.shape(key_b)
        if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != shape_b[1]:
            raise UserError(
                f"{self.folder}: {module} has factors of shapes {list(shape_a)} and {list(shape_b)} "
                "(only linear and embedding LoRA layers are supported)"
            )
        self._check_dtypes(key_a, key_b, *([magnitude] if magnitude else []))
        if magnitude and self.weights.shape(magnitude) != (shape_b[0],):
            raise UserError(
                f"{self.folder}: {module} has a DoRA magnitude of shape {list(self.weights.shape(magnitude))}, "
                f"not [{shape_b[0]}] (one per output feature)"
            )
        rank = shape_a[0]
        config_rank = pattern_value(self.config.get("rank_pattern"), module, self.config.get("r", 8))
        if config_rank != rank:
            raise UserError(f"{self.folder}: {module} has rank {rank} but adapter_config.json says {config_rank}")
        alpha = pattern_value(self.config.get("alpha_pattern"), module, self.config.get("lora_alpha", 8))
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False)) and not embedding
        out_in = (shape_b[0], shape_a[1])
        if embedding and magnitude:
            raise UserError(f"{self.folder}: DoRA on the embedding {module} is not supported yet")
        return LoraTarget(
            module=module,
            base_name=f"{module}.weight",
            key_a=key_a,
            key_b=key_b,
            rank=rank,
            alpha=alpha,
            scaling=lora_scaling(alpha, rank, bool(self.config.get("use_rslora", False))),
            fan_in_fan_out=fan_in_fan_out,
            shape=out_in[::-1] if fan_in_fan_out or embedding else out_in,
            embedding=embedding,
            magnitude_key=magnitude,
        )

    def _check_dtypes(self, *keys: str) -> None:
        """Factors, magnitudes, bias updates and token rows are what peft trains: floating point tensors."""
        for key in keys:
            dtype = self.weights.dtype(key)
            if dtype not in ADAPTER_DTYPES:
                raise UserError(f"{self.folder}: {key} is {short_name(dtype)}, not fp16, bf16, fp32 or fp64")

    def _token_indices(self, module: str) -> tuple[int, ...]:
        indices = self.config.get("trainable_token_indices")
        if isinstance(indices, dict):
            matching = [v for k, v in indices.items() if module == k or module.endswith(f".{k}")]
            indices = matching[0] if matching else None
        if not isinstance(indices, list) or not indices or not all(type(i) is int and i >= 0 for i in indices):
            raise UserError(f"{self.folder}: no trainable_token_indices for {module} in {CONFIG_FILE}")
        return tuple(indices)

    def read(self, key: str) -> torch.Tensor:
        return self.weights.read(key)

    def factors(self, target: LoraTarget) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored factors (A: r × in, B: out × r)."""
        return self.weights.read(target.key_a), self.weights.read(target.key_b)

    def expected_shape(self, change: Change) -> tuple[int, ...]:
        """The base tensor shape a low-rank update, bias update or replacement needs."""
        return change.shape if isinstance(change, LoraTarget) else self.weights.shape(change.key)

    def close(self) -> None:
        self.weights.close()


def names_in_checkpoint(changes: dict[str, list[Change]], names: set[str]) -> dict[str, list[Change]]:
    """The changes keyed by the checkpoint's own tensor names.

    Module paths carry the model class's prefix (`transformer.h.0…` in GPT2LMHeadModel), which some
    checkpoints leave out of their tensor names (`h.0…`, as the original gpt2 does); such a name is
    matched without its first component.
    """
    renamed = {}
    for name, name_changes in changes.items():
        short = name.split(".", 1)[-1]
        renamed[short if name not in names and short in names else name] = name_changes
    return renamed


def check_targets_match(
    adapter: LoraAdapter,
    shapes: dict[str, tuple[int, ...]],
    what: str,
    changes: dict[str, list[Change]] | None = None,
) -> None:
    """Every changed tensor must exist in `what` under the same name and shape."""
    changes = adapter.changes if changes is None else changes
    missing = [name for name in changes if name not in shapes]
    wrong = []
    for name, name_changes in changes.items():
        for change in name_changes:
            if name in shapes and not _fits(adapter, change, tuple(shapes[name])):
                wrong.append(f"{name} {list(shapes[name])} vs {_needed(adapter, change)}")
    if missing:
        raise UserError(
            f"adapter {adapter.folder} changes {len(missing)} tensors not in {what} "
            f"(built for another model?): {', '.join(missing[:3])}"
        )
    if wrong:
        raise UserError(
            f"adapter {adapter.folder} does not fit {what} ({len(wrong)} mismatches): {'; '.join(wrong[:3])}"
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
    return shape == adapter.expected_shape(change)


def _needed(adapter: LoraAdapter, change: Change) -> str:
    if isinstance(change, TokenRows):
        return f"rows {list(change.indices)} as {list(adapter.weights.shape(change.key))}"
    return str(list(adapter.expected_shape(change)))


def _adapter_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise UserError(f"adapter {folder}: not a folder")
    if (folder / CONFIG_FILE).is_file():
        return folder
    named = sorted(p.parent for p in folder.glob(f"*/{CONFIG_FILE}"))
    if len(named) == 1:  # peft saves a non-default adapter name in a subfolder
        log.info(f"adapter: using {named[0]}")
        return named[0]
    if named:
        names = ", ".join(p.name for p in named)
        raise UserError(f"adapter {folder}: holds several adapters ({names}); pass the one to use")
    raise UserError(f"adapter {folder}: no {CONFIG_FILE} (not a peft adapter folder)")


# LoRA variants whose merge is not W + s·B@A (or that peft itself cannot merge): refused by name, never merged
# as plain LoRA. (VeLoRA changes only the backward pass; EVA, CorDA, LoRA-GA and LoftQ only the initialisation.)
UNSUPPORTED_VARIANTS = (
    "target_parameters",
    "alora_invocation_tokens",
    "use_qalora",
    "monteclora_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "megatron_config",
)


def _read_config(path: Path) -> dict:
    config = read_json_object(path)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UserError(f"{path}: peft_type {_shorten(str(peft_type))} is not supported (only LORA)")
    if config.get("layer_replication"):
        raise UserError(f"{path}: layer_replication cannot be merged (peft refuses it too)")
    variants = [key for key in UNSUPPORTED_VARIANTS if config.get(key)]
    if variants:
        raise UserError(f"{path}: {', '.join(variants)} is set: a LoRA variant this toolkit does not support")
    _check_config_types(path, config)
    return config


def _positive_int(value: object) -> bool:
    return type(value) is int and value > 0


def _number(value: object) -> bool:
    try:
        return type(value) in (int, float) and math.isfinite(float(value))
    except OverflowError:  # an integer beyond float range
        return False


def _optional_boolean(value: object) -> bool:
    return value is None or type(value) is bool


def _patterns_of(valid: Callable[[object], bool]) -> Callable[[object], bool]:
    """A rank_pattern / alpha_pattern: null, or module-path regexes (as peft matches them) to valid values."""

    def valid_patterns(value: object) -> bool:
        if value is None:
            return True
        if not isinstance(value, dict) or not all(valid(v) for v in value.values()):
            return False
        try:
            for key in value:
                re.compile(rf"(.*\.)?({key})$")
        except re.error:
            return False
        return True

    return valid_patterns


# The fields the merge reads, with the types peft writes them in; anything else is the file's problem.
CONFIG_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "r": (_positive_int, "a positive integer"),
    "lora_alpha": (_number, "a finite number"),
    "use_rslora": (_optional_boolean, "true or false"),
    "fan_in_fan_out": (_optional_boolean, "true or false"),
    "rank_pattern": (_patterns_of(_positive_int), "an object of module-path regexes to positive integers"),
    "alpha_pattern": (_patterns_of(_number), "an object of module-path regexes to numbers"),
}


def _check_config_types(path: Path, config: dict) -> None:
    for key, (valid, what) in CONFIG_FIELDS.items():
        if key in config and not valid(config[key]):
            raise UserError(f"{path}: {key} must be {what}, not {_shorten(repr(config[key]))}")


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _AdapterWeights:
    """adapter_model.safetensors read lazily, or adapter_model.bin loaded with weights_only=True."""

    def __init__(self, folder: Path):
        safetensors_path = folder / "adapter_model.safetensors"
        bin_path = folder / "adapter_model.bin"
        self.index: CheckpointIndex | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        if safetensors_path.is_file():
            self.index = CheckpointIndex(safetensors_path)
        elif bin_path.is_file():
            self.tensors = _load_bin(bin_path)
        else:
            raise UserError(f"adapter {folder}: no adapter_model.safetensors or adapter_model.bin")

    def names(self) -> list[str]:
        return self.index.names() if self.index else list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.index.info(name).shape if self.index else tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.index.info(name).dtype if self.index else self.tensors[name].dtype

    def read(self, name: str) -> torch.Tensor:
        return self.index.read(name) if self.index else self.tensors[name]

    def close(self) -> None:
        if self.index:
            self.index.close()


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that weights_only refuses, or a corrupt file
        raise UserError(f"{path}: cannot be read safely as tensors ({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a dictionary of tensors")
    return state
