"""compare_lora_task_vector.py: exact metrics, the verdict, its reason and its exit code."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest
import torch
from conftest import assert_user_error, run_main
from safetensors.torch import load_file

from common.lora.arithmetic import lora_delta
from common.numerics.metrics import compare_tensor, cosine

SUMMARY_KEYS = {
    "shared", "lora_only", "task_vector_only", "artifacts", "mean_cosine", "min_cosine",
    "max_abs_diff", "perfect_matches", "equivalent", "tolerance",
}  # fmt: skip
TENSOR_KEYS = {"name", "cosine", "max_abs_diff", "rel_error", "norm_lora", "norm_task_vector", "status"}


def compare(tiny, tmp_path, task_vector_file, *extra, adapter=None):
    out = tmp_path / "cmp"
    args = ["--lora_path", adapter or tiny.adapter, "--task_vector_path", task_vector_file, "--output_dir", out]
    result = run_main("compare_lora_task_vector.py", *args, *extra)
    report = json.loads((out / "comparison_report.json").read_text()) if result.returncode in (0, 1) else None
    return result, report, out


def test_matching_adapter_is_equivalent_exit_0(tiny, tmp_path, pipeline):
    result, report, out = compare(tiny, tmp_path, pipeline("fp32").task_vector_file, "--base_model", tiny.base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "VALIDATION SUCCESSFUL" in result.stdout and "Analyzing 8 shared tensors" in result.stdout
    summary = report["summary"]
    assert SUMMARY_KEYS <= set(summary) and summary["equivalent"] is True
    assert summary["shared"] == 8 and summary["task_vector_only"] == 27 and summary["artifacts"] == 0
    assert summary["perfect_matches"] == 8 and summary["max_abs_diff"] < 1e-6
    assert all(TENSOR_KEYS <= set(row) for row in report["tensors"])
    for row in report["tensors"][:8]:
        assert row["status"] == "match" and -1 <= row["cosine"] <= 1 and abs(row["scale"] - 1) < 1e-5
    with open(out / "comparison_report.csv") as f:
        assert len(list(csv.DictReader(f))) == 35
    assert (out / "norm_distribution_comparison.png").read_bytes()[:4] == b"\x89PNG"


def peft_delta_weights(base, adapter) -> dict[str, torch.Tensor]:
    """Δ of every LoRA layer as peft computes it (`get_delta_weight`) with the model, and so the factors, loaded in
    float64, under the name of the base tensor it changes: peft's own reading of the adapter folder, none of ours."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64), adapter)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        return {
            f"{name.removeprefix('base_model.model.')}.weight": layer.get_delta_weight("default")
            for name, layer in layers.items()
        }


def test_lora_deltas_file_holds_peft_delta_weights_under_base_names(tiny, tmp_path, pipeline):
    """lora_deltas.safetensors is peft's Δ (computed in float64, then rounded once to float32), bit for bit: the
    expectation is peft's own load of the adapter, so a misread config (alpha, rank, rsLoRA, patterns) or a
    misnamed target cannot pass by being misread the same way on both sides."""
    _, _, out = compare(tiny, tmp_path, pipeline("fp32").task_vector_file)
    deltas = load_file(out / "lora_deltas.safetensors")
    expected = peft_delta_weights(tiny.base, tiny.adapter)
    assert len(expected) == 8 and set(deltas) == set(expected)
    config = json.loads((tiny.adapter / "adapter_config.json").read_text())
    assert config["lora_alpha"] / config["r"] == 2  # a scaling of 1 would not show a scaling that is skipped
    for name, delta in expected.items():
        assert delta.dtype == torch.float64 and deltas[name].dtype == torch.float32
        assert torch.equal(deltas[name], delta.float()), name


def test_wrong_adapter_is_not_equivalent_exit_1(tiny, tmp_path, pipeline):
    result, report, _ = compare(tiny, tmp_path, pipeline("fp32").task_vector_file, adapter=tiny.other_adapter)
    assert result.returncode == 1, result.stderr
    assert report["summary"]["equivalent"] is False and "VALIDATION FAILED" in result.stdout
    assert abs(report["summary"]["mean_cosine"]) < 0.5


def test_fp16_merge_fails_within_rounding_and_counts_artifacts(tiny, tmp_path, pipeline):
    result, report, _ = compare(tiny, tmp_path, pipeline("fp16").task_vector_file, "--base_model", tiny.base)
    assert result.returncode == 1
    summary = report["summary"]
    assert summary["artifacts"] == 27 and summary["task_vector_only_changed"] == 0
    assert "within fp16 rounding" in summary["reason"] and "merge at fp32" in summary["reason"]
    assert all(row["within_rounding"] for row in report["tensors"] if row["status"] in ("match", "mismatch"))


def test_fp16_merge_passes_at_a_tolerance_above_its_rounding(tiny, tmp_path, pipeline):
    result, _, _ = compare(
        tiny, tmp_path, pipeline("fp16").task_vector_file, "--base_model", tiny.base, "--tolerance", "1e-3"
    )
    assert result.returncode == 0, result.stdout


def test_doubled_alpha_is_diagnosed_as_a_scaling_mismatch(tiny, tmp_path, pipeline):
    doubled = tmp_path / "doubled"
    shutil.copytree(tiny.adapter, doubled)
    config = json.loads((doubled / "adapter_config.json").read_text())
    config["lora_alpha"] *= 2
    (doubled / "adapter_config.json").write_text(json.dumps(config))
    result, report, _ = compare(
        tiny, tmp_path, pipeline("fp32").task_vector_file, "--base_model", tiny.base, adapter=doubled
    )
    assert result.returncode == 1
    assert "scaling mismatch" in report["summary"]["reason"]
    assert all(abs(row["scale"] - 0.5) < 1e-5 for row in report["tensors"][:8])


def test_without_base_or_stats_artifacts_cannot_be_told_apart(tiny, tmp_path, pipeline):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(pipeline("fp16").task_vector_file, alone)
    result, report, _ = compare(tiny, tmp_path, alone / "task_vector.safetensors", "--tolerance", "1e-3")
    assert result.returncode == 1
    assert report["summary"]["task_vector_only_unclassified"] == 27 and "--base_model" in report["summary"]["reason"]
    # ...and with the base they are rounding artifacts, found from the base and τ alone (no stats file).
    result, report, _ = compare(
        tiny, tmp_path / "b", alone / "task_vector.safetensors", "--tolerance", "1e-3", "--base_model", tiny.base
    )
    assert result.returncode == 0 and report["summary"]["artifacts"] == 27


def test_json_flag_prints_the_summary(tiny, tmp_path, pipeline):
    result, report, _ = compare(tiny, tmp_path, pipeline("fp32").task_vector_file, "--json")
    assert json.loads(result.stdout) == report["summary"]


def test_missing_task_vector_is_a_user_error(tiny, tmp_path):
    result, _, out = compare(tiny, tmp_path, tmp_path / "nope.safetensors")
    assert_user_error(result, "nope.safetensors")
    assert not out.exists()


U = 2.0**-53  # float64's unit roundoff; 1 − U is the float64 just below 1


def closed_form_cosine(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """⟨x,y⟩ / (‖x‖‖y‖) of two float32 tensors computed apart from the code (Python floats, math.fsum), and the most a
    correct float64 computation can differ from it by.

    Each product of two float32 numbers is exact in float64 and fsum rounds each sum once, so this value is within
    4U of the true cosine. A float64 sum of n terms in any order errs by at most γₙ·Σ|terms| (γₙ = nU / (1 − nU)),
    on ⟨x,y⟩ and on both squared norms: γₙ·(Σ|xᵢyᵢ| / (‖x‖‖y‖) + |cos|), plus the rounding of the last square roots,
    product and quotient."""
    a, b = x.double().flatten().tolist(), y.double().flatten().tolist()
    inner = math.fsum(p * q for p, q in zip(a, b, strict=True))
    magnitude = math.fsum(abs(p * q) for p, q in zip(a, b, strict=True))
    norms = math.sqrt(math.fsum(p * p for p in a)) * math.sqrt(math.fsum(q * q for q in b))
    value, gamma = inner / norms, len(a) * U / (1 - len(a) * U)
    return value, gamma * (magnitude / norms + abs(value)) + 8 * U


def cosines(monkeypatch, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """cosine(x, y), and compare_tensor's cosine over the whole tensor and in chunks of 3001 elements (2 or 3 of them
    here, the last one partial)."""
    import common.numerics.metrics as metrics

    found = [cosine(x, y), compare_tensor("t", x, y).cosine]
    with monkeypatch.context() as patched:
        patched.setattr(metrics, "chunk_elements", lambda device: 3001)
        return [*found, compare_tensor("t", x, y).cosine]


def test_cosine_is_the_closed_form_at_every_scale(monkeypatch):
    """cosine and compare_tensor's cosine against the closed form, for pairs from opposite to identical, at float32
    magnitudes from subnormal to near overflow: a wrong norm, a missing square root, a float32 sum, a clamp that
    rounds a near-1 cosine up, or a chunk lost or counted twice fails here. The clamp to [−1, 1] cannot hide them:
    the near pairs are ~5e-9 and ~5e-11 from ±1, over ten times the most rounding can give (the bound)."""
    generator = torch.Generator().manual_seed(0)
    for scale in (1e-38, 1e-30, 1e-3, 1.0, 1e30, 1e37):
        x, noise = (torch.randn(65, 129, generator=generator) * scale for _ in range(2))
        pairs = {
            "itself": x,
            "negated": -x,
            "tripled": 3 * x,
            "near": x + 1e-4 * noise,
            "nearer": x + 1e-5 * noise,
            "near_opposite": -x + 1e-4 * noise,
            "correlated": x + noise,
            "independent": noise,
        }
        for what, y in pairs.items():
            expected, bound = closed_form_cosine(x, y)
            if what.startswith("near"):
                assert 1 - abs(expected) > 10 * bound, (scale, what, expected, bound)
            for got in cosines(monkeypatch, x, y):
                assert abs(got - expected) <= bound and -1 <= got <= 1, (scale, what, got, expected, bound)
        itself = cosines(monkeypatch, x, x)
        assert all(1 - 4 * U <= c <= 1 for c in itself), (scale, itself)  # ⟨x,x⟩ / (√⟨x,x⟩)²: 3 roundings
        assert cosine(x, -x) == -itself[0] and cosine(x, 4 * x) == itself[0]  # signs and powers of 2 are exact


def test_cosine_of_integer_vectors_is_exact(monkeypatch):
    """Sums of small integers times a power of 2 are exact in float64 in any order and any chunks, so these closed
    forms hold to the last bit: 8/9, 24/25, orthogonal (0), opposite (−1), and (4096 − 2k)/4096 for 4096 ones
    against k of them negated (√4096 = 64 is exact)."""
    ones, flipped = torch.ones(4096), torch.ones(4096)
    flipped[torch.randperm(4096, generator=torch.Generator().manual_seed(0))[:1000]] = -1
    cases = [
        ([1, 2, 2], [2, 2, 1], 8 / 9),
        ([3, 4], [4, 3], 24 / 25),
        ([1, 2, 2], [2, 1, -2], 0.0),
        ([1, 2, 2], [-2, -4, -4], -1.0),
        (ones, flipped, (4096 - 2000) / 4096),
        (ones, ones, 1.0),
    ]
    for scale in (2.0**-60, 1.0, 2.0**60):
        for x, y, expected in cases:
            x, y = torch.as_tensor(x, dtype=torch.float32) * scale, torch.as_tensor(y, dtype=torch.float32) * scale
            assert cosines(monkeypatch, x, y) == [expected] * 3, (scale, x[:3], y[:3])
            result = compare_tensor("t", x, y)
            assert result.norm_lora == float(x.double().norm()) and result.norm_task_vector == float(y.double().norm())
    assert cosine(torch.zeros(3), torch.zeros(3)) == 1.0 and cosine(torch.zeros(3), torch.ones(3)) == 0.0


def test_compare_metrics_are_exact_on_a_known_case():
    delta = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    tau = 2 * delta
    result = compare_tensor("t", delta, tau)
    assert result.cosine == 1.0 and result.scale == 2.0
    assert result.norm_lora == 5.0 and result.norm_task_vector == 10.0
    assert result.max_abs_diff == 4.0 and result.rel_error == 1.0


class ThreeLayers(torch.nn.Module):
    """The three layer kinds `lora_delta` shapes Δ for: a Linear (out × in), transformers' Conv1D (in × out, peft's
    fan_in_fan_out) and an Embedding (vocab × dim, A and B swapped)."""

    def __init__(self, rows: int):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.linear = torch.nn.Linear(6, rows)
        self.conv1d = Conv1D(rows, 6)
        self.embedding = torch.nn.Embedding(rows, 6)


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
@pytest.mark.parametrize("rows", [1, 5])
def test_lora_delta_is_peft_get_delta_weight(rows, kind, use_rslora, precision):
    """lora_delta(target, A, B, float64) is peft's get_delta_weight on a layer held in float64, and lora_delta(target,
    A, B) is peft's in float32, bit for bit, the factors saved in float32 as an adapter file holds them. The target's
    scaling is the config's closed form (alpha / r, alpha / √r), not peft's."""
    from peft import LoraConfig, get_peft_model

    from common.lora.adapter import LoraTarget

    dtype = getattr(torch, precision)
    config = LoraConfig(
        r=4, lora_alpha=8, use_rslora=use_rslora, target_modules=[kind], fan_in_fan_out=kind == "conv1d",
        init_lora_weights=False,
    )  # fmt: skip
    layer = getattr(get_peft_model(ThreeLayers(rows).to(dtype), config).base_model.model, kind)
    factors = [layer.lora_embedding_A, layer.lora_embedding_B] if kind == "embedding" else [layer.lora_A, layer.lora_B]
    generator = torch.Generator().manual_seed(rows)
    saved = []  # A and B as the adapter file holds them: float32
    with torch.no_grad():
        for factor in factors:
            weight = factor["default"] if kind == "embedding" else factor["default"].weight
            assert weight.dtype == dtype  # peft holds the factors in the layer's dtype
            saved.append(torch.randn(weight.shape, generator=generator))
            weight.copy_(saved[-1])
        expected = layer.get_delta_weight("default")
    base_shape = tuple(layer.get_base_layer().weight.shape)
    scaling = 8 / 2 if use_rslora else 8 / 4
    target = LoraTarget(
        kind, f"{kind}.weight", "a", "b", rank=4, alpha=8, scaling=scaling, fan_in_fan_out=kind == "conv1d",
        shape=base_shape, embedding=kind == "embedding",
    )  # fmt: skip
    got = lora_delta(target, *saved, torch.float64 if precision == "float64" else None)
    assert expected.dtype == got.dtype == dtype and tuple(got.shape) == base_shape
    assert torch.equal(got, expected)


@pytest.fixture(scope="module")
def tau_with_a_changed_mlp(tiny, pipeline, tmp_path_factory):
    """τ of the fp32 merge with one MLP weight changed as well: compare must say changes_outside_adapter."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("mlp_changed")
    merged = root / "merged"
    shutil.copytree(pipeline("fp32").merged, merged)
    name = "model.layers.0.mlp.c_fc.weight"
    for shard in merged.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name] = tensors[name] + 0.01
            save_file(tensors, shard, metadata={"format": "pt"})
    args = ["--base_model", tiny.base, "--finetuned_model", merged, "--output_dir", root / "tv", "--device", "cpu"]
    assert run_main("extract_task_vectors.py", *args).returncode == 0
    return root / "tv"


def test_a_stale_stats_file_never_makes_a_verdict(tiny, tmp_path, pipeline, tau_with_a_changed_mlp):
    """An older task_vector_stats.json beside a new τ (issue: compare said `equivalent`, exit 0, and analyze
    "reproduces 100%"): refused in one line naming both files, with and without the base."""
    tv = tmp_path / "tv"
    shutil.copytree(tau_with_a_changed_mlp, tv)
    result, report, _ = compare(tiny, tmp_path, tv / "task_vector.safetensors")
    assert result.returncode == 1 and report["summary"]["cause"] == "changes_outside_adapter"
    shutil.copy(pipeline("fp32").task_vectors / "task_vector_stats.json", tv)  # the older extraction's stats
    for extra in ([], ["--base_model", tiny.base]):
        result, _, _ = compare(tiny, tmp_path, tv / "task_vector.safetensors", *extra, "--overwrite")
        assert_user_error(result, str(tv / "task_vector_stats.json"), "belongs to another extraction", "stale")
    args = ["--task_vector_file", tv / "task_vector.safetensors", "--output_dir", tmp_path / "a", "--skip_plots"]
    result = run_main("analyze_lora_vs_task_vector_math.py", *args, "--lora_path", tiny.adapter)
    assert_user_error(result, "belongs to another extraction")


def test_a_stats_file_without_fingerprints_is_not_used(tiny, tmp_path, tau_with_a_changed_mlp):
    """A stats file that cannot be shown to be τ's (no fingerprints) is set aside: statuses are read off τ."""
    tv = tmp_path / "tv"
    shutil.copytree(tau_with_a_changed_mlp, tv)
    stats = json.loads((tv / "task_vector_stats.json").read_text())
    for key in ("base_fingerprint", "finetuned_fingerprint"):
        del stats["summary"][key]
    for entry in stats["tensors"]:
        entry["status"] = "unchanged"  # what a stale file could claim
    (tv / "task_vector_stats.json").write_text(json.dumps(stats))
    result, report, _ = compare(tiny, tmp_path, tv / "task_vector.safetensors", "--base_model", tiny.base)
    assert result.returncode == 1 and report["summary"]["cause"] == "changes_outside_adapter"
    assert "cannot be shown to belong to" in result.stdout
