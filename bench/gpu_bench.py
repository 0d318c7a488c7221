"""GPU timings and agreement: merge and extract on cuda:0 against the CPU, on the StarCoder2-3B shape.

For a machine with CUDA (bench/gpu_check.sh runs it). Times merge (fp32 and bf16) and extract on cuda:0
and on the CPU, each in its own process, and checks the outputs: the merged weights agree within one
rounding of the output precision (the GPU's matmul may round B @ A differently), and τ is bitwise equal
(a subtraction rounds the same everywhere).

    python bench/gpu_bench.py --layers 2 --out /tmp/gpu_bench.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from streaming_bench import build, report_out, timed


def max_ulps(a: dict, b: dict) -> float:
    """The largest difference between two state dicts, in units of the output precision's eps."""
    worst = 0.0
    for name, x in a.items():
        y = b[name]
        if x.dtype.is_floating_point:
            scale = torch.finfo(x.dtype).eps * x.float().abs().clamp_min(torch.finfo(x.dtype).tiny)
            worst = max(worst, float(((x.float() - y.float()).abs() / scale).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sc2_gpu"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    base, adapter = build(args.work / "model", args.layers)
    py, report = sys.executable, {"layers": args.layers, "device": torch.cuda.get_device_name(0), "runs": {}}
    for precision in ("fp32", "bf16"):
        merged = {}
        for device in ("cpu", "cuda:0"):
            out = args.work / f"merged_{precision}_{device.replace(':', '')}"
            report["runs"][f"merge_{precision}_{device}"] = timed(
                py, "merge_lora.py", "--base_model", base, "--lora_path", adapter, "--output_dir", out,
                "--precision", precision, "--device", device,
            )  # fmt: skip
            merged[device] = load_file(out / "model.safetensors")
        report[f"merge_{precision}_max_diff_in_eps"] = max_ulps(merged["cpu"], merged["cuda:0"])
    finetuned = args.work / "merged_fp32_cpu"
    tau = {}
    for device in ("cpu", "cuda:0"):
        out = args.work / f"tv_{device.replace(':', '')}"
        report["runs"][f"extract_{device}"] = timed(
            py, "extract_task_vectors.py", "--base_model", base, "--finetuned_model", finetuned,
            "--output_dir", out, "--device", device,
        )  # fmt: skip
        tau[device] = load_file(out / "task_vector.safetensors")
    report["extract_bitwise_equal"] = all(
        torch.equal(t.view(torch.int32), tau["cuda:0"][n].view(torch.int32)) for n, t in tau["cpu"].items()
    )
    shutil.rmtree(args.work)
    report_out(report, args.out)
    ok = report["extract_bitwise_equal"] and report["merge_fp32_max_diff_in_eps"] <= 2
    sys.exit(0 if ok and report["merge_bf16_max_diff_in_eps"] <= 2 else "gpu_bench: cuda and cpu disagree")


if __name__ == "__main__":
    main()
