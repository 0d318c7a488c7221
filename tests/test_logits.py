"""compare --check_logits: the merged model against base + adapter unmerged (peft's PeftModel), on the same tokens."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from conftest import assert_user_error, run_main

from common.compare.logits import CONTINUATION, default_sequences


def check(tiny, tmp_path, task_vectors, *extra, name="cmp"):
    out = tmp_path / name
    args = ["--base_model", tiny.base, "--lora_path", tiny.adapter, "--task_vector_path", task_vectors]
    args += ["--output_dir", out, "--device", "cpu", "--check_logits"]
    result = run_main("compare_lora_task_vector.py", *args, *extra)
    report = json.loads((out / "comparison_report.json").read_text()) if result.returncode in (0, 1) else None
    return result, report, out


def test_fp32_merge_agrees_everywhere_at_float_noise(tiny, tmp_path, pipeline):
    result, report, out = check(tiny, tmp_path, pipeline("fp32").task_vector_file)
    assert result.returncode == 0, result.stderr
    logits = report["summary"]["logits"]
    assert logits["prompts"] == 8 and logits["positions"] == 8 * (128 - CONTINUATION)  # the tiny model: 128 positions
    assert logits["top1_agreement"] == 1.0 and logits["continuations_identical"] == 8
    assert logits["max_abs_logit_diff"] < 1e-5 and logits["max_kl"] < 1e-10
    assert "picks the same next token as base + adapter at 896/896 positions" in result.stdout
    with open(out / "logit_comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(int(r["top1_agree"]) == int(r["positions"]) == 112 for r in rows)


def test_fp16_merge_has_a_small_nonzero_kl_and_the_figures_are_peft_s(tiny, tmp_path, pipeline):
    """The figures against an independent computation: peft's unmerged model and transformers' load of the merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = pipeline("fp16")
    result, report, out = check(tiny, tmp_path, run.task_vector_file)
    assert result.returncode == 1, result.stderr  # the verdict stays the weight-level one: an fp16 merge, exit 1
    logits = report["summary"]["logits"]
    assert 0 < logits["mean_kl"] < 1e-6 and 0 < logits["max_abs_logit_diff"] < 1e-2
    assert logits["reference"] == "base + adapter unmerged at fp16"
    ids = default_sequences(512, 128)[0][None]
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny.base, dtype=torch.float16)
        reference = PeftModel.from_pretrained(base, tiny.adapter).eval()(input_ids=ids).logits[0].float()
        merged = AutoModelForCausalLM.from_pretrained(run.merged, dtype=torch.float16).eval()(input_ids=ids).logits
    merged = merged[0].float()
    log_p, log_q = reference.double().log_softmax(-1), merged.double().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    with open(out / "logit_comparison.csv") as f:
        first = next(csv.DictReader(f))
    assert float(first["max_abs_logit_diff"]) == float((merged - reference).abs().max())
    assert float(first["mean_kl"]) == pytest.approx(float(kl.mean()), rel=1e-9, abs=1e-18)
    assert int(first["top1_agree"]) == int((merged.argmax(-1) == reference.argmax(-1)).sum())


def test_the_base_as_merged_model_agrees_clearly_less(tiny, tmp_path):
    """A "merged" model that is the base: τ = 0, compare says not_merged, and the logits disagree widely."""
    tv = tmp_path / "tv"
    args = ["--base_model", tiny.base, "--finetuned_model", tiny.base, "--output_dir", tv, "--device", "cpu"]
    assert run_main("extract_task_vectors.py", *args).returncode == 0
    result, report, _ = check(tiny, tmp_path, tv / "task_vector.safetensors")
    assert result.returncode == 1 and report["summary"]["cause"] == "not_merged"
    logits = report["summary"]["logits"]
    assert logits["top1_agreement"] < 0.9 and logits["mean_kl"] > 1e-4
    assert "differs in its next token from base + adapter at" in result.stdout


def test_prompts_file_is_tokenized_with_the_base_tokenizer(tiny, tmp_path, pipeline):
    from transformers import AutoTokenizer

    prompts = tmp_path / "prompts.txt"
    lines = ["def add(a, b):\n", "\n", "for i in range(10):\n"]
    prompts.write_text("".join(lines))
    result, report, out = check(tiny, tmp_path, pipeline("fp32").task_vector_file, "--prompts", prompts)
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(tiny.base)
    counts = [len(tokenizer(line.strip("\n"))["input_ids"]) for line in lines if line.strip()]
    logits = report["summary"]["logits"]
    assert logits["prompts"] == 2 and logits["positions"] == sum(counts)
    assert logits["inputs"] == f"2 prompts from {prompts}"


def test_qlora_merge_into_the_dequantized_base_behaves_like_the_trained_model(tiny, tmp_path, qlora_merges):
    """Against the 4-bit reference (as the adapter was trained), the merge into deq(Q(W)) is far closer than the
    merge into the bf16 base, which carries NF4's whole quantization error."""
    figures = {}
    for how, tv in qlora_merges.items():
        extra = ["--bnb_4bit_quant_type", "nf4", "--bnb_4bit_use_double_quant"]
        result, report, _ = check(tiny, tmp_path, tv, *extra, name=how)
        assert result.returncode in (0, 1), result.stderr
        figures[how] = report["summary"]["logits"]
    assert figures["c"]["reference"].startswith("base + adapter unmerged, base 4-bit (nf4, double quantization")
    assert figures["c"]["mean_kl"] * 100 < figures["a"]["mean_kl"]
    assert figures["c"]["max_abs_logit_diff"] * 10 < figures["a"]["max_abs_logit_diff"]
    assert figures["c"]["top1_agreement"] > figures["a"]["top1_agreement"]


def test_bad_logit_check_inputs_are_one_line(tiny, tmp_path, pipeline):
    tv = pipeline("fp32").task_vector_file
    args = ["--lora_path", tiny.adapter, "--task_vector_path", tv, "--output_dir", tmp_path / "x"]
    result = run_main("compare_lora_task_vector.py", *args, "--check_logits")
    assert_user_error(result, "--check_logits needs --base_model")
    result = run_main("compare_lora_task_vector.py", *args, "--prompts", tmp_path / "p.txt")
    assert_user_error(result, "--prompts is for --check_logits")
    result, *_ = check(tiny, tmp_path, tv, "--bnb_4bit_use_double_quant")
    assert_user_error(result, "--bnb_4bit_use_double_quant needs --bnb_4bit_quant_type")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    result, *_ = check(tiny, tmp_path, tv, "--prompts", empty)
    assert_user_error(result, "no prompts in it")
    assert not (tmp_path / "cmp").exists()


def test_prompts_without_a_tokenizer_are_refused(tiny, tmp_path, pipeline):
    base = tmp_path / "bare_base"
    base.mkdir()
    for item in tiny.base.iterdir():
        if item.suffix in (".safetensors", ".json") and not item.name.startswith(("tokenizer", "special")):
            shutil.copy(item, base)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f():\n")
    args = ["--base_model", base, "--lora_path", tiny.adapter, "--output_dir", tmp_path / "x", "--check_logits"]
    tv = pipeline("fp32").task_vector_file
    result = run_main("compare_lora_task_vector.py", *args, "--task_vector_path", tv, "--prompts", prompts)
    assert_user_error(result, "--prompts needs the base's tokenizer", "leave out --prompts")


def test_a_merged_model_other_than_tau_s_is_refused(tiny, tmp_path, pipeline):
    """The logits must judge the model the weights were compared from: τ's header fingerprint decides."""
    result, *_ = check(tiny, tmp_path, pipeline("fp32").task_vector_file, "--finetuned_model", pipeline("fp16").merged)
    assert_user_error(result, "is not the model", "was extracted from")


def test_a_merged_model_of_another_architecture_is_refused(tiny, tmp_path, pipeline, tiny_gpt2):
    result, *_ = check(tiny, tmp_path, pipeline("fp32").task_vector_file, "--finetuned_model", tiny_gpt2)
    assert_user_error(result, "has another architecture than the base", "gpt2")


def test_the_merged_model_recorded_in_tau_must_exist(tiny, tmp_path, pipeline):
    copy, tv = tmp_path / "merged_copy", tmp_path / "tv_copy"
    shutil.copytree(pipeline("fp32").merged, copy)
    args = ["--base_model", tiny.base, "--finetuned_model", copy, "--output_dir", tv, "--device", "cpu"]
    assert run_main("extract_task_vectors.py", *args).returncode == 0
    shutil.rmtree(copy)
    result, *_ = check(tiny, tmp_path, tv / "task_vector.safetensors")
    assert_user_error(result, "merged_copy", "τ's header records it", "give --finetuned_model")
