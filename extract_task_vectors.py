"""Step 2: extract the task vector τ = finetuned − base, tensor by tensor, with an exact account.

    python extract_task_vectors.py --base_model bigcode/starcoder2-3b \
        --finetuned_model merged_model_fp32/ --output_dir task_vectors_fp32/
    python extract_task_vectors.py --config extract_task_vectors_config.yml

Writes <output_dir>/task_vector.safetensors (fp32) and <output_dir>/task_vector_stats.json, which
classifies every tensor as changed, rounding_artifact (the finetuned tensor is just the base rounded
to a lower precision) or unchanged. Streaming never instantiates a model, so --trust_remote_code is
accepted for compatibility but never needed.
"""

from __future__ import annotations

from pathlib import Path

from common.cli import (
    add_overwrite,
    add_switch,
    base_parser,
    log,
    parse_with_config,
    require,
    resolve_device,
    run,
    setup_logging,
    tensor_progress,
)
from common.outputs import check_output_dir, staged_output_dir
from common.safetensors_io import CheckpointIndex
from common.sources import resolve_model
from common.task_vector import check_same_architecture, extract_task_vector, write_stats

TASK_VECTOR_FILE = "task_vector.safetensors"
STATS_FILE = "task_vector_stats.json"


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--base_model", type=str, default=None, help="hub id or local folder of the base")
    parser.add_argument("--finetuned_model", type=str, default=None, help="merged model folder from step 1")
    parser.add_argument("--output_dir", type=Path, default=None, help="folder for the task vector")
    add_switch(
        parser,
        "--trust_remote_code",
        "accepted for compatibility (default false): extraction streams tensors and never runs model code",
    )
    add_overwrite(parser)
    args = parse_with_config(parser, argv)
    require(args, "base_model", "finetuned_model", "output_dir")
    setup_logging(args.verbose)

    device = resolve_device(args.device)
    base_dir = resolve_model(args.base_model, "base model")
    finetuned_dir = resolve_model(args.finetuned_model, "finetuned model")
    check_output_dir(args.output_dir, [base_dir, finetuned_dir], args.overwrite)
    check_same_architecture(base_dir, finetuned_dir)

    sources = {"base_model": args.base_model, "finetuned_model": args.finetuned_model}
    with (
        CheckpointIndex(base_dir) as base,
        CheckpointIndex(finetuned_dir) as finetuned,
        staged_output_dir(args.output_dir) as staging,
    ):
        with tensor_progress(len(base), "extract", args.verbose) as step:
            extraction = extract_task_vector(
                base, finetuned, staging / TASK_VECTOR_FILE, device, sources, on_tensor=step
            )
        write_stats(extraction, staging / STATS_FILE, sources)

    log.info(extraction.summary_line())
    for label, names in [
        ("only in the base (not in the task vector)", extraction.only_in_base),
        ("only in the finetuned model (not in the task vector)", extraction.only_in_finetuned),
        ("with different shapes (not in the task vector)", extraction.shape_mismatch),
        ("not floating point (not in the task vector)", extraction.non_float),
    ]:
        if names:
            log.info(f"{len(names)} tensors {label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
    log.info(f"wrote {args.output_dir / TASK_VECTOR_FILE} and {args.output_dir / STATS_FILE}")
    return 0


if __name__ == "__main__":
    run(main)
