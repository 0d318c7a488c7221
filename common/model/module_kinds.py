"""Which kind of module each tensor of a checkpoint belongs to (nn.Linear, transformers' Conv1D, nn.Embedding or
another), and its path in the model peft wraps: read off a plain decoder's names, else off the model's class."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from common.errors import UserError
from common.io.safetensors_io import CheckpointIndex
from common.model.layout import EMBEDDING_SUFFIXES, read_config

log = logging.getLogger("lora_tv")
LINEAR, CONV1D, EMBEDDING, OTHER = "linear", "conv1d", "embedding", "other"
# transformers models built on transformers.pytorch_utils.Conv1D (weights stored in × out) next to nn.Linear
# layers (their lm_head): which of their tensors is which cannot be read off a name.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
# Decoder-only models whose classes hold nothing but nn.Linear layers, the nn.Embedding `model.embed_tokens` and
# norms: in their checkpoints a 2-D weight is an nn.Linear's unless it is the embedding, and a bias belongs to the
# layer of its weight. Their kinds are read off the names, without importing transformers' modeling code (about 4 s);
# tests/test_export_kinds.py checks every type here against its class.
PLAIN_DECODERS = frozenset({
    "llama", "mistral", "ministral", "qwen2", "qwen3", "starcoder2", "gemma", "gemma2", "gemma3_text", "phi", "phi3",
    "olmo", "olmo2", "granite", "cohere", "stablelm", "helium", "nemotron", "seed_oss", "arcee", "smollm3",
})  # fmt: skip
PLAIN_DECODER_TENSOR = re.compile(
    r"(?:model\.(?:embed_tokens|norm|final_layernorm|layers\.\d+\.[\w.]+)|lm_head)\.(?:weight|bias)"
)
PLAIN_EMBEDDING, PLAIN_HEAD = "model.embed_tokens.weight", "lm_head.weight"


class ModuleKinds:
    """Which kind of module a tensor of τ belongs to, and the module's path in the model peft wraps.

    When the base's config.json is at hand: for a plain decoder (PLAIN_DECODERS) whose checkpoint is named as one,
    from its names; else from the base model's class (on the meta device): nn.Linear, transformers' Conv1D,
    nn.Embedding, or anything else, the checkpoint's names mapped to the model's by transformers' own conversion.
    Without it, from names, except in models with Conv1D layers, which names cannot tell apart.
    """

    def __init__(self, base_dir: Path | None, model_type: str | None = None, from_class: bool = False):
        """`model_type`: the one τ's header records, for when the base's config.json is not at hand; `from_class`:
        read the class even of a plain decoder."""
        self.config = read_config(base_dir, required=False) if base_dir else {}
        self.model_type = self.config.get("model_type", model_type)
        self.model_paths: dict[str, str] = {}
        self.kinds: dict[str, str] = {}
        self.tied: tuple[str, str] | None = None  # (output head, input embedding) weights the base ties
        self.read_from = "names"  # or "class": where `kinds` came from
        self.structure = None  # the base's model on the meta device, when read from the class
        if self.config and (from_class or not self._read_plain_decoder(base_dir)):
            self.read_from = "class"
            self._read_model(base_dir)

    def _read_plain_decoder(self, base_dir: Path) -> bool:
        """The kinds of a plain decoder's tensors, read off the checkpoint's names and shapes; False (nothing read)
        when the model is not one: another model type or head, or a tensor not named as a plain decoder's."""
        architecture = (self.config.get("architectures") or ["ForCausalLM"])[0]
        if self.model_type not in PLAIN_DECODERS or not str(architecture).endswith("ForCausalLM"):
            return False
        try:
            with CheckpointIndex(base_dir) as checkpoint:
                shapes = checkpoint.shapes()
        except UserError:  # no safetensors to read names from (a .bin checkpoint): the class can still tell
            return False
        if not all(PLAIN_DECODER_TENSOR.fullmatch(name) for name in shapes) or PLAIN_EMBEDDING not in shapes:
            return False
        shapes.setdefault(PLAIN_HEAD, shapes[PLAIN_EMBEDDING])  # a tied head is not saved, but is a parameter
        for name in shapes:
            module = name.rpartition(".")[0]
            layer_weight = shapes.get(f"{module}.weight", ())
            matrix = len(layer_weight) == 2
            self.kinds[name] = EMBEDDING if module == "model.embed_tokens" else LINEAR if matrix else OTHER
            self.model_paths[name] = name
        if self.config.get("tie_word_embeddings", True):
            self.tied = (PLAIN_HEAD, PLAIN_EMBEDDING)
        return True

    def _read_model(self, base_dir: Path) -> None:
        from transformers.pytorch_utils import Conv1D

        from common.model.structure import ModelStructure

        try:
            structure = ModelStructure(base_dir)
        except UserError as e:
            log.info(f"export: {e}; module kinds are read off names")
            return
        self.structure = structure
        for module_path, module in structure.model.named_modules():
            kind = (
                LINEAR
                if isinstance(module, torch.nn.Linear)
                else CONV1D
                if isinstance(module, Conv1D)
                else EMBEDDING
                if isinstance(module, torch.nn.Embedding)
                else OTHER
            )
            for param_name, _ in module.named_parameters(recurse=False):
                full = f"{module_path}.{param_name}" if module_path else param_name
                for saved in structure.saved_names(full):
                    self.model_paths[saved] = full
                    self.kinds[saved] = kind
        model = structure.model
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        if self.config.get("tie_word_embeddings", True) and head is not None and embedding is not None:
            paths = {id(m): path for path, m in model.named_modules()}
            self.tied = (f"{paths[id(head)]}.weight", f"{paths[id(embedding)]}.weight")

    def kind(self, name: str) -> str | None:
        """linear / conv1d / embedding / other, or None when it cannot be known (`unknown_reason` says why)."""
        if self.kinds:
            return self.kinds.get(name)
        if self.unknown_reason(name):
            return None
        return EMBEDDING if name.endswith(EMBEDDING_SUFFIXES) else LINEAR if name.endswith(".weight") else None

    def blind_reason(self) -> str | None:
        """Why no matrix's layer can be told at all (neither the base's classes nor a model type to go by)."""
        return None if self.kinds else self.unknown_reason("any_linear.weight")

    def unknown_reason(self, name: str) -> str | None:
        """Why a tensor's layer cannot be told by its name, without the base model's classes: a model of unknown
        type may hold Conv1D layers (stored in × out) alike nn.Linear ones by name; an embedding may be tied to the
        output head (peft merges a LoRA on a tied embedding twice)."""
        if self.kinds:
            return None if name in self.kinds else "not a parameter of the base model"
        if self.model_type is None:
            return "no config.json of the base model at hand: nn.Linear and Conv1D alike by name (pass --base_model)"
        if self.model_type in CONV1D_MODEL_TYPES:
            return f"a {self.model_type} model: Conv1D (in × out) and nn.Linear alike by name (pass --base_model)"
        if name.endswith(EMBEDDING_SUFFIXES) and self.config.get("tie_word_embeddings", True):
            return "the output head may be tied to this embedding (pass --base_model)"
        return None

    def model_path(self, name: str) -> str:
        return self.model_paths.get(name, name)
