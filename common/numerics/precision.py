"""Precisions, and the exact test for a tensor that changed only because it was rounded."""

from __future__ import annotations

import torch

from common.errors import UserError

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHORT_NAMES: dict[torch.dtype, str] = {
    **{dtype: name for name, dtype in PRECISIONS.items()},
    torch.float64: "fp64",
}


def dtype_of(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    return PRECISIONS[precision]


def short_name(dtype: torch.dtype) -> str:
    return SHORT_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def dtype_from_name(name: str) -> torch.dtype | None:
    """The dtype for a short name ('fp16') or torch name ('float16'); None when unknown."""
    by_name = {**PRECISIONS, "fp64": torch.float64}
    by_name.update({str(d).removeprefix("torch."): d for d in by_name.values()})
    return by_name.get(name)


def is_rounding_artifact_of_delta(base: torch.Tensor, task_vector: torch.Tensor, dtype: torch.dtype) -> bool:
    """Is a tensor a rounding artifact (finetuned == base cast to its dtype, bit for bit), from the base and the
    fp32 task vector alone: is `base + τ` = `base` rounded to dtype?

    `τ = finetuned − base` is exact in fp32 when `finetuned` is `base` rounded (Sterbenz), so
    `base + τ` gives back `finetuned` bit for bit and the test is exact.
    """
    base32 = base.float()
    return torch.equal(base32 + task_vector.float(), base32.to(dtype).float())


EXPONENT_BITS = 0x7FF0000000000000  # of a float64: its value with the mantissa cleared is 2^⌊log₂ x⌋


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unit in the last place of `dtype` at the magnitude of `x` (float64), subnormals included:
    eps(dtype) · 2^⌊log₂ |x|⌋, the power of two read off x's exponent bits (|x| clamped to dtype's smallest normal
    number, below which the spacing stays that of the subnormals)."""
    info = torch.finfo(dtype)
    magnitude = x.abs().double().clamp_min(info.smallest_normal)
    power = torch.bitwise_and(magnitude.view(torch.int64), EXPONENT_BITS).view(torch.float64)
    return power * info.eps


def a_dtype(name: str | None) -> str:
    """The name with its article, as it is read aloud: "an fp16", "an fp32", "a bf16"."""
    return f"an {name}" if str(name).startswith("f") else f"a {name}"
