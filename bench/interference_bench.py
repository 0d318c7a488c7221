"""Benchmark: analyze over three task vectors of the StarCoder2-3B shape (issue: do they interfere?).

Writes three dense random τ files of `--layers` layers (every tensor changed, as a full fine-tune's; fp32, 12.1 GB
each at 30 layers), then runs `analyze_lora_vs_task_vector_math.py --task_vector_file T1 T2 T3` in its own process
under /usr/bin/time: wall seconds and peak RSS. Deletes every file it wrote.

    .venv/bin/python bench/interference_bench.py --layers 30 --out bench/interference_30_layers.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from full_scale import timed
from streaming_bench import REPO, fresh, report_out, tensor_shapes, write_random


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path("/tmp/interference_bench"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = fresh(args.work)
    work.mkdir(parents=True)
    try:
        files = []
        for seed in (1, 2, 3):
            path = work / f"tv_{seed}" / "task_vector.safetensors"
            path.parent.mkdir()
            write_random(path, tensor_shapes(args.layers), 1e-3, seed=seed)
            files.append(path)
        out = work / "report"
        py = sys.executable
        run = timed(py, REPO / "analyze_lora_vs_task_vector_math.py", "--task_vector_file", *files,
                    "--output_dir", out, "--device", "cpu")  # fmt: skip
        report = json.loads((out / "interference.json").read_text())
        report_out(
            {
                "layers": args.layers,
                "inputs": 3,
                "task_vector_gb": round(os.path.getsize(files[0]) / 1e9, 2),
                "cpus": os.cpu_count(),
                "analyze": run,
                "tensors": report["tensors"],
                "model_cosines": report["model"]["cosines"],
                "findings": report["findings"],
            },
            args.out,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
