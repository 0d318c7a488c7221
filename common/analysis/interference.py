"""Do several task vectors (or LoRA deltas) interfere? The weight-space measures of the literature, per tensor.

For inputs τ₁ … τ_k of one tensor (dense, or a LoRA delta s·B@A kept as its factors), all in float64:

- the Gram matrix Gᵢⱼ = ⟨τᵢ, τⱼ⟩_F and the cosines Gᵢⱼ/√(GᵢᵢGⱼⱼ) (Ilharco et al. 2023; ‖Σwτ‖² = wᵀGw). Two deltas
  in factor form never become m × n: ⟨sBA, s'B'A'⟩ = s·s'·tr((BᵀB')(A'Aᵀ)), O(r²(m + n));
- sign conflicts (TIES, Yadav et al. 2023): each input trimmed to its top-k magnitudes (k = ⌊d·N⌋, ties at the
  threshold kept in index order and counted), then per pair the share of coordinates both keep where their signs
  differ, the coordinates where any two kept entries disagree, and the kept entries whose sign is not the elected
  one sgn Σᵢτ̂ᵢ (0 → +, as peft's `calculate_majority_sign_mask`), which TIES's disjoint merge drops;
- subspace overlap of the column (and row) spaces: the principal angles between orthonormal bases Uᵢ, Uⱼ (the
  exact column space of a factored delta; the top-k singular vectors of a dense one), and Hu et al. (2021)'s
  normalized overlap φ = ‖UᵢᵀUⱼ‖²_F / min(rᵢ, rⱼ): 1 when one space holds the other, 0 when orthogonal;
- retention of each input in a merge τ_m: ⟨τ_m, τᵢ⟩/‖τᵢ‖², the coefficient of τᵢ in τ_m if the inputs were
  orthogonal (1: all of it kept).

Sums over tensors (a layer, the model) are of the numerators and denominators, never of per-tensor ratios.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from common.lora.adapter import LoraAdapter, LoraTarget
from common.lora.deltas import DeltaPlan, exact_delta
from common.numerics.metrics import cosine_of, squared_norm
from common.numerics.spectra import factor_spectrum, module_and_layer, principal_angles, truncated_svd

DEFAULT_DENSITIES = (0.2,)  # TIES's default top-20%
DEFAULT_OVERLAP_RANK = 16  # singular vectors of a dense τ whose span is compared
CHUNK = 1 << 22  # coordinates per step of the element-wise passes (32 MB of float64)


@dataclass(frozen=True)
class LowRank:
    """s·B@A in the tensor's stored orientation, kept as its factors (B: m × r, A: r × n, float64)."""

    b: torch.Tensor
    a: torch.Tensor
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.b.shape[0], self.a.shape[1]

    def dense(self) -> torch.Tensor:
        return self.scale * (self.b.double() @ self.a.double())


Contribution = torch.Tensor | LowRank


def inner(x: Contribution, y: Contribution) -> float:
    """⟨x, y⟩_F in float64; a factored delta is never formed: against another, s·s'·tr((BᵀB')(A'Aᵀ)); against a
    dense τ, s·Σ(B ⊙ τAᵀ)."""
    if isinstance(x, LowRank) and isinstance(y, LowRank):
        core = (x.b.double().T @ y.b.double()) * (x.a.double() @ y.a.double().T)  # (BᵀB')ᵢⱼ (AA'ᵀ)ᵢⱼ
        return x.scale * y.scale * float(core.sum())
    if isinstance(y, LowRank):
        x, y = y, x
    if isinstance(x, LowRank):
        projected = y.double() @ x.a.double().T  # τAᵀ, m × r
        return x.scale * float((x.b.double() * projected).sum())
    flat_x, flat_y, total = x.reshape(-1), y.reshape(-1), 0.0
    for start in range(0, flat_x.numel(), CHUNK):  # no float64 copy of a whole tensor
        total += float(flat_x[start : start + CHUNK].double().dot(flat_y[start : start + CHUNK].double()))
    return total


def squared(x: Contribution) -> float:
    """‖x‖²_F in float64."""
    return inner(x, x) if isinstance(x, LowRank) else squared_norm(x)


def gram(items: list[Contribution]) -> torch.Tensor:
    """G = [⟨τᵢ, τⱼ⟩], k × k, float64."""
    g = torch.zeros(len(items), len(items), dtype=torch.float64)
    for i, x in enumerate(items):
        g[i, i] = squared(x)
        for j in range(i):
            g[i, j] = g[j, i] = inner(x, items[j])
    return g


def cosines(g: torch.Tensor) -> torch.Tensor:
    """Gᵢⱼ/√(GᵢᵢGⱼⱼ), each clamped to [−1, 1] as `metrics.cosine_of` does (1 for two zero inputs, 0 for one)."""
    norms = g.diagonal().clamp_min(0).sqrt()
    k = len(g)
    return torch.tensor(
        [[cosine_of(float(g[i, j]), float(norms[i]), float(norms[j])) for j in range(k)] for i in range(k)]
    )


@dataclass(frozen=True)
class Trimmed:
    """An input cut to its top-k magnitudes, and how many entries at the threshold magnitude were left out (a tie
    broken by index order)."""

    values: torch.Tensor
    ties_left_out: int


@dataclass(frozen=True)
class MagnitudeCut:
    """Where an input's top-k magnitudes end: entries above `threshold` are kept, and the first `ties_kept` (in index
    order) of those equal to it; `ties_left_out` more equal it."""

    threshold: torch.Tensor
    ties_kept: int
    ties_left_out: int


def magnitude_cut(values: torch.Tensor, density: float) -> MagnitudeCut:
    """The cut keeping k = ⌊d·N⌋ entries (as peft's `magnitude_based_pruning` and TIES)."""
    flat = values.reshape(-1)
    k = int(density * flat.numel())
    if k <= 0:
        return MagnitudeCut(torch.tensor(math.inf, dtype=flat.dtype), 0, 0)
    if k >= flat.numel():
        return MagnitudeCut(torch.tensor(-1.0, dtype=flat.dtype), 0, 0)
    magnitude = flat.abs()
    threshold = torch.kthvalue(magnitude, flat.numel() - k + 1).values  # the k-th largest
    wanted = k - int((magnitude > threshold).sum())
    return MagnitudeCut(threshold, wanted, int((magnitude == threshold).sum()) - wanted)


def trimmed_chunks(values: torch.Tensor, cut: MagnitudeCut) -> Iterator[torch.Tensor]:
    """The input's entries, CHUNK at a time, with every entry outside its top-k set to 0."""
    flat, ties_left = values.reshape(-1), cut.ties_kept
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start : start + CHUNK]
        magnitude = part.abs()
        keep = magnitude > cut.threshold
        if ties_left:
            ties = (magnitude == cut.threshold).nonzero().squeeze(1)[:ties_left]
            keep[ties] = True
            ties_left -= len(ties)
        yield torch.where(keep, part, torch.zeros((), dtype=part.dtype))


def trim(values: torch.Tensor, density: float) -> Trimmed:
    """The top k = ⌊d·N⌋ magnitudes kept, every other entry 0 (as peft's `magnitude_based_pruning` and TIES); among
    entries equal to the k-th magnitude, the first ones in index order, so the result does not depend on the sort."""
    cut = magnitude_cut(values, density)
    return Trimmed(torch.cat(list(trimmed_chunks(values, cut))).reshape(values.shape), cut.ties_left_out)


@dataclass
class SignConflicts:
    """Counts over the coordinates of trimmed inputs (sums over tensors add)."""

    coordinates: int
    kept: torch.Tensor  # [i]: entries input i keeps
    overlapping: torch.Tensor  # [i, j]: coordinates both keep
    opposite: torch.Tensor  # [i, j]: coordinates both keep, with opposite signs
    contested: int  # coordinates at least two inputs keep
    conflicting: int  # coordinates where two kept entries have opposite signs
    dropped: int  # kept entries whose sign is not the elected sgn Σ τ̂ (0 → +): TIES's disjoint merge drops them
    ties_left_out: int = 0

    def __add__(self, other: SignConflicts) -> SignConflicts:
        return SignConflicts(
            self.coordinates + other.coordinates,
            self.kept + other.kept,
            self.overlapping + other.overlapping,
            self.opposite + other.opposite,
            self.contested + other.contested,
            self.conflicting + other.conflicting,
            self.dropped + other.dropped,
            self.ties_left_out + other.ties_left_out,
        )

    def pair_rate(self, i: int, j: int) -> float | None:
        """The share of the coordinates both keep where their signs differ (None: none overlap)."""
        both = int(self.overlapping[i, j])
        return int(self.opposite[i, j]) / both if both else None

    @property
    def conflict_rate(self) -> float | None:
        """The share of contested coordinates (kept by two or more) where some two disagree in sign."""
        return self.conflicting / self.contested if self.contested else None


def sign_conflicts(trimmed: list[torch.Tensor]) -> SignConflicts:
    """Sign conflicts among trimmed inputs of one tensor."""
    stacked = torch.stack([t.reshape(-1) for t in trimmed])
    positive, negative = stacked > 0, stacked < 0
    nonzero = positive | negative
    k = len(trimmed)
    overlapping = torch.zeros(k, k, dtype=torch.int64)
    opposite = torch.zeros(k, k, dtype=torch.int64)
    for i in range(k):
        for j in range(k):
            overlapping[i, j] = int((nonzero[i] & nonzero[j]).sum())
            opposite[i, j] = int(((positive[i] & negative[j]) | (negative[i] & positive[j])).sum())
    elected_positive = stacked.double().sum(dim=0) >= 0
    disagree = torch.where(elected_positive, negative, positive)  # a kept entry of the other sign
    return SignConflicts(
        coordinates=stacked.shape[1],
        kept=nonzero.sum(dim=1),
        overlapping=overlapping,
        opposite=opposite,
        contested=int((nonzero.sum(dim=0) >= 2).sum()),
        conflicting=int((positive.any(dim=0) & negative.any(dim=0)).sum()),
        dropped=int(disagree.sum()),
    )


def conflicts_at(items: list[torch.Tensor], density: float) -> SignConflicts:
    """Trim each input at `density`, then count, CHUNK coordinates at a time (no trimmed copy of a whole tensor)."""
    cuts = [magnitude_cut(x, density) for x in items]
    total = None
    for parts in zip(*(trimmed_chunks(x, cut) for x, cut in zip(items, cuts, strict=True)), strict=True):
        counts = sign_conflicts([p.double() for p in parts])
        total = counts if total is None else total + counts
    total.ties_left_out = sum(cut.ties_left_out for cut in cuts)
    return total


def column_basis(x: Contribution, k: int) -> torch.Tensor:
    """An orthonormal basis of x's column space: exact for a factored delta (its non-zero singular directions),
    the top-k left singular vectors of a dense τ (those of non-zero singular value)."""
    if isinstance(x, LowRank):
        u, s = factor_spectrum(x.b, x.a.T, x.scale)
    else:
        matrix = x.double()
        u, s, _, _ = truncated_svd(matrix, min(k, *matrix.shape), full=False)
        u, s = u[:, :k], s[:k]  # a small matrix's SVD comes whole
    tolerance = float(s.max()) * max(u.shape) * torch.finfo(torch.float64).eps if len(s) else 0.0
    return u[:, s > tolerance]


def row_basis(x: Contribution, k: int) -> torch.Tensor:
    """An orthonormal basis of x's row space (the column space of xᵀ)."""
    transposed = LowRank(x.a.T, x.b.T, x.scale) if isinstance(x, LowRank) else x.T
    return column_basis(transposed, k)


@dataclass(frozen=True)
class Overlap:
    """Principal angles (degrees, smallest first) between two subspaces and φ = ‖UᵢᵀUⱼ‖²_F / min(rᵢ, rⱼ)."""

    angles: list[float]
    phi: float
    widths: tuple[int, int] = (0, 0)  # rᵢ, rⱼ
    dimension: int = 0  # m, the space both lie in


def overlap(u: torch.Tensor, v: torch.Tensor) -> Overlap:
    width, shape = min(u.shape[1], v.shape[1]), ((u.shape[1], v.shape[1]), u.shape[0])
    if width == 0:
        return Overlap([], 0.0, *shape)
    phi = float(torch.linalg.matrix_norm(u.T @ v) ** 2) / width
    narrow, wide = (u, v) if u.shape[1] <= v.shape[1] else (v, u)
    return Overlap(_angles_into(narrow, wide), min(phi, 1.0), *shape)


def _angles_into(narrow: torch.Tensor, wide: torch.Tensor) -> list[float]:
    """The principal angles between span(narrow) and span(wide), narrow's width of them."""
    if narrow.shape[1] == wide.shape[1]:
        return principal_angles(narrow, wide)
    cosines_ = torch.linalg.svdvals(narrow.T @ wide)
    sines = torch.linalg.svdvals(narrow - wide @ (wide.T @ narrow)).flip(0)
    return [float(torch.rad2deg(torch.atan2(s, c))) for s, c in zip(sines, cosines_, strict=True)]


@dataclass
class TensorInterference:
    """The measures of one tensor across the inputs."""

    name: str
    module: str
    layer: int | None
    gram: torch.Tensor
    conflicts: dict[float, SignConflicts] = field(default_factory=dict)
    columns: dict[tuple[int, int], Overlap] = field(default_factory=dict)
    rows: dict[tuple[int, int], Overlap] = field(default_factory=dict)
    merged_inner: list[float] | None = None  # ⟨τ_m, τᵢ⟩ with the merge's τ_m, when one is given


def tensor_interference(
    name: str,
    items: list[Contribution],
    densities: tuple[float, ...] = DEFAULT_DENSITIES,
    overlap_rank: int = DEFAULT_OVERLAP_RANK,
    merged: torch.Tensor | None = None,
) -> TensorInterference:
    """Every measure for one tensor; sign conflicts need the dense values (a factored delta is formed, once)."""
    module, layer = module_and_layer(name)
    result = TensorInterference(name, module, layer, gram(items))
    matrices = all(len(x.shape) == 2 for x in items)
    dense = [x.dense() if isinstance(x, LowRank) else x for x in items] if densities else []
    for density in densities:
        result.conflicts[density] = conflicts_at(dense, density)
    if matrices:
        columns = [column_basis(x, overlap_rank) for x in items]
        rows = [row_basis(x, overlap_rank) for x in items]
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                result.columns[i, j] = overlap(columns[i], columns[j])
                result.rows[i, j] = overlap(rows[i], rows[j])
    if merged is not None:
        result.merged_inner = [inner(merged, x) for x in items]
    return result


@dataclass(frozen=True)
class Input:
    """One input of the analysis: a label, the tensors it changes, and how to read each as a contribution."""

    label: str
    names: frozenset[str]
    read: Callable[[str], Contribution]
    shape: Callable[[str], tuple[int, ...]]


@dataclass
class InterferenceAnalysis:
    """The measures of every tensor any input changes (a tensor an input leaves alone counts as 0 for it)."""

    labels: list[str]
    densities: tuple[float, ...]
    overlap_rank: int
    tensors: list[TensorInterference] = field(default_factory=list)
    merged_label: str | None = None

    def gram(self, layer: int | None | str = "all") -> torch.Tensor:
        """Σ of the per-tensor Gram matrices: the model's (default) or one layer's (None: tensors outside layers)."""
        chosen = [t.gram for t in self.tensors if layer == "all" or t.layer == layer]
        return sum(chosen, torch.zeros(len(self.labels), len(self.labels), dtype=torch.float64))

    def conflicts(self, density: float, layer: int | None | str = "all") -> SignConflicts | None:
        chosen = [t.conflicts[density] for t in self.tensors if layer == "all" or t.layer == layer]
        return sum(chosen[1:], chosen[0]) if chosen else None

    def layers(self) -> list[int | None]:
        return sorted({t.layer for t in self.tensors}, key=lambda layer: -1 if layer is None else layer)

    def retention(self) -> list[float | None] | None:
        """Σ⟨τ_m, τᵢ⟩ / Σ‖τᵢ‖² over every tensor, per input."""
        if not self.tensors or self.tensors[0].merged_inner is None:
            return None
        kept = [sum(t.merged_inner[i] for t in self.tensors) for i in range(len(self.labels))]
        norms = self.gram().diagonal().tolist()
        return [k / n if n else None for k, n in zip(kept, norms, strict=True)]


def task_vector_input(label: str, checkpoint) -> Input:
    """A τ file (or any checkpoint of differences): every tensor it holds that is not all zeros is read."""
    return Input(label, frozenset(checkpoint.names()), checkpoint.read, lambda name: checkpoint.info(name).shape)


def analyze_interference(
    inputs: list[Input],
    densities: tuple[float, ...] = DEFAULT_DENSITIES,
    overlap_rank: int = DEFAULT_OVERLAP_RANK,
    merged: Input | None = None,
    on_tensor: Callable[[str], None] = lambda name: None,
) -> InterferenceAnalysis:
    """Stream over the tensors any input changes, one tensor of each input in memory at a time."""
    result = InterferenceAnalysis(
        [i.label for i in inputs], densities, overlap_rank, merged_label=merged and merged.label
    )
    names = sorted(set().union(*(i.names for i in inputs)))
    for name in names:
        shape = next(i.shape(name) for i in inputs if name in i.names)
        items = [i.read(name) if name in i.names else torch.zeros(shape, dtype=torch.float64) for i in inputs]
        tau_m = None if merged is None else merged.read(name) if name in merged.names else torch.zeros(shape)
        result.tensors.append(tensor_interference(name, items, densities, overlap_rank, tau_m))
        on_tensor(name)
    return result


def adapter_input(label: str, adapter: LoraAdapter, plan: DeltaPlan, base, device: torch.device) -> Input:
    """An adapter's Δ per tensor: a plain LoRA as its factors (s·B@A, transposed for fan_in_fan_out and embeddings,
    in the stored orientation), any other change (DoRA, PiSSA, a bias, copies) as the dense Δ compare computes."""
    shapes = {spec.name: spec.shape for spec in plan.specs}

    def read(name: str) -> Contribution:
        changes = plan.changes[name]
        target = changes[0] if len(changes) == 1 else None
        if isinstance(target, LoraTarget) and not target.dora and not target.init:
            lora_a, lora_b = adapter.read(target.key_a).double(), adapter.read(target.key_b).double()
            if target.fan_in_fan_out or target.embedding:  # Δ = s·(BA)ᵀ = s·Aᵀ Bᵀ
                return LowRank(lora_a.T, lora_b.T, target.scaling)
            return LowRank(lora_b, lora_a, target.scaling)
        return exact_delta(name, plan, adapter, base, device)[0]

    return Input(label, frozenset(shapes), read, shapes.__getitem__)
