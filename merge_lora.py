"""Step 1: merge a LoRA adapter into its base model, tensor by tensor, at fp32, fp16 or bf16.

    python merge_lora.py --base_model bigcode/starcoder2-3b --lora_path checkpoint-40000/ \\
        --output_dir merged_model_fp32 --precision fp32

The result is a normal Hugging Face model folder, bitwise equal to peft's `merge_and_unload()` on
the same device, written without ever holding the model in memory. `--engine peft` runs peft's own
merge instead (the whole model in memory), kept for cross-checks.

Several inputs (docs/combine.md): `--lora_path A B --task_vector_path T --weights 1 0.5 -1` writes θ₀ + Σ wᵢ·Δᵢ,
weights in the order adapters then task vectors, with peft's rounding (set_scale and merge_and_unload of the
adapters loaded together; the task vectors as mergekit's task_arithmetic adds them) or `--combine_rounding exact`
(the float64 sum rounded once), and records what it combined in combination.json beside the weights.

QLoRA (an adapter trained on the base loaded 4-bit): `--bnb_4bit_quant_type nf4 [--bnb_4bit_use_double_quant]`
merges into deq(Q(W)), the weights it was trained on (transformers' dequantize(), then merge_and_unload), bit for
bit; with `--requantize`, as merge_and_unload on the 4-bit model then dequantize() (common/model/quantization.py).

Where the maths lives: common/lora/arithmetic.py (peft's arithmetic, change by change), common/lora/merge_plan.py
(which tensor gets which change), common/lora/merge.py (the streaming loop); docs/maths.md and docs/adapters.md
explain them.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from common.cli import (
    add_overwrite,
    add_residual_base,
    add_switch,
    base_parser,
    finite_weight,
    folder_path,
    log,
    parse_with_config,
    peak_memory_gb,
    resolve_device,
    run,
    setup_logging,
    tensor_progress,
)
from common.combine.combine import combine_checkpoint
from common.combine.plan import ROUNDINGS, AdapterInput, CombinationInput, TaskVectorInput, plan_combination
from common.combine.record import FORMULA, RECORD_FILE, task_vectors_of_another_base, write_record
from common.errors import UserError
from common.io.outputs import check_output_dir, staged_output_dir
from common.io.safetensors_io import CheckpointIndex
from common.io.sources import resolve_adapter, resolve_model
from common.lora.adapter import LoraAdapter
from common.lora.merge import QuantizedBase, check_requantizable, merge_checkpoint, merge_with_peft, write_model_files
from common.model.layout import check_base_supported, read_config
from common.model.quantization import QUANT_TYPES, FourBit, quantized_weights
from common.numerics.precision import PRECISIONS, dtype_of

DEFAULT_ADAPTER = "checkpoint-40000/"


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--base_model", default="bigcode/starcoder2-3b", help="hub id or local folder")
    parser.add_argument(
        "--lora_path",
        nargs="+",
        default=None,
        help=f"adapter or checkpoint-N folder, or hub id; several to combine them (default: {DEFAULT_ADAPTER}, "
        "unless --task_vector_path is given)",
    )
    parser.add_argument(
        "--task_vector_path",
        nargs="+",
        default=None,
        help="task vector files (or folders) written by extract_task_vectors.py, added to the base with the adapters",
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        type=finite_weight,
        default=None,
        help="one weight per input, adapters first, then task vectors, each in the order given (default: all 1)",
    )
    parser.add_argument(
        "--combine_rounding",
        choices=ROUNDINGS,
        default="peft",
        help="with several inputs or --weights: peft (the adapters as peft merges them after set_scale, task vectors "
        "as mergekit's task_arithmetic adds them) or exact (the float64 sum rounded once)",
    )
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
    adapters, task_vectors = input_paths(args)
    if len(adapters) + len(task_vectors) > 1 or task_vectors or args.weights or args.combine_rounding == "exact":
        return combine(args, adapters, task_vectors, four_bit, base_dir, config, precision, device, started)
    adapter = LoraAdapter(resolve_adapter(adapters[0]), base_dir, args.residual_base)
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


def combine(
    args: argparse.Namespace,
    adapters: list[str],
    task_vectors: list[str],
    four_bit: FourBit | None,
    base_dir: Path,
    config: dict,
    precision: torch.dtype,
    device: torch.device,
    started: float,
) -> int:
    """θ₀ + Σ wᵢ·Δᵢ of several adapters and task vectors (or one, weighted), streamed; combination.json beside."""
    weights = combination_weights(args.weights, len(adapters), len(task_vectors))
    if args.engine == "peft" or four_bit is not None:
        flag = "--engine peft" if args.engine == "peft" else "--bnb_4bit_quant_type"
        raise UserError(f"{flag} merges one adapter: combine several inputs (or weigh one) without it")
    with contextlib.ExitStack() as stack:
        inputs: list[CombinationInput] = []
        for path, weight in zip(adapters, weights, strict=False):
            adapter = LoraAdapter(resolve_adapter(path), base_dir, args.residual_base)
            stack.callback(adapter.close)
            inputs.append(AdapterInput(adapter, weight, path))
        for path, weight in zip(task_vectors, weights[len(adapters) :], strict=True):
            inputs.append(TaskVectorInput(stack.enter_context(task_vector_file(path)), weight, path))
        folders = [x.adapter.folder if isinstance(x, AdapterInput) else Path(x.path) for x in inputs]
        check_output_dir(args.output_dir, [base_dir, *folders], args.overwrite)
        base = stack.enter_context(CheckpointIndex(base_dir))
        for path in task_vectors_of_another_base(inputs, base):
            log.warning(
                f"note: task vector {path} was extracted against another base than {args.base_model} (their "
                "fingerprints differ): combined all the same; combination.json records both"
            )
        plan = plan_combination(base, inputs, precision, config)
        with staged_output_dir(args.output_dir, args.overwrite) as staging:
            total = sum(spec.nbytes for spec in plan.specs)
            with tensor_progress(total, "combine", args.verbose, unit="B") as step:
                summary = combine_checkpoint(base, inputs, plan, staging, args.combine_rounding, device, on_tensor=step)
            side = folders[0] if adapters else base_dir  # the tokenizer: the first adapter's if it has one
            write_model_files(config, base_dir, side, staging, precision, plan.untied)
            write_record(staging, args.base_model, base, inputs, args.combine_rounding, precision, len(summary.changed))
    if plan.untied:
        log.info(
            "note: the inputs change the output head and the input embedding differently: lm_head.weight is "
            "written untied (tie_word_embeddings: false)"
        )
    log.info(
        f"{len(summary.changed)} of {summary.tensors} tensors changed: {FORMULA} of {len(inputs)} inputs, weights "
        f"{' '.join(f'{w:g}' for w in weights)}, {args.combine_rounding} rounding, at {args.precision} on {device} -> "
        f"{args.output_dir} ({RECORD_FILE} beside) in {time.perf_counter() - started:.2f} s, "
        f"peak memory {peak_memory_gb():.2f} GB"
    )
    return 0


def input_paths(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The adapters and task vectors given (one from --config is a single string); without either, the default
    adapter."""
    adapters, task_vectors = (
        [value] if isinstance(value, str) else list(value or []) for value in (args.lora_path, args.task_vector_path)
    )
    return (adapters or ([] if task_vectors else [DEFAULT_ADAPTER])), task_vectors


def combination_weights(weights: list[float] | float | None, adapters: int, task_vectors: int) -> list[float]:
    """One weight per input (all 1 by default); a count that does not match is refused."""
    count = adapters + task_vectors
    weights = [weights] if isinstance(weights, float) else weights
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise UserError(
            f"--weights gives {len(weights)} number{'s' * (len(weights) != 1)} for {count} input{'s' * (count != 1)} "
            f"({adapters} adapter{'s' * (adapters != 1)}, {task_vectors} task vector{'s' * (task_vectors != 1)}): "
            "one per input, adapters first, then task vectors"
        )
    return weights


@contextlib.contextmanager
def task_vector_file(path: str):
    """A task vector written by extract_task_vectors.py: a safetensors file, or the folder holding it. Its header
    records how it was computed (compute_dtype); a model given here by mistake has no such record and is refused."""
    with CheckpointIndex(Path(path)) as index:
        if "compute_dtype" not in index.metadata:
            raise UserError(
                f"task vector {path}: not written by extract_task_vectors.py (its header records no compute_dtype): "
                "a model? Extract its task vector against the base first"
            )
        yield index


def four_bit_flags(args) -> FourBit | None:
    if args.bnb_4bit_quant_type is None:
        for flag in ("bnb_4bit_use_double_quant", "requantize"):
            if getattr(args, flag):
                raise UserError(f"--{flag} needs --bnb_4bit_quant_type (nf4 or fp4)")
        return None
    return FourBit(args.bnb_4bit_quant_type, args.bnb_4bit_use_double_quant, args.requantize)


if __name__ == "__main__":
    run(main)
