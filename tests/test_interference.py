"""The interference measures of several inputs, against dense float64 computations, closed forms and peft's own
TIES functions (common/analysis/interference.py)."""

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, magnitude_based_pruning

from common.analysis.interference import (
    LowRank,
    conflicts_at,
    cosines,
    gram,
    inner,
    overlap,
    sign_conflicts,
    tensor_interference,
    trim,
)
from common.io.safetensors_io import CheckpointIndex as CheckpointIndexOf


def low_rank(m: int, n: int, r: int, seed: int, scale: float = 2.0) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    return LowRank(
        torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64), scale
    )


def orthonormal(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]


def test_factored_inner_products_are_the_dense_ones():
    x, y = low_rank(40, 30, 4, 0), low_rank(40, 30, 6, 1, scale=-0.5)
    tau = torch.randn(40, 30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dense_x, dense_y = x.dense(), y.dense()
    for got, want in [
        (inner(x, y), (dense_x * dense_y).sum()),
        (inner(x, tau), (dense_x * tau).sum()),
        (inner(tau, y), (tau * dense_y).sum()),
        (inner(x, x), (dense_x * dense_x).sum()),
    ]:
        assert got == pytest.approx(float(want), rel=1e-12)


def test_gram_and_cosines_closed_forms():
    """Orthogonal inputs have cosine 0, an input and its negation −1, and ‖Σwτ‖² = wᵀGw."""
    u = orthonormal(64, 2, 3)
    a = torch.outer(u[:, 0], torch.ones(8, dtype=torch.float64))
    b = torch.outer(u[:, 1], torch.ones(8, dtype=torch.float64)) * 3
    g = gram([a, b, -a])
    c = cosines(g)
    assert float(c[0, 1]) == pytest.approx(0, abs=1e-15)
    assert float(c[0, 2]) == -1.0
    assert float(c[0, 0]) == 1.0
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    combined = w[0] * a + w[1] * b + w[2] * (-a)
    assert float(w @ g @ w) == pytest.approx(float((combined * combined).sum()), rel=1e-13)


def test_trim_is_peft_magnitude_pruning_and_breaks_ties_by_index():
    values = torch.randn(37, 11, generator=torch.Generator().manual_seed(4), dtype=torch.float64)  # distinct
    for density in (0.0, 0.05, 0.2, 0.5, 0.99, 1.0):
        assert torch.equal(trim(values, density).values, magnitude_based_pruning(values, density))
    tied = torch.tensor([1.0, -3.0, 2.0, -2.0, 2.0, 0.5])  # k = 3: 3, then two of the three 2s, by index
    cut = trim(tied, 0.5)
    assert cut.values.tolist() == [0.0, -3.0, 2.0, -2.0, 0.0, 0.0] and cut.ties_left_out == 1


def test_sign_conflicts_of_an_input_and_its_negation_are_total():
    x = torch.randn(50, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    counts = conflicts_at([x, -x], 0.3)
    kept = int(0.3 * x.numel())
    assert counts.pair_rate(0, 1) == 1.0 and int(counts.overlapping[0, 1]) == kept
    assert counts.conflicting == counts.contested == kept and counts.conflict_rate == 1.0
    same = conflicts_at([x, 2 * x], 0.3)
    assert same.pair_rate(0, 1) == 0.0 and same.conflicting == 0 and same.dropped == 0


def test_dropped_entries_are_those_peft_majority_sign_mask_rejects():
    g = torch.Generator().manual_seed(6)
    inputs = [torch.randn(30, 40, generator=g, dtype=torch.float64) * s for s in (1.0, 0.3, 2.0, 0.7)]
    trimmed = [magnitude_based_pruning(x, 0.4) for x in inputs]
    stacked = torch.stack(trimmed)
    mask = calculate_majority_sign_mask(stacked, method="total")
    counts = sign_conflicts(trimmed)
    assert counts.dropped == int(((stacked != 0) & ~mask).sum())
    assert counts.dropped > 0
    # pairwise counts from numpy, independently
    s = np.sign(stacked.numpy())
    for i in range(4):
        for j in range(4):
            both = (s[i] != 0) & (s[j] != 0)
            assert int(counts.overlapping[i, j]) == both.sum()
            assert int(counts.opposite[i, j]) == (both & (s[i] != s[j])).sum()
    contested = ((s != 0).sum(0) >= 2).sum()
    conflicting = ((s > 0).any(0) & (s < 0).any(0)).sum()
    assert (counts.contested, counts.conflicting) == (contested, conflicting)


def test_overlap_of_orthogonal_and_of_planted_shared_subspaces():
    basis = orthonormal(80, 10, 7)
    u, v = basis[:, :4], basis[:, 4:8]
    apart = overlap(u, v)
    assert apart.phi == pytest.approx(0, abs=1e-28) and all(a == pytest.approx(90, abs=1e-9) for a in apart.angles)
    shared = overlap(basis[:, :4], torch.cat([basis[:, :2], basis[:, 8:10]], dim=1))  # 2 directions in common
    assert shared.phi == pytest.approx(0.5, abs=1e-14)
    assert shared.angles[:2] == pytest.approx([0, 0], abs=1e-6) and shared.angles[2:] == pytest.approx([90, 90])


def test_principal_angles_against_numpy():
    u, v = orthonormal(60, 5, 8), orthonormal(60, 3, 9)
    want = np.degrees(np.arccos(np.clip(np.linalg.svd(u.numpy().T @ v.numpy(), compute_uv=False), -1, 1)))
    got = overlap(u, v)
    assert got.angles == pytest.approx(sorted(want), abs=1e-6)
    assert got.phi == pytest.approx(float(np.linalg.norm(u.numpy().T @ v.numpy()) ** 2 / 3), rel=1e-12)


def test_tensor_interference_of_loras_sharing_a_planted_column_space():
    """Two rank-4 LoRAs whose B share 2 directions: 2 column angles near 0 and φ = ½; retention of a merge
    τ₁ + ½τ₂ of orthogonal inputs is 1 and ½."""
    basis = orthonormal(48, 6, 10)
    g = torch.Generator().manual_seed(11)
    first = LowRank(
        basis[:, :4] @ torch.randn(4, 4, generator=g, dtype=torch.float64),
        torch.randn(4, 32, generator=g, dtype=torch.float64),
        2.0,
    )
    second_b = torch.cat([basis[:, :2], basis[:, 4:6]], dim=1) @ torch.randn(4, 4, generator=g, dtype=torch.float64)
    second = LowRank(second_b, torch.randn(4, 32, generator=g, dtype=torch.float64), 0.5)
    result = tensor_interference("model.layers.3.self_attn.q_proj.weight", [first, second])
    assert (result.module, result.layer) == ("q_proj", 3)
    columns = result.columns[0, 1]
    assert columns.phi == pytest.approx(0.5, abs=1e-12)
    assert columns.angles[:2] == pytest.approx([0, 0], abs=1e-5)
    assert float(result.gram[0, 1]) == pytest.approx(float((first.dense() * second.dense()).sum()), rel=1e-12)

    a = torch.outer(basis[:, 0], torch.ones(32, dtype=torch.float64))
    b = torch.outer(basis[:, 1], torch.arange(32, dtype=torch.float64))
    merged = a + 0.5 * b
    kept = tensor_interference("x.weight", [a, b], merged=merged)
    retention = [m / float(kept.gram[i, i]) for i, m in enumerate(kept.merged_inner)]
    assert retention == pytest.approx([1.0, 0.5], rel=1e-14)


def test_a_dense_tau_uses_its_top_singular_directions():
    """The column space of a dense τ of rank 3 is found exactly; against itself, angles 0 and φ = 1."""
    lr = low_rank(30, 25, 3, 12)
    result = tensor_interference("t.weight", [lr.dense(), lr], densities=())
    assert result.columns[0, 1].phi == pytest.approx(1.0, abs=1e-10)
    assert max(result.columns[0, 1].angles) < 1e-5
    assert result.rows[0, 1].phi == pytest.approx(1.0, abs=1e-10)
    assert not math.isnan(float(cosines(result.gram)[0, 1]))


@pytest.mark.parametrize("model", ["starcoder2", "gpt2"])
def test_an_adapter_in_factor_form_is_peft_delta(model, tiny, tiny_gpt2, peft_adapters):
    """adapter_input's factors, formed, are peft's get_delta_weight in the checkpoint's orientation (a Conv1D's
    stored in × out): the inner products the Gram matrix takes of them are of the right matrices."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from common.analysis.interference import adapter_input
    from common.io.safetensors_io import CheckpointIndex
    from common.lora.adapter import LoraAdapter
    from common.lora.deltas import plan_deltas
    from common.model.layout import read_config

    if model == "gpt2":
        base_dir = tiny_gpt2
        adapter_dir = peft_adapters(base_dir, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, r=4)
    else:
        base_dir, adapter_dir = tiny.base, tiny.adapter
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64), adapter_dir
    )
    want = {}
    for path, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            delta = module.get_delta_weight("default").detach()
            weight_name = path.removeprefix("base_model.model.") + ".weight"
            want[weight_name] = delta  # peft transposes a fan_in_fan_out delta to the stored orientation itself
    with CheckpointIndex(base_dir) as base:
        adapter = LoraAdapter(adapter_dir, base_dir)
        plan = plan_deltas(adapter, base, read_config(base_dir), set(base.names()))
        source = adapter_input("A", adapter, plan, base, torch.device("cpu"))
        stored = {name: base.info(name).shape for name in source.names}
        got = {name: source.read(name) for name in source.names}
    assert set(got) == {n.removeprefix("transformer.") if n not in stored else n for n in want} and want
    for name, delta in want.items():
        name = name if name in got else name.removeprefix("transformer.")
        assert isinstance(got[name], LowRank) and tuple(got[name].shape) == tuple(stored[name])
        torch.testing.assert_close(got[name].dense(), delta, rtol=1e-12, atol=1e-15)


def test_the_report_names_the_planted_interference():
    """Three τ over 6 layers: τ₂ planted along τ₁ in layers 3–5's v_proj, τ₃ = −τ₁ on layers 0–1; the findings
    name them, the JSON is strict, the plots are written."""
    import json

    from common.analysis.interference import Input, analyze_interference
    from common.analysis.interference_report import interference_findings, interference_plots, interference_report

    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{n}.self_attn.{m}.weight" for n in range(6) for m in ("q_proj", "k_proj", "v_proj")]
    t1 = {n: torch.randn(32, 24, generator=g) for n in names}
    t2 = {n: torch.randn(32, 24, generator=g) for n in names}
    for n in names:
        if "v_proj" in n and int(n.split(".")[2]) >= 3:
            t2[n] = 0.8 * t1[n] + 0.6 * t2[n]
    t3 = {n: -t1[n] for n in names if int(n.split(".")[2]) < 2}

    def source(label, values):
        return Input(label, frozenset(values), values.__getitem__, lambda name: (32, 24))

    merged = source("τ_m", {n: t1[n] + 0.5 * t2[n] for n in names})
    analysis = analyze_interference([source("τ₁", t1), source("τ₂", t2), source("τ₃", t3)], merged=merged)
    text = "\n".join(interference_findings(analysis))
    assert "nearly orthogonal in 15 of 18 tensors both change, except layers 3–5's v_proj (cosine +0.8" in text
    assert "τ₁ × τ₃: cosine" in text and "layers 0–1's k_proj, q_proj, v_proj (cosine -1.00, 100% of" in text
    assert "τ₂ × τ₃: cosine" in text and "nearly orthogonal (|cos| < 0.1) in all 6 tensors" in text
    report = interference_report(analysis)
    json.dumps(report, allow_nan=False)
    assert report["retention"]["τ₃"] == pytest.approx(-1.0, abs=0.05)
    assert report["model"]["sign_conflicts"]["0.2"]["pair_conflict_rate"]["τ₁ × τ₃"] == 1.0
    folder = Path(tempfile.mkdtemp())
    assert interference_plots(analysis, folder) == [
        "interference_cosines.png",
        "sign_conflicts_by_layer.png",
        "overlap_matrix.png",
    ]
    assert all((folder / name).stat().st_size > 10_000 for name in os.listdir(folder))


def test_analyze_several_inputs_end_to_end(tiny, pipeline, tmp_path):
    """analyze with a τ and two adapters: the τ of adapter A has cosine 1 with A's Δ (factor form against dense),
    the report and plots are written, and retention in A's own merge is 1 for τ."""
    import json

    import analyze_lora_vs_task_vector_math

    tau = pipeline("fp32").task_vector_file
    out = tmp_path / "several"
    args = ["--task_vector_file", tau, "--lora_path", tiny.adapter, tiny.other_adapter, "--base_model", tiny.base]
    args += ["--merged_task_vector", tau, "--output_dir", out, "--device", "cpu"]
    assert analyze_lora_vs_task_vector_math.main([str(a) for a in args]) == 0
    report = json.loads((out / "interference.json").read_text())
    labels = report["inputs"]
    assert len(labels) == 3 and len(set(labels)) == 3
    cos = report["model"]["cosines"]
    assert cos[0][1] == pytest.approx(1.0, abs=1e-6)  # τ of A against A's Δ
    assert abs(cos[1][2]) < 0.5  # two adapters trained from other seeds
    assert report["retention"][labels[0]] == pytest.approx(1.0, abs=1e-12)
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png") == [
        "interference_cosines.png",
        "overlap_matrix.png",
        "sign_conflicts_by_layer.png",
    ]
    assert report["findings"][0].startswith("3 inputs,")
    assert "## Findings" in (out / "interference_report.md").read_text()


def test_analyze_several_inputs_of_different_models_is_one_line(tiny, pipeline, tiny_gpt2, tmp_path):
    from conftest import assert_user_error, run_main
    from safetensors.torch import save_file

    other = tmp_path / "other" / "task_vector.safetensors"
    other.parent.mkdir()
    with CheckpointIndexOf(pipeline("fp32").task_vector_file) as tau:
        save_file({n: torch.zeros(3, 5) for n in tau.names()}, str(other), metadata=dict(tau.metadata))
    out = tmp_path / "out"
    result = run_main(
        "analyze_lora_vs_task_vector_math.py", "--task_vector_file", pipeline("fp32").task_vector_file, other,
        "--output_dir", out, "--device", "cpu",
    )  # fmt: skip
    assert_user_error(result, "different shapes in the inputs", "inputs of different models?")
    assert not out.exists()


def test_conflicts_counted_in_chunks_are_the_whole_tensor_s(monkeypatch):
    """The same counts, ties included, whether the coordinates are taken whole or 7 at a time."""
    import common.analysis.interference as interference

    g = torch.Generator().manual_seed(13)
    inputs = [torch.randint(-3, 4, (9, 11), generator=g).float() for _ in range(3)]  # many tied magnitudes
    whole = interference.conflicts_at(inputs, 0.3)
    trimmed_whole = interference.trim(inputs[0], 0.3).values
    assert whole.ties_left_out > 0
    monkeypatch.setattr(interference, "CHUNK", 7)
    chunked = interference.conflicts_at(inputs, 0.3)
    for field_name in ("coordinates", "contested", "conflicting", "dropped", "ties_left_out"):
        assert getattr(chunked, field_name) == getattr(whole, field_name)
    for field_name in ("kept", "overlapping", "opposite"):
        assert torch.equal(getattr(chunked, field_name), getattr(whole, field_name))
    assert torch.equal(interference.trim(inputs[0], 0.3).values, trimmed_whole)
