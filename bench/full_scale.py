"""Benchmark: the four steps on the full 30-layer StarCoder2-3B shape (12 GB at fp32 per checkpoint).

Builds the checkpoint and a rank-16 LoRA on q/k/v/o (bench/streaming_bench.py's builder), runs merge,
extract, compare and analyze as the README does, each in its own process under /usr/bin/time, then tries
the naive extraction (two `from_pretrained`, subtract, save) and records how it ends. Deletes every file.

    .venv/bin/python bench/full_scale.py --work /tmp/sc2_full --out bench/full_scale.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from streaming_bench import NAIVE_EXTRACT, REPO, build, timed


def naive_attempt(base: Path, merged: Path, out: Path) -> dict:
    """The naive extraction, which is expected to run out of memory: its exit status and last words."""
    command = ["/usr/bin/time", "-f", "TIME %e %M", sys.executable, "-c", NAIVE_EXTRACT, base, merged, out]
    result = subprocess.run(list(map(str, command)), cwd=REPO, capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    wall, rss_kb = lines[-1].split()[1:] if lines and lines[-1].startswith("TIME") else ("nan", "0")
    return {
        "exit_code": result.returncode,
        "wall_s": float(wall),
        "peak_rss_gb": round(int(rss_kb) / 1024**2, 3),
        "stderr_tail": [line for line in lines if not line.startswith("TIME")][-3:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sc2_full"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip_naive", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    try:
        base, adapter = build(args.work / "model", args.layers)
        work, py = args.work, sys.executable
        merged, tv, cmp = work / "merged", work / "task_vectors", work / "comparison"
        runs = {
            "merge": timed(py, "merge_lora.py", "--base_model", base, "--lora_path", adapter, "--output_dir", merged),
            "extract": timed(py, "extract_task_vectors.py", "--base_model", base, "--finetuned_model", merged,
                             "--output_dir", tv),
            "compare": timed(py, "compare_lora_task_vector.py", "--lora_path", adapter, "--task_vector_path",
                             tv / "task_vector.safetensors", "--output_dir", cmp),
            "analyze": timed(py, "analyze_lora_vs_task_vector_math.py", "--lora_file",
                             cmp / "lora_deltas.safetensors", "--task_vector_file", tv / "task_vector.safetensors",
                             "--output_dir", work / "analysis"),
        }  # fmt: skip
        summary = json.loads((cmp / "comparison_report.json").read_text())["summary"]
        analysis = json.loads((work / "analysis" / "analysis.json").read_text())["summary"]
        report = {
            "layers": args.layers,
            "checkpoint_gb": round((base / "model.safetensors").stat().st_size / 1e9, 2),
            "runs": runs,
            "compare_equivalent": summary["equivalent"],
            "compare_reason": summary["reason"],
            "analysis_findings": analysis["findings"],
            "task_vector_disk_gb": round(sum(f.stat().st_blocks * 512 for f in tv.iterdir()) / 1e9, 2),
        }
        print(json.dumps(report, indent=2), file=sys.stderr)
        if not args.skip_naive:
            report["naive_extraction"] = naive_attempt(base, merged, work / "naive.safetensors")
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
