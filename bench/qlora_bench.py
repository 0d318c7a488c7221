"""Benchmark: the QLoRA merge against the plain merge on the 30-layer StarCoder2-3B shape (12.1 GB at fp32).

Builds the checkpoint and a rank-16 LoRA on q/k/v/o (bench/streaming_bench.py's builder), then merges at bf16, each
in its own process under /usr/bin/time, `--repeats` rounds interleaved, medians reported:
- plain: merge_lora.py --precision bf16;
- qlora: the same with --bnb_4bit_quant_type nf4 --bnb_4bit_use_double_quant (every Linear weight but the head
  quantized and dequantized by bitsandbytes on the CPU: 180 matrices);
- quantize_4bit alone on one 3072×3072 and one 12288×3072 bf16 matrix (median of 5), the cost per matrix.
Deletes every file it wrote.

    .venv/bin/python bench/qlora_bench.py --out bench/qlora_merge_30_layers.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from full_scale import timed
from streaming_bench import build, fresh, report_out, round_robin


def quantize_seconds(shape: tuple[int, int]) -> float:
    import bitsandbytes.functional as functional

    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        functional.dequantize_4bit(packed, state)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sc2_qlora"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    py = sys.executable
    try:
        base, adapter = build(args.work / "model", args.layers)
        merge = [py, "merge_lora.py", "--base_model", base, "--lora_path", adapter, "--precision", "bf16"]
        qlora = ["--bnb_4bit_quant_type", "nf4", "--bnb_4bit_use_double_quant"]
        steps = {
            "plain": lambda i: timed(*merge, "--device", "cpu", "--output_dir", fresh(args.work / "plain")),
            "qlora": lambda i: timed(*merge, "--device", "cpu", *qlora, "--output_dir", fresh(args.work / "qlora")),
        }
        runs = round_robin(steps, args.repeats)
        report = {
            "layers": args.layers,
            "repeats": args.repeats,
            "runs": runs,
            "qlora_over_plain_wall": round(runs["qlora"]["wall_s"] / runs["plain"]["wall_s"], 2),
            "quantize_and_dequantize_s": {
                "3072x3072": quantize_seconds((3072, 3072)),
                "12288x3072": quantize_seconds((12288, 3072)),
            },  # fmt: skip
        }
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    report_out(report, args.out)


if __name__ == "__main__":
    main()
