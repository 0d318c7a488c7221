"""Step 2: extract the task vector τ = finetuned − base, tensor by tensor, with an exact account.

    python extract_task_vectors.py --base_model bigcode/starcoder2-3b \\
        --finetuned_model merged_model_fp32/ --output_dir task_vectors_fp32/
    python extract_task_vectors.py --config extract_task_vectors_config.yml

Writes <output_dir>/task_vector.safetensors (fp32; with --shard_size, shards and an index json) and
<output_dir>/task_vector_stats.json, which classifies every tensor as changed, rounding_artifact (the
finetuned tensor is just the base rounded to a lower precision) or unchanged. Streaming never
instantiates a model, so --trust_remote_code is accepted for compatibility but never needed.

Where the maths lives: common/taskvec/task_vector.py (`task_vector`, `tensor_status`); docs/maths.md.
"""

from __future__ import annotations

from pathlib import Path

from common.cli import (
    add_overwrite,
    add_switch,
    base_parser,
    byte_size,
    folder_path,
    log,
    parse_with_config,
    require,
    resolve_device,
    run,
    setup_logging,
    tensor_progress,
)
from common.errors import UserError
from common.io.outputs import check_output_dir, staged_output_dir
from common.io.safetensors_io import CheckpointIndex, ShardedWriter
from common.io.sources import resolve_model
from common.model.layout import fingerprint, read_config, stored_dtype
from common.model.quantization import QUANT_TYPES, DequantizedBase, FourBit
from common.taskvec.task_vector import (
    STATS_FILE,
    check_same_architecture,
    extract_task_vector,
    header_metadata,
    non_finite_task_vector_warnings,
    plan_extraction,
    task_vector_specs,
    write_stats,
)

COMPUTE_DTYPES = {"fp32": "float32", "fp64": "float64"}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--base_model", type=str, default=None, help="hub id or local folder of the base")
    parser.add_argument("--finetuned_model", type=str, default=None, help="merged model folder from step 1")
    parser.add_argument(
        "--output_dir", type=folder_path, default=Path("task_vectors"), help="folder for the task vector"
    )
    parser.add_argument("--compute_dtype", default="fp32", choices=list(COMPUTE_DTYPES), help="dtype of τ")
    parser.add_argument("--shard_size", type=byte_size, default=None, help="write shards of this size (e.g. 2GB)")
    add_switch(parser, "--skip_unchanged", "leave out tensors whose τ is exactly zero (listed in the stats)")
    add_switch(parser, "--allow_shape_mismatch", "subtract the rows both models have (e.g. a resized vocabulary)")
    add_switch(
        parser,
        "--trust_remote_code",
        "accepted for compatibility (default false): extraction streams tensors and never runs model code",
    )
    parser.add_argument(
        "--bnb_4bit_quant_type", choices=QUANT_TYPES, default=None, help="QLoRA: subtract the 4-bit base, deq(Q(W))"
    )
    add_switch(parser, "--bnb_4bit_use_double_quant", "with --bnb_4bit_quant_type: the block scales quantized too")
    add_overwrite(parser)
    args = parse_with_config(parser, argv)
    require(args, "base_model", "finetuned_model")
    if args.bnb_4bit_use_double_quant and not args.bnb_4bit_quant_type:
        raise UserError("--bnb_4bit_use_double_quant needs --bnb_4bit_quant_type (nf4 or fp4)")
    setup_logging(args.verbose)

    import torch

    compute_dtype = getattr(torch, COMPUTE_DTYPES[args.compute_dtype])
    device = resolve_device(args.device)
    base_dir = resolve_model(args.base_model, "base model")
    finetuned_dir = resolve_model(args.finetuned_model, "finetuned model")
    check_output_dir(args.output_dir, [base_dir, finetuned_dir], args.overwrite)
    configs = (read_config(base_dir, required=False), read_config(finetuned_dir, required=False))
    check_same_architecture(*configs)

    sources = {"base_model": args.base_model, "finetuned_model": args.finetuned_model}
    with (
        CheckpointIndex(base_dir) as base,
        CheckpointIndex(finetuned_dir) as finetuned,
        staged_output_dir(args.output_dir, args.overwrite) as staging,
    ):
        sources |= {"base_fingerprint": fingerprint(base), "finetuned_fingerprint": fingerprint(finetuned)}
        if args.bnb_4bit_quant_type:  # τ against the 4-bit base a QLoRA adapter was trained on
            four_bit = FourBit(args.bnb_4bit_quant_type, args.bnb_4bit_use_double_quant)
            base = DequantizedBase(base, base_dir, configs[0], four_bit, stored_dtype(finetuned))
            sources |= four_bit.header()
        pairs, extraction = plan_extraction(base, finetuned, configs, args.allow_shape_mismatch)
        specs = task_vector_specs(base, pairs, compute_dtype)
        metadata = header_metadata(sources, extraction, compute_dtype, configs[0])
        writer = ShardedWriter(staging, specs, args.shard_size or 2**63, metadata, stem="task_vector")
        with writer, tensor_progress(sum(s.nbytes for s in specs), "extract", args.verbose, unit="B") as step:
            extract_task_vector(
                base, finetuned, pairs, extraction, writer, device, compute_dtype, args.skip_unchanged, on_tensor=step
            )
        write_stats(extraction, staging / STATS_FILE, sources)
        non_finite = non_finite_task_vector_warnings(base, finetuned, pairs, extraction)

    log.info(extraction.summary_line())
    for line in extraction.left_out_lines():
        log.info(line)
    skipped = sum(t.skipped for t in extraction.tensors)
    if skipped:
        log.info(f"{skipped} unchanged tensors left out of the file (--skip_unchanged)")
    for line in non_finite:
        log.warning(line)
    files = [f for f, _ in writer.shards] + ([writer.index_name] if len(writer.shards) > 1 else [])
    log.info(f"wrote {', '.join(files)} and {STATS_FILE} in {args.output_dir}/")
    return 0


if __name__ == "__main__":
    run(main)
