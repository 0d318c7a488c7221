"""--export_lora on a full fine-tune: every changed tensor back as a peft adapter, loaded and merged by peft itself.

The full fine-tune is imitated on a tiny StarCoder2 (hidden 256: its matrices are 128–1024 wide): every linear
weight gets a rank-16 change plus full-rank noise, every bias, norm and the (tied) embedding change too.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import load_weights
from safetensors.torch import save_file

import analyze_lora_vs_task_vector_math as analyze
import extract_task_vectors

PLANTED_RANK = 16
NOISE = 1e-5


@pytest.fixture(scope="module")
def full_finetune(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base, finetuned, task vector file)."""
    from demo.tiny_models import build_base

    root = tmp_path_factory.mktemp("full_finetune")
    base = build_base(root / "base", num_layers=1, hidden_size=256)
    finetuned = root / "finetuned"
    shutil.copytree(base, finetuned, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    generator = torch.Generator().manual_seed(0)
    tensors = load_weights(base)
    for name, w in tensors.items():
        if w.dim() == 2 and "embed" not in name:
            m, n = w.shape
            low_rank = torch.randn(m, PLANTED_RANK, generator=generator) @ torch.randn(
                PLANTED_RANK, n, generator=generator
            )
            tensors[name] = w + 0.01 * low_rank / PLANTED_RANK + NOISE * torch.randn(m, n, generator=generator)
        else:
            tensors[name] = w + 0.01 * torch.randn(w.shape, generator=generator)
    save_file(tensors, finetuned / "model.safetensors", {"format": "pt"})
    args = ["--base_model", base, "--finetuned_model", finetuned, "--output_dir", root / "tv", "--device", "cpu"]
    assert extract_task_vectors.main([str(a) for a in args]) == 0
    return base, finetuned, root / "tv" / "task_vector.safetensors"


def export(tau: Path, out: Path, *flags: object) -> dict:
    args = ["--task_vector_file", tau, "--output_dir", out, "--device", "cpu", "--skip_plots", *flags]
    assert analyze.main([str(a) for a in args]) == 0
    text = (out / "analysis.json").read_text()
    return json.loads(text, parse_constant=lambda token: pytest.fail(f"analysis.json holds {token}"))


def peft_merged(base: Path, adapter: Path):
    """The exported adapter loaded by peft (no warning may be raised about it), and merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    ours = [str(w.message) for w in caught if "peft" in str(w.filename) and "checkpointing" not in str(w.message)]
    assert not ours, ours
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 3, 7, 100, 42, 5, 9, 300]])).logits


def test_every_tensor_comes_back_at_its_eckart_young_optimum(full_finetune, tmp_path):

    base, finetuned, tau = full_finetune
    report = export(tau, tmp_path / "a", "--base_model", base, "--export_lora", PLANTED_RANK)
    records = {t["name"]: t for t in report["export_lora"]["tensors"]}
    assert report["export_lora"]["skipped"] == {}
    assert {t["form"] for t in records.values()} == {"lora", "lora_bias", "copy"}
    merged = peft_merged(base, tmp_path / "a" / "exported_lora").merge_and_unload().state_dict()
    wanted, original = load_weights(finetuned), load_weights(base)
    for name, w in wanted.items():
        record = records[name]
        if record["form"] == "lora":
            tau_norm = (w.double() - original[name].double()).norm()
            error = float((merged[name].double() - w.double()).norm() / tau_norm)
            assert error == pytest.approx((1 - record["kept_energy"]) ** 0.5, rel=1e-6), name
        else:  # biases, norms and the embedding are the finetuned values, to the last fp32 rounding
            torch.testing.assert_close(merged[name], w, rtol=2e-7, atol=1e-9)
    assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])  # still tied


def test_at_full_rank_the_exported_adapter_is_the_finetuned_model(full_finetune, tmp_path):
    """The logits differ from the finetuned model's only by what the truncation leaves: none at full rank."""
    from transformers import AutoModelForCausalLM

    base, finetuned, tau = full_finetune
    report = export(tau, tmp_path / "a", "--base_model", base, "--export_lora", 1024)
    assert report["export_lora"]["kept_share"] == pytest.approx(1.0, abs=1e-12)
    model = peft_merged(base, tmp_path / "a" / "exported_lora")
    wanted = logits(AutoModelForCausalLM.from_pretrained(finetuned))
    torch.testing.assert_close(logits(model), wanted, rtol=1e-4, atol=1e-4)
    truncated = export(tau, tmp_path / "b", "--base_model", base, "--export_lora", 2)
    coarse = logits(peft_merged(base, tmp_path / "b" / "exported_lora"))
    assert (coarse - wanted).abs().max() > 10 * (logits(model) - wanted).abs().max()
    assert truncated["export_lora"]["kept_share"] < 1


def test_auto_rank_finds_the_planted_rank_above_the_noise(full_finetune, tmp_path):
    base, _, tau = full_finetune
    report = export(tau, tmp_path / "a", "--base_model", base, "--export_lora", "auto")
    ranks = [t["rank"] for t in report["export_lora"]["tensors"] if t["form"] == "lora"]
    assert ranks and set(ranks) == {PLANTED_RANK}
    config = json.loads((tmp_path / "a" / "exported_lora" / "adapter_config.json").read_text())
    assert config["r"] == PLANTED_RANK and 0 not in config["rank_pattern"].values()
    capped = export(tau, tmp_path / "b", "--base_model", base, "--export_lora", "auto", "--max_rank", 4)
    assert {t["rank"] for t in capped["export_lora"]["tensors"] if t["form"] == "lora"} == {4}


def test_without_the_base_biases_go_as_lora_bias_and_the_rest_is_listed_with_its_share(full_finetune, tmp_path):
    base, finetuned, tau = full_finetune
    report = export(tau, tmp_path / "a", "--export_lora", PLANTED_RANK)
    skipped = report["export_lora"]["skipped"]
    assert skipped and all("--base_model" in v["reason"] and v["share"] > 0 for v in skipped.values())
    assert any("norm" in name for name in skipped) and "model.embed_tokens.weight" in skipped
    config = json.loads((tmp_path / "a" / "exported_lora" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and not config["modules_to_save"]
    merged = peft_merged(base, tmp_path / "a" / "exported_lora").merge_and_unload().state_dict()
    wanted = load_weights(finetuned)
    biases = [n for n, t in wanted.items() if n.endswith(".bias") and "norm" not in n]
    assert biases and all(torch.allclose(merged[n], wanted[n], rtol=0, atol=1e-7) for n in biases)
    assert any("not exported" in line for line in report["summary"]["findings"])


def test_include_and_exclude_select_what_is_exported(full_finetune, tmp_path):
    base, _, tau = full_finetune
    report = export(
        tau, tmp_path / "a", "--base_model", base, "--export_lora", 4, "--export_include", r"self_attn",
        "--export_exclude", r"v_proj",
    )  # fmt: skip
    names = {t["name"] for t in report["export_lora"]["tensors"]}
    assert names and all("self_attn" in n and "v_proj" not in n for n in names)
    assert all("excluded" in v["reason"] for v in report["export_lora"]["skipped"].values())


def test_tau_alone_reports_the_rank_profile(full_finetune, tmp_path):
    _, _, tau = full_finetune
    args = ["--task_vector_file", tau, "--output_dir", tmp_path / "a", "--device", "cpu"]
    assert analyze.main([str(a) for a in args]) == 0
    report = json.loads((tmp_path / "a" / "analysis.json").read_text())
    matrices = report["task_vector_tensors"]
    assert matrices and all(m["energy_rank_90"] <= m["energy_rank_99"] for m in matrices)
    attention = [m for m in matrices if "self_attn" in m["name"]]
    assert all(m["energy_rank_99"] <= PLANTED_RANK + 1 for m in attention)  # the planted rank holds the energy
    assert (tmp_path / "a" / "task_vector_spectra.png").is_file()
    assert (tmp_path / "a" / "energy_rank_heatmap.png").is_file()


def test_one_step_from_the_two_models_writes_what_the_two_steps_write(full_finetune, tmp_path):
    """--finetuned_model: τ computed tensor by tensor in the analysis, the same fp32 τ and statuses as extract's
    file: the same analysis.json (its timings aside) and the same adapter, byte for byte."""
    base, finetuned, tau = full_finetune
    flags = ("--base_model", base, "--export_lora", PLANTED_RANK, "--intruder_k", 2)
    two_steps = export(tau, tmp_path / "a", *flags)
    args = ["--finetuned_model", finetuned, "--output_dir", tmp_path / "b", "--device", "cpu", "--skip_plots", *flags]
    assert analyze.main([str(a) for a in args]) == 0
    one_step = json.loads((tmp_path / "b" / "analysis.json").read_text())
    for report in (two_steps, one_step):
        report["export_lora"].pop("seconds")
    assert one_step == two_steps and one_step["export_lora"]["tensors"]
    adapter = "exported_lora/adapter_model.safetensors"
    assert (tmp_path / "a" / adapter).read_bytes() == (tmp_path / "b" / adapter).read_bytes()


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--finetuned_model", "FT"), "missing --base_model"),
        (("--finetuned_model", "FT", "--task_vector_file", "TV"), "--task_vector_file and --finetuned_model exclude"),
        ((), "missing --task_vector_file or --finetuned_model"),
    ],
)
def test_the_task_vector_comes_from_a_file_or_from_both_models(full_finetune, tmp_path, flags, message):
    from conftest import assert_user_error, run_main

    _, finetuned, tau = full_finetune
    named = {"FT": finetuned, "TV": tau}
    args = [named.get(flag, flag) for flag in flags]
    result = run_main("analyze_lora_vs_task_vector_math.py", *args, "--output_dir", tmp_path / "o")
    assert_user_error(result, message)
    assert not (tmp_path / "o").exists()
