"""Spectral anatomy of τ against Δ: numerical ranks, singular values, subspace angles, energy.

All decompositions run in float64. The numerical rank counts singular values above
`σ₁ · max(m, n) · eps(dtype)` (the LAPACK / numpy `matrix_rank` rule) for the dtype the matrix was
stored in; a low-precision merge adds full-rank rounding noise that lifts τ's rank to full.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from common.numerics.metrics import compare_tensor

TOP_SINGULAR_VALUES = 24
PROFILE_SINGULAR_VALUES = 256  # of τ analysed on its own: enough to draw where 90% of its energy is reached
FULL_SVD_MAX = 512  # matrices whose smaller side is at most this get an exact SVD
FIRST_RANK_GUESS = 32  # Δ's singular values are computed 32 at a time, then 128, 512 … until below tolerance
OVERSAMPLE = 10
POWER_ITERATIONS = 6
ENERGY_SLACK = 1e-12  # float64 sums of σᵢ²: a fraction of 1 keeps every direction holding more than 1e-12 of ‖τ‖²
GRAM_MIN_RATIO = 1e-5  # `gram_svd` only when every σᵢ ≥ this·σ₁: each then within ε·(σ₁/σᵢ)²/2 ≤ 1.1e-6 relative


@dataclass
class TensorSpectrum:
    """The per-tensor record of analysis.json."""

    name: str
    module: str
    layer: int | None
    shape: list[int]
    rank_lora: int
    rank_task_vector: int
    rank_task_vector_is_lower_bound: bool  # τ's rank exceeds the singular values computed (randomized SVD)
    cosine: float
    rel_error: float
    max_abs_diff: float
    residual_rms: float  # RMS of τ − Δ over the elements
    scale: float
    norm_lora: float
    norm_task_vector: float
    energy_in_lora_rank: float  # share of ‖τ‖² in its top-r singular directions, r = rank of Δ
    principal_angle_deg: float  # largest angle between the top-r column spaces of Δ and τ
    sigma_next_task_vector: float  # σ_{r+1}(τ): the floor under the LoRA subspace
    predicted_noise_floor: float  # residual_rms · (√m + √n): the top singular value of a noise matrix
    sigma_tail_ratio: float  # σ_{r+1}(τ) / σ_1(τ)
    stable_rank_task_vector: float  # ‖τ‖_F² / σ₁²
    effective_rank_lora: float  # exp(entropy of σᵢ/Σσ) over Δ's spectrum (Roy & Vetterli 2007)
    effective_rank_task_vector: float | None  # the same for τ; None when only its top values were computed
    lora_spectrum_from_factors: bool  # Δ's SVD came from the adapter's factors (exact, O((m+n)·r²))
    energy_in_lora_subspace: float = 0.0  # ‖U_rᵀ τ‖² / ‖τ‖²: the share of ‖τ‖² inside Δ's column space
    principal_angles_deg: list[float] = field(default_factory=list)  # all r angles between the top-r subspaces
    lora_rank: int | None = None  # the adapter's configured r for this tensor (rank_pattern included)
    amplification: float | None = None  # ‖Δ‖_F / ‖U_rᵀ W₀ V_r‖_F (Hu et al. 2021, §7.3), with the base
    intruder_dimensions: int | None = None  # among the top-k left singular vectors of W₀ + τ (numerics/intruders.py)
    residual_max_ulps: float | None = None  # max |τ − Δ| in ulps of the merge dtype at the merged weight
    residual_rms_ulps: float | None = None  # RMS of the same (needs the base weights)
    within_rounding: bool | None = None  # every |τ − Δ| within what a merge at that precision can round
    quantization_ratio: float | None = None  # ‖deq(Q(W)) − W‖/‖Δ‖: a QLoRA merge's 4-bit quantization against Δ
    quantization_explained: float | None = None  # share of ‖τ − Δ‖² the quantization explains
    singular_values_lora: list[float] = field(default_factory=list)
    singular_values_task_vector: list[float] = field(default_factory=list)


def rank_tolerance(sigma_1: float, shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """σ₁ · max(m, n) · eps(dtype): singular values at or below it are numerically zero."""
    return float(sigma_1) * max(shape) * torch.finfo(dtype).eps


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Count of σᵢ > σ₁ · max(m, n) · eps(dtype)."""
    if singular_values.numel() == 0 or singular_values[0] == 0:
        return 0
    return int((singular_values > rank_tolerance(singular_values[0], shape, dtype)).sum())


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(−Σ pᵢ log pᵢ) with pᵢ = σᵢ / Σσ: between 1 (one direction) and the rank (a flat spectrum)."""
    total = singular_values.sum()
    if total <= 0:
        return 0.0
    p = singular_values[singular_values > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def factor_spectrum(left: torch.Tensor, right: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and values of `scale · left @ rightᵀ` (m × r, n × r factors), in float64.

    With left = Q_L R_L and right = Q_R R_R, the product is scale · Q_L (R_L R_Rᵀ) Q_Rᵀ, so the SVD of the
    r × r core gives it exactly in O((m + n)·r²), never forming the m × n matrix.
    """
    q_left, r_left = torch.linalg.qr(left.double())
    q_right, r_right = torch.linalg.qr(right.double())
    u_core, s_core, _ = torch.linalg.svd(r_left @ r_right.T)
    return q_left @ u_core, abs(scale) * s_core


def largest_principal_angle(u: torch.Tensor, v: torch.Tensor) -> float:
    """Largest principal angle (degrees) between the column spaces of orthonormal u and v (same width).

    Its sine is ‖(I − v vᵀ) u‖₂, which stays accurate for tiny angles where arccos of a cosine does not.
    """
    if u.shape[1] == 0 or v.shape[1] == 0:
        return 0.0
    sine = float(torch.linalg.matrix_norm(u - v @ (v.T @ u), ord=2))
    return math.degrees(math.asin(min(1.0, sine)))


def principal_angles(u: torch.Tensor, v: torch.Tensor) -> list[float]:
    """All principal angles (degrees, smallest first) between the column spaces of orthonormal u and v (same
    width): θᵢ = atan2(sin θᵢ, cos θᵢ), the cosines the singular values of uᵀv, the sines those of (I − vvᵀ)u, so
    that tiny angles (where an arccosine loses them) and right angles (an arcsine) are both accurate."""
    width = min(u.shape[1], v.shape[1])
    if width == 0:
        return []
    u, v = u[:, :width], v[:, :width]
    cosines = torch.linalg.svdvals(u.T @ v)  # descending: smallest angle first
    sines = torch.linalg.svdvals(u - v @ (v.T @ u)).flip(0)  # ascending: smallest angle first
    return [math.degrees(math.atan2(float(s), float(c))) for s, c in zip(sines, cosines, strict=True)]


def amplification_factor(delta: torch.Tensor, base_weight: torch.Tensor, u_r: torch.Tensor, s_r: torch.Tensor) -> float:
    """Hu et al. (2021) §7.3: ‖Δ‖_F / ‖U_rᵀ W₀ V_r‖_F, U_r, V_r Δ's r singular vectors (its numerical rank; V_r =
    Δᵀ U_r / σ): how much Δ amplifies directions W₀ already has (large: directions W₀ barely uses)."""
    if len(s_r) == 0:
        return float("nan")
    v_r = delta.double().T @ u_r / s_r
    projected = float(torch.linalg.matrix_norm(u_r.T @ base_weight.double() @ v_r))
    return float(torch.linalg.matrix_norm(delta.double())) / projected if projected else float("inf")


def module_and_layer(name: str) -> tuple[str, int | None]:
    """('q_proj', 3) for model.layers.3.self_attn.q_proj.weight."""
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "bias") else parts[-1]
    layer = re.search(r"\.(?:layers|h|blocks|layer)\.(\d+)\.", name)
    return module, int(layer.group(1)) if layer else None


def top_singular(
    matrix: torch.Tensor, k: int, full: bool, single: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The top-k left singular vectors and values of a float64 matrix, and whether they are all of them
    (see `truncated_svd`)."""
    u, s, _, exact = truncated_svd(matrix, k, full, single)
    return u, s, exact


def truncated_svd(
    matrix: torch.Tensor, k: int, full: bool, single: torch.Tensor | None = None, gram: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, bool]:
    """U, σ and Vᵀ of a float64 matrix's top-k singular triplets, and whether they are all of them. `single`: the
    same matrix as stored in float32, when the caller holds it (the range finder's input, not converted again).

    Small matrices (or `full`) get an exact SVD, returned whole: with `gram`, through the Gram matrix when every
    singular value comes out to 1.1e-6 relative that way (`gram_svd`: the long side's vectors are then None, for
    `Decomposition.top` to form), else through a QR (`thin_svd`). Large ones get a randomized SVD: a range finder
    in float32 (k + 10 columns, 6 power iterations, `range_basis`) finds the dominant column space Q, and a float64
    SVD of Qᵀ·matrix (Rayleigh–Ritz) gives the values and vectors; the top values agree with a full float64 SVD to
    1e-6 relative or better when they stand above a noise floor, as a LoRA update does
    (tests/test_analyze.py checks 1e-6).
    Either way U σ Vᵀ = U Uᵀ·matrix, the projection on U's columns: ‖matrix − U σ Vᵀ‖² = ‖matrix‖² − Σσ².
    """
    smallest = min(matrix.shape)
    if full or smallest <= FULL_SVD_MAX or k + OVERSAMPLE >= smallest:
        u, s, vh = (gram and gram_svd(matrix)) or thin_svd(matrix)
        return u, s, vh, True
    sketched = single if single is not None and single.dtype == torch.float32 else matrix
    basis, _ = torch.linalg.qr(range_basis(sketched, k + OVERSAMPLE, POWER_ITERATIONS).double())
    u_small, s, vh = thin_svd(basis.T @ matrix)
    return (basis @ u_small)[:, :k], s[:k], vh[:k], False


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd(matrix, full_matrices=False), through a QR of its long side: M = QR (Mᵀ = QR when wide), then
    the SVD of the small square R. The same factorization to rounding (Q is orthonormal), in a fraction of the time
    LAPACK takes on a wide matrix (256 × 3072 in float64: 44 ms against 166 ms)."""
    rows, cols = matrix.shape
    if rows < cols:
        q, r = torch.linalg.qr(matrix.T)  # Mᵀ = Q R = (Q U_R) Σ V_Rᵀ, so M = V_R Σ (Q U_R)ᵀ
        u_r, s, vh_r = torch.linalg.svd(r)
        return vh_r.T, s, (q @ u_r).T
    q, r = torch.linalg.qr(matrix)  # M = Q R = (Q U_R) Σ V_Rᵀ
    u_r, s, vh_r = torch.linalg.svd(r)
    return q @ u_r, s, vh_r


def gram_svd(matrix: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None] | None:
    """The thin SVD from the eigendecomposition of the Gram matrix of the short side: MᵀM = V Λ Vᵀ (M tall; MMᵀ = U Λ
    Uᵀ when wide), σ = √λ; 2–4× faster than `thin_svd`. The long side's vectors, U = M V Σ⁻¹ (V = Mᵀ U Σ⁻¹), cost as
    much as the Gram matrix and are left to `Decomposition.top` (None here). The rounding of MᵀM and of its
    eigenvalues is ε·σ₁², so σᵢ comes out within ε·(σ₁/σᵢ)²/2 relative: None (not accurate enough) when the smallest σ
    is below GRAM_MIN_RATIO·σ₁, as in a low-rank τ with its rounding floor. V is orthonormal to rounding, so
    U_k Σ_k V_kᵀ = M V_k V_kᵀ is M's projection on V_k's span: ‖M − U_k Σ_k V_kᵀ‖² = ‖M‖² − Σ_{i≤k} σᵢ², as for
    an SVD."""
    rows, cols = matrix.shape
    if rows < cols:
        transposed = gram_svd(matrix.T)  # Mᵀ = U' Σ V'ᵀ, so M = V' Σ U'ᵀ
        return None if transposed is None else (transposed[2].T, transposed[1], None)
    eigenvalues, v = torch.linalg.eigh(matrix.T @ matrix)  # ascending
    s = eigenvalues.flip(0).clamp(min=0).sqrt()
    if not s[0] > 0 or s[-1] < GRAM_MIN_RATIO * s[0]:
        return None
    return None, s, v.flip(1).T


def range_basis(matrix: torch.Tensor, columns: int, iterations: int) -> torch.Tensor:
    """An orthonormal basis (float32) of a matrix's dominant column space: Q = orth(A·Ω) for a Gaussian Ω, refined
    by power iterations Q = orth(A·orth(Aᵀ·Q)) (Halko, Martinsson & Tropp 2011, algorithm 4.4). Ω comes from a
    generator of its own seeded with 0: reproducible, and the caller's random state is left alone."""
    a = matrix.float()
    generator = torch.Generator(device=a.device).manual_seed(0)
    omega = torch.randn(a.shape[1], columns, generator=generator, device=a.device, dtype=a.dtype)
    basis, _ = torch.linalg.qr(a @ omega)
    for _ in range(iterations):
        basis, _ = torch.linalg.qr(a.T @ basis)
        basis, _ = torch.linalg.qr(a @ basis)
    return basis


def low_rank_spectrum(
    matrix: torch.Tensor, dtype: torch.dtype, full: bool, single: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top singular vectors and values of a (numerically) low-rank matrix: enough of them to drop below the
    rank tolerance, starting from 32 and growing 4× while the last one is still above it."""
    k = FIRST_RANK_GUESS
    while True:
        u, s, exact = top_singular(matrix, min(k, min(matrix.shape)), full, single)
        if exact or s[-1] <= rank_tolerance(s[0], tuple(matrix.shape), dtype):
            return u, s
        k *= 4


def analyze_tensor(
    name: str,
    lora_delta: torch.Tensor,
    task_vector: torch.Tensor,
    stored_dtype: torch.dtype,
    full_svd: bool = False,
    lora_spectrum: tuple[torch.Tensor, torch.Tensor] | None = None,
    base_weight: torch.Tensor | None = None,
) -> tuple[TensorSpectrum, Decomposition]:
    """Everything analysis.json says about one LoRA-adapted tensor, and τ's decomposition (for the export).

    `lora_spectrum`, Δ's left singular vectors and values when known (from the factors), saves its SVD; with the
    base weight W₀, the amplification factor is measured too.
    """
    delta, tau = lora_delta.double(), task_vector.double()
    shape = tuple(delta.shape)
    u_delta, s_delta = lora_spectrum or low_rank_spectrum(delta, stored_dtype, full_svd, lora_delta)
    rank = numerical_rank(s_delta, shape, stored_dtype)
    k_tau = min(max(rank + 1, TOP_SINGULAR_VALUES), min(shape))
    u_tau, s_tau, vh_tau, tau_exact = truncated_svd(tau, k_tau, full_svd, task_vector)
    rank_tau = numerical_rank(s_tau, shape, stored_dtype)
    metrics = compare_tensor(name, delta, tau)
    energy = metrics.norm_task_vector**2
    residual_rms = metrics.norm_diff / math.sqrt(delta.numel())
    module, layer = module_and_layer(name)
    in_subspace = u_delta[:, :rank].T @ tau
    angles = principal_angles(u_delta[:, :rank], u_tau[:, :rank])
    spectrum = TensorSpectrum(
        name=name,
        module=module,
        layer=layer,
        shape=list(shape),
        rank_lora=rank,
        rank_task_vector=rank_tau,
        rank_task_vector_is_lower_bound=not tau_exact and rank_tau == len(s_tau),
        cosine=metrics.cosine,
        rel_error=metrics.rel_error,
        max_abs_diff=metrics.max_abs_diff,
        residual_rms=residual_rms,
        scale=metrics.scale,
        norm_lora=metrics.norm_lora,
        norm_task_vector=metrics.norm_task_vector,
        energy_in_lora_rank=float(s_tau[:rank].square().sum()) / energy if energy else 1.0,
        principal_angle_deg=largest_principal_angle(u_delta[:, :rank], u_tau[:, :rank]),
        sigma_next_task_vector=float(s_tau[rank]) if rank < len(s_tau) else 0.0,
        predicted_noise_floor=residual_rms * (math.sqrt(shape[0]) + math.sqrt(shape[1])),
        sigma_tail_ratio=float(s_tau[rank] / s_tau[0]) if rank < len(s_tau) and s_tau[0] > 0 else 0.0,
        stable_rank_task_vector=energy / float(s_tau[0]) ** 2 if s_tau[0] > 0 else 0.0,
        effective_rank_lora=effective_rank(s_delta[:rank]),
        effective_rank_task_vector=effective_rank(s_tau) if tau_exact else None,
        lora_spectrum_from_factors=lora_spectrum is not None,
        energy_in_lora_subspace=float(in_subspace.square().sum()) / energy if energy else 1.0,
        principal_angles_deg=angles,
        amplification=(
            amplification_factor(delta, base_weight, u_delta[:, :rank], s_delta[:rank])
            if base_weight is not None and rank
            else None
        ),
        singular_values_lora=s_delta[:TOP_SINGULAR_VALUES].tolist(),
        singular_values_task_vector=s_tau[:TOP_SINGULAR_VALUES].tolist(),
    )
    return spectrum, Decomposition(u_tau, s_tau, vh_tau, tau_exact, energy)


@dataclass
class Decomposition:
    """The top singular triplets of a float64 matrix, its ‖·‖²_F, and whether the triplets are all of them: computed
    once per tensor and shared by the analysis and the LoRA export. From `gram_svd`, the long side's vectors are
    None and formed from the matrix by `top`, only as many as asked for."""

    u: torch.Tensor | None
    s: torch.Tensor
    vh: torch.Tensor | None
    exact: bool
    energy: float
    matrix: torch.Tensor | None = None  # needed when u or vh is None

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """U_k, σ_k, V_kᵀ: a missing side from the other, U_k = M V_k Σ_k⁻¹ or V_kᵀ = Σ_k⁻¹ U_kᵀ M."""
        s = self.s[:k]
        u = self.u[:, :k] if self.u is not None else (self.matrix @ self.vh[:k].T) / s
        vh = self.vh[:k] if self.vh is not None else (u / s).T @ self.matrix
        return u, s, vh

    def transposed(self) -> Decomposition:
        """The same for the transposed matrix: Mᵀ = V Σ Uᵀ."""
        return Decomposition(_t(self.vh), self.s, _t(self.u), self.exact, self.energy, _t(self.matrix))

    def kept_energy(self, k: int) -> float:
        return float(self.s[:k].square().sum()) / self.energy if self.energy else 1.0


def _t(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.T


def decompose(matrix: torch.Tensor, full: bool, enough, first: int = FIRST_RANK_GUESS) -> Decomposition:
    """Top singular triplets, 32 at first, 4× more until `enough(σ)` holds or the SVD is exact (an exact one through
    the Gram matrix when accurate enough: `gram_svd`)."""
    energy = float(torch.linalg.matrix_norm(matrix)) ** 2
    k = first
    while True:
        u, s, vh, exact = truncated_svd(matrix, min(k, min(matrix.shape)), full, gram=True)
        if exact or enough(s, energy):
            return Decomposition(u, s, vh, exact, energy, matrix)
        k *= 4


def energy_rank(singular_values: torch.Tensor, energy: float, fraction: float) -> int | None:
    """The smallest k with Σ_{i≤k} σᵢ² ≥ fraction · ‖τ‖²_F (Biderman et al. 2024), or None if these σ's fall
    short (less ENERGY_SLACK · ‖τ‖²_F for float64 sums)."""
    reached = (singular_values.square().cumsum(0) >= (fraction - ENERGY_SLACK) * energy).nonzero()
    return int(reached[0]) + 1 if len(reached) else None


@dataclass
class TaskVectorSpectrum:
    """analysis.json's record of a changed matrix of τ analysed on its own (no LoRA delta to hold it against)."""

    name: str
    module: str
    layer: int | None
    shape: list[int]
    norm: float
    rank: int  # numerical rank (σᵢ > σ₁·max(m, n)·eps of the stored dtype)
    rank_is_lower_bound: bool  # a randomized SVD stopped before the singular values fell below that tolerance
    energy_rank_90: int | None  # smallest k keeping 90% of ‖τ‖²_F
    energy_rank_99: int | None
    stable_rank: float  # ‖τ‖²_F / σ₁²
    effective_rank: float | None  # exp(entropy of σᵢ/Σσ), when the whole spectrum was computed
    intruder_dimensions: int | None = None  # among the top-k left singular vectors of W₀ + τ (numerics/intruders.py)
    singular_values: list[float] = field(default_factory=list)


def analyze_task_vector(
    name: str, task_vector: torch.Tensor, stored_dtype: torch.dtype, full_svd: bool = False
) -> tuple[TaskVectorSpectrum, Decomposition]:
    """τ's rank profile on its own: numerical rank, the ranks keeping 90% and 99% of its energy, stable and
    effective rank; singular values computed until 99% of the energy is reached (or all of them)."""
    matrix = task_vector.double()
    shape = tuple(matrix.shape)
    dec = decompose(matrix, full_svd, lambda s, energy: energy_rank(s, energy, 0.99) is not None)
    rank = numerical_rank(dec.s, shape, stored_dtype)
    module, layer = module_and_layer(name)
    sigma_1 = float(dec.s[0]) if len(dec.s) else 0.0
    spectrum = TaskVectorSpectrum(
        name=name,
        module=module,
        layer=layer,
        shape=list(shape),
        norm=math.sqrt(dec.energy),
        rank=rank,
        rank_is_lower_bound=not dec.exact and rank == len(dec.s),
        energy_rank_90=energy_rank(dec.s, dec.energy, 0.9),
        energy_rank_99=energy_rank(dec.s, dec.energy, 0.99),
        stable_rank=dec.energy / sigma_1**2 if sigma_1 > 0 else 0.0,
        effective_rank=effective_rank(dec.s) if dec.exact else None,
        singular_values=dec.s[:PROFILE_SINGULAR_VALUES].tolist(),
    )
    return spectrum, dec
