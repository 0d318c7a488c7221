"""compare's reports: comparison_report.json / .csv and the console block (the schema is in docs/reports.md)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

from common.compare.comparison import Comparison
from common.compare.diagnosis import Diagnosis
from common.numerics.finite import json_number, strict_json
from common.numerics.metrics import PERFECT_COSINE
from common.numerics.precision import short_name
from common.taskvec.task_vector import TauStatus

REPORT_FIELDS = ["name", "status", "cosine", "max_abs_diff", "rel_error", "norm_lora", "norm_task_vector"]
EXTRA_FIELDS = [
    "scale",
    "scale_sigma",
    "max_diff_ulps",
    "within_rounding",
    "reproduces_merge",
    "rounding_floor",
    "tau_status",
]


def comparison_summary(comparison: Comparison, verdict: Diagnosis) -> dict:
    shared = comparison.shared
    cosines = [c.cosine for c in shared]
    return {
        "shared": len(shared),
        "lora_only": len(comparison.lora_only),
        "task_vector_only": len(comparison.task_vector_only),
        "task_vector_only_unchanged": comparison.only_count(TauStatus.UNCHANGED),
        "artifacts": comparison.only_count(TauStatus.ROUNDING_ARTIFACT),
        "task_vector_only_changed": comparison.only_count(TauStatus.CHANGED),
        "task_vector_only_unclassified": comparison.only_count(TauStatus.UNCLASSIFIED),
        "mean_cosine": sum(cosines) / len(cosines) if cosines else None,
        "min_cosine": min(cosines) if cosines else None,
        "max_abs_diff": max((c.max_abs_diff for c in shared), default=None),
        "perfect_matches": sum(c > PERFECT_COSINE for c in cosines),
        "equivalent": verdict.equivalent,
        "cause": verdict.cause,
        "causes": verdict.causes,
        "reason": verdict.reason,
        "evidence": {k: json_number(v) for k, v in verdict.evidence.items()},
        "tolerance": comparison.tolerance,
        "merge_dtype": short_name(comparison.merge_dtype) if comparison.merge_dtype else None,
        "quantization": quantization_summary(comparison),
    }


IDENTITY = ("base_fingerprint", "finetuned_fingerprint")  # τ's header: what binds a report to its τ


def task_vector_identity(task_vector) -> dict[str, str | None]:
    """The τ a comparison is of: its file and the two models' fingerprints its header records (analyze --lora_file
    takes compare's verdict from the report beside lora_deltas.safetensors only for that τ)."""
    return {"source": str(task_vector.source), **{key: task_vector.metadata.get(key) for key in IDENTITY}}


def verdict_of_report(report_path: Path, task_vector) -> Diagnosis | None:
    """compare's verdict from its comparison_report.json, when the report is of this τ (both fingerprints recorded
    and equal); None otherwise."""
    if not report_path.is_file():
        return None
    try:
        summary = json.loads(report_path.read_text())["summary"]
        recorded = summary["task_vector"]
        if not all(recorded.get(k) and recorded.get(k) == task_vector.metadata.get(k) for k in IDENTITY):
            return None
        return Diagnosis(summary["cause"], list(summary["causes"]), summary["reason"], dict(summary["evidence"]))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def quantization_summary(comparison: Comparison) -> dict | None:
    """What compare found of a merge into a 4-bit base (None: not one)."""
    q = comparison.quantized
    if q is None:
        return None
    return {
        "proven": q.proven,
        "quant_type": q.four_bit.quant_type if q.four_bit else None,
        "double_quant": q.four_bit.double_quant if q.four_bit else None,
        "merge": q.merge,
        "weights_outside_the_adapter": len(q.outside),
        "adapted_reproduced": q.adapted,
    }


def tensor_rows(comparison: Comparison) -> list[dict]:
    """One row per tensor: shared ones with metrics, the others with their status only."""
    rows = [{k: json_number(v) for k, v in asdict(c).items()} for c in comparison.shared]
    empty = dict.fromkeys(REPORT_FIELDS[2:] + EXTRA_FIELDS)
    rows += [{**empty, "name": n, "status": "lora_only"} for n in comparison.lora_only]
    rows += [{**empty, "name": n, "status": s.value} for n, s in comparison.task_vector_only.items()]
    return [{k: row[k] for k in REPORT_FIELDS + EXTRA_FIELDS} for row in rows]


def write_comparison_reports(summary: dict, rows: list[dict], out_dir: Path) -> None:
    report = {"summary": summary, "tensors": rows}
    (out_dir / "comparison_report.json").write_text(strict_json(report))
    with open(out_dir / "comparison_report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=REPORT_FIELDS + EXTRA_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def write_logit_rows(prompts: list, out_dir: Path) -> None:
    """logit_comparison.csv: the logit check's figures, a row per prompt."""
    rows = [asdict(p) for p in prompts]
    with open(out_dir / "logit_comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def console_block(summary: dict) -> str:
    """The seed README's analysis block, with the sets and the verdict's reason."""
    n = summary["shared"]
    lines = ["MATHEMATICAL EQUIVALENCE ANALYSIS:", f"   Analyzing {n} shared tensors..."]
    if n:
        lines += [
            f"   Average cosine similarity: {summary['mean_cosine']:.6f} (min {summary['min_cosine']:.6f})",
            f"   Max absolute difference: {summary['max_abs_diff']:.2e} (tolerance {summary['tolerance']:g})",
            f"   Perfect matches (>{PERFECT_COSINE}): {summary['perfect_matches']}/{n} "
            f"({100 * summary['perfect_matches'] / n:.1f}%)",
        ]
    lines.append(
        f"   Task-vector-only tensors: {summary['task_vector_only']} "
        f"({summary['task_vector_only_unchanged']} unchanged, "
        f"{summary['artifacts']} rounding artifacts, {summary['task_vector_only_changed']} changed"
        + (
            f", {summary['task_vector_only_unclassified']} unclassified)"
            if summary["task_vector_only_unclassified"]
            else ")"
        )
    )
    lines.append(f"   LoRA-only tensors (missing from the task vector): {summary['lora_only']}")
    outcome = "VALIDATION SUCCESSFUL" if summary["equivalent"] else "VALIDATION FAILED"
    return "\n".join(lines + ["", f"{outcome}: {summary['reason']}"])
