"""Benchmark: merge and extract on a StarCoder2-3B-shaped checkpoint, against their peers, in one run.

Builds a checkpoint with StarCoder2-3B's real dimensions (hidden 3072, intermediate 12288, vocab 49152,
2 KV heads) and `--layers` layers of random fp32 weights, plus a rank-16 LoRA on q/k/v/o, then times each
step in its own process under /usr/bin/time (wall seconds, peak RSS):
- the I/O floor: `import torch, safetensors`, reading the inputs, writing an output of the same size;
- merge: merge_lora.py (streaming) against peft (`--engine peft`: from_pretrained, merge_and_unload,
  save_pretrained), and checks the two outputs are bitwise equal;
- extract: extract_task_vectors.py against the naive way (two from_pretrained, subtract, save_file).

    .venv/bin/python bench/streaming_bench.py --layers 2 --work /tmp/sc2_bench --out bench/streaming_2_layers.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common.safetensors_io import SafetensorsWriter, TensorSpec  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sc2_bench"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    base, adapter = build(args.work, args.layers)
    size = (base / "model.safetensors").stat().st_size
    py = sys.executable
    runs = {
        "import_torch": timed(py, "-c", "import torch, safetensors"),
        "read_inputs": timed("sh", "-c", f"cat {base}/*.safetensors {adapter}/*.safetensors > /dev/null"),
        "write_output": timed(py, "-c", WRITE_FLOOR, args.work / "floor.bin", size),
        "merge_stream": timed(py, "merge_lora.py", "--base_model", base, "--lora_path", adapter,
                              "--output_dir", args.work / "merged_stream", "--device", "cpu"),
        "merge_peft": timed(py, "merge_lora.py", "--base_model", base, "--lora_path", adapter,
                            "--output_dir", args.work / "merged_peft", "--device", "cpu", "--engine", "peft"),
        "extract_stream": timed(py, "extract_task_vectors.py", "--base_model", base, "--finetuned_model",
                                args.work / "merged_stream", "--output_dir", args.work / "tv", "--device", "cpu"),
        "extract_naive": timed(py, "-c", NAIVE_EXTRACT, base, args.work / "merged_stream", args.work / "naive.st"),
    }  # fmt: skip
    from safetensors.torch import load_file

    ours = load_file(args.work / "merged_stream" / "model.safetensors")
    theirs = {}
    for shard in (args.work / "merged_peft").glob("*.safetensors"):
        theirs |= load_file(shard)
    bitwise = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    floor = sum(runs[k]["wall_s"] for k in ("import_torch", "read_inputs", "write_output"))
    report = {
        "layers": args.layers,
        "checkpoint_gb": round(size / 1e9, 2),
        "runs": runs,
        "merge_bitwise_equal_to_peft": bitwise,
        "ratios": {
            "merge_time_vs_peft": round(runs["merge_stream"]["wall_s"] / runs["merge_peft"]["wall_s"], 3),
            "merge_rss_vs_peft": round(runs["merge_stream"]["peak_rss_gb"] / runs["merge_peft"]["peak_rss_gb"], 3),
            "extract_time_vs_naive": round(runs["extract_stream"]["wall_s"] / runs["extract_naive"]["wall_s"], 3),
            "extract_rss_vs_naive": round(
                runs["extract_stream"]["peak_rss_gb"] / runs["extract_naive"]["peak_rss_gb"], 3
            ),
            "merge_time_vs_io_floor": round(runs["merge_stream"]["wall_s"] / floor, 3),
            "extract_time_vs_io_floor": round(runs["extract_stream"]["wall_s"] / floor, 3),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
