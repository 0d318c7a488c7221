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
from common.model_layout import read_json_object

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


def _optional_names(value: object) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(v, str) and v for v in value))


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
}


def _check_config_types(path: Path, config: dict) -> None:
    for key, (valid, what) in CONFIG_FIELDS.items():
        if key in config and not valid(config[key]):
            raise UserError(f"{path}: {key} must be {what}, not {shorten(repr(config[key]))}")
