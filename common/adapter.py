"""LoRA adapters: reading the files, peft's scaling rules, and the delta `Δ = scaling · B @ A`.

The rules follow peft 0.21 (../shared/LORA_MATH.md): `scaling = alpha / r` (or `alpha / √r` with
rsLoRA), with per-module `rank_pattern` / `alpha_pattern` overrides matched as peft matches them.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import UserError
from common.safetensors_io import CheckpointIndex

CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."
log = logging.getLogger("lora_tv")
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[\w-]+)?\.weight$")


@dataclass(frozen=True)
class LoraTarget:
    """One adapted linear layer: where its factors are and how peft scales them."""

    module: str  # module path, e.g. model.layers.0.self_attn.q_proj
    base_name: str  # the base tensor it changes, e.g. model.layers.0.self_attn.q_proj.weight
    key_a: str
    key_b: str
    rank: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool
    shape: tuple[int, ...]  # shape of the base weight (out × in, or in × out with fan_in_fan_out)


class LoraAdapter:
    """A peft LoRA adapter folder (or Trainer `checkpoint-N/` folder): config plus lazily read factors."""

    def __init__(self, folder: Path):
        self.folder = _adapter_folder(Path(folder))
        self.config = _read_config(self.folder / CONFIG_FILE)
        self.weights = _AdapterWeights(self.folder)
        self.targets = self._find_targets()

    def _find_targets(self) -> dict[str, LoraTarget]:
        factors: dict[str, dict[str, str]] = {}
        unsupported = []
        for key in self.weights.names():
            match = LORA_KEY.match(key)
            if match is None:
                unsupported.append(key)
                continue
            module = match["module"].removeprefix(PREFIX)
            factors.setdefault(module, {})[match["factor"]] = key
        if unsupported:
            raise UserError(
                f"{self.folder}: adapter tensors of a kind this version cannot merge yet "
                f"(DoRA, embedding LoRA, biases, modules_to_save…): {', '.join(unsupported[:3])}"
            )
        targets = {}
        for module, keys in sorted(factors.items()):
            if set(keys) != {"A", "B"}:
                raise UserError(f"{self.folder}: module {module} has lora_{''.join(keys)} but not both factors")
            target = self._target(module, keys["A"], keys["B"])
            targets[target.base_name] = target
        if not targets:
            raise UserError(f"{self.folder}: the adapter holds no LoRA weights")
        return targets

    def _target(self, module: str, key_a: str, key_b: str) -> LoraTarget:
        shape_a, shape_b = self.weights.shape(key_a), self.weights.shape(key_b)
        if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != shape_b[1]:
            raise UserError(f"{self.folder}: {module} has factors of shapes {shape_a} and {shape_b}")
        rank = shape_a[0]
        config_rank = pattern_value(self.config.get("rank_pattern"), module, self.config.get("r", 8))
        if config_rank != rank:
            raise UserError(f"{self.folder}: {module} has rank {rank} but adapter_config.json says {config_rank}")
        alpha = pattern_value(self.config.get("alpha_pattern"), module, self.config.get("lora_alpha", 8))
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        out_in = (shape_b[0], shape_a[1])
        return LoraTarget(
            module=module,
            base_name=f"{module}.weight",
            key_a=key_a,
            key_b=key_b,
            rank=rank,
            alpha=alpha,
            scaling=lora_scaling(alpha, rank, bool(self.config.get("use_rslora", False))),
            fan_in_fan_out=fan_in_fan_out,
            shape=out_in[::-1] if fan_in_fan_out else out_in,
        )

    def factors(self, target: LoraTarget) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored factors (A: r × in, B: out × r)."""
        return self.weights.read(target.key_a), self.weights.read(target.key_b)

    def close(self) -> None:
        self.weights.close()


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """peft's scaling: `alpha / r`, or `alpha / √r` for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def pattern_value(patterns: dict | None, module: str, default: float) -> float:
    """peft's `rank_pattern` / `alpha_pattern` rule: the first key matching the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_delta(
    target: LoraTarget, lora_a: torch.Tensor, lora_b: torch.Tensor, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`Δ = scaling · B @ A` (transposed for fan_in_fan_out), the whole matrix, in peft's op order.

    With `compute_dtype=None` it runs in the dtype peft merges in: fp16/bf16 factors are upcast to
    fp32 (peft's `autocast_adapter_dtype`), so the result is bitwise what `merge_and_unload` adds.
    It is computed whole on purpose: row slices of the product take other BLAS kernels when short
    (measured on CPU: slices of fewer than 12 rows differ in the last bit).
    """
    if compute_dtype is None:
        compute_dtype = torch.float32 if lora_a.dtype in (torch.float16, torch.bfloat16) else lora_a.dtype
    product = lora_b.to(compute_dtype) @ lora_a.to(compute_dtype)
    return (product.T if target.fan_in_fan_out else product) * target.scaling


def check_targets_match(adapter: LoraAdapter, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Every adapted tensor must exist in `what` under the same name and shape."""
    missing = [t.base_name for t in adapter.targets.values() if t.base_name not in shapes]
    wrong = [
        f"{t.base_name} {list(t.shape)} vs {list(shapes[t.base_name])}"
        for t in adapter.targets.values()
        if t.base_name in shapes and tuple(shapes[t.base_name]) != t.shape
    ]
    if missing:
        raise UserError(
            f"adapter {adapter.folder} targets {len(missing)} tensors not in {what} "
            f"(built for another model?): {', '.join(missing[:3])}"
        )
    if wrong:
        raise UserError(
            f"adapter {adapter.folder} does not fit {what} ({len(wrong)} shape mismatches): {'; '.join(wrong[:3])}"
        )


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


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UserError(f"{path}: peft_type {peft_type} is not supported (only LORA)")
    for key in ("layer_replication",):
        if config.get(key):
            raise UserError(f"{path}: {key} cannot be merged (peft refuses it too)")
    return config


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
