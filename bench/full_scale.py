"""Benchmark: the README's four commands on the full 30-layer StarCoder2-3B shape (12 GB at fp32 per checkpoint).

Builds the checkpoint and a rank-16 LoRA on q/k/v/o (bench/streaming_bench.py's builder), then runs, each in
its own process under /usr/bin/time (wall seconds, peak RSS), `--repeats` rounds interleaved, medians reported:
- the README's commands exactly as it prints them (paths replaced): merge at fp32, extract, compare **with
  --base_model and --tolerance 1e-5**, analyze with --lora_file;
- beside them: compare without --base_model; analyze with --base_model (residual in ulps, intruder
  dimensions); τ alone (no LoRA) with and without intruder dimensions; merge with fsync turned into a no-op
  (what flushing the output to disk costs); compare with torch's huge-page allocation turned off.
Then checks the verdict, and that compare's figures are the same in every round. Deletes every file it wrote.
With `--device cuda:0` the README's four commands alone run on the GPU (`--device cuda:0` added to each), through
bench/peak_memory.py: wall seconds, peak host RSS and peak GPU memory (torch's allocator) of each.

    .venv/bin/python bench/full_scale.py --work /tmp/sc2_full --out bench/full_scale_30_layers.json
    python3 bench/full_scale.py --device cuda:0 --repeats 1 --out bench/full_scale_30_layers_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from streaming_bench import REPO, build, fresh, report_out, round_robin

NO_FSYNC = "import os, runpy, sys; os.fsync = lambda fd: None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"  # noqa: E501


def timed(*command: object, env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)) -> dict:
    """Wall seconds, peak RSS (GB) and exit code of one command in its own process."""
    os.sync()  # the previous step's dirty pages written back first: each step pays for its own writes only
    result = subprocess.run(
        ["/usr/bin/time", "-f", "TIME %e %M", *map(str, command)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=os.environ | (env or {}),
    )
    if result.returncode not in ok:
        sys.exit(f"{command} failed:\n{result.stderr[-3000:]}")
    wall, rss_kb = result.stderr.strip().splitlines()[-1].split()[1:]
    return {"wall_s": float(wall), "peak_rss_gb": round(int(rss_kb) / 1024**2, 3), "exit_code": result.returncode}


def timed_on(device: str, script: str, *args: object) -> dict:
    """One of the four scripts with `--device device`, through bench/peak_memory.py: wall seconds, exit code, peak
    host RSS and peak GPU memory (GB)."""
    os.sync()
    py, wrapper = sys.executable, REPO / "bench" / "peak_memory.py"
    start = time.perf_counter()
    result = subprocess.run([py, wrapper, script, *map(str, args), "--device", device], cwd=REPO, capture_output=True,
                            text=True)  # fmt: skip
    wall = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{script} failed:\n{result.stderr[-3000:]}")
    peak = json.loads(result.stderr.strip().splitlines()[-1].removeprefix("PEAK "))
    return {"wall_s": round(wall, 2), **peak, "exit_code": result.returncode}


def removed_after(output: Path, *command: object) -> dict:
    """`timed(*command, output)` into a fresh `output`, deleted afterwards (one more 12 GB copy is not kept)."""
    result = timed(*command, fresh(output))
    fresh(output)
    return result


def readme_steps(
    base: Path, adapter: Path, work: Path, device: str | None, check_logits: bool = False
) -> dict[str, Callable[[int], dict]]:
    """The README's four commands, in its order and with its flags (on `device` when one is named); with
    `check_logits`, compare --check_logits after them."""
    merged, tv = work / "merged_model_fp32", work / "task_vectors_fp32"
    cmp, analysis = work / "comparison_results", work / "mathematical_analysis"
    if device is None:
        py = sys.executable

        def timed_step(script: str, *args: object) -> dict:
            return timed(py, script, *args)
    else:

        def timed_step(script: str, *args: object) -> dict:
            return timed_on(device, script, *args)

    steps = {
        "merge": lambda i: timed_step("merge_lora.py", "--base_model", base, "--lora_path", adapter,
                                      "--output_dir", fresh(merged), "--precision", "fp32"),
        "extract": lambda i: timed_step("extract_task_vectors.py", "--base_model", base,
                                        "--finetuned_model", merged, "--output_dir", fresh(tv)),
        "compare": lambda i: timed_step("compare_lora_task_vector.py", "--base_model", base, "--lora_path", adapter,
                                        "--task_vector_path", tv / "task_vector.safetensors",
                                        "--output_dir", fresh(cmp), "--tolerance", "1e-5"),
        "analyze": lambda i: timed_step("analyze_lora_vs_task_vector_math.py",
                                        "--lora_file", cmp / "lora_deltas.safetensors",
                                        "--task_vector_file", tv / "task_vector.safetensors",
                                        "--output_dir", fresh(analysis)),
    }  # fmt: skip
    if check_logits:
        steps["compare_check_logits"] = lambda i: timed_step(
            "compare_lora_task_vector.py", "--base_model", base, "--lora_path", adapter,
            "--task_vector_path", tv / "task_vector.safetensors", "--output_dir", fresh(work / "cmp_logits"),
            "--tolerance", "1e-5", "--check_logits",
        )  # fmt: skip
    return steps


def other_steps(base: Path, adapter: Path, work: Path) -> dict[str, Callable[[int], dict]]:
    """The same steps with other options, on the README steps' outputs."""
    py, tv = sys.executable, work / "task_vectors_fp32" / "task_vector.safetensors"
    analyze = [py, "analyze_lora_vs_task_vector_math.py", "--task_vector_file", tv]
    return {
        "merge_without_fsync": lambda i: removed_after(work / "merged_nosync", py, "-c", NO_FSYNC, "merge_lora.py",
                                                       "--base_model", base, "--lora_path", adapter,
                                                       "--precision", "fp32", "--output_dir"),
        "compare_without_base": lambda i: timed(py, "compare_lora_task_vector.py", "--lora_path", adapter,
                                                "--task_vector_path", tv, "--output_dir", fresh(work / "cmp_nobase"),
                                                "--tolerance", "1e-5"),
        "compare_without_huge_pages": lambda i: timed(py, "compare_lora_task_vector.py", "--base_model", base,
                                                      "--lora_path", adapter, "--task_vector_path", tv,
                                                      "--output_dir", fresh(work / "cmp_nothp"), "--tolerance", "1e-5",
                                                      env={"THP_MEM_ALLOC_ENABLE": "0"}),
        "analyze_with_base": lambda i: timed(*analyze, "--lora_path", adapter, "--base_model", base,
                                             "--output_dir", fresh(work / "analysis_base")),
        "analyze_tau_alone": lambda i: timed(*analyze, "--output_dir", fresh(work / "analysis_tau")),
        "analyze_tau_alone_intruders": lambda i: timed(*analyze, "--base_model", base,
                                                       "--output_dir", fresh(work / "analysis_tau_intruders")),
    }  # fmt: skip


def figures(work: Path) -> dict:
    """What the README's compare and analyze said, to check every round says the same."""
    report = json.loads((work / "comparison_results" / "comparison_report.json").read_text())
    analysis = json.loads((work / "mathematical_analysis" / "analysis.json").read_text())
    logits_path = work / "cmp_logits" / "comparison_report.json"
    logits = json.loads(logits_path.read_text())["summary"]["logits"] if logits_path.exists() else None
    alone_path = work / "analysis_tau_intruders" / "analysis.json"
    alone = json.loads(alone_path.read_text()) if alone_path.exists() else {"summary": {}}
    return {
        "compare_summary": {k: report["summary"].get(k) for k in ("equivalent", "cause", "reason")},
        "compare_tensors": [
            {k: t[k] for k in ("name", "cosine", "max_abs_diff", "within_rounding", "reproduces_merge")}
            for t in report["tensors"]
        ],
        "analysis_findings": analysis["summary"]["findings"],
        "intruder_dimensions_total": alone["summary"].get("intruder_dimensions_total"),
        **({"logits": logits} if logits else {}),
    }


def device_name(device: str) -> dict:
    """The device and the versions the commands ran with."""
    import peft
    import torch
    import transformers

    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    return {"device": device, "name": name, **versions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sc2_full"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default=None, help="run the README's four commands alone, on this device")
    parser.add_argument("--check_logits", action="store_true", help="with --device: compare --check_logits too")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    try:
        start = time.perf_counter()
        base, adapter = build(args.work / "model", args.layers)
        print(f"  built in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        steps = readme_steps(base, adapter, args.work, args.device, args.check_logits)
        if args.device is None:
            steps |= other_steps(base, adapter, args.work)
        rounds: list[dict] = []

        def check(i: int) -> dict:
            rounds.append(figures(args.work))
            return {"wall_s": 0.0, "peak_rss_gb": 0.0}

        runs = round_robin(steps | {"check": check}, args.repeats)
        del runs["check"]
        readme_total = sum(runs[s]["wall_s"] for s in ("merge", "extract", "compare", "analyze"))
        report = {
            **({"device": device_name(args.device)} if args.device else {}),
            "layers": args.layers,
            "checkpoint_gb": round((base / "model.safetensors").stat().st_size / 1e9, 2),
            "cpus": os.cpu_count(),
            "repeats": args.repeats,
            "runs": runs,
            "readme_commands_total_s": round(readme_total, 1),
            "same_figures_every_round": all(r == rounds[0] for r in rounds),
            **{k: v for k, v in rounds[0].items() if k != "compare_tensors"},
        }
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    report_out(report, args.out)


if __name__ == "__main__":
    main()
