"""--export_lora: τ written back as a peft adapter — every changed tensor, or listed with its share of ‖τ‖².

Matrices (nn.Linear, Conv1D, nn.Embedding weights) become LoRA factors by truncated SVD. Per tensor, M is τ in
peft's orientation, out × in: τ itself for an nn.Linear weight, τᵀ for a Conv1D weight (stored in × out,
`fan_in_fan_out`) and for an embedding (stored vocab × dim; peft's Δ = (B @ A)ᵀ there). Its top-k singular
triplets M ≈ U_k Σ_k V_kᵀ are split evenly between the factors,

    B = U_k Σ_k^½ (out × k),   A = Σ_k^½ V_kᵀ (k × in),

all in float64 until the factors are saved as fp32; lora_alpha = r makes peft's scaling 1, so it merges B @ A.
Eckart–Young: no rank-k matrix is closer to M, and ‖M − B A‖²_F = ‖M‖²_F − Σ_{i≤k} σᵢ² (the relative error² and the
kept energy add up to 1; the fp32 rounding of the factors adds only its square).

The rank is fixed (RANK), the smallest keeping a share of ‖τ‖²_F (`energy`), or chosen per tensor (`auto`): the
singular values above Gavish & Donoho's optimal hard threshold for white noise, λ*(β)·√n·σ̂, with the noise level σ̂
estimated from the energy beyond the top singular values (`noise_threshold`). Never rank 0: a tensor with nothing
above the threshold is listed, not exported.

Everything else, in the form peft merges back exactly (docs/adapters.md):
- a changed bias of a linear layer: `lora_bias` (b += s·lora_B.bias, base-free) when every LoRA target has a bias,
  else its value with `bias: "all"` (needs the base: value = base + τ);
- norms and any other changed module: `modules_to_save` copies of base + τ (needs the base);
- an embedding: an embedding LoRA, or a copy with `embeddings="copy"`; when the output head is tied to it, a copy
  with `ensure_weight_tying` (peft's merge of a LoRA on a tied embedding adds it twice): never silently untied.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Self

import torch

from common.errors import UserError
from common.io.safetensors_io import SafetensorsWriter, TensorSpec
from common.lora.adapter import PREFIX
from common.model.module_kinds import CONV1D, EMBEDDING, LINEAR, OTHER, ModuleKinds
from common.numerics.metrics import squared_norm
from common.numerics.spectra import Decomposition, energy_rank, truncated_svd

log = logging.getLogger("lora_tv")
FOLDER = "exported_lora"
BLOCK_BYTES = 32 * 1024 * 1024  # rows of τ − BA formed at a time to measure its norm
DEFAULT_MAX_RANK = 256  # the cap of `auto` and `energy` ranks unless --max_rank says otherwise


@dataclass(frozen=True)
class ExportRequest:
    """How ranks are chosen (one of `rank`, `energy`, `auto`), which tensors are exported, and how."""

    rank: int | None = None
    energy: float | None = None
    auto: bool = False
    max_rank: int | None = None
    full_svd: bool = False
    include: str | None = None  # a regex searched in tensor names: only those are exported
    exclude: str | None = None
    embeddings: str = "lora"  # or "copy": a modules_to_save copy (needs the base)

    def wants(self, name: str) -> bool:
        included = self.include is None or re.search(self.include, name) is not None
        return included and (self.exclude is None or re.search(self.exclude, name) is None)

    @property
    def cap(self) -> int:
        return self.max_rank or (self.rank if self.rank else DEFAULT_MAX_RANK)


@dataclass
class ExportedTensor:
    """The per-tensor record of analysis.json's export_lora section."""

    name: str
    module: str
    form: str  # lora | lora_bias | bias_value | copy
    layout: str  # linear | conv1d (stored in × out) | embedding | other
    shape: list[int]
    share: float  # ‖τ‖²_F of this tensor / ‖τ‖²_F of every changed tensor
    rank: int = 0
    kept_energy: float = 1.0  # Σ_{i≤k} σᵢ² / ‖τ‖²_F (1 for exact forms)
    rel_error: float | None = 0.0  # ‖τ − BA‖_F / ‖τ‖_F with the factors as saved (fp32), in float64
    rel_error_lora: float | None = None  # ‖Δ − BA‖_F / ‖Δ‖_F, when a LoRA delta was given
    exact_svd: bool = True  # False: a randomized SVD found the top-k directions
    threshold: float | None = None  # `auto`: the singular value threshold


def recorded_base_dir(base_dir: Path | None, metadata: dict[str, str]) -> Path | None:
    """The base model's folder: --base_model's, else that of the base recorded in τ's metadata when it is a local
    folder or in the Hugging Face cache (never downloaded); None when neither is found."""
    if base_dir is not None:
        return base_dir
    recorded = metadata.get("base_model")
    if not recorded:
        return None
    if Path(recorded).is_dir():
        return Path(recorded)
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(recorded, "config.json")
    except ValueError:  # not a hub id either
        return None
    return Path(cached).parent if isinstance(cached, str) else None


@dataclass
class LoraExport:
    """What the export did: a record per exported tensor, the tensors left out and why, and the adapter's shape."""

    request: ExportRequest
    tensors: list[ExportedTensor] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # tensor -> why it is not in the adapter
    skipped_share: dict[str, float] = field(default_factory=dict)  # tensor -> its share of ‖τ‖²_F
    ranks: dict[str, int] = field(default_factory=dict)  # LoRA target module -> its rank, in the adapter's order
    copies: list[str] = field(default_factory=list)  # modules_to_save
    tied: bool = False  # ensure_weight_tying: a copy of an embedding the output head is tied to
    seconds: float = 0.0
    total_energy: float = 0.0  # ‖τ‖²_F over every changed tensor


@dataclass(frozen=True)
class ExportItem:
    """One changed tensor of τ on its way into the adapter: where it sits in the model, and what is known of it."""

    name: str  # its name in τ
    path: str  # the model parameter it is (module_kinds' model path)
    kind: str | None  # its layer's kind (linear, conv1d, embedding, other); None when it cannot be told
    tau: torch.Tensor  # in its stored layout
    energy: float  # ‖τ‖²_F
    base: torch.Tensor | None = None
    lora_delta: torch.Tensor | None = None
    decomposition: Decomposition | None = None  # the analysis's SVD of τ, when it made one

    @property
    def module(self) -> str:
        return self.path.rpartition(".")[0]

    @property
    def param(self) -> str:
        return self.path.rpartition(".")[2]

    @property
    def is_weight_matrix(self) -> bool:
        return self.param == "weight" and self.tau.dim() == 2

    def matrix(self, layout: str) -> torch.Tensor:
        """τ in float64 in peft's orientation: the analysis's own copy when its decomposition holds one."""
        held = self.decomposition.matrix if self.decomposition is not None else None
        return peft_oriented(held if held is not None else self.tau.double(), layout)

    def value(self) -> torch.Tensor:
        """base + τ, summed in float64, as fp32 on the host (a modules_to_save copy or a bias value)."""
        return (self.base.double() + self.tau.double()).float().cpu()


def peft_oriented(matrix: torch.Tensor, layout: str) -> torch.Tensor:
    """A matrix in its stored layout turned to peft's orientation, out × in (Conv1D and embeddings are stored
    transposed)."""
    return matrix if layout == LINEAR else matrix.T


@dataclass(frozen=True)
class Stored:
    """A tensor's place in a ScratchFile."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class ScratchFile:
    """Tensors appended to a file as they are made, so that none is held in memory until the adapter is written:
    a file with no name (O_TMPFILE where the file system has it), gone when closed, even after SIGKILL, in `folder`
    (analyze gives the output's staging folder: the output's disk, not a /tmp that may be RAM; None: the system's
    temporary folder). `assemble` copies its tensors into a safetensors file in any order, by the kernel
    (copy_file_range: no pass through user memory)."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self._file: BinaryIO | None = None
        self.size = 0

    def put(self, tensor: torch.Tensor) -> Stored:
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.folder)
        data = tensor.detach().cpu().contiguous()
        stored = Stored(self.size, data.dtype, tuple(data.shape))
        self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self.size += stored.nbytes
        return stored

    def assemble(self, path: Path, tensors: list[tuple[str, Stored]], metadata: dict[str, str]) -> None:
        """A safetensors file at `path` holding `tensors` (key, place here) in that order."""
        specs = [TensorSpec(key, stored.dtype, stored.shape) for key, stored in tensors]
        if self._file is not None:
            self._file.flush()
        with SafetensorsWriter(path, specs, metadata) as writer:
            for key, stored in tensors:
                writer.copy_from(key, stored.dtype, self._file.fileno(), stored.offset, stored.nbytes)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class AdapterTensors:
    """adapter_model.safetensors as it is made: every tensor goes to the scratch file at once, only its place is
    kept. In the file: per LoRA target A and B (and its lora_B.bias) in the order they were made, then the saved
    values (modules_to_save copies and bias values)."""

    def __init__(self, scratch: ScratchFile):
        self.scratch = scratch
        self.factors: dict[str, tuple[str, Stored, Stored]] = {}  # module -> (layout, A, B)
        self.lora_biases: dict[str, Stored] = {}  # module -> τ of its bias (lora_bias)
        self.values: dict[str, Stored] = {}  # adapter key -> base + τ

    def add_factors(self, module: str, layout: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        self.factors[module] = (layout, self.scratch.put(lora_a), self.scratch.put(lora_b))

    def add_value(self, key: str, value: torch.Tensor | Stored) -> Stored:
        """base + τ under `key` (a tensor, or one already stored: the same bytes under a second key)."""
        self.values[key] = value if isinstance(value, Stored) else self.scratch.put(value)
        return self.values[key]

    def ranks(self) -> dict[str, int]:
        return {module: lora_a.shape[0] for module, (_, lora_a, _) in self.factors.items()}

    def write(self, path: Path) -> None:
        order: list[tuple[str, Stored]] = []
        for module, (layout, lora_a, lora_b) in self.factors.items():
            key_a, key_b = adapter_keys(module, layout)
            order += [(key_a, lora_a), (key_b, lora_b)]
            if module in self.lora_biases:
                order.append((f"{PREFIX}{module}.lora_B.bias", self.lora_biases[module]))
        self.scratch.assemble(path, order + list(self.values.items()), {"format": "pt"})


@dataclass(frozen=True)
class HeldBias:
    """A changed bias of a linear layer, stored until every LoRA target is known (which decides its form): its τ,
    and base + τ when the base is given."""

    name: str
    module: str
    shape: list[int]
    energy: float
    delta: Stored
    value: Stored | None


def lora_bias_fits(biases: Iterable[str], factored: Iterable[str], biased: set[str], copies: Iterable[str]) -> bool:
    """peft's lora_bias adds lora_B.bias to the bias of every LoRA target, so it needs one on each: it fits when
    every target (a factored module, or one whose bias changed) has a bias in τ, or is a modules_to_save copy."""
    biases = set(biases)
    return bool(biases) and biases | set(factored) <= biased | set(copies)


class LoraExporter:
    """Collects every changed tensor of τ (`add`), each one's factors or value written to a scratch file as soon as
    it is made; then writes the adapter (`write`). Memory: one tensor's work at a time, and a record per tensor."""

    def __init__(
        self,
        request: ExportRequest,
        kinds: ModuleKinds,
        shapes: dict[str, tuple[int, ...]],
        scratch_dir: Path | None = None,
    ):
        self.export = LoraExport(request)
        self.kinds = kinds
        self.shapes = shapes  # every tensor of τ
        self.names = set(shapes)
        self.adapter = AdapterTensors(ScratchFile(scratch_dir))
        self.biases: dict[str, HeldBias] = {}  # module -> its changed bias, placed in `write`

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.adapter.scratch.close()

    def add(
        self,
        name: str,
        task_vector: torch.Tensor,
        base: torch.Tensor | None = None,
        lora_delta: torch.Tensor | None = None,
        decomposition: Decomposition | None = None,
    ) -> None:
        """One changed tensor of τ (in its stored layout), with the base tensor when there is one, Δ when the
        analysis had one, and τ's decomposition when the analysis made one."""
        start = time.perf_counter()
        energy = self._count(task_vector)
        if not self.export.request.wants(name):
            self._skip(name, "excluded (--export_include / --export_exclude)", energy)
        else:
            path = self.kinds.model_path(name)
            kind = self.kinds.kind(name)
            self._route(ExportItem(name, path, kind, task_vector, energy, base, lora_delta, decomposition))
        self.export.seconds += time.perf_counter() - start

    def skip(self, name: str, why: str, task_vector: torch.Tensor) -> None:
        """A changed tensor of τ that is not exported (its energy still counts in ‖τ‖²)."""
        self._skip(name, why, self._count(task_vector))

    def _count(self, task_vector: torch.Tensor) -> float:
        """‖τ‖²_F of one changed tensor, added to the total every share is a fraction of."""
        energy = squared_norm(task_vector)
        self.export.total_energy += energy
        return energy

    def _route(self, item: ExportItem) -> None:
        if self.kinds.tied and item.path in self.kinds.tied:
            self._tied(item)
        elif item.kind is None:
            self._skip(item.name, self.kinds.unknown_reason(item.name) or "its layer's kind is unknown", item.energy)
        elif item.kind in (LINEAR, CONV1D) and item.is_weight_matrix:
            self._factor(item, item.kind)
        elif item.kind == EMBEDDING and item.is_weight_matrix:
            if self.export.request.embeddings == "copy":
                self._copy(item)
            else:
                self._factor(item, EMBEDDING)
        elif item.kind in (LINEAR, CONV1D) and item.param == "bias":
            self._hold_bias(item)  # its form depends on every target: see _place_biases
        else:
            self._copy(item)

    def _tied(self, item: ExportItem) -> None:
        """The output head or the embedding of a base that ties them: peft merges a LoRA on either into the one
        shared weight (an embedding LoRA twice), so they go as copies; with ensure_weight_tying when the head is
        still tied in τ (not saved on its own), so that peft ties the copies too."""
        head, _ = self.kinds.tied
        if item.base is None:
            why = "the base ties the output head to the embedding: a copy of it needs --base_model"
            self._skip(item.name, why, item.energy)
            return
        stored = self._copy(item)
        still_tied = next((n for n, path in self.kinds.model_paths.items() if path == head), None) not in self.names
        if still_tied:  # peft ties the head's copy to the embedding's, and loads it from its own key
            self.export.tied = True
            self.adapter.add_value(f"{PREFIX}{head}", stored)

    def _copy(self, item: ExportItem) -> Stored | None:
        """A modules_to_save copy of base + τ, under the parameter's own name."""
        if item.base is None:
            why = "its value needs --base_model (exported as a modules_to_save copy of base + τ)"
            self._skip(item.name, why, item.energy)
            return None
        stored = self.adapter.add_value(f"{PREFIX}{item.path}", item.value())
        if item.module not in self.export.copies:
            self.export.copies.append(item.module)
        self.export.tensors.append(
            ExportedTensor(item.name, item.module, "copy", OTHER, list(item.tau.shape), item.energy)
        )
        return stored

    def _factor(self, item: ExportItem, layout: str) -> None:
        """Truncated SVD factors B, A of τ in peft's orientation (top_triplets chooses the rank)."""
        matrix = item.matrix(layout)
        u, s, vh, exact, threshold = top_triplets(matrix, item.energy, self.export.request, item.decomposition, layout)
        if len(s) == 0:
            self._skip(item.name, "no singular value above the noise threshold", item.energy)
            return
        root = s.sqrt()
        lora_b, lora_a = (u * root).float(), (root[:, None] * vh).float()
        delta = None if item.lora_delta is None else peft_oriented(item.lora_delta, layout)
        self.export.tensors.append(
            ExportedTensor(
                name=item.name,
                module=item.module,
                form="lora",
                layout=layout,
                shape=list(item.tau.shape),
                share=item.energy,
                rank=len(s),
                kept_energy=float(s.square().sum()) / item.energy if item.energy else 1.0,
                rel_error=relative_residual(matrix, lora_b, lora_a),
                rel_error_lora=relative_residual(delta, lora_b, lora_a) if delta is not None else None,
                exact_svd=exact,
                threshold=threshold,
            )
        )
        self.adapter.add_factors(item.module, layout, lora_a, lora_b)

    def _hold_bias(self, item: ExportItem) -> None:
        delta = self.adapter.scratch.put(item.tau.float())
        value = self.adapter.scratch.put(item.value()) if item.base is not None else None
        self.biases[item.module] = HeldBias(item.name, item.module, list(item.tau.shape), item.energy, delta, value)

    def _skip(self, name: str, why: str, energy: float) -> None:
        self.export.skipped[name] = why
        self.export.skipped_share[name] = energy

    def write(self, folder: Path, source_config: dict | None, base_model: str | None) -> LoraExport:
        """adapter_model.safetensors and adapter_config.json into `folder`; shares become fractions of ‖τ‖²."""
        start = time.perf_counter()
        self._place_biases()
        self.export.ranks = self.adapter.ranks()
        self._energies_to_shares()
        if not self.export.tensors:
            reasons = "; ".join(sorted(set(self.export.skipped.values()))) or "τ is zero"
            raise UserError(f"--export_lora: no tensor to export ({reasons})")
        folder.mkdir()
        self.adapter.write(folder / "adapter_model.safetensors")
        self.close()
        config = adapter_config(self.export, source_config, base_model)
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        self.export.seconds += time.perf_counter() - start
        return self.export

    def _energies_to_shares(self) -> None:
        """Each tensor's ‖τ‖²_F, exported or skipped, as its share of ‖τ‖²_F over every changed tensor."""
        total = self.export.total_energy or 1.0
        for record in self.export.tensors:
            record.share /= total
        self.export.skipped_share = {name: e / total for name, e in self.export.skipped_share.items()}

    def _place_biases(self) -> None:
        """Biases of linear layers: lora_bias (base-free, b += lora_B.bias) when every LoRA target has a bias in
        τ, with zero factors for a layer whose weight did not change; else their values (`bias: "all"`)."""
        biased = {self.kinds.model_path(n).rpartition(".")[0] for n in self.names if n.endswith(".bias")}
        lora_bias = lora_bias_fits(self.biases, self.adapter.factors, biased, self.export.copies)
        for module, bias in self.biases.items():
            if lora_bias:
                if module not in self.adapter.factors:  # a layer whose weight τ is zero: rank-1 zero factors
                    self._zero_factors(module)
                self.adapter.lora_biases[module] = bias.delta
                self._record_bias(bias, "lora_bias")
            elif bias.value is not None:
                base_layer = ".base_layer" if module in self.adapter.factors else ""
                self.adapter.add_value(f"{PREFIX}{module}{base_layer}.bias", bias.value)
                self._record_bias(bias, "bias_value")
            else:
                why = "not every LoRA target has a bias (no lora_bias): its value needs --base_model"
                self._skip(bias.name, why, bias.energy)

    def _record_bias(self, bias: HeldBias, form: str) -> None:
        self.export.tensors.append(ExportedTensor(bias.name, bias.module, form, LINEAR, bias.shape, bias.energy))

    def _zero_factors(self, module: str) -> None:
        weight = next(n for n in self.names if self.kinds.model_path(n) == f"{module}.weight")
        shape = self.shapes[weight]
        out_features, in_features = shape if self.kinds.kind(weight) == LINEAR else shape[::-1]
        self.adapter.add_factors(module, LINEAR, torch.zeros(1, in_features), torch.zeros(out_features, 1))


def top_triplets(
    matrix: torch.Tensor, energy: float, request: ExportRequest, decomposition: Decomposition | None, layout: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, float | None]:
    """U_k, σ_k, V_kᵀ for the requested rank (fixed, by energy, or above the noise threshold), reusing the
    analysis's decomposition of τ when it holds enough triplets; whether the SVD was exact; the threshold.
    `energy`: ‖matrix‖²_F."""
    smallest = min(matrix.shape)
    dec = decomposition if decomposition is None or layout == LINEAR else decomposition.transposed()
    k = min(request.rank or 32, smallest)
    while True:
        if dec is None or (len(dec.s) < k and not dec.exact):
            u, s, vh, exact = truncated_svd(matrix, k, request.full_svd, gram=True)
            dec = Decomposition(u, s, vh, exact, energy, matrix)
        kept, threshold = _rank(dec, request, matrix.shape)
        if kept is not None or dec.exact or len(dec.s) >= min(request.cap, smallest):
            kept = min(kept if kept is not None else len(dec.s), request.cap, len(dec.s))
            return *dec.top(kept), dec.exact, threshold
        k = min(4 * max(k, len(dec.s)), smallest)


def _rank(dec: Decomposition, request: ExportRequest, shape: tuple[int, ...]) -> tuple[int | None, float | None]:
    """The rank these singular values give, or None when more are needed to tell."""
    if request.rank is not None:
        return request.rank, None
    if request.energy is not None:
        return energy_rank(dec.s, dec.energy, request.energy), None
    threshold = noise_threshold(dec.s, dec.energy, shape)
    above = int((dec.s > threshold).sum())
    return (above if above < len(dec.s) or dec.exact else None), threshold


def noise_threshold(singular_values: torch.Tensor, energy: float, shape: tuple[int, ...]) -> float:
    """Gavish & Donoho's optimal hard threshold for a known noise level, λ*(β)·√n·σ̂, β = m/n ≤ 1 (n the larger
    side), λ*(β) = √(2(β+1) + 8β / ((β+1) + √(β² + 14β + 1))); σ̂, the noise's standard deviation per element, is
    estimated from the energy beyond the singular values above the threshold (the noise's share of the top ones
    removed), iterated to a fixed point. On white noise alone it keeps nothing; under it, signal is not
    recoverable anyway."""
    m, n = sorted(shape)
    beta = m / n
    lam = math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta**2 + 14 * beta + 1)))
    squares = singular_values.double().square()
    kept = 0
    for _ in range(20):
        tail = max(energy - float(squares[:kept].sum()), 0.0)
        sigma = math.sqrt(tail / max(1, (m - kept) * (n - kept)))
        threshold = lam * math.sqrt(n) * sigma
        above = int((singular_values > threshold).sum())
        if above == kept:
            break
        kept = above
    return threshold


def relative_residual(exact: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor) -> float | None:
    """‖exact − B A‖_F / ‖exact‖_F in float64, a block of rows at a time (never the whole m × n product);
    None when `exact` is zero."""
    residual = norm = 0.0
    lora_b, lora_a = lora_b.double(), lora_a.double()
    rows = max(2, BLOCK_BYTES // (8 * exact.shape[1]))
    for start in range(0, exact.shape[0], rows):
        block = exact[start : start + rows].double()
        residual += float((block - lora_b[start : start + rows] @ lora_a).square().sum())
        norm += float(block.square().sum())
    return math.sqrt(residual / norm) if norm else None


def adapter_keys(module: str, layout: str) -> tuple[str, str]:
    """peft's saved names of A and B (the adapter name stripped, as `save_pretrained` writes them)."""
    if layout == EMBEDDING:
        return f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def adapter_config(export: LoraExport, source_config: dict | None, base_model: str | None) -> dict:
    """adapter_config.json: scaling 1 everywhere (lora_alpha = r); ranks other than the most common one (r)
    in rank_pattern, with the same alpha in alpha_pattern (never a rank 0)."""
    ranks = export.ranks
    counts = Counter(ranks.values()).most_common() or [(8, 0)]
    r = max(counts, key=lambda rank_count: (rank_count[1], rank_count[0]))[0]
    others = {re.escape(module): rank for module, rank in ranks.items() if rank != r}
    bias_values = any(t.form == "bias_value" for t in export.tensors)
    return {
        "peft_type": "LORA",
        "task_type": (source_config or {}).get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": list(ranks),
        "lora_dropout": 0.0,
        "bias": "all" if bias_values else "none",
        "lora_bias": any(t.form == "lora_bias" for t in export.tensors),
        "fan_in_fan_out": any(t.layout == CONV1D for t in export.tensors),  # peft sets it per layer type anyway
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": export.copies or None,
        "ensure_weight_tying": export.tied,
        "inference_mode": True,
    }
