"""extract_task_vectors.py: τ = finetuned − base bit for bit, and the exact classification of every tensor."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import assert_user_error, load_weights, run_main, run_merge
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.lora.adapter import LoraAdapter


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
    result = run_main(
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


def extract(tiny, finetuned, out, *extra, base=None):
    args = ["--base_model", base or tiny.base, "--finetuned_model", finetuned, "--output_dir", out, *extra]
    result = run_main("extract_task_vectors.py", *args)
    assert result.returncode == 0, result.stderr
    stats = json.loads((out / "task_vector_stats.json").read_text())
    return result, stats, {t["name"]: t for t in stats["tensors"]}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_full_finetune_of_one_mlp_layer_is_changed(tiny, tmp_path, pipeline, precision):
    """A tensor trained outside the adapter (on top of the merge) must be reported as changed, exactly."""
    finetuned = tmp_path / "finetuned"
    shutil.copytree(pipeline(precision).merged, finetuned)
    weights = load_file(finetuned / "model.safetensors")
    name = "model.layers.1.mlp.c_fc.weight"
    weights[name][:10] += 0.25
    save_file(weights, finetuned / "model.safetensors", metadata={"format": "pt"})
    _, _, by_name = extract(tiny, finetuned, tmp_path / "tv")
    assert by_name[name]["status"] == "changed"
    assert by_name[name]["elements_beyond_rounding"] == 10 * weights[name].shape[1]
    other = "model.layers.1.mlp.c_proj.weight"
    assert by_name[other]["status"] == ("unchanged" if precision == "fp32" else "rounding_artifact")
    assert by_name[other]["elements_beyond_rounding"] == 0


def test_lora_targets_count_every_element_beyond_rounding(tiny, pipeline):
    stats = stats_of(pipeline("fp16"))
    base, finetuned = load_weights(tiny.base), load_weights(pipeline("fp16").merged)
    for entry in stats["tensors"]:
        name = entry["name"]
        expected = int((finetuned[name] != base[name].to(torch.float16)).sum())
        assert entry["elements_beyond_rounding"] == expected, name


def test_fp64_compute_dtype(tiny, tmp_path, pipeline):
    extract(tiny, pipeline("fp16").merged, tmp_path / "tv", "--compute_dtype", "fp64")
    task_vector = load_file(tmp_path / "tv" / "task_vector.safetensors")
    base, finetuned = load_weights(tiny.base), load_weights(pipeline("fp16").merged)
    for name, tau in task_vector.items():
        assert tau.dtype == torch.float64 and torch.equal(tau, finetuned[name].double() - base[name].double())


def test_shards_with_an_index_and_compare_reads_them(tiny, tmp_path, pipeline):
    out = tmp_path / "tv"
    result, _, _ = extract(tiny, pipeline("fp32").merged, out, "--shard_size", "40KB")
    index = json.loads((out / "task_vector.safetensors.index.json").read_text())
    shards = sorted(out.glob("task_vector-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert "task_vector.safetensors.index.json" in result.stdout
    reference = load_file(pipeline("fp32").task_vector_file)
    sharded = {k: v for shard in shards for k, v in load_file(shard).items()}
    assert sharded.keys() == reference.keys() and all(torch.equal(sharded[k], reference[k]) for k in reference)
    for path in (out, out / "task_vector.safetensors.index.json"):
        args = ["--lora_path", tiny.adapter, "--task_vector_path", path, "--output_dir", tmp_path / f"cmp_{path.name}"]
        assert run_main("compare_lora_task_vector.py", *args).returncode == 0


def test_skip_unchanged_keeps_only_the_changes(tiny, tmp_path, pipeline):
    result, stats, by_name = extract(tiny, pipeline("fp32").merged, tmp_path / "tv", "--skip_unchanged")
    kept = load_file(tmp_path / "tv" / "task_vector.safetensors")
    assert set(kept) == set(LoraAdapter(tiny.adapter).targets)
    assert stats["summary"]["skipped_unchanged"] == 27 and "27 unchanged tensors left out" in result.stdout
    assert all(by_name[n]["skipped"] == (n not in kept) for n in by_name)
    full = load_file(pipeline("fp32").task_vector_file)
    assert all(torch.equal(kept[n], full[n]) for n in kept)
    args = ["--lora_path", tiny.adapter, "--task_vector_path", tmp_path / "tv" / "task_vector.safetensors"]
    assert run_main("compare_lora_task_vector.py", *args, "--output_dir", tmp_path / "cmp").returncode == 0


def test_resized_vocabulary_is_reported_or_truncated(tiny, tmp_path, pipeline):
    finetuned = tmp_path / "finetuned"
    shutil.copytree(pipeline("fp32").merged, finetuned)
    weights = load_file(finetuned / "model.safetensors")
    name = "model.embed_tokens.weight"
    weights[name] = torch.cat([weights[name], torch.randn(8, weights[name].shape[1])])
    save_file(weights, finetuned / "model.safetensors", metadata={"format": "pt"})
    result, stats, by_name = extract(tiny, finetuned, tmp_path / "strict")
    assert name not in by_name and stats["shape_mismatch"] == [f"{name} [512, 64] vs [520, 64]"]
    assert "1 tensors with different shapes, not in the task vector" in result.stdout
    _, stats, by_name = extract(tiny, finetuned, tmp_path / "overlap", "--allow_shape_mismatch")
    assert by_name[name]["status"] == "unchanged" and by_name[name]["shape"] == [512, 64]
    assert "first 512 rows compared" in stats["shape_mismatch"][0]


def test_output_head_tied_in_one_model_only(tiny, tmp_path, peft_adapters):
    """Our merge unties the head for an embedding LoRA: its τ is taken against the base's tied embedding."""
    adapter = peft_adapters(tiny.base, r=4, target_modules=["embed_tokens", "q_proj"])
    merged = tmp_path / "merged"
    run_merge(tiny.base, adapter, merged)
    _, stats, by_name = extract(tiny, merged, tmp_path / "tv")
    assert stats["tied"] == ["lm_head.weight: the base ties it to model.embed_tokens.weight"]
    assert by_name["lm_head.weight"]["status"] == "unchanged"  # the head keeps the base embedding
    assert by_name["model.embed_tokens.weight"]["status"] == "changed"
    assert stats["only_in_finetuned"] == []
    # And the other way round: the untied model as the base, the tied one as finetuned.
    _, stats, by_name = extract(tiny, tiny.base, tmp_path / "reverse", base=merged)
    assert stats["tied"] == ["lm_head.weight: the finetuned model ties it to model.embed_tokens.weight"]
    assert by_name["lm_head.weight"]["status"] == "unchanged" and stats["only_in_base"] == []


def test_missing_tensor_is_reported_not_crashed_on(tiny, tmp_path, pipeline):
    finetuned = tmp_path / "finetuned"
    shutil.copytree(pipeline("fp32").merged, finetuned)
    weights = load_file(finetuned / "model.safetensors")
    del weights["model.norm.bias"]
    weights["extra.weight"] = torch.ones(3)
    save_file(weights, finetuned / "model.safetensors")
    out = tmp_path / "tv"
    args = ["--base_model", tiny.base, "--finetuned_model", finetuned, "--output_dir", out]
    result = run_main("extract_task_vectors.py", *args)
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
    result = run_main("extract_task_vectors.py", *args)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "from_flag" / "task_vector.safetensors").is_file()
    assert not (tmp_path / "from_config").exists()


def test_shipped_example_config_names_only_known_flags(tmp_path):
    import yaml

    import extract_task_vectors

    example = yaml.safe_load(open(extract_task_vectors.__file__.replace(".py", "_config.yml")))
    assert {"base_model", "finetuned_model", "output_dir"} <= set(example)
    # Loading it must get past config validation to the (absent) models: a path error, not a config error.
    result = run_main(
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
    assert_user_error(run_main("extract_task_vectors.py", "--config", config), fragment)


def test_different_architectures_are_refused(tiny, tmp_path, pipeline):
    other = tmp_path / "other"
    shutil.copytree(pipeline("fp32").merged, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(config))
    args = ["--base_model", tiny.base, "--finetuned_model", other, "--output_dir", tmp_path / "tv"]
    assert_user_error(run_main("extract_task_vectors.py", *args), "not the same architecture")


def test_negative_zero_differences_are_kept_and_zero_tensors_are_holes(tmp_path):
    """τ of (−0.0) − (+0.0) is −0.0: written, not left as a hole that reads back +0.0; all-zero chunks are holes."""
    base = {"a.weight": torch.zeros(512, 1024), "b.weight": torch.randn(4, 4)}
    finetuned = {"a.weight": torch.zeros(512, 1024), "b.weight": base["b.weight"].clone()}
    base["b.weight"][0, 0], finetuned["b.weight"][0, 0] = 0.0, -0.0
    for name, tensors in (("base", base), ("finetuned", finetuned)):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
    args = ["--base_model", tmp_path / "base", "--finetuned_model", tmp_path / "finetuned"]
    result = run_main("extract_task_vectors.py", *args, "--output_dir", tmp_path / "tv")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "tv" / "task_vector.safetensors"
    tau = load_file(path)
    assert tau["b.weight"][0, 0].signbit() and torch.equal(tau["b.weight"], finetuned["b.weight"] - base["b.weight"])
    assert not torch.count_nonzero(tau["a.weight"].view(torch.int32))
    assert path.stat().st_blocks * 512 < path.stat().st_size - 1024 * 1024  # a.weight (2 MiB) is a hole


@pytest.mark.parametrize("how", ["replaced", "rewritten", "removed"])
def test_an_input_changed_during_the_run_is_refused(tiny, tmp_path, pipeline, monkeypatch, how):
    """A merge with --overwrite finishing while extract reads the finetuned model: the τ would mix two models.
    Every file is read through the descriptor opened at the start, and checked before the output is published."""
    import extract_task_vectors

    finetuned = tmp_path / "finetuned"
    shutil.copytree(pipeline("fp32").merged, finetuned)
    shard = sorted(finetuned.glob("*.safetensors"))[-1]
    original = extract_task_vectors.extract_task_vector

    def change_then_extract(*args, **kwargs):
        if how == "replaced":  # as a publishing merge does: a new file renamed over the old one
            replacement = tmp_path / "new.safetensors"
            shutil.copyfile(shard, replacement)
            os.replace(replacement, shard)
        elif how == "rewritten":
            with open(shard, "r+b") as f:
                f.seek(-4, os.SEEK_END)
                f.write(b"\x00\x00\x80\x7f")
        else:
            shard.unlink()
        return original(*args, **kwargs)

    monkeypatch.setattr(extract_task_vectors, "extract_task_vector", change_then_extract)
    args = [
        "--base_model",
        tiny.base,
        "--finetuned_model",
        finetuned,
        "--output_dir",
        tmp_path / "tv",
        "--device",
        "cpu",
    ]
    result = run_main("extract_task_vectors.py", *args)
    assert_user_error(result, str(shard), "input changed during the run")
    assert not (tmp_path / "tv").exists() and not list(tmp_path.glob(".tv.*"))
