"""adapter_config.json as a typed object (peft's defaults, each layer's own rank, alpha and scaling), compare's scale
diagnosis with rank_pattern / alpha_pattern, and the adapter's changes dispatched exhaustively.

The patterned adapter is saved by peft on the tiny StarCoder2 and merged by peft's own merge_and_unload, once with
its config, once with every alpha doubled, once with rsLoRA switched on; τ of each is compared with the adapter.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import run_main

ADAPTED = ["q_proj", "k_proj", "v_proj", "o_proj"]
# four layer kinds, three ranks and three alphas: no one r or lora_alpha describes every layer
PATTERNED = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ADAPTED,
    "rank_pattern": {"v_proj": 2, "o_proj": 8},
    "alpha_pattern": {"k_proj": 16, "o_proj": 4},
}
DOUBLED = {"lora_alpha": 16, "alpha_pattern": {"k_proj": 32, "o_proj": 8}}


@dataclass
class Patterned:
    adapter: Path  # peft's adapter with rank_pattern and alpha_pattern, use_rslora false
    says_rslora: Path  # the same adapter whose config says use_rslora true
    taus: dict[str, Path]  # τ of peft's merges: "correct", "alpha_doubled", "rslora"
    root: Path


def edited(adapter: Path, out: Path, **config: object) -> Path:
    shutil.copytree(adapter, out)
    data = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(data | config))
    return out


def peft_merge(base: Path, adapter: Path, out: Path) -> Path:
    """peft's merge_and_unload at fp32, saved by transformers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return out


def extract(base: Path, finetuned: Path, out: Path) -> Path:
    args = ["--base_model", base, "--finetuned_model", finetuned, "--output_dir", out, "--device", "cpu"]
    result = run_main("extract_task_vectors.py", *args)
    assert result.returncode == 0, result.stderr
    return out / "task_vector.safetensors"


@pytest.fixture(scope="module")
def patterned(tiny, peft_adapters, tmp_path_factory) -> Patterned:
    root = tmp_path_factory.mktemp("patterned")
    adapter = peft_adapters(tiny.base, **PATTERNED)
    merged = {
        "correct": adapter,
        "alpha_doubled": edited(adapter, root / "adapter_alpha_doubled", **DOUBLED),
        "rslora": edited(adapter, root / "adapter_rslora", use_rslora=True),
    }
    taus = {
        name: extract(tiny.base, peft_merge(tiny.base, source, root / f"merged_{name}"), root / f"tv_{name}")
        for name, source in merged.items()
    }
    return Patterned(adapter, merged["rslora"], taus, root)


def compare(tiny, adapter: Path, tau: Path, out: Path) -> tuple[int, dict]:
    args = ["--lora_path", adapter, "--task_vector_path", tau, "--output_dir", out, "--base_model", tiny.base]
    result = run_main("compare_lora_task_vector.py", *args, "--device", "cpu")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads((out / "comparison_report.json").read_text())["summary"]


# --- compare's scale diagnosis, each tensor at its own scaling


def test_a_correct_merge_of_a_patterned_adapter_is_equivalent(tiny, patterned, tmp_path):
    code, summary = compare(tiny, patterned.adapter, patterned.taus["correct"], tmp_path / "c")
    assert (code, summary["cause"], summary["causes"]) == (0, "equivalent", ["equivalent"])


def test_a_patterned_adapter_merged_with_every_alpha_doubled_is_a_scale_mismatch_of_2(tiny, patterned, tmp_path):
    """c = 2 in every tensor. The layers' ranks are 2, 4 and 8, so it is no √r mix-up, though √r = 2 for the
    global r = 4 (which the diagnosis used to read every tensor's scale from)."""
    code, summary = compare(tiny, patterned.adapter, patterned.taus["alpha_doubled"], tmp_path / "c")
    assert (code, summary["cause"], summary["causes"]) == (1, "scale_mismatch", ["scale_mismatch"]), summary
    assert "τ = 2·Δ in every adapted tensor" in summary["reason"]
    assert "alpha/r of each layer (0.5 to 4)" in summary["reason"]
    assert (
        'as if every alpha were 2× its own: lora_alpha 16 instead of 8, alpha_pattern {"k_proj": 32, "o_proj": 8} '
        'instead of {"k_proj": 16, "o_proj": 4}'
    ) in summary["reason"]


def test_a_patterned_adapter_merged_with_rslora_is_an_rslora_mismatch_at_each_rank(tiny, patterned, tmp_path):
    """c = √r with each layer's own r: √2, 2 and √8, no one scale."""
    code, summary = compare(tiny, patterned.adapter, patterned.taus["rslora"], tmp_path / "c")
    assert (code, summary["cause"], summary["causes"]) == (1, "rslora_mismatch", ["rslora_mismatch"]), summary
    assert "c = √r for each tensor's own r (2, 4, 8)" in summary["reason"]
    assert "the adapter says alpha/r, the merge used alpha/√r (rsLoRA)" in summary["reason"]
    assert "c from 1.41421 to 2.82843" in summary["reason"]


def test_a_patterned_rslora_adapter_merged_without_it_is_an_rslora_mismatch(tiny, patterned, tmp_path):
    code, summary = compare(tiny, patterned.says_rslora, patterned.taus["correct"], tmp_path / "c")
    assert (code, summary["cause"]) == (1, "rslora_mismatch"), summary
    assert "c = 1/√r for each tensor's own r (2, 4, 8)" in summary["reason"]


# --- the typed config


def test_absent_fields_take_peft_defaults(tmp_path):
    from peft import LoraConfig

    from common.lora.config import read_adapter_config

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    ours, peft = read_adapter_config(tmp_path / "adapter_config.json"), LoraConfig()
    for name in ("r", "lora_alpha", "use_rslora", "fan_in_fan_out", "use_dora", "lora_bias", "init_lora_weights"):
        assert getattr(ours, name) == getattr(peft, name), name
    for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern"):
        assert getattr(ours, name) is None and getattr(peft, name) is None, name
    assert dict(ours.rank_pattern) == peft.rank_pattern == {} and dict(ours.alpha_pattern) == peft.alpha_pattern
    assert ours.target_parameters is None and ours.trainable_token_indices is None
    assert ours.raw["task_type"] == "CAUSAL_LM"


def test_the_config_is_read_only(tiny):
    from dataclasses import FrozenInstanceError

    from common.lora.adapter import LoraAdapter

    config = LoraAdapter(tiny.adapter).config
    with pytest.raises(FrozenInstanceError):
        config.r = 2
    with pytest.raises(TypeError):
        config.raw["r"] = 2
    assert isinstance(config.target_modules, tuple | str)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_each_layer_has_the_rank_alpha_and_scaling_peft_gives_it(tiny, peft_adapters, use_rslora):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from common.lora.adapter import LoraAdapter

    adapter = peft_adapters(tiny.base, **PATTERNED, use_rslora=use_rslora)
    ours = LoraAdapter(adapter, tiny.base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny.base), adapter)
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == 8 and {ours.targets[f"{n}.weight"].module for n in layers} == set(layers)
    for module, layer in layers.items():
        scaling, target = ours.config.module_scaling(module), ours.targets[f"{module}.weight"]
        peft = (layer.r["default"], layer.lora_alpha["default"], layer.scaling["default"])
        assert (scaling.rank, scaling.alpha, scaling.scaling) == peft, module
        assert (target.rank, target.alpha, target.scaling) == peft, module
    assert {layer.r["default"] for layer in layers.values()} == {2, 4, 8}


# --- the changes, dispatched exhaustively


@dataclass(frozen=True)
class Unknown:
    """A change type the arithmetic does not know, shaped like trainable token rows (which it used to become)."""

    base_name: str
    key: str
    indices: tuple[int, ...]


def test_an_unknown_change_type_is_a_bug_not_token_rows(tiny):
    from common.lora.adapter import LoraAdapter
    from common.lora.arithmetic import apply_change, apply_changes, base_free_delta, is_base_free, product_magnitude

    adapter = LoraAdapter(tiny.adapter)
    target = next(iter(adapter.targets.values()))
    change = Unknown(target.base_name, target.key_a, (0,))
    weight = torch.zeros(target.shape)
    with pytest.raises(TypeError, match="Unknown"):
        apply_change(weight, change, adapter)
    with pytest.raises(TypeError, match="Unknown"):
        apply_changes(weight, [target, change], adapter)
    with pytest.raises(TypeError):
        is_base_free(change)
    with pytest.raises(TypeError):
        base_free_delta(change, adapter, torch.device("cpu"))
    with pytest.raises(TypeError):
        product_magnitude([change], adapter, weight)
    with pytest.raises(TypeError):
        adapter.expected_shape(change)


def test_the_pieces_of_a_parameter_share_one_delta_kept_for_the_last_parameter():
    from common.lora.adapter import PieceDeltas

    deltas, computed = PieceDeltas(), []

    def cut(name: str):
        return lambda: computed.append(name) or {f"{name}.0": torch.zeros(1), f"{name}.1": torch.ones(1)}

    cpu = torch.device("cpu")
    first = deltas.get("experts.w", torch.float64, cpu, cut("w"))
    assert deltas.get("experts.w", torch.float64, cpu, cut("w")) is first and computed == ["w"]
    deltas.get("experts.w", None, cpu, cut("w"))  # another dtype: computed once more, both kept
    assert deltas.get("experts.w", torch.float64, cpu, cut("w")) is first and computed == ["w", "w"]
    deltas.get("experts.v", torch.float64, cpu, cut("v"))  # another parameter: the first one's are dropped
    assert deltas.get("experts.w", torch.float64, cpu, cut("w")) is not first and computed == ["w", "w", "v", "w"]


def test_the_inputs_of_every_change_kind_are_named_and_an_unknown_kind_is_a_bug():
    """NaN tracing names the adapter tensors a change reads: an expert piece's factors, not an AttributeError."""
    from common.lora.adapter import ParameterPiece, ParameterTarget
    from common.lora.non_finite import change_keys

    target = ParameterTarget("m.experts.w", "m.experts.lora_A", "m.experts.lora_B", 2, 4.0, 2.0, (2, 3, 4), False)
    assert change_keys(ParameterPiece("m.experts.0.w", target, True)) == ["m.experts.lora_A", "m.experts.lora_B"]
    with pytest.raises(TypeError):
        change_keys(object())
