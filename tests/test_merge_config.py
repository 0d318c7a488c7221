"""The merge follows adapter_config.json as peft does: drawn configs against peft's own merge_and_unload.

peft builds LoRA layers from the config (target_modules as names, regexes or all-linear; layers_to_transform and
layers_pattern; exclude_modules; use_dora; lora_bias; fan_in_fan_out as the layer's type decides), then loads what
the adapter's file holds for them and leaves the rest out. Each draw takes a file holding every LoRA tensor peft can
save (DoRA magnitudes, LoRA biases), drops some of it, writes a drawn config beside it, and merges with both engines:
the outputs must be bitwise equal, or both refuse, or ours refuses for the one reason peft does not — layers the
config targets and the file lacks, which peft would merge with random or weight-moving initial factors.

A few draws in the everyday suite; MERGE_CONFIG_EXAMPLES (default 300) in the slow one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import build_peft_adapter, load_weights, run_main
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"]
UNTRAINED = "random or weight-moving initial factors"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def full_adapter(tiny, tmp_path_factory) -> Path:
    """Every LoRA tensor peft saves for the tiny StarCoder2's linear layers: factors, DoRA magnitudes, LoRA biases."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("full_adapter")
    folder = build_peft_adapter(tiny.base, root / "adapter", seed=11, r=4, target_modules=MODULES, use_dora=True)
    biased = build_peft_adapter(tiny.base, root / "biased", seed=12, r=4, target_modules=MODULES, lora_bias=True)
    tensors = load_file(folder / "adapter_model.safetensors")  # peft saves DoRA and lora_bias apart: one file here
    tensors |= {k: v for k, v in load_file(biased / "adapter_model.safetensors").items() if k.endswith(".bias")}
    save_file(tensors, folder / "adapter_model.safetensors", {"format": "pt"})
    return folder


@st.composite
def configs(draw) -> dict:
    names = st.lists(st.sampled_from(MODULES), min_size=1, max_size=4, unique=True)
    target = draw(
        st.one_of(
            names,
            st.sampled_from([r".*\.(q|v)_proj", r".*layers\.1\..*", r".*mlp\.c_.*", "all-linear", "ALL-LINEAR"]),
            st.just(["model.layers.0.self_attn.q_proj", "k_proj"]),
        )
        | st.just(["nope"])
    )
    config = {"target_modules": target, "r": 4, "lora_alpha": draw(st.sampled_from([4, 8, 16.5]))}
    layers = draw(st.sampled_from([None, None, None, 0, 1, [0], [1], [0, 1], []]))
    config["layers_to_transform"] = layers
    config["layers_pattern"] = draw(st.sampled_from([None, None, None, "layers", ["layers"], "h", ""]))
    config["exclude_modules"] = draw(st.one_of(st.none(), names, st.just(r".*\.0\.self_attn\.k_proj")))
    config["fan_in_fan_out"] = draw(st.booleans())
    config["use_dora"] = draw(st.booleans())
    config["lora_bias"] = draw(st.booleans())
    config["use_rslora"] = draw(st.booleans())
    config["init_lora_weights"] = draw(st.sampled_from([True, True, False, "gaussian"]))
    return config


@st.composite
def file_edits(draw) -> dict:
    """What the file loses: some modules entirely, the magnitudes, the biases."""
    layers = [f"model.layers.{i}.{'self_attn' if m.endswith('_proj') and m != 'c_proj' else 'mlp'}.{m}"
              for i in (0, 1) for m in MODULES]  # fmt: skip
    return {
        "drop_modules": draw(st.lists(st.sampled_from(layers), max_size=4, unique=True)),
        "drop_magnitudes": draw(st.booleans()),
        "drop_biases": draw(st.booleans()),
    }


def edited_adapter(source: Path, folder: Path, config: dict, edits: dict) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    for key in list(tensors):
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        if (
            module in edits["drop_modules"]
            or edits["drop_magnitudes"] and "lora_magnitude_vector" in key
            or edits["drop_biases"] and key.endswith("lora_B.bias")
        ):  # fmt: skip
            del tensors[key]
    save_file(tensors, folder / "adapter_model.safetensors", {"format": "pt"})
    saved = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(saved | config))
    return folder


def merge_both(base: Path, adapter: Path, out: Path, precision: str) -> dict:
    """The streaming merge as the README runs it, and peft alone (merge.merge_with_peft: transformers' load,
    PeftModel.from_pretrained, merge_and_unload, save_pretrained; none of this toolkit's checks of the adapter)."""
    from common.errors import UserError
    from common.lora.merge import merge_with_peft
    from common.numerics.precision import PRECISIONS

    args = ["--base_model", base, "--lora_path", adapter, "--output_dir", out / "stream", "--precision", precision]
    ours = run_main("merge_lora.py", *args, "--device", "cpu")
    (out / "peft").mkdir()
    torch.manual_seed(0)  # peft's initial factors for layers the file lacks: the same draw each time
    try:
        merge_with_peft(base, adapter, out / "peft", PRECISIONS[precision], torch.device("cpu"))
        peft = subprocess.CompletedProcess(["peft"], 0, "", "")
    except (UserError, ValueError, TypeError, KeyError, RuntimeError) as e:
        peft = subprocess.CompletedProcess(["peft"], 2, "", f"{type(e).__name__}: {e}")
    return {
        "stream": (ours, load_weights(out / "stream") if ours.returncode == 0 else None),
        "peft": (peft, load_weights(out / "peft") if peft.returncode == 0 else None),
    }


def check_against_peft(tiny, full_adapter: Path, config: dict, edits: dict, precision: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        adapter = edited_adapter(full_adapter, Path(tmp) / "adapter", config, edits)
        (ours, ours_weights), (peft, peft_weights) = merge_both(tiny.base, adapter, Path(tmp), precision).values()
    with contextlib.suppress(InvalidArgument):  # outside a drawn example (the parametrized cases): no statistics
        event(f"stream {ours.returncode}, peft {peft.returncode}")
    if ours.returncode == 0 and peft.returncode == 0:
        assert ours_weights.keys() == peft_weights.keys()
        differing = [name for name, tensor in peft_weights.items() if not torch.equal(tensor, ours_weights[name])]
        assert not differing, (config, edits, differing)
    elif ours.returncode == 2 and UNTRAINED in ours.stderr:  # peft's result depends on its initial draws
        assert config["init_lora_weights"] is False or config["use_dora"], (config, ours.stderr)
    elif ours.returncode == 2 and "its merge would be the base unchanged" in ours.stderr:
        assert peft.returncode == 0, peft.stderr
        dtype = PRECISIONS[precision]
        base = {name: tensor.to(dtype) for name, tensor in load_weights(tiny.base).items()}
        assert all(torch.equal(base[name], tensor) for name, tensor in peft_weights.items() if name in base)
    else:
        assert (ours.returncode, peft.returncode) == (2, 2), (config, edits, ours.stderr, peft.stderr)


EVERYDAY = settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SLOW = settings(
    max_examples=int(os.environ.get("MERGE_CONFIG_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


@EVERYDAY
@given(config=configs(), edits=file_edits())
def test_drawn_configs_merge_as_peft_merges(tiny, full_adapter, config, edits):
    check_against_peft(tiny, full_adapter, config, edits, "fp32")


@pytest.mark.slow
@SLOW
@given(config=configs(), edits=file_edits(), precision=st.sampled_from(["fp32", "bf16", "fp16"]))
def test_many_drawn_configs_merge_as_peft_merges(tiny, full_adapter, config, edits, precision):
    check_against_peft(tiny, full_adapter, config, edits, precision)


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ["q_proj"]},
        {"target_modules": r".*layers\.1\.self_attn\.(q|v)_proj"},
        {"layers_to_transform": [0]},
        {"layers_to_transform": 1, "layers_pattern": "layers"},
        {"exclude_modules": ["k_proj"]},
        {"fan_in_fan_out": True},
        {"use_dora": False},
        {"lora_bias": False},
    ],
    ids=[
        "narrower-list",
        "regex",
        "layers",
        "layer-and-pattern",
        "exclude",
        "fan-in-fan-out-on-linear",
        "magnitudes-without-dora",
        "biases-without-lora-bias",
    ],  # fmt: skip
)
def test_each_config_rule_as_peft_applies_it(tiny, full_adapter, config):
    """The cases the streaming merge used to get wrong, exit 0 (it merged every tensor of the file)."""
    check_against_peft(tiny, full_adapter, config, {"drop_modules": [], "drop_magnitudes": False,
                                                    "drop_biases": False}, "fp32")  # fmt: skip


def test_dora_without_magnitudes_takes_peft_s_initial_magnitude(tiny, full_adapter):
    """use_dora with no magnitude vectors in the file: peft's DoRA layer keeps its initial ‖W‖ per row (B₀ = 0)."""
    for precision in ("fp32", "bf16"):
        edits = {"drop_modules": [], "drop_magnitudes": True, "drop_biases": False}
        check_against_peft(tiny, full_adapter, {"use_dora": True, "init_lora_weights": True}, edits, precision)


def test_gpt2_fan_in_fan_out_follows_the_layer_not_the_config(tiny_gpt2, tmp_path):
    """peft sets fan_in_fan_out true on Conv1D layers and false on nn.Linear ones, whatever the config says."""
    adapter = build_peft_adapter(tiny_gpt2, tmp_path / "gpt2_adapter", seed=5, r=4,
                                 target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True)  # fmt: skip
    for claimed in (True, False):
        folder = tmp_path / f"claimed_{claimed}"
        shutil.copytree(adapter, folder)
        config = json.loads((folder / "adapter_config.json").read_text()) | {"fan_in_fan_out": claimed}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        (ours, ours_weights), (peft, peft_weights) = merge_both(
            tiny_gpt2, folder, tmp_path / str(claimed), "fp32"
        ).values()
        assert ours.returncode == peft.returncode == 0, ours.stderr + peft.stderr
        assert [n for n, t in peft_weights.items() if not torch.equal(t, ours_weights[n])] == [], claimed
