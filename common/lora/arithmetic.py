"""The LoRA arithmetic, operation by operation as peft 0.21 performs it (docs/maths.md), and Δ = merged − base.

Each `apply_*` function takes a base tensor already cast to the output precision (as
`from_pretrained(dtype=...)` leaves it) and returns what `merge_and_unload()` leaves in its place.
Adapter tensors in fp16/bf16 are upcast to fp32 first, as peft's `autocast_adapter_dtype` does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from common.lora.adapter import (
    BiasUpdate,
    Change,
    LoraAdapter,
    LoraTarget,
    ParameterPiece,
    ParameterTarget,
    Replacement,
    TokenRows,
)


def adapter_dtype(tensor: torch.Tensor) -> torch.Tensor:
    """An adapter tensor as peft holds it after loading: fp16/bf16 upcast to fp32."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def lora_delta(
    target: LoraTarget, lora_a: torch.Tensor, lora_b: torch.Tensor, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`Δ = scaling · B @ A`, transposed for fan_in_fan_out and for embeddings, the whole matrix.

    With `compute_dtype=None` it runs in the dtype peft merges in, so the result is bitwise what
    `merge_and_unload` adds. It is computed whole on purpose: row slices of the product take other
    BLAS kernels (measured on CPU, torch 2.13: slices of 1–3, 5–7 and 9–11 rows differ in the last bit).
    """
    lora_a, lora_b = adapter_dtype(lora_a), adapter_dtype(lora_b)
    if compute_dtype is not None:
        lora_a, lora_b = lora_a.to(compute_dtype), lora_b.to(compute_dtype)
    product = (lora_b @ lora_a).mul_(target.scaling)  # in place: the same rounding as a scaled copy, no second copy
    return product.T if target.fan_in_fan_out or target.embedding else product


def apply_changes(
    weight: torch.Tensor,
    changes: list[Change],
    adapter: LoraAdapter,
    compute_dtype: torch.dtype | None = None,
    init_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Every change of one tensor in order: what `merge_and_unload` leaves (compute_dtype=None), or the same
    operations with the low-rank products in `compute_dtype` (float64 for exact deltas). A PiSSA / OLoRA init
    takes its factors from the weight rounded to `init_dtype` (the merge's dtype) when given."""
    for change in changes:
        weight = apply_change(weight, change, adapter, compute_dtype, init_dtype)
    return weight


def apply_change(
    weight: torch.Tensor,
    change: Change,
    adapter: LoraAdapter,
    compute_dtype: torch.dtype | None = None,
    init_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One change of an adapter applied to one tensor, in peft's arithmetic. A `ParameterTarget` is applied as the
    `ParameterPiece`s the merge plan cuts it into; anything else is a bug (TypeError)."""
    match change:
        case Replacement():
            return apply_replacement(weight, change, adapter)
        case LoraTarget():
            return apply_low_rank(weight, change, adapter, compute_dtype, init_dtype)
        case BiasUpdate():
            return apply_bias_update(weight, change, adapter)
        case ParameterPiece():
            return apply_parameter_piece(weight, change, adapter, compute_dtype)
        case TokenRows():
            return apply_token_rows(weight, change, adapter)
        case _:
            raise TypeError(f"no arithmetic for {_described(change)}")


def apply_replacement(weight: torch.Tensor, change: Replacement, adapter: LoraAdapter) -> torch.Tensor:
    """Stored values (a trained bias, a modules_to_save copy) loaded into the layer: cast to its dtype."""
    return adapter.read(change.key).to(device=weight.device, dtype=weight.dtype)


def apply_low_rank(
    weight: torch.Tensor,
    target: LoraTarget,
    adapter: LoraAdapter,
    compute_dtype: torch.dtype | None = None,
    init_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W += Δ in place (one rounding); embeddings add Δ cast to W's dtype; DoRA rescales rows. PiSSA and OLoRA
    adapters first turn W into the residual W − s·B₀A₀ peft trained them on."""
    if target.init is not None:
        weight = residual_weight(weight, target, compute_dtype, init_dtype)
    lora_a, lora_b = (f.to(weight.device) for f in adapter.factors(target))
    delta = lora_delta(target, lora_a, lora_b, compute_dtype)
    if target.dora:
        return apply_dora(weight, delta, target, adapter)
    if target.embedding:
        weight += delta.to(weight.dtype)
    else:
        weight += delta
    return weight


def apply_dora(weight: torch.Tensor, delta: torch.Tensor, target: LoraTarget, adapter: LoraAdapter) -> torch.Tensor:
    """DoRA: W' = (m / ‖W + Δ‖_row) · (W + Δ), the norm over each output row of the unmerged weight."""
    rows_w = weight.T if target.fan_in_fan_out else weight
    if target.initial_magnitude:  # peft's DoraLinearLayer.update_layer: ‖W + s·B₀A₀‖ per row, B₀ = 0, in W's dtype
        magnitude = adapter_dtype(torch.linalg.norm(rows_w, dim=1).to(weight.dtype))
    else:
        magnitude = adapter_dtype(adapter.read(target.magnitude_key)).to(weight.device)
    rows_delta = delta.T if target.fan_in_fan_out else delta
    combined = rows_w + 1 * rows_delta
    weight_norm = torch.linalg.norm(combined, dim=1).to(combined.dtype)
    factor = (magnitude / weight_norm).view(-1, 1)
    factor = factor.T if target.fan_in_fan_out else factor
    return (factor * (weight + delta)).to(weight.dtype)


def initial_factors(weight: torch.Tensor, target: LoraTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """A₀, B₀ (fp32) as peft's `pissa_init` / `olora_init` compute them from the layer's weight when it loads the
    adapter: PiSSA from the exact SVD W = V S Uᵀ (A₀ = √(S_r/s)·U_rᵀ, B₀ = V_r·√(S_r/s)), OLoRA from W = QR
    (A₀ = R_r, B₀ = Q_r). Their shapes must be the saved factors' (peft cannot load them otherwise)."""
    rank = target.rank
    if target.init == "olora":  # peft's OLoRA ignores fan_in_fan_out
        q, r = torch.linalg.qr(weight.to(torch.float32))
        return r[:rank].contiguous(), q[:, :rank].contiguous()
    w = weight.to(torch.float32)
    v, s, uh = torch.linalg.svd(w.T if target.fan_in_fan_out else w, full_matrices=False)
    s_r = s[:rank] / target.scaling
    return torch.diag(torch.sqrt(s_r)) @ uh[:rank], v[:, :rank] @ torch.diag(torch.sqrt(s_r))


def residual_weight(
    weight: torch.Tensor,
    target: LoraTarget,
    compute_dtype: torch.dtype | None = None,
    init_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W − s·B₀A₀: the base weight peft leaves in a PiSSA / OLoRA layer before it loads the trained factors.

    peft computes it in fp32 and casts it back to W's dtype (compute_dtype=None: bitwise peft's); in float64
    it is the exact residual of those same fp32 factors, taken from the weight rounded to `init_dtype` when given
    (a merge at fp16 takes its SVD or QR of the fp16 weight: the exact Δ must start from the same factors).
    """
    lora_a, lora_b = initial_factors(weight if init_dtype is None else weight.to(init_dtype), target)
    transposed = target.fan_in_fan_out and target.init == "pissa"
    w = weight.to(compute_dtype or torch.float32)
    w = w.T if transposed else w
    lora_a, lora_b = lora_a.to(w.dtype), lora_b.to(w.dtype)
    residual = (w - target.scaling * lora_b @ lora_a).to(weight.dtype)
    return residual.T if transposed else residual


def parameter_delta(
    target: ParameterTarget, adapter: LoraAdapter, device: torch.device, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """peft's `ParamWrapper.get_delta_weight` before its cast to the parameter's dtype."""
    lora_a, lora_b = (adapter_dtype(f.to(device)) for f in adapter.factors(target))
    return stacked_lora_delta(target, lora_a, lora_b, compute_dtype)


def stacked_lora_delta(
    target: ParameterTarget, lora_a: torch.Tensor, lora_b: torch.Tensor, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """s·B@A of a 2-D parameter, or per expert e s·B_e@A_e stacked: A is (experts·r) × in, read as
    experts × r × in; B is out × (experts·r), read as out × r × experts (peft's layout)."""
    if compute_dtype is not None:
        lora_a, lora_b = lora_a.to(compute_dtype), lora_b.to(compute_dtype)
    experts = target.experts
    if experts == 1:
        delta = (lora_b @ lora_a) * target.scaling
        return delta.unsqueeze(0) if len(target.shape) == 3 else delta
    lora_a = lora_a.reshape(experts, -1, lora_a.shape[-1])
    lora_b = lora_b.reshape(lora_b.shape[0], -1, experts)
    layout = "e i o" if target.transposed else "e o i"
    return torch.einsum(f"o r e, e r i -> {layout}", lora_b, lora_a) * target.scaling


def piece_delta(
    piece: ParameterPiece, adapter: LoraAdapter, device: torch.device, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The part of the parameter's Δ this checkpoint tensor holds. Δ is computed whole, as peft does, and cut by
    transformers' own save conversion, once for all the pieces of the parameter (kept in `piece.deltas`, which the
    merge plan gives them)."""
    if not piece.split:
        return parameter_delta(piece.target, adapter, device, compute_dtype)
    parameter = piece.target.base_name

    def cut() -> dict[str, torch.Tensor]:
        return adapter.structure.split(parameter, parameter_delta(piece.target, adapter, device, compute_dtype))

    return piece.deltas.get(parameter, compute_dtype, device, cut)[piece.base_name]


def apply_parameter_piece(
    weight: torch.Tensor, piece: ParameterPiece, adapter: LoraAdapter, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`target_parameters`: W += Δ cast to W's dtype first (peft's ParamWrapper.merge: two roundings)."""
    weight += piece_delta(piece, adapter, weight.device, compute_dtype).to(weight.dtype)
    return weight


def is_base_free(change: Change) -> bool:
    """Plain LoRA updates and LoRA biases add a change that does not depend on the base weights."""
    match change:
        case LoraTarget():
            return not change.dora and change.init is None
        case BiasUpdate() | ParameterPiece():
            return True
        case Replacement() | TokenRows() | ParameterTarget():
            return False
        case _:
            raise TypeError(f"not an adapter change: {_described(change)}")


def base_free_delta(change: Change, adapter: LoraAdapter, device: torch.device) -> torch.Tensor:
    """The float64 change a base-free change (see `is_base_free`) makes."""
    match change:
        case BiasUpdate():
            return adapter.read(change.key).to(device).double() * change.scaling
        case ParameterPiece():
            return piece_delta(change, adapter, device, torch.float64)
        case LoraTarget() if is_base_free(change):
            lora_a, lora_b = (f.to(device) for f in adapter.factors(change))
            return lora_delta(change, lora_a, lora_b, torch.float64)
        case _:
            raise TypeError(f"not a base-free change: {_described(change)}")


def product_magnitude(
    changes: list[Change], adapter: LoraAdapter, like: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ |s|·(|B| @ |A|) over a tensor's low-rank changes (float64, Δ's layout), PiSSA / OLoRA's B₀A₀ (from
    `weight`) included: the scale of the fp32 rounding in B @ A, which can far exceed |Δ| where the products
    cancel. Zero for other changes."""
    terms = []
    for change in changes:
        match change:
            case LoraTarget():
                lora_a, lora_b = (f.to(like.device).abs() for f in adapter.factors(change))
                terms.append(lora_delta(change, lora_a, lora_b, torch.float64).abs_())
                if change.init is not None and weight is not None:
                    init_a, init_b = (f.abs().double() for f in initial_factors(weight, change))
                    product = change.scaling * init_b @ init_a
                    transposed = change.fan_in_fan_out and change.init == "pissa"
                    terms.append(product.T if transposed else product)
            case ParameterPiece():
                terms.append(_piece_magnitude(change, adapter, like.device))
            case BiasUpdate() | Replacement() | TokenRows():  # no product to round
                pass
            case _:
                raise TypeError(f"no product magnitude for {_described(change)}")
    if not terms:
        return torch.zeros(like.shape, dtype=torch.float64, device=like.device)
    return common_rows(sum_of(terms), like)


def sum_of(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """t₁ + t₂ + …, left to right, adding in place into the first (which callers hand over)."""
    iterator = iter(terms)
    total = next(iterator)
    for term in iterator:
        total = total + term if total.shape != term.shape else total.add_(term)
    return total


def _piece_magnitude(piece: ParameterPiece, adapter: LoraAdapter, device: torch.device) -> torch.Tensor:
    """|s|·(|B_e| @ |A_e|) for the experts and rows this checkpoint tensor holds."""
    lora_a, lora_b = (f.to(device).abs() for f in adapter.factors(piece.target))
    magnitude = stacked_lora_delta(piece.target, lora_a, lora_b, torch.float64).abs()
    if not piece.split:
        return magnitude
    return adapter.structure.split(piece.target.base_name, magnitude)[piece.base_name]


def apply_bias_update(bias: torch.Tensor, change: BiasUpdate, adapter: LoraAdapter) -> torch.Tensor:
    """`lora_bias`: b += lora_B.bias · scaling, in place."""
    bias += adapter_dtype(adapter.read(change.key)).to(bias.device) * change.scaling
    return bias


def apply_token_rows(weight: torch.Tensor, change: TokenRows, adapter: LoraAdapter) -> torch.Tensor:
    """Trainable tokens: an index copy of the stored rows, cast to the embedding's dtype."""
    rows = adapter.read(change.key).to(weight)
    index = torch.tensor(change.indices, device=weight.device)
    return weight.index_copy(0, index, rows)


def common_rows(merged: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """A merged tensor cut to the base's rows: a resized vocabulary's new rows have no base to subtract from, so Δ
    (like τ extracted with --allow_shape_mismatch) covers the rows both have."""
    return merged[: base.shape[0]] if merged.dim() and merged.shape[0] > base.shape[0] else merged


def _described(change: object) -> str:
    """A change in an error message: its type and the tensor it is for."""
    return f"{type(change).__name__} {getattr(change, 'base_name', change)!r}"
