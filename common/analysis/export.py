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
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class LoraExport:
    request: ExportRequest
    tensors: list[ExportedTensor] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # tensor -> why it is not in the adapter
    skipped_share: dict[str, float] = field(default_factory=dict)  # tensor -> its share of ‖τ‖²_F
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B), fp32
    bias_deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> τ of its bias (lora_bias)
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # adapter key -> base + τ (copies, biases)
    copies: list[str] = field(default_factory=list)  # modules_to_save
    tied: bool = False  # ensure_weight_tying: a copy of an embedding the output head is tied to
    seconds: float = 0.0
    total_energy: float = 0.0  # ‖τ‖²_F over every changed tensor


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


class LoraExporter:
    """Collects every changed tensor of τ (`add`), then writes the adapter (`write`)."""

    def __init__(self, request: ExportRequest, kinds: ModuleKinds, shapes: dict[str, tuple[int, ...]]):
        self.export = LoraExport(request)
        self.kinds = kinds
        self.shapes = shapes  # every tensor of τ
        self.names = set(shapes)
        self.pending_biases: dict[str, tuple[torch.Tensor, torch.Tensor | None, float]] = {}

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
        energy = squared_norm(task_vector)
        self.export.total_energy += energy
        if not self.export.request.wants(name):
            self._skip(name, "excluded (--export_include / --export_exclude)", energy)
        else:
            self._route(name, task_vector, base, lora_delta, decomposition, energy)
        self.export.seconds += time.perf_counter() - start

    def skip(self, name: str, why: str, task_vector: torch.Tensor) -> None:
        """A changed tensor of τ that is not exported (its energy still counts in ‖τ‖²)."""
        energy = squared_norm(task_vector)
        self.export.total_energy += energy
        self._skip(name, why, energy)

    def _route(self, name, tau, base, lora_delta, decomposition, energy) -> None:
        kind = self.kinds.kind(name)
        path = self.kinds.model_path(name)
        module, _, param = path.rpartition(".")
        if self.kinds.tied and path in self.kinds.tied:
            self._tied(name, module, tau, base, energy)
        elif kind is None:
            self._skip(name, self.kinds.unknown_reason(name) or "its layer's kind is unknown", energy)
        elif kind in (LINEAR, CONV1D) and param == "weight" and tau.dim() == 2:
            self._factor(name, module, kind, tau, lora_delta, decomposition, energy)
        elif kind == EMBEDDING and param == "weight" and tau.dim() == 2:
            self._embedding(name, module, tau, base, lora_delta, decomposition, energy)
        elif kind in (LINEAR, CONV1D) and param == "bias":
            self.pending_biases[module] = (tau, base, energy)  # its form depends on every target: see write()
        else:
            self._copy(name, module, param, tau, base, energy)

    def _embedding(self, name, module, tau, base, lora_delta, decomposition, energy) -> None:
        if self.export.request.embeddings == "copy":
            self._copy(name, module, "weight", tau, base, energy)
        else:
            self._factor(name, module, EMBEDDING, tau, lora_delta, decomposition, energy)

    def _tied(self, name, module, tau, base, energy) -> None:
        """The output head or the embedding of a base that ties them: peft merges a LoRA on either into the one
        shared weight (an embedding LoRA twice), so they go as copies; with ensure_weight_tying when the head is
        still tied in τ (not saved on its own), so that peft ties the copies too."""
        head = next((n for n, path in self.kinds.model_paths.items() if path == self.kinds.tied[0]), None)
        if base is None:
            self._skip(name, "the base ties the output head to the embedding: a copy of it needs --base_model", energy)
            return
        still_tied = head not in self.names
        self._copy(name, module, "weight", tau, base, energy)
        if still_tied:  # peft ties the head's copy to the embedding's, and loads it from its own key
            self.export.tied = True
            self.export.values[f"{PREFIX}{self.kinds.tied[0]}"] = self.export.values[f"{PREFIX}{module}.weight"]

    def _copy(self, name, module, param, tau, base, energy) -> None:
        if base is None:
            self._skip(name, "its value needs --base_model (exported as a modules_to_save copy of base + τ)", energy)
            return
        self.export.values[f"{PREFIX}{module}.{param}"] = (base.double() + tau.double()).float().cpu()
        if module not in self.export.copies:
            self.export.copies.append(module)
        self.export.tensors.append(ExportedTensor(name, module, "copy", OTHER, list(tau.shape), energy))

    def _factor(self, name, module, layout, tau, lora_delta, decomposition, energy) -> None:
        held = decomposition.matrix if decomposition is not None else None  # τ in float64, when the analysis has it
        matrix = held if held is not None else tau.double()
        matrix = matrix if layout == LINEAR else matrix.T
        u, s, vh, exact, threshold = top_triplets(matrix, energy, self.export.request, decomposition, layout)
        if len(s) == 0:
            self._skip(name, "no singular value above the noise threshold", energy)
            return
        root = s.sqrt()
        lora_b, lora_a = (u * root).float(), (root[:, None] * vh).float()
        delta = None if lora_delta is None else (lora_delta if layout == LINEAR else lora_delta.T)
        record = ExportedTensor(
            name=name,
            module=module,
            form="lora",
            layout=layout,
            shape=list(tau.shape),
            share=energy,
            rank=len(s),
            kept_energy=float(s.square().sum()) / energy if energy else 1.0,
            rel_error=relative_residual(matrix, lora_b, lora_a),
            rel_error_lora=relative_residual(delta, lora_b, lora_a) if delta is not None else None,
            exact_svd=exact,
            threshold=threshold,
        )
        self.export.tensors.append(record)
        self.export.factors[module] = (lora_a.cpu(), lora_b.cpu())

    def _skip(self, name: str, why: str, energy: float) -> None:
        self.export.skipped[name] = why
        self.export.skipped_share[name] = energy

    def write(self, folder: Path, source_config: dict | None, base_model: str | None) -> LoraExport:
        """adapter_model.safetensors and adapter_config.json into `folder`; shares become fractions of ‖τ‖²."""
        start = time.perf_counter()
        self._place_biases()
        total = self.export.total_energy or 1.0
        for record in self.export.tensors:
            record.share /= total
        self.export.skipped_share = {n: e / total for n, e in self.export.skipped_share.items()}
        if not self.export.tensors:
            reasons = "; ".join(sorted(set(self.export.skipped.values()))) or "τ is zero"
            raise UserError(f"--export_lora: no tensor to export ({reasons})")
        folder.mkdir()
        write_adapter_tensors(folder / "adapter_model.safetensors", self.export)
        config = adapter_config(self.export, source_config, base_model)
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        self.export.seconds += time.perf_counter() - start
        return self.export

    def _place_biases(self) -> None:
        """Biases of linear layers: lora_bias (base-free, b += lora_B.bias) when every LoRA target has a bias in
        τ, with zero factors for a layer whose weight did not change; else their values (`bias: "all"`)."""
        targets = set(self.export.factors) | set(self.pending_biases)
        biased = {self.kinds.model_path(n).rpartition(".")[0] for n in self.names if n.endswith(".bias")}
        lora_bias = bool(self.pending_biases) and targets <= biased | set(self.export.copies)
        for module, (tau, base, energy) in self.pending_biases.items():
            name = next((n for n in self.names if self.kinds.model_path(n) == f"{module}.bias"), f"{module}.bias")
            if lora_bias:
                if module not in self.export.factors:  # a layer whose weight τ is zero: rank-1 zero factors
                    weight = next(n for n in self.names if self.kinds.model_path(n) == f"{module}.weight")
                    self._zero_factors(weight, module)
                self.export.bias_deltas[module] = tau.float().cpu()
                self.export.tensors.append(ExportedTensor(name, module, "lora_bias", LINEAR, list(tau.shape), energy))
            elif base is not None:
                key = f"{PREFIX}{module}.base_layer.bias" if module in self.export.factors else f"{PREFIX}{module}.bias"
                self.export.values[key] = (base.double() + tau.double()).float().cpu()
                self.export.tensors.append(ExportedTensor(name, module, "bias_value", LINEAR, list(tau.shape), energy))
            else:
                self._skip(
                    name, "not every LoRA target has a bias (no lora_bias): its value needs --base_model", energy
                )

    def _zero_factors(self, weight_name: str, module: str) -> None:
        shape = self.shapes[weight_name]
        out_features, in_features = shape if self.kinds.kind(weight_name) == LINEAR else shape[::-1]
        self.export.factors[module] = (torch.zeros(1, in_features), torch.zeros(out_features, 1))


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


def write_adapter_tensors(path: Path, export: LoraExport) -> None:
    """Every A and B (fp32) in the order the tensors were analysed, the LoRA biases, then the saved values."""
    tensors = []
    layouts = {t.module: t.layout for t in export.tensors if t.form == "lora"}
    for module, (lora_a, lora_b) in export.factors.items():
        key_a, key_b = adapter_keys(module, layouts.get(module, LINEAR))
        tensors += [(key_a, lora_a), (key_b, lora_b)]
        if module in export.bias_deltas:
            tensors.append((f"{PREFIX}{module}.lora_B.bias", export.bias_deltas[module]))
    tensors += list(export.values.items())
    specs = [TensorSpec(key, tensor.dtype, tuple(tensor.shape)) for key, tensor in tensors]
    with SafetensorsWriter(path, specs, {"format": "pt"}) as writer:
        for key, tensor in tensors:
            writer.write(key, tensor.contiguous())


def adapter_config(export: LoraExport, source_config: dict | None, base_model: str | None) -> dict:
    """adapter_config.json: scaling 1 everywhere (lora_alpha = r); ranks other than the most common one (r)
    in rank_pattern, with the same alpha in alpha_pattern (never a rank 0)."""
    ranks = {module: a.shape[0] for module, (a, _) in export.factors.items()}
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
        "lora_bias": bool(export.bias_deltas),
        "fan_in_fan_out": any(t.layout == CONV1D for t in export.tensors),  # peft sets it per layer type anyway
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": export.copies or None,
        "ensure_weight_tying": export.tied,
        "inference_mode": True,
    }
