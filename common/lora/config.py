"""adapter_config.json: read, checked field by field, and what its `init_lora_weights` means for the base.

The fields the merge reads must have the types peft writes them in; LoRA variants whose merge is not
W + s·B@A are refused by name; an initialisation that rewrote the base weights (PiSSA, OLoRA, CorDA, LoftQ,
LoRA-GA) is redone when peft can redo it exactly, else refused with the ways out (docs/adapters.md).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

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


def base_rewriting_init(path: Path, config: dict) -> str | None:
    """The base-rewriting initialisation this adapter needs redone ("pissa" or "olora"), None for a plain LoRA.

    When `init_lora_weights` is PiSSA, OLoRA, CorDA, LoftQ or LoRA-GA, training started from a rewritten base
    W − s·B₀A₀, not from W. An adapter saved without conversion belongs to that base. peft's from_pretrained redoes
    PiSSA (exact SVD) and OLoRA (QR) on the original base; the others it cannot redo (a randomised SVD, the
    quantisation, data statistics or gradients they came from), so they are refused with the ways out.
    """
    init = config.get("init_lora_weights", True)
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


def read_adapter_config(path: Path) -> dict:
    config = read_json_object(path)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UserError(f"{path}: peft_type {shorten(str(peft_type))} is not supported (only LORA)")
    if config.get("layer_replication"):
        raise UserError(f"{path}: layer_replication cannot be merged (peft refuses it too)")
    _check_config_types(path, config)
    for refusal in peft_refusals(config):
        raise UserError(f"{path}: {refusal} (peft's LoraConfig refuses it too)")
    variants = [key for key in UNSUPPORTED_VARIANTS if config.get(key)]
    if variants:
        raise UserError(f"{path}: {', '.join(variants)} is set: a LoRA variant this toolkit does not support")
    return config


def peft_refusals(config: dict) -> list[str]:
    """The combinations of fields peft's LoraConfig.__post_init__ refuses (peft 0.21), in its words."""
    refusals = []
    regex = isinstance(config.get("target_modules"), str)
    if regex and config.get("layers_to_transform") is not None:
        refusals.append("`layers_to_transform` cannot be used when `target_modules` is a str")
    if regex and config.get("layers_pattern") is not None:
        refusals.append("`layers_pattern` cannot be used when `target_modules` is a str")
    if config.get("layers_pattern") and config.get("layers_to_transform") is None:
        refusals.append("when `layers_pattern` is specified, `layers_to_transform` must also be specified")
    if config.get("lora_bias") and config.get("init_lora_weights", True) not in (True, False):
        refusals.append("lora_bias=True is only supported with init_lora_weights=True or False")
    if config.get("lora_bias") and config.get("use_dora"):
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


def targets(config: dict, module: str, linear: bool = True, head: str = "lm_head") -> bool:
    """Does peft build a LoRA layer at `module` (a path in the model, as peft names modules) from this config?

    peft's `check_target_module_exists` (tuners_utils), rule for rule: `exclude_modules` (a regex, or names matched
    at the end of the path) and `modules_to_save` exclude; `target_modules` as a regex fully matching the path, as
    `all-linear` (every linear layer, `linear`, but the output head: full names, so no layer filter applies), as exact
    paths, or as names matched at the end of the path, these last ones filtered by `layers_to_transform` (the layer
    index after `layers_pattern`, or after the first numbered segment). No `target_modules`: the adapter's own files
    decide (peft would take its defaults for the model type). tests/test_merge_config.py holds this to peft.
    """
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif module in exclude or any(module.endswith(f".{name}") for name in exclude):
            return False
    if any(re.match(rf"(^|.*\.){name}($|\..*)", module) for name in config.get("modules_to_save") or []):
        return False
    wanted = config.get("target_modules")
    if wanted is None:
        return not config.get("target_parameters")
    if isinstance(wanted, str):
        if wanted.lower() == ALL_LINEAR:
            return linear and module != head and not module.endswith(f".{head}")
        return re.fullmatch(wanted, module) is not None
    if module in wanted:
        return True
    if not any(module.endswith(f".{name}") for name in wanted):
        return False
    return _in_transformed_layer(config, module)


def _in_transformed_layer(config: dict, module: str) -> bool:
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    patterns = config.get("layers_pattern")
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
