"""Step 4: the mathematics of τ against Δ: ranks, singular spectra, subspace angles, residuals.

    python analyze_lora_vs_task_vector_math.py --lora_file comparison_results/lora_deltas.safetensors \
        --task_vector_file task_vectors_fp32/task_vector.safetensors --output_dir mathematical_analysis/

Δ comes from --lora_file (compare's lora_deltas.safetensors) or from the adapter itself (--lora_path:
Δ in float64 and a plain LoRA's SVD exactly from its factors). --base_model adds the residual in ulps of
the merge precision. Writes analysis.json, report.md and the plots (singular value spectra; layer × module
maps of the relative error, ‖Δ‖ and the subspace angle; with a base, the residual histogram in ulps).
--export_lora RANK (or --export_lora_energy FRACTION) also writes τ's analysed tensors as a peft adapter,
by truncated SVD, into exported_lora/, with each tensor's reconstruction error in analysis.json. τ comes from
--task_vector_file or, with --finetuned_model and --base_model, is computed as extract would (no τ file): one
command from a full fine-tune to an adapter.

    python analyze_lora_vs_task_vector_math.py --base_model bigcode/starcoder2-3b \
        --finetuned_model my_full_finetune/ --export_lora 64 --skip_plots --intruder_k 0 --output_dir exported/

Where the maths lives: common/numerics/spectra.py (ranks, SVDs, angles), common/numerics/metrics.py (residuals, the
rounding bound), common/analysis/export.py (the LoRA export), common/analysis/report.py (the findings);
docs/maths.md, docs/reports.md.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from common.analysis.analysis import Analysis, VerdictEvidence, analyze_files, deltas_from_adapter, deltas_from_file
from common.analysis.export import FOLDER, ExportRequest, LoraExporter, recorded_base_dir
from common.analysis.report import analysis_markdown, analysis_report
from common.analysis.several import analyze_several
from common.cli import (
    add_overwrite,
    add_residual_base,
    add_switch,
    at_most_one,
    base_parser,
    count_or_zero,
    folder_path,
    fraction,
    log,
    parse_with_config,
    positive_int,
    rank_or_auto,
    regex,
    require,
    resolve_device,
    run,
    setup_logging,
    tensor_progress,
)
from common.compare.quantized_merge import quantization_of
from common.compare.report import verdict_of_report
from common.errors import UserError
from common.io.outputs import check_output_dir, staged_output_dir
from common.io.safetensors_io import CheckpointIndex
from common.io.sources import resolve_adapter, resolve_model
from common.io.tensor_source import TensorSource
from common.lora.adapter import LoraAdapter
from common.lora.deltas import plan_deltas
from common.model.layout import read_config
from common.model.module_kinds import ModuleKinds
from common.model.quantization import DequantizedBase, FourBit
from common.numerics.finite import strict_json
from common.numerics.precision import dtype_from_name
from common.taskvec.of_models import TaskVectorOfModels
from common.taskvec.task_vector import ExtractionRecord, stats_beside


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--lora_file", type=Path, default=None, help="lora_deltas.safetensors from step 3")
    parser.add_argument(
        "--lora_path",
        nargs="+",
        default=None,
        help="or the adapter (folder or hub id): Δ exact, SVD from its factors; several: their interference",
    )
    parser.add_argument(
        "--task_vector_file",
        type=Path,
        nargs="+",
        default=None,
        help="task_vector.safetensors from step 2; several (with or without adapters): their interference",
    )
    parser.add_argument(
        "--merged_task_vector", type=Path, default=None, help="several inputs: τ of their merge, for retention"
    )
    parser.add_argument(
        "--densities", type=fraction, nargs="+", default=[0.2], help="several inputs: top-k shares for sign conflicts"
    )
    parser.add_argument(
        "--overlap_rank", type=positive_int, default=16, help="several inputs: singular vectors of a dense τ compared"
    )
    parser.add_argument(
        "--finetuned_model", default=None, help="or the finetuned model, with --base_model: τ computed, not read"
    )
    parser.add_argument("--base_model", default=None, help="base model (hub id or folder): residual in ulps")
    parser.add_argument("--output_dir", type=folder_path, default=Path("mathematical_analysis"), help="report folder")
    add_switch(parser, "--full_svd", "exact SVDs even of large matrices (else randomized above 512)")
    parser.add_argument(
        "--intruder_k",
        type=count_or_zero,
        default=10,
        help="with --base_model: intruders among the top-k singular vectors (0: off)",
    )
    parser.add_argument(
        "--intruder_epsilon", type=fraction, default=0.5, help="an intruder's largest |cosine| is below it"
    )
    add_export_flags(parser)
    add_switch(parser, "--skip_plots", "write analysis.json and report.md only (an export-only run)")
    add_residual_base(parser)
    add_overwrite(parser)
    args = parse_with_config(parser, argv)
    task_vectors, adapters = as_list(args.task_vector_file), as_list(args.lora_path)
    if len(task_vectors) > 1 or len(adapters) > 1:
        return several(args, [Path(t) for t in task_vectors], adapters)
    if args.merged_task_vector is not None:
        raise UserError("--merged_task_vector: give several inputs (--task_vector_file T1 T2, --lora_path A B)")
    args.task_vector_file = Path(task_vectors[0]) if task_vectors else None
    args.lora_path = adapters[0] if adapters else None
    at_most_one(args, "task_vector_file", "finetuned_model", required=True)
    if args.finetuned_model:
        require(args, "base_model")
    at_most_one(args, "lora_file", "lora_path")
    at_most_one(args, "export_lora", "export_lora_energy")
    setup_logging(args.verbose)

    device = resolve_device(args.device)
    base_dir = resolve_model(args.base_model, "base model") if args.base_model else None
    finetuned_dir = resolve_model(args.finetuned_model, "finetuned model") if args.finetuned_model else None
    adapter = LoraAdapter(resolve_adapter(args.lora_path), base_dir, args.residual_base) if args.lora_path else None
    lora = adapter.folder if adapter else args.lora_file
    inputs = [args.task_vector_file or finetuned_dir] + ([lora] if lora else []) + ([base_dir] if base_dir else [])
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(CheckpointIndex(base_dir)) if base_dir else None
        if finetuned_dir is not None:
            finetuned = stack.enter_context(CheckpointIndex(finetuned_dir))
            sources = {"base_model": args.base_model, "finetuned_model": args.finetuned_model}
            task_vector = TaskVectorOfModels(base, finetuned, sources)
            known = task_vector.statuses
            record = ExtractionRecord(dict(known))
            for line in task_vector.extraction.left_out_lines():
                log.info(line)
        else:
            task_vector = stack.enter_context(CheckpointIndex(args.task_vector_file))
            record = stats_beside(task_vector, args.task_vector_file)
            known = record.status
            four_bit = FourBit.recorded(task_vector.metadata)
            merge_dtype = dtype_from_name(task_vector.metadata.get("finetuned_dtype", ""))
            if base is not None and four_bit is not None and merge_dtype is not None:  # τ of the 4-bit base
                base = DequantizedBase(base, base_dir, read_config(base_dir), four_bit, merge_dtype)
        deltas, count = None, len(task_vector)
        if adapter is not None:
            stack.callback(adapter.close)
            config = read_config(base_dir) if base_dir else {}
            plan = plan_deltas(adapter, base, config, set(task_vector.names()))
            merge_dtype = dtype_from_name(task_vector.metadata.get("finetuned_dtype", ""))
            deltas = deltas_from_adapter(adapter, plan, base, device, merge_dtype)
        elif args.lora_file is not None:
            lora_deltas = stack.enter_context(CheckpointIndex(args.lora_file))
            deltas = deltas_from_file(lora_deltas, base, device)
        export = export_setup(args, task_vector, base_dir)
        recorded_base = recorded_base_dir(base_dir, task_vector.metadata)  # the export reads the base τ records
        check_output_dir(args.output_dir, inputs + ([recorded_base] if recorded_base else []), args.overwrite)
        staging = stack.enter_context(staged_output_dir(args.output_dir, args.overwrite))
        exporter = None
        if export is not None:  # its factors go to a scratch file in the staging folder as they are made
            exporter = stack.enter_context(LoraExporter(*export, task_vector.shapes(), scratch_dir=staging))
        found, quantization = None, None
        if adapter is not None and base is not None and not isinstance(base, DequantizedBase):
            found, quantization = quantization_of(task_vector, base, base_dir, known, adapter, plan, device)
        verdict = None
        if adapter is not None:  # compare's evidence, gathered on the way: the headline is compare's diagnosis
            verdict = VerdictEvidence(adapter, plan, task_vector, base, args.base_model, record)
        with tensor_progress(count, "analyze", args.verbose) as step:
            intruders = (args.intruder_k, args.intruder_epsilon)
            measured = analyze_files(
                deltas, task_vector, device, step, args.full_svd, known, exporter, base, intruders, quantization,
                verdict,
            )  # fmt: skip
        diagnosis = None
        if verdict is not None:
            diagnosis = verdict.diagnose(task_vector, base, known, found)
        elif args.lora_file is not None:  # compare's verdict from the report beside its deltas, when of this τ
            diagnosis = verdict_of_report(args.lora_file.parent / "comparison_report.json", task_vector)
        exported = None
        if exporter is not None:
            base_model = task_vector.metadata.get("base_model") or args.base_model
            exported = exporter.write(staging / FOLDER, dict(adapter.config.raw) if adapter else None, base_model)
        analysis = Analysis(
            measured,
            lora_source="lora_path" if adapter else "lora_file" if args.lora_file else None,
            quantized_base=found.four_bit.describe() if found else None,
            verdict=diagnosis,
            export=exported,
        )
        report = analysis_report(analysis)
        (staging / "analysis.json").write_text(strict_json(report))
        plots = [] if args.skip_plots else draw_plots(analysis, staging)
        (staging / "report.md").write_text(analysis_markdown(report, plots))

    log.info("FINDINGS:")
    for line in report["summary"]["findings"]:
        log.info(f"   {line}")
    log.info(f"\n{', '.join(['analysis.json', 'report.md', *plots])} in {args.output_dir}/")
    if analysis.export is not None:
        log.info(f"the exported adapter in {args.output_dir / FOLDER}/ ({analysis.export.seconds:.1f} s)")
    return 0


def as_list(value: object) -> list:
    """A flag of several values (a single one from a --config file)."""
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def several(args, task_vectors: list[Path], adapters: list[str]) -> int:
    """Several inputs: their interference (common/analysis/several.py)."""
    for flag in ("finetuned_model", "lora_file", "export_lora", "export_lora_energy"):
        if getattr(args, flag, None) is not None:
            raise UserError(f"--{flag} analyses one input; several inputs are compared with each other")
    setup_logging(args.verbose)
    base_dir = resolve_model(args.base_model, "base model") if args.base_model else None
    analyze_several(
        task_vectors, [resolve_adapter(a) for a in adapters], base_dir, args.merged_task_vector, args.output_dir,
        tuple(args.densities), args.overlap_rank, resolve_device(args.device), args.overwrite, args.skip_plots,
    )  # fmt: skip
    return 0


def add_export_flags(parser) -> None:
    parser.add_argument(
        "--export_lora",
        type=rank_or_auto,
        metavar="RANK|auto",
        help="also write τ as a peft LoRA: rank RANK, or auto (the singular values above the noise threshold)",
    )
    parser.add_argument(
        "--export_lora_energy",
        type=fraction,
        metavar="FRACTION",
        help="the same, per tensor the smallest rank keeping FRACTION of ‖τ‖²_F",
    )
    parser.add_argument("--max_rank", type=positive_int, default=None, help="cap of the auto and energy ranks (256)")
    parser.add_argument("--export_include", type=regex, default=None, help="export only tensors matching this regex")
    parser.add_argument("--export_exclude", type=regex, default=None, help="do not export tensors matching it")
    parser.add_argument(
        "--export_embeddings",
        choices=["lora", "copy"],
        default="lora",
        help="an embedding as an embedding LoRA, or as a full copy (modules_to_save; needs --base_model)",
    )


def export_setup(
    args: argparse.Namespace, task_vector: TensorSource, base_dir: Path | None
) -> tuple[ExportRequest, ModuleKinds] | None:
    """--export_lora's request and the base's layer kinds; refused before the analysis when no layer can be told."""
    if not (args.export_lora or args.export_lora_energy):
        return None
    request = ExportRequest(
        rank=args.export_lora if isinstance(args.export_lora, int) else None,
        energy=args.export_lora_energy,
        auto=args.export_lora == "auto",
        max_rank=args.max_rank,
        full_svd=args.full_svd,
        include=args.export_include,
        exclude=args.export_exclude,
        embeddings=args.export_embeddings,
    )
    kinds = ModuleKinds(recorded_base_dir(base_dir, task_vector.metadata), task_vector.metadata.get("model_type"))
    if kinds.blind_reason():  # no matrix's layer can be told: refused before the analysis, not after
        raise UserError(f"--export_lora: {kinds.blind_reason()}")
    return request, kinds


def draw_plots(analysis: Analysis, folder: Path) -> list[str]:
    """The analysis's plots; matplotlib (about a second to import) only when they are drawn."""
    from common.analysis.plots import analysis_plots

    return analysis_plots(analysis.measured, folder)


if __name__ == "__main__":
    run(main)
