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
