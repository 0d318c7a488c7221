"""Benchmark: the whole analysis on StarCoder2-3B-shaped tensors (a benchmark, not a test).

Builds `lora_deltas.safetensors` and a task vector for 30 layers × q/k/v/o (q, o: 3072 × 3072; k, v:
256 × 3072), rank 16, the task vector made as an fp16 merge makes it (base and merged weight rounded
to fp16), then times `analyze_lora_vs_task_vector_math.py` on them and writes the figures to JSON.

    .venv/bin/python bench/analyze_starcoder2_shapes.py --work /tmp/analyze_bench --out bench/analyze.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.io.safetensors_io import SafetensorsWriter, TensorSpec  # noqa: E402

SHAPES = {"q_proj": (3072, 3072), "k_proj": (256, 3072), "v_proj": (256, 3072), "o_proj": (3072, 3072)}


def build(work: Path, layers: int, rank: int) -> tuple[Path, Path]:
    names = [(f"model.layers.{i}.self_attn.{m}.weight", s) for i in range(layers) for m, s in SHAPES.items()]
    specs = [TensorSpec(n, torch.float32, s) for n, s in names]
    deltas, task_vector = work / "lora_deltas.safetensors", work / "task_vector.safetensors"
    generator = torch.Generator().manual_seed(0)
    with (
        SafetensorsWriter(deltas, specs) as write_delta,
        SafetensorsWriter(task_vector, specs, {"finetuned_dtype": "fp16"}) as write_tau,
    ):
        for name, (m, n) in names:
            delta = (torch.randn(m, rank, generator=generator) @ torch.randn(rank, n, generator=generator)) * 2e-4
            weight = torch.randn(m, n, generator=generator) * 0.02
            merged = (weight.half().float() + delta).half()
            write_delta.write(name, delta)
            write_tau.write(name, merged.float() - weight)
    return deltas, task_vector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("/tmp/analyze_bench"))
    parser.add_argument("--out", type=Path, default=Path("bench/analyze_starcoder2_shapes.json"))
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    started = time.perf_counter()
    deltas, task_vector = build(args.work, args.layers, rank=16)
    built = time.perf_counter() - started
    command = [
        "/usr/bin/time", "-f", "%e %M", sys.executable, "analyze_lora_vs_task_vector_math.py",
        "--lora_file", str(deltas), "--task_vector_file", str(task_vector), "--output_dir", str(args.work / "out"),
        "--device", "cpu",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if result.returncode:
        sys.exit(result.stderr)
    wall, rss_kb = result.stderr.strip().splitlines()[-1].split()
    figures = {
        "tensors": 4 * args.layers,
        "build_s": round(built, 1),
        "analyze_wall_s": float(wall),
        "analyze_peak_rss_gb": round(int(rss_kb) / 1024**2, 2),
        "findings": json.loads((args.work / "out" / "analysis.json").read_text())["summary"]["findings"],
    }
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
