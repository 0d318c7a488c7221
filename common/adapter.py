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
| `M(.base_layer)*.lora_A/B.weight` of a `target_parameters` parameter P | `ParameterTarget`: P += s·B@A per expert |
| `M.original_module.weight` (beside a resized vocabulary's copies) | nothing: the frozen original, not merged |
| anything else (`M.base_layer.bias`, `modules_to_save` copies, a saved embedding) | `Replacement`: new values |

`init_lora_weights` that rewrite the base weight when peft loads the adapter (PiSSA, OLoRA: W − s·B₀A₀) are
redone exactly (`LoraTarget.init`); the ones peft cannot redo deterministically are refused (`base_rewriting_init`).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from common.adapter_config import base_rewriting_init, read_adapter_config
from common.errors import UserError
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
    init: str | None = None  # "pissa" / "olora": peft first rewrites W as W − s·B₀A₀ (common/lora.py)


@dataclass(frozen=True)
class ParameterTarget:
    """`target_parameters` (peft's ParamWrapper): a LoRA on a model parameter, often a stack of experts.

    The factors hold every expert: A is (experts·r) × in, B is out × (experts·r). Δ is `scaling · B_e @ A_e` per
    expert e, cast to the parameter's dtype before it is added (unlike a Linear layer's single rounding).
    """

    base_name: str  # the model parameter, e.g. model.layers.0.mlp.experts.gate_up_proj
    key_a: str
    key_b: str
    rank: int  # per expert
    alpha: float
    scaling: float
    shape: tuple[int, ...]  # (experts, out, in), (experts, in, out) when `transposed`, or (out, in)
    transposed: bool

    @property
    def experts(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1


@dataclass(frozen=True)
class ParameterPiece:
    """One checkpoint tensor holding part of a `ParameterTarget`'s parameter (one expert's w1, say), or all of it."""

    base_name: str
    target: ParameterTarget
    split: bool  # the parameter is saved as several tensors (transformers' conversion); else under its own name

    @property
    def rank(self) -> int:
        return self.target.rank


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


Change = LoraTarget | BiasUpdate | Replacement | TokenRows | ParameterTarget | ParameterPiece
# the order peft applies them in
ORDER = {Replacement: 0, LoraTarget: 1, ParameterTarget: 1, ParameterPiece: 1, BiasUpdate: 2, TokenRows: 3}
KIND_NAMES = {
    Replacement: "trained copies (modules_to_save, biases)",
    LoraTarget: "LoRA updates",
    BiasUpdate: "LoRA biases",
    TokenRows: "trainable tokens",
    ParameterTarget: "target_parameters LoRA updates",
    ParameterPiece: "target_parameters LoRA updates",
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
    """A peft LoRA adapter folder (or Trainer `checkpoint-N/` folder): config plus lazily read tensors.

    `base_dir` is the base model's folder: adapters with `target_parameters` need its model class to know which
    parameter each LoRA belongs to. With `residual_base`, the base given is the residual model a base-rewriting
    init (PiSSA, CorDA, …) saved, so the adapter is merged into it as a plain LoRA.
    """

    def __init__(self, folder: Path, base_dir: Path | None = None, residual_base: bool = False):
        self.folder = _adapter_folder(Path(folder))
        self.config = read_adapter_config(self.folder / CONFIG_FILE)
        self.init = None if residual_base else base_rewriting_init(self.folder / CONFIG_FILE, self.config)
        self.weights = _AdapterWeights(self.folder)
        self.structure = self._model_structure(base_dir)
        self.piece_cache: dict = {}  # the pieces of the last parameter's Δ (common/lora.py: piece_delta)
        self.changes = self._find_changes()
        self.targets = {c.base_name: c for cs in self.changes.values() for c in cs if isinstance(c, LoraTarget)}

    def _model_structure(self, base_dir: Path | None):
        if not self.config.get("target_parameters"):
            return None
        if self.init is not None:
            raise UserError(f"{self.folder}: init_lora_weights {self.init!r} with target_parameters is not supported")
        if base_dir is None:
            raise UserError(
                f"adapter {self.folder} uses target_parameters: which model parameter each LoRA belongs to, and how "
                "the checkpoint stores it, comes from the base model: pass --base_model"
            )
        from common.model_structure import ModelStructure

        return ModelStructure(base_dir)

    def _find_changes(self) -> dict[str, list[Change]]:
        parts: dict[str, dict[str, str]] = {}
        replacements: dict[str, Replacement] = {}
        for key in self.weights.names():
            name = key.removeprefix(PREFIX)
            match = KEY.match(name)
            if match is not None:
                kind = match["kind"] + (".bias" if (match["rest"] or "").endswith("bias") else "")
                parts.setdefault(match["module"], {})[kind] = key
            elif ".original_module." not in name:  # the frozen original of a modules_to_save copy: not merged
                _add_replacement(replacements, key, name)
        changes: list[Change] = list(replacements.values())
        for module, keys in sorted(parts.items()):
            changes += self._module_changes(module, keys)
        if not changes:
            raise UserError(f"{self.folder}: the adapter holds no weights")
        by_tensor: dict[str, list[Change]] = {}
        for change in sorted(changes, key=lambda c: ORDER[type(c)]):
            by_tensor.setdefault(change.base_name, []).append(change)
        return by_tensor

    def _module_changes(self, module: str, keys: dict[str, str]) -> list[Change]:
        if self.structure is not None:
            parameter = self._wrapped_parameter(module)
            if parameter is not None:
                return [self._parameter_target(module, parameter, keys)]
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
        if len(shape_a) != 2 or len(shape_b) != 2:
            raise UserError(
                f"{self.folder}: {module} has factors of shapes {list(shape_a)} and {list(shape_b)} "
                "(a convolution LoRA: only linear and embedding LoRA layers are supported)"
            )
        if shape_a[0] != shape_b[1]:
            raise UserError(
                f"{self.folder}: {module} has a rank-{shape_a[0]} A {list(shape_a)} but a rank-{shape_b[1]} B "
                f"{list(shape_b)} (a damaged or hand-edited adapter)"
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
        if self.init == "olora" and fan_in_fan_out and out_in[0] != out_in[1]:
            raise UserError(
                f"{self.folder}: OLoRA on the Conv1D layer {module} ({out_in[1]} × {out_in[0]}): peft's OLoRA "
                "ignores fan_in_fan_out, so its initial factors do not fit the layer and peft cannot merge it either"
            )
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
            init=None if embedding else self.init,  # peft runs PiSSA / OLoRA on Linear and Conv1D layers only
        )

    def _wrapped_parameter(self, module: str) -> str | None:
        """The parameter a ParamWrapper at `module` (`…experts.base_layer` for the second one nested) adapts; None
        for a LoRA layer. peft wraps a module's targeted parameters in their registration order, the first
        innermost, so the outermost wrapper (saved without `base_layer`) holds the last one."""
        depth = module.count(".base_layer")
        unwrapped = module.replace(".base_layer", "")
        parameters = self.structure.targeted_parameters(unwrapped, list(self.config["target_parameters"]))
        if not parameters:
            return None
        if depth >= len(parameters):
            raise UserError(
                f"{self.folder}: {module} nests {depth + 1} LoRA wrappers but the model has only "
                f"{len(parameters)} targeted parameters there ({', '.join(parameters)})"
            )
        return parameters[len(parameters) - 1 - depth]

    def _parameter_target(self, module: str, parameter: str, keys: dict[str, str]) -> ParameterTarget:
        """peft's ParamWrapper: A is (experts·r) × in, B is out × (experts·r), in and out as peft reads the shape."""
        if set(keys) != {"lora_A", "lora_B"}:
            raise UserError(
                f"{self.folder}: {module} (target_parameters) holds {', '.join(sorted(keys))}, not lora_A "
                "and lora_B only"
            )
        shape = self.structure.shape(parameter)
        transposed = self.structure.is_transposed(parameter)
        experts = shape[0] if len(shape) == 3 else 1
        if len(shape) == 3:
            fan_in, fan_out = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
        elif len(shape) == 2:
            fan_in, fan_out = shape[1], shape[0]
        else:
            raise UserError(f"{self.folder}: {parameter} has {len(shape)} dimensions (peft adapts 2-D and 3-D ones)")
        self._check_dtypes(keys["lora_A"], keys["lora_B"])
        shape_a, shape_b = self.weights.shape(keys["lora_A"]), self.weights.shape(keys["lora_B"])
        rank = shape_a[0] // experts if len(shape_a) == 2 else 0
        if shape_a != (rank * experts, fan_in) or shape_b != (fan_out, rank * experts) or rank == 0:
            raise UserError(
                f"{self.folder}: {parameter} {list(shape)} does not take factors of shapes {list(shape_a)} and "
                f"{list(shape_b)} (built for another model?)"
            )
        config_rank = pattern_value(self.config.get("rank_pattern"), parameter, self.config.get("r", 8))
        if config_rank != rank:
            raise UserError(f"{self.folder}: {parameter} has rank {rank} but adapter_config.json says {config_rank}")
        alpha = pattern_value(self.config.get("alpha_pattern"), parameter, self.config.get("lora_alpha", 8))
        scaling = lora_scaling(alpha, rank, bool(self.config.get("use_rslora", False)))
        return ParameterTarget(parameter, keys["lora_A"], keys["lora_B"], rank, alpha, scaling, shape, transposed)

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

    def factors(self, target: LoraTarget | ParameterTarget) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored factors (A: r × in, B: out × r)."""
        return self.weights.read(target.key_a), self.weights.read(target.key_b)

    def expected_shape(self, change: Change) -> tuple[int, ...]:
        """The base tensor shape a low-rank update, bias update or replacement needs."""
        if isinstance(change, LoraTarget | ParameterTarget):
            return change.shape
        return self.weights.shape(change.key)

    def close(self) -> None:
        self.weights.close()


def _add_replacement(replacements: dict[str, Replacement], key: str, name: str) -> None:
    """A saved copy or bias: new values for the base tensor it is named after.

    peft saves a modules_to_save copy as `M.weight`; when the vocabulary was resized it also saves
    `M.modules_to_save.weight` (the same values) and `M.original_module.weight` beside it. peft loads the first
    form, so it wins when both are there.
    """
    shared = ".base_layer." in name
    plain = ".modules_to_save." not in name
    base_name = re.sub(r"\.modules_to_save\.(?:[\w-]+\.)?(?=[^.]+$)|\.modules_to_save\.[\w-]+\.", ".", name)
    base_name = base_name.replace(".base_layer.", ".")
    if plain or base_name not in replacements:
        replacements[base_name] = Replacement(base_name=base_name, key=key, shared=shared)


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
