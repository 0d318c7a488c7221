"""extract_task_vectors.py: τ = finetuned − base bit for bit, and the exact classification of every tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import assert_user_error, load_weights, run_script
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.adapter import LoraAdapter


def stats_of(pipeline) -> dict:
    return json.loads((pipeline.task_vectors / "task_vector_stats.json").read_text())


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_task_vector_is_finetuned_minus_base_bitwise(tiny, pipeline, precision):
    run = pipeline(precision)
    base, finetuned = load_weights(tiny.base), load_weights(run.merged)
    task_vector = load_file(run.task_vector_file)
    assert task_vector.keys() == base.keys()
    for name, tau in task_vector.items():
        assert tau.dtype == torch.float32
        assert torch.equal(tau, finetuned[name].float() - base[name].float()), name


def test_fp32_merge_changes_exactly_the_lora_targets(tiny, pipeline):
    stats = stats_of(pipeline("fp32"))
    targets = set(LoraAdapter(tiny.adapter).targets)
    changed = {t["name"] for t in stats["tensors"] if t["status"] == "changed"}
    assert changed == targets and len(targets) == 8
    assert all(t["status"] == "unchanged" for t in stats["tensors"] if t["name"] not in targets)
    assert stats["summary"]["changed"] == 8 and stats["summary"]["unchanged"] == len(stats["tensors"]) - 8


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_merge_makes_every_other_tensor_a_rounding_artifact(tiny, pipeline, precision):
    stats = stats_of(pipeline(precision))
    targets = set(LoraAdapter(tiny.adapter).targets)
    for entry in stats["tensors"]:
        assert entry["status"] == ("changed" if entry["name"] in targets else "rounding_artifact"), entry["name"]
        assert entry["norm"] > 0
    assert stats["summary"]["finetuned_dtype"] == precision and stats["summary"]["base_dtype"] == "fp32"


def test_screen_summary_and_header_metadata(tiny, tmp_path, pipeline):
    out = tmp_path / "tv"
    result = run_script(
        "extract_task_vectors.py",
        "--base_model",
        tiny.base,
        "--finetuned_model",
        pipeline("fp16").merged,
        "--output_dir",
        out,
    )
    assert result.returncode == 0, result.stderr
    assert "35 tensors: 8 changed, 27 rounding artifacts (fp32 base -> fp16 finetuned), 0 unchanged" in result.stdout
    with safe_open(out / "task_vector.safetensors", "pt") as f:
        metadata = f.metadata()
    assert metadata["finetuned_dtype"] == "fp16" and metadata["compute_dtype"] == "fp32"
    assert metadata["base_model"] == str(tiny.base)


def test_a_change_outside_the_adapter_is_classified_changed(tiny, tmp_path, pipeline):
    """A full fine-tune of one tensor on top of the merge: it must be reported as changed."""
    finetuned = tmp_path / "finetuned"
    shutil.copytree(pipeline("fp16").merged, finetuned)
    shard = finetuned / "model.safetensors"
    weights = load_file(shard)
    weights["model.norm.bias"] = weights["model.norm.bias"] + 0.5
    save_file(weights, shard, metadata={"format": "pt"})
    out = tmp_path / "tv"
    args = ["--base_model", tiny.base, "--finetuned_model", finetuned, "--output_dir", out]
    assert run_script("extract_task_vectors.py", *args).returncode == 0
    stats = {t["name"]: t for t in json.loads((out / "task_vector_stats.json").read_text())["tensors"]}
    assert stats["model.norm.bias"]["status"] == "changed"
    assert stats["model.norm.weight"]["status"] == "rounding_artifact"


def test_missing_tensor_is_reported_not_crashed_on(tiny, tmp_path, pipeline):
    finetuned = tmp_path / "finetuned"
    shutil.copytree(pipeline("fp32").merged, finetuned)
    weights = load_file(finetuned / "model.safetensors")
    del weights["model.norm.bias"]
    weights["extra.weight"] = torch.ones(3)
    save_file(weights, finetuned / "model.safetensors")
    out = tmp_path / "tv"
    args = ["--base_model", tiny.base, "--finetuned_model", finetuned, "--output_dir", out]
    result = run_script("extract_task_vectors.py", *args)
    assert result.returncode == 0, result.stderr
    stats = json.loads((out / "task_vector_stats.json").read_text())
    assert stats["only_in_base"] == ["model.norm.bias"] and stats["only_in_finetuned"] == ["extra.weight"]
    assert "1 tensors only in the base" in result.stdout
    assert "model.norm.bias" not in load_file(out / "task_vector.safetensors")


def test_config_file_with_command_line_override(tiny, tmp_path, pipeline):
    config = tmp_path / "config.yml"
    config.write_text(
        f"base_model: {tiny.base}\nfinetuned_model: {pipeline('fp32').merged}\n"
        f"output_dir: {tmp_path / 'from_config'}\ntrust_remote_code: false\n"
    )
    args = ["--config", config, "--output_dir", tmp_path / "from_flag", "--trust_remote_code", "false"]
    result = run_script("extract_task_vectors.py", *args)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "from_flag" / "task_vector.safetensors").is_file()
    assert not (tmp_path / "from_config").exists()


def test_shipped_example_config_names_only_known_flags(tmp_path):
    import yaml

    import extract_task_vectors

    example = yaml.safe_load(open(extract_task_vectors.__file__.replace(".py", "_config.yml")))
    assert {"base_model", "finetuned_model", "output_dir"} <= set(example)
    # Loading it must get past config validation to the (absent) models: a path error, not a config error.
    result = run_script(
        "extract_task_vectors.py", "--config", "extract_task_vectors_config.yml", "--base_model", tmp_path / "x"
    )
    assert_user_error(result, "no such file or folder")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("base_model: a\nlearning_rate: 3\n", "unknown key 'learning_rate'"),
        ("base_model: a\ntrust_remote_code: maybe\n", "trust_remote_code must be true or false"),
        ("base_model: [a, b]\n", "base_model must be a single value"),
        ("base_model: a\n  bad: indent\n", "invalid YAML"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, text, fragment):
    config = tmp_path / "bad.yml"
    config.write_text(text)
    assert_user_error(run_script("extract_task_vectors.py", "--config", config), fragment)


def test_different_architectures_are_refused(tiny, tmp_path, pipeline):
    other = tmp_path / "other"
    shutil.copytree(pipeline("fp32").merged, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(config))
    args = ["--base_model", tiny.base, "--finetuned_model", other, "--output_dir", tmp_path / "tv"]
    assert_user_error(run_script("extract_task_vectors.py", *args), "not the same architecture")
