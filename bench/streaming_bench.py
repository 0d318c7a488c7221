"""Benchmark: merge and extract on a StarCoder2-3B-shaped checkpoint, against their peers, in one run.

Builds a checkpoint with StarCoder2-3B's real dimensions (hidden 3072, intermediate 12288, vocab 49152,
2 KV heads) and `--layers` layers of random fp32 weights, plus a rank-16 LoRA on q/k/v/o, then times each
step in its own process under /usr/bin/time (wall seconds, peak RSS), `--repeats` times round-robin, and
reports medians (this machine's timings vary by 2-4x from run to run: page-cache memory freed by one step is
slow to hand out again for a while):
- the I/O floor: `import torch, safetensors`, reading the inputs, writing an output of the same size;
- merge: merge_lora.py (streaming) against peft (`--engine peft`: from_pretrained, merge_and_unload,
  save_pretrained), and checks the two outputs are bitwise equal;
- extract: extract_task_vectors.py against the naive way (two from_pretrained, subtract, save_file).
With `--flat_layers N`, merge and extract also run on an N-layer checkpoint: their peak RSS against the
first's is the memory-flatness ratio.

    .venv/bin/python bench/streaming_bench.py --layers 2 --flat_layers 4 --out bench/streaming_2_layers.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common.io.safetensors_io import SafetensorsWriter, TensorSpec  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB, KV = 3072, 12288, 49152, 256


def tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes |= {f"{p}{norm}.weight": (HIDDEN,), f"{p}{norm}.bias": (HIDDEN,)}
        for proj, out in (("q_proj", HIDDEN), ("k_proj", KV), ("v_proj", KV), ("o_proj", HIDDEN)):
            shapes |= {f"{p}self_attn.{proj}.weight": (out, HIDDEN), f"{p}self_attn.{proj}.bias": (out,)}
        shapes |= {f"{p}mlp.c_fc.weight": (INTERMEDIATE, HIDDEN), f"{p}mlp.c_fc.bias": (INTERMEDIATE,)}
        shapes |= {f"{p}mlp.c_proj.weight": (HIDDEN, INTERMEDIATE), f"{p}mlp.c_proj.bias": (HIDDEN,)}
    return shapes | {"model.norm.weight": (HIDDEN,), "model.norm.bias": (HIDDEN,)}


def write_random(path: Path, shapes: dict[str, tuple[int, ...]], scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    specs = [TensorSpec(n, torch.float32, s) for n, s in shapes.items()]
    with SafetensorsWriter(path, specs, {"format": "pt"}) as writer:
        for name, shape in shapes.items():
            rows = shape[0]
            for start in range(0, rows, 4096):
                chunk_shape = (min(4096, rows - start), *shape[1:])
                writer.write(name, torch.randn(chunk_shape, generator=generator) * scale)


def build(work: Path, layers: int) -> tuple[Path, Path]:
    from transformers import Starcoder2Config

    base, adapter = work / "base", work / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    config = Starcoder2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
        num_attention_heads=24, num_key_value_heads=2, use_bias=True, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    config.save_pretrained(base)
    write_random(base / "model.safetensors", tensor_shapes(layers), 0.02, seed=0)
    lora = {}
    for i in range(layers):
        for proj, out in (("q_proj", HIDDEN), ("k_proj", KV), ("v_proj", KV), ("o_proj", HIDDEN)):
            key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            lora |= {f"{key}.lora_A.weight": (16, HIDDEN), f"{key}.lora_B.weight": (out, 16)}
    write_random(adapter / "adapter_model.safetensors", lora, 0.01, seed=1)
    adapter_config = {
        "peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "bias": "none", "lora_dropout": 0.0,
    }  # fmt: skip
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    return base, adapter


def timed(*command: object) -> dict:
    """Wall seconds and peak RSS (GB) of one command in its own process."""
    result = subprocess.run(
        ["/usr/bin/time", "-f", "TIME %e %M", *map(str, command)], cwd=REPO, capture_output=True, text=True
    )
    if result.returncode:
        sys.exit(f"{command} failed:\n{result.stderr[-2000:]}")
    wall, rss_kb = result.stderr.strip().splitlines()[-1].split()[1:]
    return {"wall_s": float(wall), "peak_rss_gb": round(int(rss_kb) / 1024**2, 3)}


def medians(runs: list[dict]) -> dict:
    """The median of each figure a run reports (wall seconds, peak memories), and every run's wall seconds."""
    figures = [k for k in runs[0] if k != "exit_code"]
    return {k: statistics.median(r[k] for r in runs) for k in figures} | {"all_wall_s": [r["wall_s"] for r in runs]}


def round_robin(steps: dict[str, Callable[[int], dict]], repeats: int) -> dict[str, dict]:
    """Each step `repeats` times, interleaved so slow and fast periods of the machine hit every step."""
    runs: dict[str, list[dict]] = {name: [] for name in steps}
    for repeat in range(repeats):
        for name, step in steps.items():
            runs[name].append(step(repeat))
            print(f"  {name} #{repeat}: {runs[name][-1]}", file=sys.stderr)
    return {name: medians(r) for name, r in runs.items()}


def report_out(report: dict, out: Path | None) -> None:
    """A bench's JSON report, printed and (with --out) written."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    if path.is_file():
        path.unlink()
    return path


NAIVE_EXTRACT = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).state_dict()
tuned = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32).state_dict()
vector = {k: (tuned[k] - base[k]).contiguous() for k in base if k in tuned and k != "lm_head.weight"}
save_file(vector, sys.argv[3])
"""
WRITE_FLOOR = """
import os, sys
size, chunk = int(sys.argv[2]), bytearray(64 << 20)
with open(sys.argv[1], "wb") as f:
    for start in range(0, size, len(chunk)):
        f.write(chunk[: min(len(chunk), size - start)])
"""


def steps(base: Path, adapter: Path, work: Path, with_peers: bool) -> dict[str, Callable[[int], dict]]:
    """The commands to time; each writes a fresh output (the first merge's is kept as extract's input)."""
    py = sys.executable
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    merged = work / "merged_0"

    def merge(engine: str) -> Callable[[int], dict]:
        def run(i: int) -> dict:
            out = fresh(work / ("merged_0" if engine == "stream" and i == 0 else f"merged_{engine}"))
            args = ["--base_model", base, "--lora_path", adapter, "--output_dir", out, "--device", "cpu"]
            return timed(py, "merge_lora.py", *args, "--engine", engine)

        return run

    def extract(i: int) -> dict:
        args = ["--base_model", base, "--finetuned_model", merged, "--output_dir", fresh(work / "tv")]
        return timed(py, "extract_task_vectors.py", *args, "--device", "cpu")

    ours = {"merge_stream": merge("stream"), "extract_stream": extract}
    if not with_peers:
        return ours
    return {
        "import_torch": lambda i: timed(py, "-c", "import torch, safetensors"),
        "read_inputs": lambda i: timed("sh", "-c", f"cat {base}/*.safetensors {adapter}/*.safetensors > /dev/null"),
        "write_output": lambda i: timed(py, "-c", WRITE_FLOOR, fresh(work / "floor.bin"), size),
        "merge_stream": ours["merge_stream"],
        "merge_peft": merge("peft"),
        "extract_stream": extract,
        "extract_naive": lambda i: timed(py, "-c", NAIVE_EXTRACT, base, merged, fresh(work / "naive.safetensors")),
    }


def bitwise_equal(ours_dir: Path, theirs_dir: Path) -> bool:
    from safetensors.torch import load_file

    ours, theirs = {}, {}
    for folder, tensors in ((ours_dir, ours), (theirs_dir, theirs)):
        for shard in folder.glob("*.safetensors"):
            tensors |= load_file(shard)
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def ratio(a: float, b: float) -> float:
    return round(a / b, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--flat_layers", type=int, default=None, help="also run ours at this many layers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sc2_bench"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    base, adapter = build(args.work / "model", args.layers)
    runs = round_robin(steps(base, adapter, args.work, with_peers=True), args.repeats)
    bitwise = bitwise_equal(args.work / "merged_0", args.work / "merged_peft")
    floor = sum(runs[k]["wall_s"] for k in ("import_torch", "read_inputs", "write_output"))
    report = {
        "layers": args.layers,
        "checkpoint_gb": round((base / "model.safetensors").stat().st_size / 1e9, 2),
        "repeats": args.repeats,
        "medians": runs,
        "io_floor_s": round(floor, 3),
        "merge_bitwise_equal_to_peft": bitwise,
        "ratios": {
            "merge_time_vs_peft": ratio(runs["merge_stream"]["wall_s"], runs["merge_peft"]["wall_s"]),
            "merge_rss_vs_peft": ratio(runs["merge_stream"]["peak_rss_gb"], runs["merge_peft"]["peak_rss_gb"]),
            "extract_time_vs_naive": ratio(runs["extract_stream"]["wall_s"], runs["extract_naive"]["wall_s"]),
            "extract_rss_vs_naive": ratio(runs["extract_stream"]["peak_rss_gb"], runs["extract_naive"]["peak_rss_gb"]),
            "merge_time_vs_io_floor": ratio(runs["merge_stream"]["wall_s"], floor),
            "extract_time_vs_io_floor": ratio(runs["extract_stream"]["wall_s"], floor),
        },
    }
    if args.flat_layers:
        shutil.rmtree(args.work)
        base, adapter = build(args.work / "model", args.flat_layers)
        larger = round_robin(steps(base, adapter, args.work, with_peers=False), args.repeats)
        report["flatness"] = {
            "layers": args.flat_layers,
            "checkpoint_gb": round((base / "model.safetensors").stat().st_size / 1e9, 2),
            "medians": larger,
            "merge_rss_ratio": ratio(larger["merge_stream"]["peak_rss_gb"], runs["merge_stream"]["peak_rss_gb"]),
            "extract_rss_ratio": ratio(larger["extract_stream"]["peak_rss_gb"], runs["extract_stream"]["peak_rss_gb"]),
        }
    report_out(report, args.out)
    shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
