"""--export_lora: τ written back as a peft LoRA adapter by truncated SVD, with each tensor's reconstruction error.

What mergekit's extract-lora does, plus the error of every tensor and a rank chosen by kept energy.
Per tensor, M is τ in peft's orientation, out × in: τ itself for an nn.Linear weight, τᵀ for a Conv1D weight
(stored in × out, `fan_in_fan_out`) and for an embedding (stored vocab × dim; peft's Δ = (B @ A)ᵀ there).
Its top-k singular triplets M ≈ U_k Σ_k V_kᵀ are split evenly between the factors,

    B = U_k Σ_k^½ (out × k),   A = Σ_k^½ V_kᵀ (k × in),

so that both sit on the same scale (mergekit's default split too; the product is the same either way). It is
all float64 until the factors are saved as fp32. lora_alpha = r makes peft's scaling 1: it merges exactly B @ A.

Eckart–Young: no rank-k matrix is closer to M than U_k Σ_k V_kᵀ, and ‖M − B A‖²_F = ‖M‖²_F − Σ_{i≤k} σᵢ².
So the relative error² and the kept energy Σ_{i≤k} σᵢ² / ‖M‖²_F add up to 1; the fp32 rounding of the factors
adds only its square (its first-order part is orthogonal to the residual).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.adapter import PREFIX, Change, LoraTarget
from common.errors import UserError
from common.model_layout import EMBEDDING_SUFFIXES, read_config
from common.safetensors_io import SafetensorsWriter, TensorSpec
from common.spectra import FIRST_RANK_GUESS, truncated_svd

log = logging.getLogger("lora_tv")
FOLDER = "exported_lora"
LINEAR, CONV1D, EMBEDDING = "linear", "conv1d", "embedding"
# transformers models built on transformers.pytorch_utils.Conv1D (weights stored in × out) next to nn.Linear
# layers (their lm_head): which of their tensors is which cannot be read off a name.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
BLOCK_BYTES = 32 * 1024 * 1024  # rows of τ − BA formed at a time to measure its norm
ENERGY_SLACK = 1e-12  # float64 sums of σᵢ²: FRACTION 1 keeps every direction holding more than 1e-12 of ‖τ‖²


@dataclass(frozen=True)
class ExportRequest:
    """The same rank k for every tensor, or per tensor the smallest k keeping `energy` of ‖τ‖²_F."""

    rank: int | None = None
    energy: float | None = None
    full_svd: bool = False


@dataclass
class ExportedTensor:
    """The per-tensor record of analysis.json's export_lora section."""

    name: str
    module: str
    layout: str  # linear | conv1d (stored in × out) | embedding
    shape: list[int]
    rank: int
    kept_energy: float  # Σ_{i≤k} σᵢ² / ‖τ‖²_F
    rel_error: float  # ‖τ − BA‖_F / ‖τ‖_F with the factors as saved (fp32), in float64
    rel_error_lora: float | None  # ‖Δ − BA‖_F / ‖Δ‖_F (None when Δ is zero)
    exact_svd: bool  # False: a randomized SVD found the top-k directions


@dataclass
class LoraExport:
    request: ExportRequest
    tensors: list[ExportedTensor] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # tensor -> why it is not in the adapter
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B), fp32
    seconds: float = 0.0


def recorded_base_config(base_dir: Path | None, metadata: dict[str, str]) -> dict | None:
    """config.json of the base model: --base_model's, else that of the base recorded in τ's metadata when it
    is a local folder or in the Hugging Face cache (never downloaded); None when neither is found."""
    if base_dir is not None:
        return read_config(base_dir, required=False) or None
    recorded = metadata.get("base_model")
    if not recorded:
        return None
    if Path(recorded).is_dir():
        return read_config(Path(recorded), required=False) or None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(recorded, "config.json")
    except ValueError:  # not a hub id either
        return None
    if not isinstance(cached, str):
        return None
    return read_config(Path(cached).parent, required=False) or None


def layout_problem(model_config: dict | None) -> str | None:
    """Why the layout of a tensor the adapter does not name cannot be known, or None when it can."""
    if model_config is None:
        return "no config.json for the base model (pass --base_model), so nn.Linear and Conv1D cannot be told apart"
    model_type = model_config.get("model_type")
    if model_type in CONV1D_MODEL_TYPES:
        return f"a {model_type} model has Conv1D layers (stored in × out) beside nn.Linear ones, alike by name"
    return None


class LoraExporter:
    """Collects the factors of every analysed matrix of τ (`add`), then writes the adapter (`write`).

    A tensor's layout comes from the source adapter's LoRA target when there is one (--lora_path), else from
    its name in a model without Conv1D layers (an embedding by its name, anything else nn.Linear).
    """

    def __init__(self, request: ExportRequest, changes: dict[str, list[Change]], model_config: dict | None):
        self.export = LoraExport(request)
        self.targets = {name: c for name, cs in changes.items() for c in cs if isinstance(c, LoraTarget)}
        self.layout_problem = layout_problem(model_config)
        if not changes and self.layout_problem:
            raise UserError(f"--export_lora: {self.layout_problem}; --lora_path gives each layer's layout")

    def add(self, name: str, lora_delta: torch.Tensor, task_vector: torch.Tensor) -> None:
        """Factor one tensor of τ (2-D, in its stored layout) and record its error against τ and Δ."""
        start = time.perf_counter()
        target = self.targets.get(name)
        if target is None and self.layout_problem:
            self.export.skipped[name] = f"not a LoRA target of the adapter, and {self.layout_problem}"
        elif target is None and not name.endswith(".weight"):
            self.export.skipped[name] = "not a module's weight"
        elif not torch.count_nonzero(task_vector):
            self.export.skipped[name] = "τ is zero"
        else:
            module = target.module if target else name.removesuffix(".weight")
            layout = _layout(name, target)
            self._factor(name, module, layout, lora_delta, task_vector)
        self.export.seconds += time.perf_counter() - start

    def _factor(self, name: str, module: str, layout: str, lora_delta: torch.Tensor, tau: torch.Tensor) -> None:
        matrix = tau.double() if layout == LINEAR else tau.double().T
        energy = float(torch.linalg.matrix_norm(matrix)) ** 2  # ‖τ‖²_F directly, not a sum over computed σ's
        u, s, vh, exact = top_triplets(matrix, energy, self.export.request)
        root = s.sqrt()
        lora_b, lora_a = (u * root).float(), (root[:, None] * vh).float()
        record = ExportedTensor(
            name=name,
            module=module,
            layout=layout,
            shape=list(tau.shape),
            rank=len(s),
            kept_energy=float(s.square().sum()) / energy,
            rel_error=relative_residual(matrix, lora_b, lora_a),
            rel_error_lora=relative_residual(lora_delta if layout == LINEAR else lora_delta.T, lora_b, lora_a),
            exact_svd=exact,
        )
        self.export.tensors.append(record)
        self.export.factors[module] = (lora_a.cpu(), lora_b.cpu())
        log.debug(
            f"  export {module}: rank {record.rank}, kept energy {record.kept_energy:.9f}, "
            f"‖τ − BA‖/‖τ‖ {record.rel_error:.2e}"
        )

    def write(self, folder: Path, source_config: dict | None, base_model: str | None) -> LoraExport:
        """adapter_model.safetensors and adapter_config.json into `folder`."""
        start = time.perf_counter()
        if not self.export.tensors:
            raise UserError(
                f"--export_lora: no tensor to export ({'; '.join(sorted(set(self.export.skipped.values())))})"
            )
        folder.mkdir()
        write_factors(folder / "adapter_model.safetensors", self.export)
        config = adapter_config(self.export, source_config, base_model)
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        self.export.seconds += time.perf_counter() - start
        return self.export


def _layout(name: str, target: LoraTarget | None) -> str:
    if target is not None:
        return EMBEDDING if target.embedding else CONV1D if target.fan_in_fan_out else LINEAR
    return EMBEDDING if name.endswith(EMBEDDING_SUFFIXES) else LINEAR


def top_triplets(
    matrix: torch.Tensor, energy: float, request: ExportRequest
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """U_k, σ_k, V_kᵀ for the requested rank, or for the smallest k keeping the requested energy (from 32
    singular values, 4× more while they fall short, up to the exact SVD); and whether the SVD was exact."""
    smallest = min(matrix.shape)
    k = min(request.rank or FIRST_RANK_GUESS, smallest)
    while True:
        u, s, vh, exact = truncated_svd(matrix, k, request.full_svd)
        if request.rank is not None:
            return u[:, :k], s[:k], vh[:k], exact
        kept = rank_for_energy(s, energy, request.energy)
        if kept is not None or exact:
            kept = kept or len(s)
            return u[:, :kept], s[:kept], vh[:kept], exact
        k = min(4 * k, smallest)


def rank_for_energy(singular_values: torch.Tensor, energy: float, fraction: float) -> int | None:
    """The smallest k with Σ_{i≤k} σᵢ² ≥ fraction · ‖τ‖²_F (less ENERGY_SLACK · ‖τ‖²_F), None if these σ's
    fall short."""
    reached = (singular_values.square().cumsum(0) >= (fraction - ENERGY_SLACK) * energy).nonzero()
    return int(reached[0]) + 1 if len(reached) else None


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


def write_factors(path: Path, export: LoraExport) -> None:
    """Every A and B, fp32, in the order the tensors were analysed."""
    tensors = []
    for t in export.tensors:
        key_a, key_b = adapter_keys(t.module, t.layout)
        lora_a, lora_b = export.factors[t.module]
        tensors += [(key_a, lora_a), (key_b, lora_b)]
    specs = [TensorSpec(key, tensor.dtype, tuple(tensor.shape)) for key, tensor in tensors]
    with SafetensorsWriter(path, specs, {"format": "pt"}) as writer:
        for key, tensor in tensors:
            writer.write(key, tensor)


def adapter_config(export: LoraExport, source_config: dict | None, base_model: str | None) -> dict:
    """adapter_config.json: scaling 1 everywhere (lora_alpha = r); ranks other than the most common one (r)
    in rank_pattern, with the same alpha in alpha_pattern."""
    ranks = {t.module: t.rank for t in export.tensors}
    r = max(Counter(ranks.values()).most_common(), key=lambda rank_count: (rank_count[1], rank_count[0]))[0]
    others = {module: rank for module, rank in ranks.items() if rank != r}
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
        "bias": "none",
        "fan_in_fan_out": any(t.layout == CONV1D for t in export.tensors),  # peft sets it per layer type anyway
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
