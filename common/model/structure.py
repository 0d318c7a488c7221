"""The model behind a checkpoint, built on the meta device (no weights): its parameters and how they are stored.

Only adapters with `target_parameters` need it. peft's `ParamWrapper` puts a LoRA on a model *parameter*,
such as a stack of experts `model.layers.0.mlp.experts.gate_up_proj` (E × out × in) — a tensor that
transformers 5 assembles on load from several checkpoint tensors (Mixtral stores `…experts.{e}.w1.weight`
and `…w3.weight`) and splits again on save. Which parameter a saved LoRA belongs to, and which checkpoint
tensors hold which part of it, is read off the model class and transformers' own conversion rules, not
guessed from names.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from common.errors import UserError

log = logging.getLogger("lora_tv")


def _targets(parameter: str, target_parameters: list[str]) -> bool:
    """peft's rule for `target_parameters`: the full name, or a dotted suffix of it."""
    return any(parameter == t or parameter.endswith(f".{t}") for t in target_parameters)


class ModelStructure:
    """A model class instantiated on the meta device from a base model's config.json."""

    def __init__(self, model_dir: Path):
        self.model = _meta_model(model_dir)

    def targeted_parameters(self, module: str, target_parameters: list[str]) -> list[str]:
        """The parameters of `module` that `target_parameters` selects, in the order peft wraps them (innermost first:
        the module's registration order)."""
        try:
            owner = self.model.get_submodule(module)
        except AttributeError:
            return []
        names = [f"{module}.{name}" for name, _ in owner.named_parameters(recurse=False)]
        return [name for name in names if _targets(name, target_parameters)]

    def shape(self, parameter: str) -> tuple[int, ...]:
        return tuple(self.model.get_parameter(parameter).shape)

    def is_transposed(self, parameter: str) -> bool:
        """peft reads a 3-D parameter as (experts, in, out) when its module says `is_transposed`, else (experts,
        out, in)."""
        module = self.model.get_submodule(parameter.rpartition(".")[0])
        return bool(getattr(module, "is_transposed", False))

    def checkpoint_pieces(self, parameter: str) -> dict[str, tuple[int, ...]]:
        """The checkpoint tensors `save_pretrained` writes this parameter as, with their shapes."""
        return {
            name: tuple(t.shape)
            for name, t in self.split(parameter, torch.empty(self.shape(parameter), device="meta")).items()
        }

    def saved_names(self, parameter: str) -> list[str]:
        """The checkpoint names a model parameter is saved under ([] for a name the model does not have)."""
        try:
            self.model.get_parameter(parameter)
        except AttributeError:
            return []
        return list(self.checkpoint_pieces(parameter))

    def split(self, parameter: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """A tensor of the parameter's shape cut into the checkpoint tensors it is saved as (transformers' own
        reverse conversion: pure data movement, so an element-wise merge commutes with it)."""
        try:
            from transformers.core_model_loading import revert_weight_conversion
        except ImportError:  # transformers 4: parameters are saved under their own names
            return {parameter: tensor}
        return revert_weight_conversion(self.model, {parameter: tensor})


def _meta_model(model_dir: Path) -> torch.nn.Module:
    """The model class of config.json's `architectures` (else a causal LM), with every parameter on `meta`."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"model {model_dir}: config.json cannot be read by transformers ({_first_line(e)})") from None
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    try:
        with torch.device("meta"):
            if model_class is not None:
                return model_class._from_config(config)
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise UserError(
            f"model {model_dir}: transformers cannot build {architectures[0] if architectures else 'a causal LM'} "
            f"from config.json ({_first_line(e)}), which target_parameters adapters need"
        ) from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return re.sub(r"\s+", " ", text.splitlines()[0])[:160] if text else type(error).__name__
