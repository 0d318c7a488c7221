"""QLoRA's 4-bit base: the weights a QLoRA adapter was trained against, deq(Q(W)), as bitsandbytes computes them.

transformers loads a base 4-bit (`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=…,
bnb_4bit_use_double_quant=…)`, `dtype=d`) by quantizing each quantizable Linear weight cast to d: blocks of 64
elements, each scaled by its absolute maximum and rounded to the nearest of 16 NF4 (or FP4) levels; with double
quantization the block scales are themselves quantized to 8 bits in blocks of 256 around their mean. The adapter was
trained on deq(Q(W_d)). Two merges follow from it (peft 0.21, bitsandbytes 0.50, measured bit for bit):

- into the dequantized base (`model.dequantize()` first, then `merge_and_unload`): d(fp32(deq(Q(W_d))) + Δ), the
  weights the adapter was trained on — `dequantized`, then the usual merge;
- `merge_and_unload` on the 4-bit model (peft's Linear4bit.merge re-quantizes W + Δ from fp32), then
  `dequantize()`: d(deq(Q_fp32(fp32(deq(Q(W_d))) + Δ))) — `requantized`.

Layers the adapter does not change are deq(Q(W_d)) in both. Dequantization is the same on every device; with double
quantization, CUDA's quantization of the block scales differs from the CPU's by one 8-bit step in places (measured on
an H200: deq(Q(W)) up to 6e-4 apart on weights of scale 0.02): merge on the device the adapter was trained on to get
its weights bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import UserError
from common.io.four_bit import bitsandbytes
from common.io.safetensors_io import CheckpointIndex
from common.model.layout import HEAD
from common.model.module_kinds import CONV1D, LINEAR, PLAIN_DECODERS, ModuleKinds

BLOCKSIZE = 64  # transformers' BitsAndBytesConfig default; QLoRA's
QUANT_TYPES = ("nf4", "fp4")


@dataclass(frozen=True)
class FourBit:
    """How the base was quantized for training: `quant_type` nf4 / fp4, double quantization of the block scales."""

    quant_type: str
    double_quant: bool
    requantize: bool = False  # the merge re-quantizes W + Δ (merge_and_unload on the 4-bit model)

    def describe(self) -> str:
        double = ", double quantization" if self.double_quant else ""
        return f"{self.quant_type}{double}"

    def header(self) -> dict[str, str]:
        """τ's header fields recording it (τ extracted against the 4-bit base)."""
        return {"base_4bit_quant_type": self.quant_type, "base_4bit_double_quant": str(self.double_quant).lower()}

    @staticmethod
    def recorded(metadata: dict[str, str]) -> FourBit | None:
        """The 4-bit base τ's header records, if any."""
        quant_type = metadata.get("base_4bit_quant_type")
        if quant_type not in QUANT_TYPES:
            return None
        return FourBit(quant_type, metadata.get("base_4bit_double_quant") == "true")


def bnb_config(four_bit: FourBit, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for it, computing in `dtype` (QLoRA's recipe: bf16)."""
    bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=four_bit.quant_type,
        bnb_4bit_use_double_quant=four_bit.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def dequantized(weight: torch.Tensor, four_bit: FourBit, transposed: bool = False) -> torch.Tensor:
    """deq(Q(W)) in W's dtype and layout, on W's device. `transposed`: a Conv1D weight (in × out), which transformers
    quantizes as out × in."""
    functional = bitsandbytes()
    source = weight.T.contiguous() if transposed else weight.contiguous()
    packed, state = functional.quantize_4bit(
        source, blocksize=BLOCKSIZE, quant_type=four_bit.quant_type, compress_statistics=four_bit.double_quant
    )
    result = functional.dequantize_4bit(packed, state)
    return result.T.contiguous() if transposed else result


def requantized(
    merged32: torch.Tensor, four_bit: FourBit, dtype: torch.dtype, transposed: bool = False
) -> torch.Tensor:
    """peft's Linear4bit.merge then transformers' dequantize(): W + Δ (fp32) quantized again, dequantized, cast."""
    return dequantized(merged32.float(), four_bit, transposed).to(dtype)


def quantized_weights(base_dir: Path, base: CheckpointIndex, config: dict) -> dict[str, bool]:
    """The weights transformers quantizes when it loads this base 4-bit, each with whether it is a Conv1D's
    (stored in × out): every nn.Linear and Conv1D but the modules it keeps in full precision — tied parameters,
    the output head, the module of the last parameter (`get_keys_to_not_convert`) and `_keep_in_fp32_modules`.
    A plain decoder's are read off its names (every matrix but the embedding and the head); others off the
    model's class on the meta device, through transformers' own functions."""
    kinds = ModuleKinds(base_dir, from_class=config.get("model_type") not in PLAIN_DECODERS)
    if kinds.read_from == "names":  # every matrix but the embedding and the head
        matrices = [name for name, kind in kinds.kinds.items() if kind == LINEAR and name.endswith(".weight")]
        return {name: False for name in matrices if name in base and name != HEAD}
    if kinds.structure is None:
        raise UserError(
            f"base model {base_dir}: which layers a 4-bit load quantizes comes from its model class, which "
            "transformers cannot build here (an unknown model_type?)"
        )
    skipped = _modules_not_converted(kinds.structure.model)
    quantized = {}
    for name, kind in kinds.kinds.items():
        module = kinds.model_path(name).rpartition(".")[0]
        if kind in (LINEAR, CONV1D) and name.endswith(".weight") and name in base and _converted(module, skipped):
            quantized[name] = kind == CONV1D
    return quantized


def _modules_not_converted(model) -> list[str]:
    from transformers.quantizers.base import get_keys_to_not_convert

    return get_keys_to_not_convert(model) + list(getattr(model, "_keep_in_fp32_modules", None) or [])


def _converted(module: str, patterns: list[str]) -> bool:
    """transformers' should_convert_module: a pattern matching from the start at a module boundary, or a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{key}){boundary}", module) or module.endswith(key) for key in patterns)


class DequantizedBase:
    """A base checkpoint read as its 4-bit load holds it: every weight transformers quantizes is deq(Q(W_d)) (W cast
    to `dtype`, the merge's), returned in the stored dtype (exactly: deq's values are representable there); every
    other tensor as stored. What extract and compare subtract and compare against for a QLoRA merge."""

    def __init__(self, base: CheckpointIndex, base_dir: Path, config: dict, four_bit: FourBit, dtype: torch.dtype):
        self.base, self.four_bit, self.dtype = base, four_bit, dtype
        self.weights = quantized_weights(base_dir, base, config)
        self._last: tuple[str, torch.Tensor] | None = None  # the whole tensor the last rows came from

    def __getattr__(self, name: str):  # everything else (names, info, shapes, metadata, source …) is the base's
        return getattr(self.base, name)

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def read(self, name: str) -> torch.Tensor:
        if name not in self.weights:
            return self.base.read(name)
        if self._last is None or self._last[0] != name:
            stored = self.base.read(name)
            deq = dequantized(stored.to(self.dtype), self.four_bit, self.weights[name])
            self._last = (name, deq.to(stored.dtype))
        return self._last[1]

    def read_rows(self, name: str, start: int, stop: int, scratch=None) -> torch.Tensor:
        if name not in self.weights:
            return self.base.read_rows(name, start, stop, scratch)
        return self.read(name)[start:stop]
