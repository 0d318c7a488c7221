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

`LoraAdapter` is the facade the rest of the code uses; behind it, by responsibility: `adapter_folder` and
`AdapterWeights` (the folder and its tensors), `parse_keys` (the key grammar above), `ChangeReader` (each module's
keys into changes, checked against the config: ranks, shapes, dtypes, DoRA, lora_bias, trainable tokens) and
`check_targets` (what peft refuses or does otherwise under the config, against the base's modules).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.errors import UserError, shorten
from common.io.safetensors_io import CheckpointIndex
from common.lora.config import AdapterConfig, base_rewriting_init, read_adapter_config, targets
from common.model.layout import EMBEDDING_SUFFIXES, HEAD, read_config, tied_embedding
from common.model.module_kinds import CONV1D, CONV1D_MODEL_TYPES, ModuleKinds
from common.numerics.precision import short_name

if TYPE_CHECKING:
    from common.model.structure import ModelStructure

CONFIG_FILE = "adapter_config.json"
ADAPTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PREFIX = "base_model.model."
log = logging.getLogger("lora_tv")
UNTRAINED_FACTORS = "random or weight-moving initial factors"
LAYER, EMBEDDING_MODULE, OTHER_MODULE = "layer", "embedding", "other"  # the base's modules, as peft may wrap them
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
    init: str | None = None  # "pissa" / "olora": peft first rewrites W as W − s·B₀A₀ (common/lora/arithmetic.py)
    initial_magnitude: bool = False  # DoRA whose file holds no magnitude: peft's initial one, ‖W‖ per row

    @property
    def dora(self) -> bool:
        return self.magnitude_key is not None or self.initial_magnitude


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


class PieceDeltas:
    """The Δ of a `target_parameters` parameter cut into the checkpoint tensors that hold it, for the parameter asked
    for last. The merge plan gives the pieces it cuts one of these (merge_plan.split_parameters); the pieces of one
    parameter are asked for one after the other, so its Δ is computed once, whole (as peft does), for each dtype and
    device asked, and dropped when another parameter's is asked for."""

    def __init__(self) -> None:
        self._parameter: str | None = None
        self._cut: dict[tuple[torch.dtype | None, str], dict[str, torch.Tensor]] = {}

    def get(
        self,
        parameter: str,
        compute_dtype: torch.dtype | None,
        device: torch.device,
        cut: Callable[[], dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """The cut Δ of `parameter` computed in `compute_dtype` on `device`: `cut()` when not kept."""
        if parameter != self._parameter:
            self._parameter, self._cut = parameter, {}
        key = (compute_dtype, str(device))
        if key not in self._cut:
            self._cut[key] = cut()
        return self._cut[key]


@dataclass(frozen=True)
class ParameterPiece:
    """One checkpoint tensor holding part of a `ParameterTarget`'s parameter (one expert's w1, say), or all of it."""

    base_name: str
    target: ParameterTarget
    split: bool  # the parameter is saved as several tensors (transformers' conversion); else under its own name
    deltas: PieceDeltas = field(default_factory=PieceDeltas, compare=False, repr=False)  # shared by a plan's pieces

    @property
    def rank(self) -> int:
        return self.target.rank


@dataclass(frozen=True)
class BiasUpdate:
    """`lora_bias=True`: the layer's bias moves by scaling · lora_B.bias (the layer's own rank, alpha and scaling)."""

    base_name: str
    key: str
    rank: int
    alpha: float
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


class LoraAdapter:
    """A peft LoRA adapter folder (or Trainer `checkpoint-N/` folder): config plus lazily read tensors.

    `base_dir` is the base model's folder: adapters with `target_parameters` need its model class to know which
    parameter each LoRA belongs to. With `residual_base`, the base given is the residual model a base-rewriting
    init (PiSSA, CorDA, …) saved, so the adapter is merged into it as a plain LoRA.
    """

    def __init__(self, folder: Path, base_dir: Path | None = None, residual_base: bool = False):
        self.folder = adapter_folder(Path(folder))
        self.config = read_adapter_config(self.folder / CONFIG_FILE)
        self.init = None if residual_base else base_rewriting_init(self.folder / CONFIG_FILE, self.config)
        self.weights = AdapterWeights(self.folder)
        self.base_dir = base_dir
        self.conv1d = _conv1d_modules(base_dir)
        self.structure = _model_structure(self.folder, self.config, self.init, base_dir)
        reader = ChangeReader(self.folder, self.config, self.init, self.weights, self.structure, self.conv1d)
        self.changes = reader.changes(base_dir)
        self.ignored = reader.ignored  # keys of the file peft does not load under this config
        self.targets = {c.base_name: c for cs in self.changes.values() for c in cs if isinstance(c, LoraTarget)}

    def read(self, key: str) -> torch.Tensor:
        return self.weights.read(key)

    def factors(self, target: LoraTarget | ParameterTarget) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored factors (A: r × in, B: out × r)."""
        return self.weights.read(target.key_a), self.weights.read(target.key_b)

    def expected_shape(self, change: Change) -> tuple[int, ...]:
        """The base tensor shape a low-rank update, bias update or replacement needs."""
        match change:
            case LoraTarget() | ParameterTarget():
                return change.shape
            case BiasUpdate() | Replacement():
                return self.weights.shape(change.key)
            case TokenRows() | ParameterPiece():  # rows of a tensor of any length; a part of a parameter
                raise TypeError(f"{type(change).__name__} does not say its base tensor's shape: {change.base_name}")
            case _:
                raise TypeError(f"not an adapter change: {change!r}")

    def close(self) -> None:
        self.weights.close()


def _model_structure(
    folder: Path, config: AdapterConfig, init: str | None, base_dir: Path | None
) -> ModelStructure | None:
    """The base's model class on the meta device, for an adapter with `target_parameters`; else None."""
    if not config.target_parameters:
        return None
    if init is not None:
        raise UserError(f"{folder}: init_lora_weights {init!r} with target_parameters is not supported")
    if base_dir is None:
        raise UserError(
            f"adapter {folder} uses target_parameters: which model parameter each LoRA belongs to, and how "
            "the checkpoint stores it, comes from the base model: pass --base_model"
        )
    from common.model.structure import ModelStructure

    return ModelStructure(base_dir)


# --- the folder and its tensors


def adapter_folder(folder: Path) -> Path:
    """The folder holding adapter_config.json: `folder`, or its one subfolder that does (a named adapter)."""
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


class AdapterWeights:
    """adapter_model.safetensors read lazily, or adapter_model.bin loaded with weights_only=True."""

    def __init__(self, folder: Path):
        safetensors_path = folder / "adapter_model.safetensors"
        bin_path = folder / "adapter_model.bin"
        self.folder = folder
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

    def check_dtypes(self, *keys: str) -> None:
        """Factors, magnitudes, bias updates and token rows are what peft trains: floating point tensors."""
        for key in keys:
            dtype = self.dtype(key)
            if dtype not in ADAPTER_DTYPES:
                raise UserError(f"{self.folder}: {key} is {short_name(dtype)}, not fp16, bf16, fp32 or fp64")

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


# --- the key grammar


@dataclass
class AdapterKeys:
    """The file's keys by what they are: each module's LoRA tensors and token rows (`modules`: module path → kind →
    key, the kind `lora_B.bias` for a LoRA bias), the modules among them with LoRA tensors (`lora_modules`), and the
    new values of whole tensors (`replacements`)."""

    modules: dict[str, dict[str, str]]
    lora_modules: list[str]
    replacements: dict[str, Replacement]


def parse_keys(names: list[str]) -> AdapterKeys:
    """The keys of an adapter's file read by the grammar of the module docstring's table."""
    modules: dict[str, dict[str, str]] = {}
    replacements: dict[str, Replacement] = {}
    for key in names:
        name = key.removeprefix(PREFIX)
        match = KEY.match(name)
        if match is not None:
            kind = match["kind"] + (".bias" if (match["rest"] or "").endswith("bias") else "")
            modules.setdefault(match["module"], {})[kind] = key
        elif ".original_module." not in name:  # the frozen original of a modules_to_save copy: not merged
            _add_replacement(replacements, key, name)
    lora_modules = [m for m, kinds in modules.items() if any(k.startswith("lora_") for k in kinds)]
    return AdapterKeys(modules, lora_modules, replacements)


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


# --- each module's keys into changes


class ChangeReader:
    """The changes an adapter's file makes under its config, module by module, as peft loads them; `ignored`
    collects the keys peft leaves unloaded under the config."""

    def __init__(
        self,
        folder: Path,
        config: AdapterConfig,
        init: str | None,
        weights: AdapterWeights,
        structure: ModelStructure | None,
        conv1d: set[str] | None,
    ):
        self.folder, self.config, self.init, self.weights = folder, config, init, weights
        self.structure, self.conv1d = structure, conv1d
        self.ignored: list[str] = []

    def changes(self, base_dir: Path | None) -> dict[str, list[Change]]:
        """Every change, by the base tensor it changes, in peft's order; the config's targets checked against the
        base's modules (`check_targets`) when `base_dir` is given."""
        if not self.weights.names():
            raise UserError(f"{self.folder}: the adapter holds no weights")
        keys = parse_keys(self.weights.names())
        changes: list[Change] = list(keys.replacements.values())
        targeted = {module: parts for module, parts in keys.modules.items() if self.targeted(module, parts)}
        base = _base_modules(base_dir, set(keys.modules))
        check_targets(self.folder, self.config, self.init, base, keys, targeted)
        for module, parts in sorted(targeted.items()):
            changes += self.module_changes(module, parts)
        if self.ignored:
            listing = ", ".join(self.ignored[:3]) + (" ..." if len(self.ignored) > 3 else "")
            log.info(
                f"note: {len(self.ignored)} tensors of adapter {self.folder} are not loaded under its "
                f"{CONFIG_FILE} ({listing}): left out, as peft leaves them out"
            )
        if not changes:
            raise UserError(
                f"{self.folder}: under its {CONFIG_FILE}, nothing of the adapter's file is loaded ({len(self.ignored)} "
                "tensors left out, as peft leaves them out): its merge would be the base unchanged"
            )
        by_tensor: dict[str, list[Change]] = {}
        for change in sorted(changes, key=lambda c: ORDER[type(c)]):
            by_tensor.setdefault(change.base_name, []).append(change)
        return by_tensor

    def targeted(self, module: str, keys: dict[str, str]) -> bool:
        """Does peft build this module's LoRA layer under the config (else its tensors are left unloaded, and
        taken out of `keys`)? Trainable tokens are configured apart, by trainable_token_indices."""
        lora = {k: v for k, v in keys.items() if k != "token_adapter.trainable_tokens_delta"}
        if not lora or self.structure is not None and self._wrapped_parameter(module) is not None:
            return True
        embedding = "lora_embedding_A" in lora or "lora_embedding_B" in lora
        if targets(self.config, module, linear=not embedding):
            return True
        self.ignored += sorted(lora.values())
        for kind in lora:
            keys.pop(kind)
        return bool(keys)

    def module_changes(self, module: str, keys: dict[str, str]) -> list[Change]:
        if self.structure is not None:
            parameter = self._wrapped_parameter(module)
            if parameter is not None:
                return [self._parameter_target(module, parameter, keys)]
        token_rows: list[Change] = []
        if "token_adapter.trainable_tokens_delta" in keys:
            key = keys.pop("token_adapter.trainable_tokens_delta")
            self.weights.check_dtypes(key)
            token_rows.append(TokenRows(f"{module}.weight", key, self._token_indices(module)))
        if not keys:
            return token_rows
        embedding = "lora_embedding_A" in keys or "lora_embedding_B" in keys
        a, b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a not in keys or b not in keys:
            raise UserError(f"{self.folder}: module {module} lacks {a if a not in keys else b} (incomplete adapter)")
        magnitude = keys.get("lora_magnitude_vector")
        if magnitude is not None and not self.config.use_dora:
            self.ignored.append(magnitude)  # no DoRA layer to load it into
            magnitude = None
        target = self._target(module, keys[a], keys[b], embedding, magnitude)
        changes: list[Change] = [target, *token_rows]
        if self.config.lora_bias and "lora_B.bias" not in keys and not embedding:
            if self.config.init_lora_weights is False:
                raise UserError(
                    f"{self.folder}: lora_bias, but no lora_B.bias for {module} in the file, and init_lora_weights "
                    f"false: peft would merge the bias it draws at random ({UNTRAINED_FACTORS}), not the training"
                )
        if "lora_B.bias" in keys and not self.config.lora_bias:
            self.ignored.append(keys["lora_B.bias"])  # lora_B has no bias to load it into
        elif "lora_B.bias" in keys:
            self.weights.check_dtypes(keys["lora_B.bias"])
            changes.append(BiasUpdate(f"{module}.bias", keys["lora_B.bias"], target.rank, target.alpha, target.scaling))
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
        self.weights.check_dtypes(key_a, key_b, *([magnitude] if magnitude else []))
        if magnitude and self.weights.shape(magnitude) != (shape_b[0],):
            raise UserError(
                f"{self.folder}: {module} has a DoRA magnitude of shape {list(self.weights.shape(magnitude))}, "
                f"not [{shape_b[0]}] (one per output feature)"
            )
        rank = shape_a[0]
        scale = self.config.module_scaling(module)
        if scale.rank != rank:
            raise UserError(f"{self.folder}: {module} has rank {rank} but adapter_config.json says {scale.rank}")
        fan_in_fan_out = self._fan_in_fan_out(module) and not embedding
        out_in = (shape_b[0], shape_a[1])
        initial_magnitude = self.config.use_dora and magnitude is None
        if embedding and (magnitude or initial_magnitude):
            raise UserError(f"{self.folder}: DoRA on the embedding {module} is not supported yet")
        if initial_magnitude and (self.init is not None or self.config.init_lora_weights is False):
            init = json.dumps(self.config.init_lora_weights)
            raise UserError(
                f"{self.folder}: use_dora, but no magnitude vectors in the file, and init_lora_weights {init}: peft's "
                f"initial magnitude (‖W + s·B₀A₀‖ per row) would come from {UNTRAINED_FACTORS}, not the training"
            )
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
            alpha=scale.alpha,
            scaling=scale.scaling,
            fan_in_fan_out=fan_in_fan_out,
            shape=out_in[::-1] if fan_in_fan_out or embedding else out_in,
            embedding=embedding,
            magnitude_key=magnitude,
            init=None if embedding else self.init,  # peft runs PiSSA / OLoRA on Linear and Conv1D layers only
            initial_magnitude=initial_magnitude,
        )

    def _fan_in_fan_out(self, module: str) -> bool:
        """peft sets fan_in_fan_out by the layer, whatever the config says: true on a Conv1D, false on an nn.Linear
        (warning when the config says otherwise). Without the base the config's value is all there is."""
        if self.conv1d is None:
            return self.config.fan_in_fan_out
        return module in self.conv1d

    def _wrapped_parameter(self, module: str) -> str | None:
        """The parameter a ParamWrapper at `module` (`…experts.base_layer` for the second one nested) adapts; None
        for a LoRA layer. peft wraps a module's targeted parameters in their registration order, the first
        innermost, so the outermost wrapper (saved without `base_layer`) holds the last one."""
        depth = module.count(".base_layer")
        unwrapped = module.replace(".base_layer", "")
        parameters = self.structure.targeted_parameters(unwrapped, list(self.config.target_parameters))
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
        self.weights.check_dtypes(keys["lora_A"], keys["lora_B"])
        shape_a, shape_b = self.weights.shape(keys["lora_A"]), self.weights.shape(keys["lora_B"])
        rank = shape_a[0] // experts if len(shape_a) == 2 else 0
        if shape_a != (rank * experts, fan_in) or shape_b != (fan_out, rank * experts) or rank == 0:
            raise UserError(
                f"{self.folder}: {parameter} {list(shape)} does not take factors of shapes {list(shape_a)} and "
                f"{list(shape_b)} (built for another model?)"
            )
        scale = self.config.module_scaling(parameter)
        if scale.rank != rank:
            raise UserError(f"{self.folder}: {parameter} has rank {rank} but adapter_config.json says {scale.rank}")
        return ParameterTarget(
            parameter, keys["lora_A"], keys["lora_B"], rank, scale.alpha, scale.scaling, shape, transposed
        )

    def _token_indices(self, module: str) -> tuple[int, ...]:
        indices = self.config.trainable_token_indices
        if isinstance(indices, Mapping):
            matching = [v for k, v in indices.items() if module == k or module.endswith(f".{k}")]
            indices = matching[0] if matching else None
        if not isinstance(indices, tuple) or not indices or not all(type(i) is int and i >= 0 for i in indices):
            raise UserError(f"{self.folder}: no trainable_token_indices for {module} in {CONFIG_FILE}")
        return indices


# --- the config's targets against the base's modules


def check_targets(
    folder: Path,
    config: AdapterConfig,
    init: str | None,
    base: dict[str, str] | None,
    keys: AdapterKeys,
    targeted: dict[str, dict[str, str]],
) -> None:
    """What peft refuses, or does otherwise than load the file, under this config: target_modules matching
    nothing, or a module LoRA does not apply to, a modules_to_save copy missing (the file's `keys` hold the copies),
    and layers it targets that the file holds no factors for, whose initial factors are not zero. `base`: the base's
    modules (`_base_modules`), None without a base; `targeted`: the file's modules peft loads."""
    lora_modules = keys.lora_modules
    if lora_modules and not any(m in targeted for m in lora_modules):
        if base is None or not any(targets(config, m, kind == LAYER) for m, kind in base.items()):
            raise UserError(
                f"{folder}: target_modules {shorten(json.dumps(config.target_modules))} in {CONFIG_FILE} matches none "
                "of the adapter's modules nor the base's (peft refuses it too: 'Target modules … not found in the "
                "base model')"
            )
    if base is None:
        return
    _check_saved_copies(folder, config, base, set(keys.replacements))
    if config.target_parameters:
        return
    matched = {m: kind for m, kind in base.items() if targets(config, m, kind == LAYER)}
    unsupported = sorted(m for m, kind in matched.items() if kind == OTHER_MODULE)
    if unsupported:
        raise UserError(
            f"{folder}: target_modules {shorten(json.dumps(config.target_modules))} matches "
            f"{unsupported[0]}, not a layer LoRA applies to (peft refuses it too: 'Target module … is not "
            "supported')"
        )
    absent = sorted(m for m in matched if m not in keys.modules)
    if absent and (config.init_lora_weights is False or config.use_dora or init is not None):
        raise UserError(
            f"{folder}: {CONFIG_FILE} targets {len(absent)} layers the adapter's file holds no factors for "
            f"({', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}), and peft would merge them with "
            f"{UNTRAINED_FACTORS} (init_lora_weights {json.dumps(config.init_lora_weights)}, use_dora "
            f"{json.dumps(config.use_dora)}): not the trained adapter"
        )


def _check_saved_copies(folder: Path, config: AdapterConfig, base: dict[str, str], replaced: set[str]) -> None:
    """modules_to_save: peft wraps every base module of that name and loads its copy from the file; a copy the
    file lacks fails peft's load (KeyError), so it is refused here with the name."""
    copies = {name.rpartition(".")[0] for name in replaced}
    for wanted in config.modules_to_save or ():
        present = [m for m in base if m == wanted or m.endswith(f".{wanted}")]
        missing = [m for m in present if m not in copies and not any(c.endswith(f".{m}") for c in copies)]
        if missing:
            raise UserError(
                f"{folder}: modules_to_save lists {wanted}, but the adapter's file holds no copy of "
                f"{missing[0]} (peft fails to load it too)"
            )


def _base_modules(base_dir: Path | None, in_file: set[str]) -> dict[str, str] | None:
    """The base model's modules as its checkpoint shows them (paths as the model's, which the adapter's carry, the
    file's modules `in_file`): each a LAYER (a matrix weight), an EMBEDDING, or OTHER_MODULE (norms, and the
    containers above every parameter); None without a base."""
    if base_dir is None:
        return None
    try:
        with CheckpointIndex(base_dir) as base:
            shapes = base.shapes()
            embedding = tied_embedding(base, read_config(base_dir, required=False))
            if embedding is not None:  # a tied head is a module of the model, though not saved
                shapes[HEAD] = shapes[embedding]
    except UserError:
        return None
    kinds: dict[str, str] = {}
    for name, shape in shapes.items():
        module, _, parameter = name.rpartition(".")
        parts = module.split(".")
        for depth in range(1, len(parts)):
            kinds.setdefault(".".join(parts[:depth]), OTHER_MODULE)
        if parameter == "weight" and len(shape) == 2:
            kinds[module] = EMBEDDING_MODULE if name.endswith(EMBEDDING_SUFFIXES) else LAYER
        else:
            kinds.setdefault(module, OTHER_MODULE)
    paths = _model_paths(list(kinds), in_file)
    return dict(zip(paths, kinds.values(), strict=True))


def _model_paths(names: list[str], in_file: set[str]) -> list[str]:
    """A base checkpoint's module names as the model's paths, which the adapter's carry: a checkpoint saved without
    the model class's prefix (the original gpt2's h.0… for transformer.h.0…) takes the prefix the adapter shows."""
    present = set(names)
    prefixes = {f[: -len(n) - 1] for f in in_file for n in (f.split(".", 1)[-1],) if n in present and f != n}
    if len(prefixes) != 1:
        return names
    prefix = prefixes.pop()
    return [name if name in in_file else f"{prefix}.{name}" for name in names]


def _conv1d_modules(base_dir: Path | None) -> set[str] | None:
    """The base model's Conv1D layers (module paths), empty for a model type without any; None without a base."""
    if base_dir is None:
        return None
    config = read_config(base_dir, required=False)
    if config.get("model_type") not in CONV1D_MODEL_TYPES:
        return set()
    kinds = ModuleKinds(base_dir, from_class=True)
    return {kinds.model_path(name).rpartition(".")[0] for name, kind in kinds.kinds.items() if kind == CONV1D}
