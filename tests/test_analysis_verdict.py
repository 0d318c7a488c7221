"""analyze's headline is compare's verdict, and no finding says what its own numbers contradict.

Over compare's diagnosis matrix (the cases of test_diagnosis.py, and a QLoRA merge), with and without the base:
analysis.json's summary.cause, causes and reason are compare's for the same τ and adapter; the first finding says it;
the residual is called a merge's rounding only for the rounding causes; no share of ‖τ‖² is negative.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_main
from test_diagnosis import ADAPTED, compare, edited_adapter, extract, model_like

import analyze_lora_vs_task_vector_math

ROUNDING_CAUSES = {"precision_rounding", "tolerance_below_rounding", "equivalent"}


def build_case(case: str, tiny, pipeline, tmp_path):
    """(adapter, τ file) for one cause of compare's matrix."""
    if case == "fp32":
        return tiny.adapter, pipeline("fp32").task_vector_file
    if case == "fp16":
        return tiny.adapter, pipeline("fp16").task_vector_file
    if case == "doubled_alpha":
        return edited_adapter(tiny.adapter, tmp_path / "adapter", lora_alpha=32), pipeline("fp32").task_vector_file
    if case == "rslora_mixed_up":
        return edited_adapter(tiny.adapter, tmp_path / "adapter", use_rslora=True), pipeline("fp32").task_vector_file
    if case == "swapped":
        return tiny.adapter, extract(pipeline("fp32").merged, tiny.base, tmp_path / "tv")
    if case == "not_merged":
        return tiny.adapter, extract(
            tiny.base, model_like(tiny.base, tmp_path / "copy", lambda t: None), tmp_path / "tv"
        )
    if case == "other_adapter":
        return tiny.other_adapter, pipeline("fp32").task_vector_file
    if case == "mlp_changed":
        generator = torch.Generator().manual_seed(3)

        def train(tensors):
            name = "model.layers.0.mlp.c_fc.weight"
            tensors[name] = tensors[name] + 1e-3 * torch.randn(tensors[name].shape, generator=generator)

        return tiny.adapter, extract(
            tiny.base, model_like(pipeline("fp32").merged, tmp_path / "m", train), tmp_path / "tv"
        )
    if case == "wrong_base":
        generator = torch.Generator().manual_seed(7)

        def perturb(tensors):
            for name, tensor in tensors.items():
                tensors[name] = tensor + 1e-3 * torch.randn(tensor.shape, generator=generator)

        other = model_like(tiny.base, tmp_path / "revision", perturb)
        return tiny.adapter, extract(other, pipeline("fp32").merged, tmp_path / "tv")
    if case == "partially_merged":
        from conftest import load_weights

        base = load_weights(tiny.base)

        def unmerge(tensors):
            for name in tensors:
                if ".layers.1." in name and any(m in name for m in ADAPTED):
                    tensors[name] = base[name]

        return tiny.adapter, extract(
            tiny.base, model_like(pipeline("fp32").merged, tmp_path / "h", unmerge), tmp_path / "tv"
        )
    if case == "qlora":
        out = tmp_path / "qlora"
        args = ["--base_model", tiny.base, "--lora_path", tiny.adapter, "--output_dir", out, "--precision", "bf16"]
        flags = ["--bnb_4bit_quant_type", "nf4", "--bnb_4bit_use_double_quant", "--device", "cpu"]
        assert run_main("merge_lora.py", *args, *flags).returncode == 0
        return tiny.adapter, extract(tiny.base, out, tmp_path / "tv")
    raise ValueError(case)


FROM_FILE = {"fp16", "doubled_alpha", "other_adapter", "qlora"}  # also checked as README's step 4 runs it
CASES = ["fp32", "fp16", "doubled_alpha", "rslora_mixed_up", "swapped", "not_merged", "other_adapter",
         "mlp_changed", "wrong_base", "partially_merged", "qlora"]  # fmt: skip


@pytest.mark.parametrize("with_base", [True, False], ids=["with-base", "without-base"])
@pytest.mark.parametrize("case", CASES)
def test_analyze_s_headline_is_compare_s_verdict(tiny, pipeline, tmp_path, case, with_base):
    """With --lora_path the evidence is gathered again and diagnosed by compare's rules; with --lora_file (compare's
    lora_deltas.safetensors, its report beside it) the verdict is the report's, for this τ only."""
    adapter, tau = build_case(case, tiny, pipeline, tmp_path)
    base = ["--base_model", tiny.base] if with_base else []
    _, expected = compare(adapter, tau, tmp_path / "c", *base)
    lora = (
        ["--lora_file", tmp_path / "c" / "lora_deltas.safetensors"] if case in FROM_FILE else ["--lora_path", adapter]
    )
    args = ["--task_vector_file", tau, *lora, "--output_dir", tmp_path / "a", "--skip_plots"]
    assert analyze_lora_vs_task_vector_math.main([str(a) for a in [*args, *base, "--device", "cpu"]]) == 0
    summary = json.loads((tmp_path / "a" / "analysis.json").read_text())["summary"]
    assert (summary["cause"], summary["causes"], summary["reason"]) == (
        expected["cause"],
        expected["causes"],
        expected["reason"],
    )
    findings = summary["findings"]
    assert findings[0] == f"Verdict ({expected['cause']}, as compare gives it): {expected['reason']}."
    claims_rounding = [line for line in findings[1:] if "— the rounding of" in line or "rounding noise" in line]
    if expected["cause"] not in ROUNDING_CAUSES:
        assert not claims_rounding, claims_rounding
    if expected["cause"] == "precision_rounding" and with_base and case not in FROM_FILE:  # proven: said
        assert claims_rounding
    assert not any("reproduces -" in line for line in findings)


def test_a_report_of_another_tau_gives_no_verdict(tiny, pipeline, tmp_path):
    """compare's report beside the deltas counts only for the τ it was made of (its fingerprints)."""
    compare(tiny.adapter, pipeline("fp32").task_vector_file, tmp_path / "c")
    args = [
        "--task_vector_file",
        pipeline("fp16").task_vector_file,
        "--lora_file",
        tmp_path / "c" / "lora_deltas.safetensors",
    ]
    assert (
        analyze_lora_vs_task_vector_math.main([str(a) for a in [*args, "--output_dir", tmp_path / "a", "--skip_plots"]])
        == 0
    )
    summary = json.loads((tmp_path / "a" / "analysis.json").read_text())["summary"]
    assert summary["cause"] is None and not summary["findings"][0].startswith("Verdict")
