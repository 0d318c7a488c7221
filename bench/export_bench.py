"""Benchmark: our LoRA export (`--export_lora`) against `mergekit-extract-lora` (mergekit 0.1.5), side by side.

Builds a small StarCoder2-shaped checkpoint (hidden 512, intermediate 2048, 4 layers, vocab 8192, 4 heads, 2 KV
heads, fp32, tied embeddings, biases) and two fine-tunes of it:
- full_finetune: every linear weight + a rank-64 change (‖·‖_F = 0.25·‖W‖_F) + full-rank noise (std 1e-4·‖W‖_F
  per element); every bias, norm and the embedding + N(0, 0.002²) noise;
- merged_lora: a rank-16 LoRA on q/k/v/o merged into the base by merge_lora.py --precision fp32.
Per case it times, round-robin `--repeats` times (alternating which goes first), each command in its own process
under /usr/bin/time (wall s, user + sys CPU s, peak RSS), and reports medians over the runs that succeeded:
- ours: analyze_lora_vs_task_vector_math.py --finetuned_model FT --base_model BASE --export_lora RANK --skip_plots
  --intruder_k 0 (one process: τ computed tensor by tensor, the export and the τ analysis it comes with, without
  plots and intruder dimensions);
- ours in two steps, for reference: extract_task_vectors.py, then the same analysis of the τ file (walls summed,
  peak RSS the larger of the two);
- theirs: mergekit-extract-lora --max-rank RANK, from its own virtualenv (--mergekit_venv, created when missing
  with torch==2.13.0 then mergekit==0.1.5).
Then, for each adapter: base + PeftModel.from_pretrained + merge_and_unload against the fine-tune: relative
Frobenius error of every changed linear weight, max |Δ| of everything else, max |Δ logits| on a fixed batch, peft's
warnings while loading, the adapter's size. mergekit's adapter is measured as written and again with
"lora_bias": true set in its adapter_config.json by hand (it writes lora_B.bias without it, which peft ignores).

    .venv/bin/python bench/export_bench.py --repeats 3 --out bench/export_vs_mergekit.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from streaming_bench import report_out

REPO = Path(__file__).resolve().parents[1]
HIDDEN, INTERMEDIATE, LAYERS, VOCAB, HEADS, KV_HEADS = 512, 2048, 4, 8192, 4, 2
KV = HIDDEN // HEADS * KV_HEADS
RANKS = {"full_finetune": 64, "merged_lora": 16}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes |= {f"{p}{norm}.weight": (HIDDEN,), f"{p}{norm}.bias": (HIDDEN,)}
        for proj, out in zip(ATTENTION, (HIDDEN, KV, KV, HIDDEN), strict=True):
            shapes |= {f"{p}self_attn.{proj}.weight": (out, HIDDEN), f"{p}self_attn.{proj}.bias": (out,)}
        shapes |= {f"{p}mlp.c_fc.weight": (INTERMEDIATE, HIDDEN), f"{p}mlp.c_fc.bias": (INTERMEDIATE,)}
        shapes |= {f"{p}mlp.c_proj.weight": (HIDDEN, INTERMEDIATE), f"{p}mlp.c_proj.bias": (HIDDEN,)}
    return shapes | {"model.norm.weight": (HIDDEN,), "model.norm.bias": (HIDDEN,)}


def is_linear(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name


def build(work: Path) -> dict[str, tuple[Path, Path]]:
    """The base and both fine-tunes, as model folders (config.json + model.safetensors)."""
    from transformers import Starcoder2Config

    base, full, adapter = work / "base", work / "full_finetune", work / "adapter"
    config = Starcoder2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, use_bias=True, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, architectures=["Starcoder2ForCausalLM"],  # mergekit needs architectures
    )  # fmt: skip
    config.save_pretrained(base)
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(s, generator=g) * 0.02 for n, s in tensor_shapes().items()}
    save_file(weights, base / "model.safetensors", {"format": "pt"})

    tuned = {}
    for name, w in weights.items():
        if is_linear(name, w):
            norm = float(w.norm())
            low = torch.randn(w.shape[0], 64, generator=g) @ torch.randn(64, w.shape[1], generator=g)
            noise = torch.randn(w.shape, generator=g) * 1e-4 * norm
            tuned[name] = w + low * (0.25 * norm / float(low.norm())) + noise
        else:
            tuned[name] = w + torch.randn(w.shape, generator=g) * 0.002
    full.mkdir()
    shutil.copy(base / "config.json", full)
    save_file(tuned, full / "model.safetensors", {"format": "pt"})

    adapter.mkdir()
    lora = {}
    for i in range(LAYERS):
        for proj, out in zip(ATTENTION, (HIDDEN, KV, KV, HIDDEN), strict=True):
            key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            lora[f"{key}.lora_A.weight"] = torch.randn(16, HIDDEN, generator=g) * 0.01
            lora[f"{key}.lora_B.weight"] = torch.randn(out, 16, generator=g) * 0.01
    save_file(lora, adapter / "adapter_model.safetensors", {"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": list(ATTENTION), "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base), "bias": "none", "lora_dropout": 0.0,
    }  # fmt: skip
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    merged = work / "merged_lora"
    args = ["--base_model", base, "--lora_path", adapter, "--output_dir", merged, "--precision", "fp32"]
    subprocess.run([sys.executable, "merge_lora.py", *map(str, args)], cwd=REPO, env=ENV, check=True)
    return {"full_finetune": (base, full), "merged_lora": (base, merged)}


def mergekit_venv(venv: Path) -> Path:
    """mergekit-extract-lora from its own virtualenv: torch 2.13.0 first (the local CPU wheel), then mergekit."""
    tool = venv / "bin" / "mergekit-extract-lora"
    if not tool.exists():
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pip = [venv / "bin" / "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "mergekit==0.1.5"], check=True)
    return tool


def timed(*command: object) -> dict:
    """Wall and CPU (user + sys) seconds and peak RSS (GB) of one command in its own process; the error's tail if
    it failed."""
    result = subprocess.run(
        ["/usr/bin/time", "-f", "TIME %e %U %S %M", *map(str, command)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
    )
    wall, user, system, rss_kb = result.stderr.strip().splitlines()[-1].split()[1:]
    run = {
        "wall_s": float(wall),
        "cpu_s": round(float(user) + float(system), 2),
        "peak_rss_gb": round(int(rss_kb) / 1024**2, 3),
    }
    if result.returncode:
        run["error"] = f"{command[:3]}... exit {result.returncode}: {result.stderr[-1500:]}"
    return run


def ours(base: Path, ft: Path, out: Path, rank: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    return timed(sys.executable, "analyze_lora_vs_task_vector_math.py", "--finetuned_model", ft, "--base_model", base,
                 "--output_dir", out / "analysis", "--export_lora", rank, "--skip_plots", "--intruder_k", 0,
                 "--device", "cpu")  # fmt: skip


def ours_two_steps(base: Path, ft: Path, out: Path, rank: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    py = sys.executable
    extract = timed(py, "extract_task_vectors.py", "--base_model", base, "--finetuned_model", ft,
                    "--output_dir", out / "tv", "--device", "cpu")  # fmt: skip
    analyze = timed(py, "analyze_lora_vs_task_vector_math.py", "--task_vector_file", out / "tv/task_vector.safetensors",
                    "--base_model", base, "--output_dir", out / "analysis", "--export_lora", rank, "--skip_plots",
                    "--intruder_k", 0, "--device", "cpu")  # fmt: skip
    run = {
        "wall_s": round(extract["wall_s"] + analyze["wall_s"], 2),
        "cpu_s": round(extract["cpu_s"] + analyze["cpu_s"], 2),
        "peak_rss_gb": max(extract["peak_rss_gb"], analyze["peak_rss_gb"]),
        "extract_wall_s": extract["wall_s"],
        "analyze_wall_s": analyze["wall_s"],
    }
    errors = [r["error"] for r in (extract, analyze) if "error" in r]
    return run | ({"error": "\n".join(errors)} if errors else {})


def theirs(tool: Path, base: Path, ft: Path, out: Path, rank: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    return timed(tool, "--model", ft, "--base-model", base, "--out-path", out, "--max-rank", rank, "--device", "cpu")


def medians(runs: list[dict]) -> dict:
    """Medians over the runs that succeeded (None if none did); every run listed."""
    good = [r for r in runs if "error" not in r]
    summary = {k: statistics.median(r[k] for r in good) if good else None for k in ("wall_s", "cpu_s", "peak_rss_gb")}
    return summary | {"failed_runs": len(runs) - len(good), "runs": runs}


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}"[:400])


def quality(base: Path, ft: Path, adapter: Path) -> dict:
    """The adapter merged into the base by peft, against the fine-tune."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def load(folder: Path, dtype: torch.dtype = torch.float32):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()

    model, collect = load(base), Collect()
    loggers = [logging.getLogger(n) for n in ("peft", "transformers")]
    for logger in loggers:
        logger.addHandler(collect)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    for logger in loggers:
        logger.removeHandler(collect)
    base_sd, ft_sd = load_file(base / "model.safetensors"), load_file(ft / "model.safetensors")
    ft_sd["lm_head.weight"] = ft_sd["model.embed_tokens.weight"]  # tied
    base_sd["lm_head.weight"] = base_sd["model.embed_tokens.weight"]
    rel, unchanged, biases, others = {}, 0.0, 0.0, 0.0
    # the factors' own error, without the fp32 rounding of the merge (±1e-9 relative): peft merging in float64
    rel64 = linear_errors(PeftModel.from_pretrained(load(base, torch.float64), adapter).merge_and_unload(), ft_sd,
                          base_sd)  # fmt: skip
    for name, w in merged.state_dict().items():
        diff = (w - ft_sd[name]).double()
        if is_linear(name, w):
            change = float((ft_sd[name].double() - base_sd[name].double()).norm())
            if change:
                rel[name] = float(diff.norm()) / change
            else:
                unchanged = max(unchanged, float(diff.abs().max()))
        elif name.endswith(".bias") and "norm" not in name:
            biases = max(biases, float(diff.abs().max()))
        else:
            others = max(others, float(diff.abs().max()))
    ids = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tuned_logits, merged_logits = load(ft)(ids).logits, merged(ids).logits
        base_logits = load(base)(ids).logits
    worst = max(rel, key=rel.get)
    head, embedding = merged.get_output_embeddings().weight, merged.get_input_embeddings().weight
    return {
        "linear_rel_error_median": statistics.median(rel.values()),
        "linear_rel_error_max": rel[worst],
        "linear_rel_error_worst_tensor": worst,
        "linear_rel_error_median_float64_merge": statistics.median(rel64.values()),
        "linear_rel_error_max_float64_merge": max(rel64.values()),
        "unchanged_linear_max_abs": unchanged,
        "linear_bias_max_abs": biases,
        "norm_embedding_head_max_abs": others,
        "logits_max_abs_diff": float((merged_logits - tuned_logits).abs().max()),
        "logits_max_abs_finetune_vs_base": float((tuned_logits - base_logits).abs().max()),
        "merged_head_still_tied": head.data_ptr() == embedding.data_ptr() and merged.config.tie_word_embeddings,
        "peft_warnings": sorted({str(w.message)[:400] for w in caught} | set(collect.messages)),
        "adapter_bytes": sum(f.stat().st_size for f in adapter.iterdir() if f.is_file()),
        "adapter_safetensors_bytes": sum(f.stat().st_size for f in adapter.glob("*.safetensors")),
        "adapter_tensors": len(load_file(next(adapter.glob("*.safetensors")))),
    }


def linear_errors(merged, ft_sd: dict, base_sd: dict) -> dict[str, float]:
    """‖W_merged − W_ft‖_F / ‖W_ft − W_base‖_F of every changed linear weight, in float64."""
    errors = {}
    for name, w in merged.state_dict().items():
        change = float((ft_sd[name].double() - base_sd[name].double()).norm())
        if is_linear(name, w) and change:
            errors[name] = float((w.double() - ft_sd[name].double()).norm()) / change
    return errors


def same_bytes(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def with_bias_flag(adapter: Path, copy: Path) -> Path:
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps(config | {"lora_bias": True}, indent=2))
    return copy


def versions(venv: Path) -> dict:
    import peft
    import transformers

    names = ("mergekit", "torch", "transformers", "peft")
    code = f"import importlib.metadata as m, json; print(json.dumps({{p: m.version(p) for p in {names}}}))"
    theirs_versions = subprocess.run([venv / "bin/python", "-c", code], capture_output=True, text=True).stdout
    return {
        "ours": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "mergekit_venv": json.loads(theirs_versions),
        "python": platform.python_version(),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/export_bench"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--mergekit_venv", type=Path, default=Path("/tmp/mergekit_venv"))
    parser.add_argument("--keep", action="store_true", help="keep --work (the models and adapters) at the end")
    args = parser.parse_args()
    tool = mergekit_venv(args.mergekit_venv)
    shutil.rmtree(args.work, ignore_errors=True)
    cases = build(args.work)
    commands = {"ours": ours, "ours_two_steps": ours_two_steps, "mergekit": lambda *a: theirs(tool, *a)}
    runs = {case: {name: [] for name in commands} for case in cases}
    for repeat in range(args.repeats):
        for case, (base, ft) in cases.items():
            for name in sorted(commands, reverse=repeat % 2 == 1):  # alternate who goes first
                out = args.work / f"{case}_{name}"
                run = commands[name](base, ft, out, RANKS[case])
                runs[case][name].append(run)
                print(f"{case} {name} #{repeat}: {runs[case][name][-1]}", file=sys.stderr)
    report: dict = {
        "setting": {
            "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, noisy: medians of round-robin runs",
            "model": f"Starcoder2 hidden {HIDDEN}, intermediate {INTERMEDIATE}, {LAYERS} layers, vocab {VOCAB}, "
            f"{HEADS} heads, {KV_HEADS} KV heads, fp32, tied embeddings, use_bias",
            "checkpoint_mb": round((args.work / "base/model.safetensors").stat().st_size / 1e6, 1),
            "repeats": args.repeats,
            "ranks": RANKS,
            "ours": "analyze_lora_vs_task_vector_math.py --finetuned_model FT --base_model BASE --export_lora RANK "
            "--skip_plots --intruder_k 0 (one process)",
            "ours_two_steps": "extract_task_vectors.py, then analyze_lora_vs_task_vector_math.py --task_vector_file "
            "TV --base_model BASE with the same flags (two processes: walls summed, peak RSS the larger)",
            "mergekit": "mergekit-extract-lora --model FT --base-model BASE --out-path OUT --max-rank RANK "
            "--device cpu",
            "quality": "base + PeftModel.from_pretrained(adapter).merge_and_unload() (peft, fp32) against the "
            "fine-tune: ‖W_merged − W_ft‖_F / ‖W_ft − W_base‖_F over changed linear weights (also with peft "
            "merging in float64: the factors' own error, free of the fp32 merge's rounding); max |Δ| over "
            "linear biases, and over norms, embedding and head; max |Δ logits| on 4×64 fixed random token ids",
        },
        "versions": versions(args.mergekit_venv),
        "cases": {},
    }
    for case, (base, ft) in cases.items():
        ours_m, theirs_m = medians(runs[case]["ours"]), medians(runs[case]["mergekit"])
        two_steps = medians(runs[case]["ours_two_steps"])
        ours_adapter = args.work / f"{case}_ours/analysis/exported_lora"
        theirs_adapter = args.work / f"{case}_mergekit"
        fixed = with_bias_flag(theirs_adapter, args.work / f"{case}_mergekit_lora_bias")
        report["cases"][case] = {
            "rank": RANKS[case],
            "ours": ours_m,
            "ours_two_steps": two_steps,
            "mergekit": theirs_m,
            "ratios_ours_over_mergekit": {
                "wall": ratio(ours_m["wall_s"], theirs_m["wall_s"]),
                "cpu": ratio(ours_m["cpu_s"], theirs_m["cpu_s"]),
                "peak_rss": ratio(ours_m["peak_rss_gb"], theirs_m["peak_rss_gb"]),
                "wall_two_steps": ratio(two_steps["wall_s"], theirs_m["wall_s"]),
            },
            "two_steps_adapter_is_the_same_file": same_bytes(
                ours_adapter / "adapter_model.safetensors",
                args.work / f"{case}_ours_two_steps/analysis/exported_lora/adapter_model.safetensors",
            ),
            "quality": {
                "ours": quality(base, ft, ours_adapter) if ours_adapter.exists() else "no adapter",
                "mergekit_as_written": quality(base, ft, theirs_adapter),
                "mergekit_with_lora_bias_true_set_by_hand": quality(base, ft, fixed),
            },
        }
    report_out(report, args.out)
    if not args.keep:
        shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
