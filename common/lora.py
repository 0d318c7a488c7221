"""The LoRA arithmetic, operation by operation as peft 0.21 performs it (../shared/LORA_MATH.md).

Each `apply_*` function takes a base tensor already cast to the output precision (as
`from_pretrained(dtype=...)` leaves it) and returns what `merge_and_unload()` leaves in its place.
Adapter tensors in fp16/bf16 are upcast to fp32 first, as peft's `autocast_adapter_dtype` does.
"""

from __future__ import annotations

import torch

from common.adapter import BiasUpdate, Change, LoraAdapter, LoraTarget, Replacement, TokenRows


def adapter_dtype(tensor: torch.Tensor) -> torch.Tensor:
    """An adapter tensor as peft holds it after loading: fp16/bf16 upcast to fp32."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def lora_delta(
    target: LoraTarget, lora_a: torch.Tensor, lora_b: torch.Tensor, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`Δ = scaling · B @ A`, transposed for fan_in_fan_out and for embeddings, the whole matrix.

    With `compute_dtype=None` it runs in the dtype peft merges in, so the result is bitwise what
    `merge_and_unload` adds. It is computed whole on purpose: row slices of the product take other
    BLAS kernels when short (measured on CPU: slices of fewer than 12 rows differ in the last bit).
    """
    lora_a, lora_b = adapter_dtype(lora_a), adapter_dtype(lora_b)
    if compute_dtype is not None:
        lora_a, lora_b = lora_a.to(compute_dtype), lora_b.to(compute_dtype)
    product = lora_b @ lora_a
    return (product.T if target.fan_in_fan_out or target.embedding else product) * target.scaling


def apply_changes(
    weight: torch.Tensor, changes: list[Change], adapter: LoraAdapter, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Every change of one tensor in order: what `merge_and_unload` leaves (compute_dtype=None), or the same
    operations with the low-rank products in `compute_dtype` (float64 for exact deltas)."""
    for change in changes:
        weight = apply_change(weight, change, adapter, compute_dtype)
    return weight


def apply_change(
    weight: torch.Tensor, change: Change, adapter: LoraAdapter, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """One change of an adapter applied to one tensor, in peft's arithmetic."""
    if isinstance(change, Replacement):
        return apply_replacement(weight, change, adapter)
    if isinstance(change, LoraTarget):
        return apply_low_rank(weight, change, adapter, compute_dtype)
    if isinstance(change, BiasUpdate):
        return apply_bias_update(weight, change, adapter)
    return apply_token_rows(weight, change, adapter)


def apply_replacement(weight: torch.Tensor, change: Replacement, adapter: LoraAdapter) -> torch.Tensor:
    """Stored values (a trained bias, a modules_to_save copy) loaded into the layer: cast to its dtype."""
    return adapter.read(change.key).to(device=weight.device, dtype=weight.dtype)


def apply_low_rank(
    weight: torch.Tensor, target: LoraTarget, adapter: LoraAdapter, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """W += Δ in place (one rounding); embeddings add Δ cast to W's dtype; DoRA rescales rows."""
    lora_a, lora_b = (f.to(weight.device) for f in adapter.factors(target))
    delta = lora_delta(target, lora_a, lora_b, compute_dtype)
    if target.magnitude_key is not None:
        return apply_dora(weight, delta, target, adapter)
    if target.embedding:
        weight += delta.to(weight.dtype)
    else:
        weight += delta
    return weight


def apply_dora(weight: torch.Tensor, delta: torch.Tensor, target: LoraTarget, adapter: LoraAdapter) -> torch.Tensor:
    """DoRA: W' = (m / ‖W + Δ‖_row) · (W + Δ), the norm over each output row of the unmerged weight."""
    magnitude = adapter_dtype(adapter.read(target.magnitude_key)).to(weight.device)
    rows_w = weight.T if target.fan_in_fan_out else weight
    rows_delta = delta.T if target.fan_in_fan_out else delta
    combined = rows_w + 1 * rows_delta
    weight_norm = torch.linalg.norm(combined, dim=1).to(combined.dtype)
    factor = (magnitude / weight_norm).view(-1, 1)
    factor = factor.T if target.fan_in_fan_out else factor
    return (factor * (weight + delta)).to(weight.dtype)


def is_base_free(change: Change) -> bool:
    """Plain LoRA updates and LoRA biases add a change that does not depend on the base weights."""
    return isinstance(change, BiasUpdate) or (isinstance(change, LoraTarget) and change.magnitude_key is None)


def base_free_delta(change: Change, adapter: LoraAdapter, device: torch.device) -> torch.Tensor:
    """The float64 change a base-free change (see `is_base_free`) makes."""
    if isinstance(change, BiasUpdate):
        return adapter.read(change.key).to(device).double() * change.scaling
    lora_a, lora_b = (f.to(device) for f in adapter.factors(change))
    return lora_delta(change, lora_a, lora_b, torch.float64)


def product_magnitude(changes: list[Change], adapter: LoraAdapter, like: torch.Tensor) -> torch.Tensor:
    """Σ |s|·(|B| @ |A|) over a tensor's low-rank changes (float64, Δ's layout): the scale of the fp32
    rounding in B @ A, which can far exceed |Δ| where the products cancel. Zero for other changes."""
    total = torch.zeros(like.shape, dtype=torch.float64, device=like.device)
    for change in changes:
        if isinstance(change, LoraTarget):
            lora_a, lora_b = (f.to(like.device).abs() for f in adapter.factors(change))
            total += lora_delta(change, lora_a, lora_b, torch.float64).abs()
    return total


def apply_bias_update(bias: torch.Tensor, change: BiasUpdate, adapter: LoraAdapter) -> torch.Tensor:
    """`lora_bias`: b += lora_B.bias · scaling, in place."""
    bias += adapter_dtype(adapter.read(change.key)).to(bias.device) * change.scaling
    return bias


def apply_token_rows(weight: torch.Tensor, change: TokenRows, adapter: LoraAdapter) -> torch.Tensor:
    """Trainable tokens: an index copy of the stored rows, cast to the embedding's dtype."""
    rows = adapter.read(change.key).to(weight)
    index = torch.tensor(change.indices, device=weight.device)
    return weight.index_copy(0, index, rows)
