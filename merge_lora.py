"""Step 1: merge a LoRA adapter into its base model, tensor by tensor, at fp32, fp16 or bf16.

    python merge_lora.py --base_model bigcode/starcoder2-3b --lora_path checkpoint-40000/ \
        --output_dir merged_model_fp32 --precision fp32

The result is a normal Hugging Face model folder, bitwise equal to peft's `merge_and_unload()`
on the same device, written without ever holding the model in memory.
"""

from __future__ import annotations

from pathlib import Path

from common.adapter import LoraAdapter
from common.cli import add_overwrite, base_parser, log, resolve_device, run, setup_logging, tensor_progress
from common.merge import merge_checkpoint, write_model_files
from common.outputs import check_output_dir, staged_output_dir
from common.precision import PRECISIONS, dtype_of
from common.safetensors_io import CheckpointIndex
from common.sources import resolve_adapter, resolve_model


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--base_model", default="bigcode/starcoder2-3b", help="hub id or local folder")
    parser.add_argument("--lora_path", default="checkpoint-40000/", help="adapter or checkpoint-N folder, or hub id")
    parser.add_argument("--output_dir", type=Path, default=Path("merged_model"), help="merged model folder")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="dtype of the merged model")
    add_overwrite(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    precision = dtype_of(args.precision)
    device = resolve_device(args.device)
    base_dir = resolve_model(args.base_model, "base model")
    adapter = LoraAdapter(resolve_adapter(args.lora_path))
    check_output_dir(args.output_dir, [base_dir, adapter.folder], args.overwrite)

    with CheckpointIndex(base_dir) as base, staged_output_dir(args.output_dir) as staging:
        with tensor_progress(len(base), "merge", args.verbose) as step:
            summary = merge_checkpoint(base, adapter, staging, precision, device, on_tensor=step)
        write_model_files(base_dir, adapter.folder, staging, precision)

    log.info(
        f"merged {len(summary.merged)} LoRA-adapted tensors into {summary.tensors} tensors "
        f"at {args.precision} on {device} -> {args.output_dir} ({len(summary.files)} weight file(s))"
    )
    return 0


if __name__ == "__main__":
    run(main)
