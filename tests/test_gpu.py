"""CUDA runs of the pipeline (run with `pytest -m gpu` on a GPU machine; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch
from conftest import load_weights, run_script

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_merge_is_within_the_rounding_bound_of_the_exact_delta(tiny, tmp_path, precision):
    """cuda:0's matmul may round B @ A otherwise than the CPU's (on an H200, 3 of 4096 fp32 elements of the tiny
    merge one rounding apart, 3.7e-9 where the element is 1.5e-3): no element-wise tolerance tied to the merged value
    holds. The CUDA merge's τ is checked against the exact Δ by the rounding bound instead, compared on the CPU and
    on cuda:0, and on cuda:0 it is bit for bit what compare's own merge there gives."""
    import compare_lora_task_vector
    import extract_task_vectors

    merged, tv = tmp_path / "cuda", tmp_path / "tv"
    args = ["--base_model", tiny.base, "--lora_path", tiny.adapter, "--output_dir", merged, "--precision", precision]
    result = run_script("merge_lora.py", *args, "--device", "cuda:0")
    assert result.returncode == 0, result.stderr
    args = ["--base_model", tiny.base, "--finetuned_model", merged, "--output_dir", tv, "--device", "cpu"]
    assert extract_task_vectors.main([str(a) for a in args]) == 0
    for device in ("cpu", "cuda:0"):
        out = tmp_path / device.replace(":", "")
        args = ["--base_model", tiny.base, "--lora_path", tiny.adapter, "--task_vector_path", tv]
        code = compare_lora_task_vector.main([str(a) for a in args] + ["--output_dir", str(out), "--device", device])
        report = __import__("json").loads((out / "comparison_report.json").read_text())
        assert code == (0 if precision == "fp32" else 1), report["summary"]
        adapted = [row for row in report["tensors"] if row["status"] in ("match", "mismatch")]
        assert len(adapted) == 8 and all(row["within_rounding"] for row in adapted), device
        if device == "cuda:0":
            assert all(row["reproduces_merge"] for row in adapted)


def test_cuda_compare_and_analyze_agree_with_cpu(tiny, pipeline, tmp_path):
    """The same verdict and, per tensor, the same figures on cuda:0 as on the CPU (Δ is float64 on both: they
    may differ in the last bits of a float64 matmul, far below what any report prints)."""
    import json

    import analyze_lora_vs_task_vector_math
    import compare_lora_task_vector

    tv = str(pipeline("fp16").task_vector_file)
    reports = {}
    for device in ("cpu", "cuda:0"):
        out = tmp_path / device.replace(":", "")
        args = ["--base_model", str(tiny.base), "--lora_path", str(tiny.adapter), "--task_vector_path", tv]
        code = compare_lora_task_vector.main([*args, "--output_dir", str(out / "c"), "--device", device])
        args = ["--lora_path", str(tiny.adapter), "--base_model", str(tiny.base), "--task_vector_file", tv]
        assert analyze_lora_vs_task_vector_math.main([*args, "--output_dir", str(out / "a"), "--device", device]) == 0
        compare = json.loads((out / "c" / "comparison_report.json").read_text())
        analysis = json.loads((out / "a" / "analysis.json").read_text())
        reports[device] = code, compare, analysis
    (cpu_code, cpu_compare, cpu_analysis), (cuda_code, cuda_compare, cuda_analysis) = reports["cpu"], reports["cuda:0"]
    assert cuda_code == cpu_code and cuda_compare["summary"]["reason"] == cpu_compare["summary"]["reason"]
    for cpu_row, cuda_row in zip(cpu_compare["tensors"], cuda_compare["tensors"], strict=True):
        assert cpu_row["name"] == cuda_row["name"] and cpu_row["status"] == cuda_row["status"]
        for field in ("within_rounding", "reproduces_merge"):
            assert cpu_row[field] == cuda_row[field], (cpu_row["name"], field)
        for field in ("cosine", "max_abs_diff", "rel_error", "scale", "max_diff_ulps"):
            if cpu_row[field] is not None:
                assert cuda_row[field] == pytest.approx(cpu_row[field], rel=1e-9, abs=1e-15), (cpu_row["name"], field)
    assert cuda_analysis["summary"]["findings"][:2] == cpu_analysis["summary"]["findings"][:2]
    for cpu_t, cuda_t in zip(cpu_analysis["tensors"], cuda_analysis["tensors"], strict=True):
        assert (cpu_t["rank_lora"], cpu_t["rank_task_vector"]) == (cuda_t["rank_lora"], cuda_t["rank_task_vector"])
        assert cuda_t["within_rounding"] == cpu_t["within_rounding"]
        assert cuda_t["rel_error"] == pytest.approx(cpu_t["rel_error"], rel=1e-9)
        assert cuda_t["residual_max_ulps"] == pytest.approx(cpu_t["residual_max_ulps"], rel=1e-9)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_merge_is_bitwise_peft_on_cuda(tiny, tmp_path, precision):
    """On the same device, the streaming merge and peft's merge_and_unload run the same kernels."""
    outputs = {}
    for engine in ("stream", "peft"):
        out = tmp_path / engine
        args = ["--base_model", tiny.base, "--lora_path", tiny.adapter, "--output_dir", out, "--precision", precision]
        result = run_script("merge_lora.py", *args, "--device", "cuda:0", "--engine", engine)
        assert result.returncode == 0, result.stderr
        outputs[engine] = load_weights(out)
    assert outputs["stream"].keys() == outputs["peft"].keys()
    for name, tensor in outputs["stream"].items():
        assert torch.equal(tensor, outputs["peft"][name]), name


def test_cuda_extract_is_bitwise_the_cpu_extract(tiny, pipeline, tmp_path):
    """A subtraction rounds the same on every device: τ from cuda:0 equals τ from the CPU bit for bit."""
    run = pipeline("fp16")
    args = ["--base_model", tiny.base, "--finetuned_model", run.merged, "--output_dir", tmp_path / "tv"]
    result = run_script("extract_task_vectors.py", *args, "--device", "cuda:0")
    assert result.returncode == 0, result.stderr
    cpu, cuda = load_weights(run.task_vectors), load_weights(tmp_path / "tv")
    assert cpu.keys() == cuda.keys()
    for name, tensor in cpu.items():
        assert torch.equal(tensor.view(torch.int32), cuda[name].view(torch.int32)), name


def test_cuda_check_logits_agrees_with_the_cpu(tiny, pipeline, tmp_path, qlora_merges):
    """--check_logits on cuda:0: the fp32 merge picks base + adapter's next token everywhere, as on the CPU; against
    the 4-bit reference quantized by bitsandbytes on CUDA, the merge into the (CPU-)dequantized base stays far closer
    than the bf16 merge. The figures are printed for the run's log."""
    import json

    import compare_lora_task_vector

    cases = {"fp32": (pipeline("fp32").task_vector_file, [])}
    qlora = ["--bnb_4bit_quant_type", "nf4", "--bnb_4bit_use_double_quant"]
    cases |= {f"qlora_{how}": (tv, qlora) for how, tv in qlora_merges.items()}
    figures = {}
    for device in ("cpu", "cuda:0"):
        for name, (tv, extra) in cases.items():
            out = tmp_path / f"{device.replace(':', '')}_{name}"
            args = ["--base_model", tiny.base, "--lora_path", tiny.adapter, "--task_vector_path", tv, *extra]
            args += ["--output_dir", out, "--device", device, "--check_logits"]
            compare_lora_task_vector.main([str(a) for a in args])
            figures[f"{device} {name}"] = json.loads((out / "comparison_report.json").read_text())["summary"]["logits"]
    print(json.dumps(figures, indent=1))
    fp32 = figures["cuda:0 fp32"]
    assert fp32["top1_agreement"] == 1.0 and fp32["continuations_identical"] == fp32["prompts"]
    assert fp32["max_abs_logit_diff"] < 1e-4
    assert figures["cuda:0 qlora_c"]["mean_kl"] * 10 < figures["cuda:0 qlora_a"]["mean_kl"]


@pytest.mark.parametrize("requantize", [False, True])
def test_cuda_qlora_merge_is_bitwise_the_real_path_on_cuda(tiny, tmp_path, requantize):
    """The QLoRA merge on cuda:0 quantizes with bitsandbytes' CUDA kernels (another deq(Q(W)) than the CPU's with
    double quantization: docs/gpu.md); it must equal transformers' 4-bit load + peft on cuda:0 bit for bit."""
    flags = ["--bnb_4bit_quant_type", "nf4", "--bnb_4bit_use_double_quant"] + ["--requantize"] * requantize
    outputs = {}
    for engine in ("stream", "peft"):
        out = tmp_path / engine
        args = ["--base_model", tiny.base, "--lora_path", tiny.adapter, "--output_dir", out, "--precision", "bf16"]
        result = run_script("merge_lora.py", *args, "--device", "cuda:0", "--engine", engine, *flags)
        assert result.returncode == 0, result.stderr
        outputs[engine] = load_weights(out)
    assert outputs["stream"].keys() == outputs["peft"].keys()
    assert [n for n, t in outputs["peft"].items() if not torch.equal(t, outputs["stream"][n])] == []
