"""QLoRA on CUDA against the CPU: bitsandbytes' NF4 quantization and peft's QLoRA merges, compared bit for bit.

For a machine with CUDA and bitsandbytes. Adapters are trained on GPUs, so the weights a QLoRA adapter was trained
against are deq(Q(W)) as CUDA computes it; a toolkit that rebuilds them on the CPU must get the same numbers.
1. quantize_4bit (NF4, blocksize 64, with and without double quantization) of StarCoder2-3B-shaped bf16 and fp32
   weights on cuda:0 and on the CPU: are the codes and scales equal, and is deq(Q(W)) equal (each device's own, and
   CUDA's quantization dequantized on the CPU)? Time of one quantization on each.
2. The three merges of a tiny StarCoder2 and Llama with a random rank-8 adapter on every Linear — (a) bf16 base +
   merge_and_unload, (b) 4-bit base + merge_and_unload + dequantize, (c) dequantize + merge_and_unload — each made
   on cuda:0 and on the CPU: how many tensors differ and by how much.
With `--refs DIR`, the tiny bases, adapters and CUDA's merges are saved there (reference outputs for the CPU).

    python3 bench/qlora_gpu.py --out /tmp/qlora_gpu.json --refs /tmp/qlora_refs
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from streaming_bench import report_out

SHAPES = {"q_proj": (3072, 3072), "k_proj": (256, 3072), "c_fc": (12288, 3072), "c_proj": (3072, 12288)}


def synced_seconds(fn, device: str) -> tuple[object, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def quantized_parts(packed: torch.Tensor, state) -> dict[str, torch.Tensor]:
    """Everything a quantized weight is made of, on the CPU."""
    parts = {"codes": packed, "absmax": state.absmax}
    if state.nested:
        parts |= {"nested_absmax": state.state2.absmax, "nested_code": state.state2.code, "offset": state.offset}
    return {k: v.detach().cpu() for k, v in parts.items()}


def quantization_agreement(device: str) -> dict:
    import bitsandbytes.functional as F

    rows = {}
    generator = torch.Generator().manual_seed(0)
    for name, shape in SHAPES.items():
        w32 = torch.randn(shape, generator=generator) * 0.02
        for dtype_name, w in (("bf16", w32.to(torch.bfloat16)), ("fp32", w32)):
            for double in (True, False):
                quant = dict(blocksize=64, quant_type="nf4", compress_statistics=double)
                (packed_cpu, state_cpu), cpu_s = synced_seconds(lambda w=w, q=quant: F.quantize_4bit(w, **q), "cpu")
                (packed_gpu, state_gpu), gpu_s = synced_seconds(
                    lambda w=w, q=quant: F.quantize_4bit(w.to(device), **q), device
                )
                cpu_parts, gpu_parts = quantized_parts(packed_cpu, state_cpu), quantized_parts(packed_gpu, state_gpu)
                deq_cpu = F.dequantize_4bit(packed_cpu, state_cpu)
                deq_gpu = F.dequantize_4bit(packed_gpu, state_gpu).cpu()
                # CUDA's quantization dequantized on the CPU (a 4-bit checkpoint saved on a GPU, read on a CPU)
                state_back = state_gpu.to("cpu") or state_gpu
                deq_gpu_on_cpu = F.dequantize_4bit(packed_gpu.cpu(), state_back)
                codes_differ = int((cpu_parts["codes"] != gpu_parts["codes"]).sum())
                rows[f"{name}_{dtype_name}_{'double' if double else 'single'}"] = {
                    "shape": list(shape),
                    "parts_equal": {k: bool(torch.equal(cpu_parts[k], gpu_parts[k])) for k in cpu_parts},
                    "code_bytes_differing": codes_differ,
                    "absmax_max_diff": max_diff(cpu_parts["absmax"], gpu_parts["absmax"]),
                    "deq_equal": bool(torch.equal(deq_cpu, deq_gpu)),
                    "deq_max_diff": max_diff(deq_cpu, deq_gpu),
                    "cuda_quantized_deq_on_cpu_equal_cuda": bool(torch.equal(deq_gpu_on_cpu, deq_gpu)),
                    "deq_dtype": str(deq_cpu.dtype),
                    "quantize_s": {"cpu": round(cpu_s, 4), device: round(gpu_s, 4)},
                }
                print(name, dtype_name, double, rows[list(rows)[-1]], flush=True)
    return rows


def tiny_model(kind: str, folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Starcoder2Config, Starcoder2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    if kind == "starcoder2":
        model = Starcoder2ForCausalLM(Starcoder2Config(**common, use_bias=True, tie_word_embeddings=True))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


def tiny_adapter(base: Path, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=8, lora_alpha=16, target_modules=[t for t in targets if f".{t}." in str(model)] or targets)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(folder)
    return folder


def merged(base: Path, adapter: Path, how: str, device: str) -> dict[str, torch.Tensor]:
    """Merge (a), (b) or (c) on `device`, from freshly loaded models (no forward pass before merging)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if how == "a":
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    else:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.bfloat16, device_map=device, quantization_config=quant
        )
        if how == "b":
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
            model = model.dequantize()
        else:
            model = model.dequantize()
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def merge_agreement(device: str, work: Path, refs: Path | None) -> dict:
    from safetensors.torch import save_file

    rows = {}
    for kind in ("starcoder2", "llama"):
        base = tiny_model(kind, work / kind / "base")
        adapter = tiny_adapter(base, work / kind / "adapter")
        for how in ("a", "b", "c"):
            on_cpu, on_gpu = merged(base, adapter, how, "cpu"), merged(base, adapter, how, device)
            differing = {k: max_diff(t, on_gpu[k]) for k, t in on_cpu.items() if not torch.equal(t, on_gpu[k])}
            rows[f"{kind}_{how}"] = {
                "tensors": len(on_cpu),
                "tensors_differing": len(differing),
                "max_diff": max(differing.values(), default=0.0),
                "differing": dict(sorted(differing.items())[:8]),
            }
            print(kind, how, rows[f"{kind}_{how}"], flush=True)
            if refs is not None:
                (refs / kind).mkdir(parents=True, exist_ok=True)
                tensors = {k: v.contiguous() for k, v in on_gpu.items()}
                save_file(tensors, refs / kind / f"merged_{how}_cuda.safetensors")
        if refs is not None:
            import shutil

            shutil.copytree(base, refs / kind / "base", dirs_exist_ok=True)
            shutil.copytree(adapter, refs / kind / "adapter", dirs_exist_ok=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlora_gpu"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--refs", type=Path, default=None)
    parser.add_argument("--skip_quantization", action="store_true")
    args = parser.parse_args()
    import bitsandbytes
    import peft
    import transformers

    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    report = {
        "device": name,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },  # fmt: skip
    }
    if not args.skip_quantization:
        report["quantize_4bit"] = quantization_agreement(args.device)
    report["merges"] = merge_agreement(args.device, args.work, args.refs)
    report_out(report, args.out)


if __name__ == "__main__":
    main()
