"""Step 1: merge a LoRA adapter into its base model, tensor by tensor, at fp32, fp16 or bf16.

    python merge_lora.py --base_model bigcode/starcoder2-3b --lora_path checkpoint-40000/ \\
        --output_dir merged_model_fp32 --precision fp32

The result is a normal Hugging Face model folder, bitwise equal to peft's `merge_and_unload()` on
the same device, written without ever holding the model in memory. `--engine peft` runs peft's own
merge instead (the whole model in memory), kept for cross-checks.

QLoRA (an adapter trained on the base loaded 4-bit): `--bnb_4bit_quant_type nf4 [--bnb_4bit_use_double_quant]`
merges into deq(Q(W)), the weights it was trained on (transformers' dequantize(), then merge_and_unload), bit for
bit; with `--requantize`, as merge_and_unload on the 4-bit model then dequantize() (common/model/quantization.py).

Where the maths lives: common/lora/arithmetic.py (peft's arithmetic, change by change), common/lora/merge_plan.py
(which tensor gets which change), common/lora/merge.py (the streaming loop); docs/maths.md and docs/adapters.md
explain them.
"""

from __future__ import annotations

import time
from pathlib import Path

from common.cli import (
    add_overwrite,
    add_residual_base,
    add_switch,
    base_parser,
    folder_path,
    log,
    parse_with_config,
    peak_memory_gb,
    resolve_device,
    run,
    setup_logging,
    tensor_progress,
)
from common.errors import UserError
from common.io.outputs import check_output_dir, staged_output_dir
from common.io.safetensors_io import CheckpointIndex
from common.io.sources import resolve_adapter, resolve_model
from common.lora.adapter import LoraAdapter
from common.lora.merge import QuantizedBase, check_requantizable, merge_checkpoint, merge_with_peft, write_model_files
from common.model.layout import check_base_supported, read_config
from common.model.quantization import QUANT_TYPES, FourBit, quantized_weights
from common.numerics.precision import PRECISIONS, dtype_of


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--base_model", default="bigcode/starcoder2-3b", help="hub id or local folder")
    parser.add_argument("--lora_path", default="checkpoint-40000/", help="adapter or checkpoint-N folder, or hub id")
    parser.add_argument("--output_dir", type=folder_path, default=Path("merged_model"), help="merged model folder")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="dtype of the merged model")
    parser.add_argument(
        "--engine",
        default="stream",
        choices=["stream", "peft"],
        help="stream: tensor by tensor (default); peft: transformers + merge_and_unload (whole model in memory)",
    )
    parser.add_argument(
        "--bnb_4bit_quant_type", choices=QUANT_TYPES, default=None, help="QLoRA: merge into the 4-bit base, deq(Q(W))"
    )
    add_switch(parser, "--bnb_4bit_use_double_quant", "with --bnb_4bit_quant_type: the block scales quantized too")
    add_switch(parser, "--requantize", "with --bnb_4bit_quant_type: W + Δ quantized again (merge_and_unload in 4-bit)")
    add_residual_base(parser)
    add_overwrite(parser)
    args = parse_with_config(parser, argv)
    four_bit = four_bit_flags(args)
    setup_logging(args.verbose)
    started = time.perf_counter()

    precision = dtype_of(args.precision)
    device = resolve_device(args.device)
    base_dir = resolve_model(args.base_model, "base model")
    config = read_config(base_dir)
    check_base_supported(config, base_dir)
    adapter = LoraAdapter(resolve_adapter(args.lora_path), base_dir, args.residual_base)
    check_output_dir(args.output_dir, [base_dir, adapter.folder], args.overwrite)

    with CheckpointIndex(base_dir) as base, staged_output_dir(args.output_dir, args.overwrite) as staging:
        if args.engine == "peft":
            merge_with_peft(base_dir, adapter.folder, staging, precision, device, four_bit)
            what = "merged with peft's merge_and_unload"
        else:
            quantized = QuantizedBase(four_bit, quantized_weights(base_dir, base, config)) if four_bit else None
            if quantized is not None:
                check_requantizable(adapter, quantized)
            total = sum(info.nbytes for info in base.tensors.values())
            with tensor_progress(total, "merge", args.verbose, unit="B") as step:
                summary = merge_checkpoint(
                    base, adapter, staging, precision, device, config, on_tensor=step, four_bit=quantized
                )
            write_model_files(config, base_dir, adapter.folder, staging, precision, summary.untied, summary.vocabulary)
            what = f"{len(summary.changed)} of {summary.tensors} tensors changed"
            if quantized is not None:
                how = "re-quantized after the merge" if four_bit.requantize else "the adapter merged into it"
                what += f", {len(quantized.weights)} weights as the {four_bit.describe()} 4-bit base gives them ({how})"
            if summary.untied:
                log.info(
                    "note: the adapter changes the output head and the input embedding differently, which the "
                    "unmerged model keeps apart: lm_head.weight is written untied (tie_word_embeddings: false)"
                )
            if summary.vocabulary:
                log.info(
                    "note: the adapter's trained embedding and head copies resize the vocabulary from "
                    f"{summary.vocabulary[0]} to {summary.vocabulary[1]} rows (config.json's vocab_size follows)"
                )

    log.info(
        f"{what} at {args.precision} on {device} -> {args.output_dir} "
        f"in {time.perf_counter() - started:.2f} s, peak memory {peak_memory_gb():.2f} GB"
    )
    return 0


def four_bit_flags(args) -> FourBit | None:
    if args.bnb_4bit_quant_type is None:
        for flag in ("bnb_4bit_use_double_quant", "requantize"):
            if getattr(args, flag):
                raise UserError(f"--{flag} needs --bnb_4bit_quant_type (nf4 or fp4)")
        return None
    return FourBit(args.bnb_4bit_quant_type, args.bnb_4bit_use_double_quant, args.requantize)


if __name__ == "__main__":
    run(main)
