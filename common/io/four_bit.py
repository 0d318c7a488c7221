"""4-bit weights as transformers saves them (bitsandbytes' serialization: the packed weight beside the tensors of
its quantization state), found by name and read dequantized exactly as transformers' `dequantize()` gives them.
bitsandbytes is imported only when one is read."""

from __future__ import annotations

import torch

from common.errors import UserError


def bitsandbytes():
    """bitsandbytes.functional, or one line naming the package."""
    try:
        import bitsandbytes.functional as functional
    except ImportError:
        raise UserError("a 4-bit base needs bitsandbytes (pip install bitsandbytes)") from None
    return functional


QUANT_STATE = ".quant_state.bitsandbytes__"  # the JSON blob bitsandbytes saves beside each 4-bit weight
STATE_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def saved_four_bit(names: list[str]) -> dict[str, list[str]]:
    """The 4-bit weights of a checkpoint saved by transformers (bitsandbytes' serialization), each with the tensors
    of its quantization state: `W` (packed uint8), `W.absmax`, `W.quant_map`, `W.nested_…`, `W.quant_state.…`."""
    present = set(names)
    weights = [n.split(QUANT_STATE)[0] for n in names if QUANT_STATE in n]
    return {w: [n for n in (*(f"{w}.{p}" for p in STATE_PARTS),) if n in present] + [
        n for n in names if n.startswith(f"{w}{QUANT_STATE}")] for w in weights}  # fmt: skip


def saved_state_layout(blob: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...]]:
    """The dtype and shape of the weight a saved quantization state describes."""
    import json

    try:
        state = json.loads(bytes(blob.tolist()))
        return getattr(torch, state["dtype"]), tuple(int(d) for d in state["shape"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"a corrupt bitsandbytes quantization state ({type(e).__name__}: {e})") from None


def dequantize_saved(packed: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """A saved 4-bit weight dequantized, as transformers' dequantize() gives it (bitsandbytes' own QuantState)."""
    functional = bitsandbytes()
    try:
        state = functional.QuantState.from_dict(dict(parts), device=packed.device)
    except (ValueError, KeyError, AssertionError) as e:
        raise UserError(f"a corrupt bitsandbytes quantization state ({type(e).__name__}: {e})") from None
    return functional.dequantize_4bit(packed, state)
