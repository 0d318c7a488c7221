"""Step 3: prove (or refute) that the task vector equals the LoRA delta Δ = scaling · B @ A.

    python compare_lora_task_vector.py --base_model bigcode/starcoder2-3b --lora_path checkpoint-40000/ \
        --task_vector_path task_vectors_fp32/task_vector.safetensors --output_dir comparison_results/

Exit code 0: equivalent within --tolerance (absolute); 1: not equivalent (the last line says why, and
comparison_report.json's summary.cause names the cause); 2: bad input. Writes lora_deltas.safetensors (its header
records each tensor's configured rank, for analyze --lora_file), comparison_report.json / .csv and the plots
norm_distribution_comparison.png, relative_error_heatmap.png and (with --base_model) residual_ulp_histogram.png into
--output_dir.

With --check_logits (and --base_model): the merged model against base + adapter unmerged, on the same tokens —
top-1 agreement, max |Δ logit|, KL, greedy continuations (summary.logits, logit_comparison.csv). Evidence beside
the verdict; the exit code stays the weight-level one.

Where the maths lives: common/lora/deltas.py (Δ: `plan_deltas`, `exact_delta`), common/numerics/metrics.py
(cosine, the rounding bound), common/compare/comparison.py (the evidence), common/compare/diagnosis.py (the cause);
docs/maths.md, docs/diagnosis.md and docs/reports.md for the report's fields.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from common.analysis.analysis import ranks_metadata
from common.analysis.plots import comparison_plots
from common.cli import (
    add_overwrite,
    add_residual_base,
    add_switch,
    base_parser,
    folder_path,
    log,
    parse_with_config,
    require,
    resolve_device,
    run,
    setup_logging,
    tensor_progress,
    tolerance,
)
from common.compare.comparison import compare_adapter
from common.compare.diagnosis import diagnose
from common.compare.logits import QUANT_TYPES, compare_logits, console_line, plan_logit_check
from common.compare.quantized_merge import find_quantized_merge, quantized_pattern
from common.compare.report import (
    comparison_summary,
    console_block,
    task_vector_identity,
    tensor_rows,
    write_comparison_reports,
    write_logit_rows,
)
from common.errors import UserError
from common.io.outputs import check_output_dir, staged_output_dir
from common.io.safetensors_io import CheckpointIndex, SafetensorsWriter
from common.io.sources import resolve_adapter, resolve_model
from common.lora.adapter import LoraAdapter
from common.lora.deltas import plan_deltas
from common.model.layout import read_config
from common.model.quantization import DequantizedBase, FourBit
from common.numerics.finite import strict_json
from common.numerics.precision import PRECISIONS, dtype_from_name
from common.taskvec.task_vector import stats_beside


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--base_model", default=None, help="base model (hub id or folder): classifies artifacts")
    parser.add_argument("--lora_path", default=None, help="adapter or checkpoint-N folder, or hub id (required)")
    parser.add_argument(
        "--task_vector_path", type=Path, default=None, help="task_vector.safetensors from step 2 (required)"
    )
    parser.add_argument("--output_dir", type=folder_path, default=Path("comparison_results"), help="results folder")
    parser.add_argument("--tolerance", type=tolerance, default=1e-5, help="max |τ − Δ| allowed per element")
    add_switch(parser, "--json", "print the summary as JSON on stdout")
    add_residual_base(parser)
    add_logit_flags(parser)
    add_overwrite(parser)
    args = parse_with_config(parser, argv)
    require(args, "lora_path", "task_vector_path")
    check_logit_flags(args)
    setup_logging(args.verbose, to_stderr=args.json)

    device = resolve_device(args.device)
    base_dir = resolve_model(args.base_model, "base model") if args.base_model else None
    adapter = LoraAdapter(resolve_adapter(args.lora_path), base_dir, args.residual_base)

    with contextlib.ExitStack() as stack:
        task_vector = stack.enter_context(CheckpointIndex(args.task_vector_path))
        logit_check = None
        if args.check_logits:
            precision = PRECISIONS[args.precision] if args.precision else None
            logit_check = plan_logit_check(
                base_dir, args.finetuned_model, task_vector, args.prompts, precision, args.bnb_4bit_quant_type,
                args.bnb_4bit_use_double_quant,
            )  # fmt: skip
        inputs = [adapter.folder, args.task_vector_path] + ([base_dir] if base_dir else [])
        inputs += [logit_check.merged_dir] if logit_check else []
        check_output_dir(args.output_dir, inputs, args.overwrite)
        base = stack.enter_context(CheckpointIndex(base_dir)) if base_dir else None
        four_bit = FourBit.recorded(task_vector.metadata)
        merge_dtype = dtype_from_name(task_vector.metadata.get("finetuned_dtype", ""))
        if base is not None and four_bit is not None and merge_dtype is not None:  # τ of the 4-bit base: compare so
            base = DequantizedBase(base, base_dir, read_config(base_dir), four_bit, merge_dtype)
        plan = plan_deltas(adapter, base, read_config(base_dir) if base_dir else {}, set(task_vector.names()))
        staging = stack.enter_context(staged_output_dir(args.output_dir, args.overwrite))
        ranks = ranks_metadata(plan)  # each Δ's configured rank: analyze --lora_file reports it
        deltas = stack.enter_context(SafetensorsWriter(staging / "lora_deltas.safetensors", plan.specs, ranks))
        step = stack.enter_context(tensor_progress(len(plan.specs), "compare", args.verbose))
        record = stats_beside(task_vector, args.task_vector_path)
        comparison = compare_adapter(
            adapter, plan, task_vector, deltas, device, args.tolerance, base, record, step, args.base_model
        )
        comparison.quantized = quantized_merge(comparison, task_vector, base, base_dir, adapter, plan, device)
        result = diagnose(comparison)
        summary = comparison_summary(comparison, result) | {"task_vector": task_vector_identity(task_vector)}
        if logit_check:
            logits = compare_logits(logit_check, adapter.folder, device)
            summary["logits"] = logits.summary()
            write_logit_rows(logits.prompts, staging)
        rows = tensor_rows(comparison)
        write_comparison_reports(summary, rows, staging)
        comparison_plots(rows, comparison.ulp_errors, comparison.merge_dtype, staging)

    if args.json:
        print(strict_json(summary), end="")
    else:
        log.info(console_block(summary))
        if "logits" in summary:
            log.info(console_line(summary["logits"]))
        log.info(f"\nreports and plots in {args.output_dir}/")
    return 0 if result.equivalent else 1


def quantized_merge(comparison, task_vector, base, base_dir, adapter, plan, device):
    """Is τ of a merge into a 4-bit base (QLoRA)? Proven with the base (bitsandbytes redoes the quantization), read
    off the pattern of changed tensors without it."""
    if FourBit.recorded(task_vector.metadata) is not None:  # τ already against the 4-bit base
        return None
    if base is None or comparison.merge_dtype is None:
        return quantized_pattern(task_vector, comparison.task_vector_only)
    try:
        return find_quantized_merge(
            task_vector, base, base_dir, read_config(base_dir), comparison.task_vector_only, adapter, plan,
            comparison.merge_dtype, device,
        )  # fmt: skip
    except UserError:  # no bitsandbytes here: the pattern is all there is
        return quantized_pattern(task_vector, comparison.task_vector_only)


def add_logit_flags(parser) -> None:
    add_switch(parser, "--check_logits", "also run the merged model and base + adapter unmerged on the same tokens")
    parser.add_argument("--finetuned_model", default=None, help="merged model for --check_logits (default: τ's own)")
    parser.add_argument("--prompts", type=Path, default=None, help="--check_logits inputs: a text file, one per line")
    parser.add_argument(
        "--precision", choices=list(PRECISIONS), default=None, help="--check_logits reference dtype (default: merged's)"
    )
    parser.add_argument(
        "--bnb_4bit_quant_type", choices=QUANT_TYPES, default=None, help="--check_logits: base loaded 4-bit (QLoRA)"
    )
    add_switch(parser, "--bnb_4bit_use_double_quant", "with --bnb_4bit_quant_type: double quantization")


def check_logit_flags(args) -> None:
    """The logit check's flags make sense together: a base for the reference, the others only with the check."""
    if args.check_logits and not args.base_model:
        raise UserError("--check_logits needs --base_model: the reference is base + adapter")
    for flag in ("finetuned_model", "prompts", "precision", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant"):
        if getattr(args, flag) not in (None, False) and not args.check_logits:
            raise UserError(f"--{flag} is for --check_logits, which is not given")
    if args.bnb_4bit_use_double_quant and not args.bnb_4bit_quant_type:
        raise UserError("--bnb_4bit_use_double_quant needs --bnb_4bit_quant_type (nf4 or fp4)")


if __name__ == "__main__":
    run(main)
