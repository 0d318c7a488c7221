"""Tiny, real, offline Hugging Face models for the demo and the tests.

``build_base`` writes a 2-layer Starcoder2 causal LM (fp32, sharded safetensors, own BPE tokenizer);
``build_adapter`` trains a LoRA on it with a real ``transformers.Trainer`` (well under a second on CPU) and
writes the Trainer checkpoint folder (adapter plus optimizer/scheduler/rng/args pickles that tools must
never load). Everything is seeded and deterministic; nothing is downloaded.

CLI: ``python -m demo.tiny_models --out DIR [--seed S]`` builds ``DIR/base_model`` and ``DIR/checkpoint-5``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Starcoder2Config,
    Starcoder2ForCausalLM,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

__all__ = ["build_adapter", "build_base", "main"]

VOCAB_SIZE = 512
SEQ_LEN = 32
BATCH_SIZE = 4
PERTURB_STD = 0.02
MAX_SHARD_SIZE = "150KB"  # the fp32 checkpoint is ~0.5 MB for 2 layers -> 4 shards
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"  # ids 0, 1, 2

# Just enough Python for the BPE trainer to fill all VOCAB_SIZE ids, so every model id decodes.
_CORPUS = (
    "def add(a, b):\n    return a + b\n",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "import os\nimport sys\n\nprint(os.getcwd(), sys.argv)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "with open('data.txt') as f:\n    lines = [line.strip() for line in f]\n",
    "try:\n    value = int(text)\nexcept ValueError:\n    value = None\n",
    "def mean(values: list[float]) -> float:\n    return sum(values) / len(values) if values else 0.0\n",
    "async def fetch(session, url):\n"
    "    async with session.get(url) as response:\n"
    "        return await response.json()\n",
    "@dataclass\nclass Config:\n    name: str = 'tiny'\n    layers: int = 2\n    dropout: float = 0.1\n",
    "result = {key: value for key, value in items.items() if value is not None}\n",
    "while queue:\n    node = queue.pop(0)\n    visited.add(node)\n    queue.extend(graph[node] - visited)\n",
    "raise NotImplementedError(f'unsupported type: {type(obj).__name__}')\n",
    "assert torch.allclose(expected, actual, atol=1e-6), 'tensors differ'\n",
    "logger = logging.getLogger(__name__)\nlogger.info('loaded %d records from %s', count, path)\n",
)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch/numpy/python RNGs for the block and restore the caller's RNG states afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (<= VOCAB_SIZE tokens) on a few lines of Python, in memory."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=128,
    )


def build_base(out_dir: Path, *, num_layers: int = 2, seed: int = 0, hidden_size: int = 64) -> Path:
    """Write a tiny fp32 Starcoder2 (perturbed weights, sharded) plus its tokenizer to out_dir; return it.

    `hidden_size` (a multiple of 4 heads; MLP 4× wider) makes it larger, e.g. for memory measurements.
    """
    out_dir = Path(out_dir)
    tokenizer = _build_tokenizer()
    if len(tokenizer) > VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, model vocab is {VOCAB_SIZE}")
    config = Starcoder2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        use_bias=True,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype=torch.float32,
    )
    with _seeded(seed), torch.no_grad():
        model = Starcoder2ForCausalLM(config).to(torch.float32)
        # Init leaves LayerNorms at 1/0 and biases at 0: add noise everywhere so it looks "pretrained".
        for param in model.parameters():
            param.add_(PERTURB_STD * torch.randn(param.shape, dtype=param.dtype))
    model.save_pretrained(out_dir, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    steps: int = 5,
    seed: int = 0,
    use_rslora: bool = False,
) -> Path:
    """Train a LoRA on base_dir for `steps` Trainer steps, write the checkpoint folder out_dir; return it."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _seeded(seed):
        base = Starcoder2ForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        lora = LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            target_modules=list(target_modules),
            lora_dropout=0.0,
            use_rslora=use_rslora,
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():  # peft 0.21 probes a transformers-5-deprecated attribute
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(base, lora)  # lora_A init draws from the seeded torch RNG
        # Causal-LM data: a small seeded pool of random token sequences (ids 0-2 are the special tokens).
        pool = torch.randint(3, VOCAB_SIZE, (2 * BATCH_SIZE, SEQ_LEN))
        seqs = [pool[i % len(pool)] for i in range(steps * BATCH_SIZE)]
        rows = [{"input_ids": seq, "labels": seq} for seq in seqs]
        with tempfile.TemporaryDirectory(prefix=".tiny-trainer-", dir=out_dir.parent) as tmp:
            args = TrainingArguments(
                output_dir=tmp,
                max_steps=steps,
                per_device_train_batch_size=BATCH_SIZE,
                learning_rate=1e-2,
                logging_steps=1,
                save_strategy="steps",
                save_steps=steps,
                report_to="none",
                use_cpu=True,
                seed=seed,
                disable_tqdm=True,
                dataloader_num_workers=0,
            )
            trainer = Trainer(model=model, args=args, train_dataset=rows)  # type: ignore[arg-type]
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            out_dir.mkdir(exist_ok=True)
            for item in (Path(tmp) / f"checkpoint-{steps}").iterdir():
                shutil.move(item, out_dir / item.name)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: build DIR/base_model and DIR/checkpoint-5 and print both paths."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, LoRA init and data")
    args = parser.parse_args(argv)

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    out = args.out.resolve()  # absolute, so adapter_config.json's base_model_name_or_path is too
    base_dir = build_base(out / "base_model", seed=args.seed)
    ckpt_dir = build_adapter(base_dir, out / "checkpoint-5", steps=5, seed=args.seed)
    print(base_dir)
    print(ckpt_dir)
    print(f"built in {time.perf_counter() - start:.2f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
