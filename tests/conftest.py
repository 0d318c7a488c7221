"""Shared fixtures: a tiny real StarCoder2 base, LoRA adapters trained with peft, and pipeline outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
REPO = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run_script(script: str, *args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the four scripts as a user would, from the repo root."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_in_process(main, *args: object) -> tuple[int, str, str]:
    """A script's main run as its `__main__` runs it (`common.cli.run`: user errors become one line on stderr and
    exit code 2), in this process: (exit code, stdout, stderr). The signal handlers it installs are put back."""
    import contextlib
    import io
    import signal

    from common.cli import run

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
            run(main, [str(a) for a in args])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return exit_.value.code, out.getvalue(), err.getvalue()


def run_merge(base: Path, adapter: Path, out: Path, *extra: object) -> subprocess.CompletedProcess:
    """merge_lora.py as the README runs it, asserting success."""
    result = run_script("merge_lora.py", "--base_model", base, "--lora_path", adapter, "--output_dir", out, *extra)
    assert result.returncode == 0, result.stderr
    return result


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, exactly one line on stderr mentioning every fragment, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@dataclass
class Tiny:
    base: Path
    adapter: Path  # a Trainer-style checkpoint-5/ folder
    other_adapter: Path  # the same recipe, another seed: a wrong adapter for compare
    root: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    from demo.tiny_models import build_adapter, build_base

    root = tmp_path_factory.mktemp("tiny")
    base = build_base(root / "base_model")
    adapter = build_adapter(base, root / "checkpoint-5", seed=0)
    other = build_adapter(base, root / "other" / "checkpoint-5", seed=1)
    return Tiny(base=base, adapter=adapter, other_adapter=other, root=root)


@dataclass
class Pipeline:
    merged: Path
    task_vectors: Path

    @property
    def task_vector_file(self) -> Path:
        return self.task_vectors / "task_vector.safetensors"


@pytest.fixture(scope="session")
def pipeline(tiny: Tiny):
    """Merged model and task vector at a precision, built once per session through the scripts' mains."""
    import extract_task_vectors
    import merge_lora

    built: dict[str, Pipeline] = {}

    def get(precision: str) -> Pipeline:
        if precision not in built:
            merged = tiny.root / f"merged_{precision}"
            tvs = tiny.root / f"task_vectors_{precision}"
            merge_args = ["--base_model", tiny.base, "--lora_path", tiny.adapter, "--output_dir", merged]
            assert merge_lora.main([*map(str, merge_args), "--precision", precision, "--device", "cpu"]) == 0
            extract_args = ["--base_model", tiny.base, "--finetuned_model", merged, "--output_dir", tvs]
            assert extract_task_vectors.main([*map(str, extract_args), "--device", "cpu"]) == 0
            built[precision] = Pipeline(merged=merged, task_vectors=tvs)
        return built[precision]

    return get


def peft_merged_state_dict(base: Path, adapter: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The reference: transformers load at `dtype`, peft load, merge_and_unload, on CPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, through safetensors' own reader."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 (Conv1D layers, tied wte / lm_head), every tensor perturbed, saved as safetensors in fp32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


def build_peft_adapter(base: Path, out: Path, seed: int = 3, **lora_config) -> Path:
    """An adapter saved by peft itself, every trainable tensor (B, magnitudes, copies, token rows) randomised."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora_config),
    )
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param) * (param.abs().mean() + 0.1))
    model.save_pretrained(out)
    return out
