"""Every refusal of an adapter names its real cause: one edited copy of a real peft adapter per message.

The hostile-input tests check the one-line, exit-2 contract on real processes; these check what each line
says, in-process (merge_lora.main raises the UserError that the script boundary prints).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_architectures import ARCHITECTURES, build_base

import merge_lora
from common.errors import UserError

PREFIX = "base_model.model.model.layers.0.self_attn."
MAG7, MAGNITUDE_Q = torch.ones(7), "model__layers__0__self_attn__q_proj__lora_magnitude_vector"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama and a peft adapter on its q_proj, v_proj and embedding."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("messages")
    base = build_base(ARCHITECTURES["llama"], root / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(root / "adapter")
    return base, root / "adapter"


def edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        tensors = load_file(folder / "adapter_model.safetensors")
        edit(tensors)
        save_file(tensors, folder / "adapter_model.safetensors", {"format": "pt"})

    return apply


def edit_config(**fields) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(fields)
        (folder / "adapter_config.json").write_text(json.dumps(config))

    return apply


def _retype(tensors: dict, key: str, dtype: torch.dtype) -> None:
    tensors[key] = tensors[key].to(dtype)


def _both(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        for edit in edits:
            edit(folder)

    return apply


def _add(**tensors: torch.Tensor) -> Callable[[Path], None]:
    """Add tensors under `base_model.model.<name>` (dots written as double underscores)."""
    named = {f"base_model.model.{k.replace('__', '.')}": v for k, v in tensors.items()}
    return edit_tensors(lambda t: t.update(named))


CASES = {
    "no weights": (edit_tensors(lambda t: [t.pop(k) for k in list(t)]), "the adapter holds no weights"),
    "a factor missing": (
        edit_tensors(lambda t: t.pop(f"{PREFIX}q_proj.lora_B.weight")),
        "module model.layers.0.self_attn.q_proj lacks lora_B (incomplete adapter)",
    ),
    "a convolution LoRA": (
        _add(model__layers__0__self_attn__q_proj__lora_A__weight=torch.zeros(4, 32, 1, 1)),
        "a convolution LoRA: only linear and embedding LoRA layers are supported",
    ),
    "ranks of A and B differ": (
        _add(model__layers__0__self_attn__q_proj__lora_B__weight=torch.zeros(32, 5)),
        "has a rank-4 A [4, 32] but a rank-5 B [32, 5] (a damaged or hand-edited adapter)",
    ),
    "rank unlike the config": (edit_config(r=8), "has rank 4 but adapter_config.json says 8"),
    "a DoRA magnitude of another size": (
        _both(edit_config(use_dora=True, target_modules=["q_proj", "v_proj"]), _add(**{MAGNITUDE_Q: MAG7})),
        "has a DoRA magnitude of shape [7], not [32] (one per output feature)",
    ),
    "DoRA on the embedding": (
        _both(edit_config(use_dora=True), _add(model__embed_tokens__lora_magnitude_vector=torch.ones(32))),
        "DoRA on the embedding model.embed_tokens is not supported yet",
    ),
    "integer factors": (
        edit_tensors(lambda t: _retype(t, f"{PREFIX}v_proj.lora_A.weight", torch.int32)),
        "v_proj.lora_A.weight is int32, not fp16, bf16, fp32 or fp64",
    ),
    "token rows without indices": (
        _add(model__embed_tokens__token_adapter__trainable_tokens_delta=torch.zeros(2, 32)),
        "no trainable_token_indices for model.embed_tokens in adapter_config.json",
    ),
    "a quantization-only variant": (edit_config(use_qalora=True), "use_qalora is set: a LoRA variant"),
    "layer replication": (edit_config(layer_replication=[[0, 1]]), "layer_replication cannot be merged (peft refuses"),
    "another peft type": (edit_config(peft_type="LOHA"), "peft_type LOHA is not supported (only LORA)"),
    "target_parameters not a list": (edit_config(target_parameters="experts"), "target_parameters must be a list"),
    "randomised PiSSA": (edit_config(init_lora_weights="pissa_niter_16"), "a randomised SVD that peft cannot repeat"),
    "a tensor of another size": (
        _add(model__layers__0__self_attn__v_proj__lora_B__weight=torch.zeros(64, 4)),
        "1 of 3 changed tensors have another shape: another variant of the model?",
    ),
    "a module the base lacks": (
        _both(
            edit_config(target_modules=["q_proj", "v_proj", "embed_tokens", "router"]),
            _add(
                model__layers__0__mlp__router__lora_A__weight=torch.zeros(4, 32),
                model__layers__0__mlp__router__lora_B__weight=torch.zeros(4, 4),
            ),
        ),
        "changes 1 of 4 tensors that are not in base model",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_refusal_names_its_cause(llama, tmp_path, case):
    base, adapter = llama
    edit, says = CASES[case]
    edited = tmp_path / "adapter"
    shutil.copytree(adapter, edited)
    edit(edited)
    args = ["--base_model", str(base), "--lora_path", str(edited), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(UserError) as error:
        merge_lora.main([*args, "--device", "cpu"])
    assert says in str(error.value)
    assert not (tmp_path / "out").exists()


def test_folder_errors(llama, tmp_path):
    base, adapter = llama
    two = tmp_path / "two"
    for name in ("a", "b"):
        shutil.copytree(adapter, two / name)
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_weights").mkdir()
    shutil.copy(adapter / "adapter_config.json", tmp_path / "no_weights")
    (tmp_path / "a_file").write_text("x")
    cases = {
        two: "holds several adapters (a, b); pass the one to use",
        tmp_path / "empty": "no adapter_config.json (not a peft adapter folder)",
        tmp_path / "no_weights": "no adapter_model.safetensors or adapter_model.bin",
        tmp_path / "a_file": "not a folder",
    }
    for folder, says in cases.items():
        args = ["--base_model", str(base), "--lora_path", str(folder), "--output_dir", str(tmp_path / "out")]
        with pytest.raises(UserError) as error:
            merge_lora.main(args)
        assert says in str(error.value)
