"""adapter_config.json: read once into an `AdapterConfig`, checked field by field, and what its `init_lora_weights`
means for the base.

The fields the merge reads must have the types peft writes them in; absent ones take peft's LoraConfig defaults;
each module's rank, alpha and scaling come from `AdapterConfig.module_scaling` (rank_pattern, alpha_pattern and
rsLoRA as peft applies them). LoRA variants whose merge is not W + s·B@A are refused by name; an initialisation that
rewrote the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) is redone when peft can redo it exactly, else refused
with the ways out (docs/adapters.md).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType

from common.errors import UserError, shorten
from common.model.layout import read_json_object

# init_lora_weights values that leave the base weights as they are (the factors are overwritten by the saved ones).
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
# Base-rewriting inits peft redoes deterministically when it loads the adapter on the original base.
REDONE_INITS = ("pissa", "olora")
WAYS_OUT = (
    "either save the adapter converted to a plain LoRA (peft's save_pretrained(..., "
    "path_initial_model_for_weight_conversion=...)), or pass the residual base model saved with it as --base_model "
    "together with --residual_base"
)


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """peft's scaling: `alpha / r`, or `alpha / √r` for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def pattern_value(patterns: Mapping[str, float] | None, module: str, default: float) -> float:
    """peft's `rank_pattern` / `alpha_pattern` rule: the first key matching the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class ModuleScaling:
    """One LoRA layer's scale as peft sets it: its own rank and alpha (rank_pattern, alpha_pattern), and s."""

    rank: int
    alpha: float
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.use_rslora)


EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True)
class AdapterConfig:
    """adapter_config.json, parsed once (`read_adapter_config`): the fields the toolkit reads, absent or null ones
    at peft's LoraConfig defaults (peft 0.21); lists as tuples, objects as read-only mappings. `raw` is the file's
    object as read, for what is written back out (the exporter copies its task_type)."""

    raw: Mapping[str, object]
    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=lambda: EMPTY)
    alpha_pattern: Mapping[str, float] = field(default_factory=lambda: EMPTY)
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    target_parameters: tuple[str, ...] | None = None
    trainable_token_indices: object = None  # a list of indices or an object of module names to them: as read
    fan_in_fan_out: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    init_lora_weights: bool | str | None = True  # null stays null: not an init peft knows

    @classmethod
    def parse(cls, raw: dict) -> AdapterConfig:
        """The typed config of a JSON object whose fields have been checked (`_check_config_types`)."""
        names = {f.name for f in fields(cls)} - {"raw"}
        given = {k: _frozen(v) for k, v in raw.items() if k in names and (v is not None or k == "init_lora_weights")}
        return cls(raw=MappingProxyType(dict(raw)), **given)

    def module_scaling(self, module: str) -> ModuleScaling:
        """The rank, alpha and scaling peft gives the LoRA at `module` (a module path, or a `target_parameters`
        parameter's name): rank_pattern and alpha_pattern matched as peft's `get_pattern_key` matches them."""
        rank = pattern_value(self.rank_pattern, module, self.r)
        return ModuleScaling(rank, pattern_value(self.alpha_pattern, module, self.lora_alpha), self.use_rslora)


def _frozen(value: object) -> object:
    """JSON values made immutable: lists as tuples, objects as read-only mappings."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    return value


def base_rewriting_init(path: Path, config: AdapterConfig) -> str | None:
    """The base-rewriting initialisation this adapter needs redone ("pissa" or "olora"), None for a plain LoRA.

    When `init_lora_weights` is PiSSA, OLoRA, CorDA, LoftQ or LoRA-GA, training started from a rewritten base
    W − s·B₀A₀, not from W. An adapter saved without conversion belongs to that base. peft's from_pretrained redoes
    PiSSA (exact SVD) and OLoRA (QR) on the original base; the others it cannot redo (a randomised SVD, the
    quantisation, data statistics or gradients they came from), so they are refused with the ways out.
    """
    init = config.init_lora_weights
    if init in PLAIN_INITS:
        return None
    name = str(init).lower() if isinstance(init, str) else init
    if name in REDONE_INITS:
        return name
    why = {
        "pissa_niter": "a randomised SVD that peft cannot repeat exactly",
        "corda": "it came from activation statistics of training data",
        "loftq": "it came from quantising the base weights",
        "lora_ga": "it came from gradients of training data, which peft does not redo on load",
    }
    reason = next((text for prefix, text in why.items() if str(name).startswith(prefix)), None)
    if reason is None:
        reason = "an initialisation this toolkit does not know, which may rewrite the base weights"
    raise UserError(
        f"{path}: init_lora_weights {shorten(json.dumps(init))}: the adapter belongs to a rewritten base "
        f"({reason}); {WAYS_OUT}"
    )


# LoRA variants whose merge is not W + s·B@A (or that peft itself cannot merge): refused by name, never merged
# as plain LoRA. (VeLoRA changes only the backward pass; EVA, CorDA, LoRA-GA and LoftQ only the initialisation:
# see base_rewriting_init.)
UNSUPPORTED_VARIANTS = (
    "alora_invocation_tokens",
    "use_qalora",
    "monteclora_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "megatron_config",
)


def read_adapter_config(path: Path) -> AdapterConfig:
    """adapter_config.json parsed into an `AdapterConfig`, or a UserError naming what peft or this toolkit refuses."""
    raw = read_json_object(path)
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UserError(f"{path}: peft_type {shorten(str(peft_type))} is not supported (only LORA)")
    if raw.get("layer_replication"):
        raise UserError(f"{path}: layer_replication cannot be merged (peft refuses it too)")
    _check_config_types(path, raw)
    config = AdapterConfig.parse(raw)
    for refusal in peft_refusals(config):
        raise UserError(f"{path}: {refusal} (peft's LoraConfig refuses it too)")
    variants = [key for key in UNSUPPORTED_VARIANTS if raw.get(key)]
    if variants:
        raise UserError(f"{path}: {', '.join(variants)} is set: a LoRA variant this toolkit does not support")
    return config


def peft_refusals(config: AdapterConfig) -> list[str]:
    """The combinations of fields peft's LoraConfig.__post_init__ refuses (peft 0.21), in its words."""
    refusals = []
    regex = isinstance(config.target_modules, str)
    if regex and config.layers_to_transform is not None:
        refusals.append("`layers_to_transform` cannot be used when `target_modules` is a str")
    if regex and config.layers_pattern is not None:
        refusals.append("`layers_pattern` cannot be used when `target_modules` is a str")
    if config.layers_pattern and config.layers_to_transform is None:
        refusals.append("when `layers_pattern` is specified, `layers_to_transform` must also be specified")
    if config.lora_bias and config.init_lora_weights not in (True, False):
        refusals.append("lora_bias=True is only supported with init_lora_weights=True or False")
    if config.lora_bias and config.use_dora:
        refusals.append("lora_bias=True is not supported for DoRA")
    return refusals


def _positive_int(value: object) -> bool:
    return type(value) is int and value > 0


def _number(value: object) -> bool:
    try:
        return type(value) in (int, float) and math.isfinite(float(value))
    except OverflowError:  # an integer beyond float range
        return False


def _optional_boolean(value: object) -> bool:
    return value is None or type(value) is bool


def _optional_names(value: object) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(v, str) and v for v in value))


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _regex_or_names(value: object) -> bool:
    return value is None or (isinstance(value, str) and _compiles(value)) or _optional_names(value)


def _pattern_or_patterns(value: object) -> bool:
    if value in (None, "", []):  # peft: any layer pattern
        return True
    patterns = [value] if isinstance(value, str) else value
    return _optional_names(patterns) and all(_compiles(p) for p in patterns)


def _layer_indices(value: object) -> bool:
    indices = [value] if type(value) is int else value
    return value is None or (isinstance(indices, list) and all(type(i) is int and i >= 0 for i in indices))


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
    "target_parameters": (_optional_names, "a list of parameter names"),
    "target_modules": (_regex_or_names, "a regex, or a list of module names"),
    "exclude_modules": (_regex_or_names, "a regex, or a list of module names"),
    "modules_to_save": (_optional_names, "a list of module names"),
    "layers_to_transform": (_layer_indices, "a layer index or a list of them"),
    "layers_pattern": (_pattern_or_patterns, "a regex, or a list of them"),
    "use_dora": (_optional_boolean, "true or false"),
    "lora_bias": (_optional_boolean, "true or false"),
}


def _check_config_types(path: Path, config: dict) -> None:
    for key, (valid, what) in CONFIG_FIELDS.items():
        if key in config and not valid(config[key]):
            raise UserError(f"{path}: {key} must be {what}, not {shorten(repr(config[key]))}")


ALL_LINEAR = "all-linear"


def targets(config: AdapterConfig, module: str, linear: bool = True, head: str = "lm_head") -> bool:
    """Does peft build a LoRA layer at `module` (a path in the model, as peft names modules) from this config?

    peft's `check_target_module_exists` (tuners_utils), rule for rule: `exclude_modules` (a regex, or names matched
    at the end of the path) and `modules_to_save` exclude; `target_modules` as a regex fully matching the path, as
    `all-linear` (every linear layer, `linear`, but the output head: full names, so no layer filter applies), as exact
    paths, or as names matched at the end of the path, these last ones filtered by `layers_to_transform` (the layer
    index after `layers_pattern`, or after the first numbered segment). No `target_modules`: the adapter's own files
    decide (peft would take its defaults for the model type). tests/test_merge_config.py holds this to peft.
    """
    exclude = config.exclude_modules
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif module in exclude or any(module.endswith(f".{name}") for name in exclude):
            return False
    if any(re.match(rf"(^|.*\.){name}($|\..*)", module) for name in config.modules_to_save or ()):
        return False
    wanted = config.target_modules
    if wanted is None:
        return not config.target_parameters
    if isinstance(wanted, str):
        if wanted.lower() == ALL_LINEAR:
            return linear and module != head and not module.endswith(f".{head}")
        return re.fullmatch(wanted, module) is not None
    if module in wanted:
        return True
    if not any(module.endswith(f".{name}") for name in wanted):
        return False
    return _in_transformed_layer(config, module)


def _in_transformed_layer(config: AdapterConfig, module: str) -> bool:
    layers = config.layers_to_transform
    if layers is None or (isinstance(layers, tuple) and not layers):
        return True
    patterns = config.layers_pattern
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match["idx"])
    return index == layers if isinstance(layers, int) else index in layers
