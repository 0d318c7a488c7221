"""The export's layer kinds read off a plain decoder's names are the ones its class says, type by type.

Every model type of PLAIN_DECODERS is built tiny by transformers and saved by `save_pretrained`; ModuleKinds reads
it once from the names and once from the class (on the meta device): the same kind, model path and tied pair for
every tensor. A model of another type, another head or with a tensor named otherwise goes to the class.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from common.model.module_kinds import EMBEDDING, LINEAR, OTHER, PLAIN_DECODERS, ModuleKinds

SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    vocab_size=64,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
)


def save_tiny(model_type: str, folder: Path, **changes) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **SMALL, **changes)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def same_kinds(folder: Path) -> ModuleKinds:
    named, built = ModuleKinds(folder), ModuleKinds(folder, from_class=True)
    assert named.read_from == "names" and named.kinds
    assert (named.kinds, named.model_paths, named.tied) == (built.kinds, built.model_paths, built.tied)
    return named


@pytest.mark.parametrize("model_type", sorted(PLAIN_DECODERS))
def test_a_plain_decoders_kinds_from_its_names_are_its_classes(model_type, tmp_path):
    kinds = same_kinds(save_tiny(model_type, tmp_path / model_type))
    assert set(kinds.kinds.values()) >= {LINEAR, EMBEDDING}
    assert kinds.kinds["model.layers.0.self_attn.o_proj.weight" if model_type != "phi" else "lm_head.weight"] == LINEAR


@pytest.mark.parametrize("tie", [True, False])
def test_a_tied_or_untied_head_is_read_as_the_class_says(tie, tmp_path):
    kinds = same_kinds(save_tiny("starcoder2", tmp_path / "m", tie_word_embeddings=tie, use_bias=True))
    assert kinds.tied == (("lm_head.weight", "model.embed_tokens.weight") if tie else None)
    assert kinds.kinds["model.norm.bias"] == OTHER and kinds.kinds["model.layers.0.mlp.c_fc.bias"] == LINEAR


def test_other_models_heads_and_names_go_to_the_class(tmp_path, monkeypatch):
    folder = save_tiny("llama", tmp_path / "llama")
    read = []
    monkeypatch.setattr(ModuleKinds, "_read_model", lambda self, base_dir: read.append(base_dir))
    assert ModuleKinds(folder).read_from == "names" and read == []
    for change in ({"architectures": ["LlamaForSequenceClassification"]}, {"model_type": "gpt2"}):
        other = tmp_path / f"other{len(read)}"
        shutil.copytree(folder, other)
        config = json.loads((other / "config.json").read_text()) | change
        (other / "config.json").write_text(json.dumps(config))
        ModuleKinds(other)
        assert read[-1] == other
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "renamed"
    shutil.copytree(folder, renamed)
    tensors = load_file(renamed / "model.safetensors")
    tensors["model.layers.0.extra.scale"] = torch.ones(2)
    save_file(tensors, renamed / "model.safetensors", {"format": "pt"})
    ModuleKinds(renamed)
    assert read[-1] == renamed, "a tensor no plain decoder has"
    (renamed / "model.safetensors").rename(renamed / "pytorch_model.bin")  # no names to read
    ModuleKinds(renamed)
    assert read[-1] == renamed and len(read) == 4, "a checkpoint without safetensors"
