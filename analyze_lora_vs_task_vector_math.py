"""Step 4: the mathematics of τ against Δ: ranks, singular spectra, subspace angles, residuals.

    python analyze_lora_vs_task_vector_math.py --lora_file comparison_results/lora_deltas.safetensors \
        --task_vector_file task_vectors_fp32/task_vector.safetensors --output_dir mathematical_analysis/

Writes analysis.json, report.md and the plots (singular value spectra; layer × module maps of the
relative error, ‖Δ‖ and the subspace angle) into --output_dir.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.analysis import analysis_report, analyze_files
from common.cli import add_overwrite, base_parser, log, resolve_device, run, setup_logging, tensor_progress
from common.outputs import check_output_dir, staged_output_dir
from common.plots import analysis_plots
from common.reports import analysis_markdown
from common.safetensors_io import CheckpointIndex
from common.task_vector import stats_beside


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--lora_file", type=Path, required=True, help="lora_deltas.safetensors from step 3")
    parser.add_argument("--task_vector_file", type=Path, required=True, help="task_vector.safetensors from step 2")
    parser.add_argument("--output_dir", type=Path, default=Path("mathematical_analysis"), help="report folder")
    parser.add_argument(
        "--full_svd", action="store_true", help="exact SVDs even of large matrices (default: randomized above 512)"
    )
    add_overwrite(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    device = resolve_device(args.device)
    check_output_dir(args.output_dir, [args.lora_file, args.task_vector_file], args.overwrite)
    with (
        CheckpointIndex(args.lora_file) as lora_deltas,
        CheckpointIndex(args.task_vector_file) as task_vector,
        staged_output_dir(args.output_dir) as staging,
    ):
        with tensor_progress(len(lora_deltas), "analyze", args.verbose) as step:
            known = stats_beside(args.task_vector_file)
            analysis = analyze_files(lora_deltas, task_vector, device, step, args.full_svd, known)
        report = analysis_report(analysis)
        (staging / "analysis.json").write_text(json.dumps(report, indent=2) + "\n")
        plots = analysis_plots(analysis.tensors, staging)
        (staging / "report.md").write_text(analysis_markdown(report, plots))

    log.info("FINDINGS:")
    for line in report["summary"]["findings"]:
        log.info(f"   {line}")
    log.info(f"\nanalysis.json, report.md and {', '.join(plots)} in {args.output_dir}/")
    return 0


if __name__ == "__main__":
    run(main)
