"""CUDA runs of the pipeline (run with `pytest -m gpu` on a GPU machine; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch
from conftest import load_weights, run_script

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_merge_matches_cpu_merge_within_one_rounding(tiny, pipeline, tmp_path, precision):
    out = tmp_path / "cuda"
    args = ["--base_model", tiny.base, "--lora_path", tiny.adapter, "--output_dir", out, "--precision", precision]
    result = run_script("merge_lora.py", *args, "--device", "cuda:0")
    assert result.returncode == 0, result.stderr
    cpu, cuda = load_weights(pipeline(precision).merged), load_weights(out)
    for name, tensor in cpu.items():
        # The matmul may take another kernel on the GPU: at most one rounding step apart.
        eps = torch.finfo(tensor.dtype).eps
        torch.testing.assert_close(cuda[name].float(), tensor.float(), rtol=2 * eps, atol=2 * eps * 1e-2)


def test_cuda_compare_and_analyze_agree_with_cpu(tiny, pipeline, tmp_path):
    tv = pipeline("fp32").task_vector_file
    args = ["--base_model", tiny.base, "--lora_path", tiny.adapter, "--task_vector_path", tv]
    assert (
        run_script(
            "compare_lora_task_vector.py", *args, "--output_dir", tmp_path / "c", "--device", "cuda:0"
        ).returncode
        == 0
    )
    args = ["--lora_file", tmp_path / "c" / "lora_deltas.safetensors", "--task_vector_file", tv]
    assert (
        run_script(
            "analyze_lora_vs_task_vector_math.py", *args, "--output_dir", tmp_path / "a", "--device", "cuda:0"
        ).returncode
        == 0
    )


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
