"""merge_lora.py with several adapters and task vectors (θ₀ + Σ wᵢ·Δᵢ), against peft, mergekit and the float64
closed form computed here from the raw files (docs/combine.md)."""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import PRECISIONS, STARCODER2_VARIANTS, assert_user_error, load_weights, run_main
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.io.safetensors_io import CheckpointIndex
from common.model.layout import fingerprint
from common.numerics.precision import ulp

HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"
# Three adapters of other seeds, ranks, scalings and targets; only a0 has LoRA biases, only a1 rsLoRA, only a2 an
# embedding LoRA and o_proj, only a1 c_fc (q_proj is shared by a0 and a1).
COMBO = (
    {"seed": 11, "r": 4, "target_modules": ["q_proj", "v_proj"], "lora_bias": True},
    {"seed": 12, "r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "c_fc"]},
    {"seed": 13, "r": 2, "target_modules": ["embed_tokens", "o_proj"]},
)
WEIGHTS = (0.7, -1.3, 0.45)
FIXTURE = Path(__file__).parent / "fixtures" / "mergekit_task_arithmetic.safetensors"


@pytest.fixture(scope="module")
def adapters(tiny, peft_adapters) -> list[Path]:
    return [peft_adapters(tiny.base, **config) for config in COMBO]


def combine(base: Path, out: Path, *args: object, precision: str = "fp32", rounding: str = "peft"):
    """merge_lora.py with several inputs, asserting success; its weights."""
    extra = ["--precision", precision, "--combine_rounding", rounding, "--device", "cpu"]
    result = run_main("merge_lora.py", "--base_model", base, "--output_dir", out, *args, *extra)
    assert result.returncode == 0, result.stderr
    return load_weights(out)


def peft_combination(base: Path, adapters: list[Path], weights: list[float], dtype: torch.dtype) -> dict:
    """The reference: the adapters loaded into one PeftModel, set_scale(name, w) on every LoRA layer, and
    merge_and_unload(adapter_names=[…])."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    names = [f"a{i}" for i in range(len(adapters))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapters[0], adapter_name=names[0]
        )
        for name, adapter in zip(names[1:], adapters[1:], strict=True):
            model.load_adapter(adapter, adapter_name=name)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name, weight in zip(names, weights, strict=True):
                    module.set_scale(name, weight)
        merged = model.merge_and_unload(adapter_names=names)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def assert_peft_bits(ours: dict, reference: dict, base: dict, dtype: torch.dtype) -> None:
    """Every tensor bit for bit peft's, but a head the merge unties (peft writes the embedding's change into the
    tied head; the unmerged model's head is the base embedding, which the merge writes: common/lora/merge.py)."""
    assert set(ours) <= set(reference)
    for name, tensor in ours.items():
        expected = base[EMBEDDING].to(dtype) if name == HEAD and EMBEDDING in ours else reference[name]
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name


# --- the float64 closed form, from the raw files


def closed_form(
    base: Path, adapters: list[Path], weights: list[float], task_vectors: list[Path] = (), magnitude: bool = False
) -> dict:
    """W + Σ wᵢ·Δᵢ in float64, read from the safetensors files and adapter_config.json numbers alone: Δ = s·B@A
    (transposed for an embedding), s = alpha/r or alpha/√r, a LoRA bias s·lora_B.bias; τ as stored. The tied head
    is the base embedding until an input changes it. With `magnitude`, |W| + Σ |wᵢ·Δᵢ| instead."""
    size = torch.abs if magnitude else (lambda t: t)
    exact = {n: size(t.double()) for n, t in load_weights(base).items()}
    exact[HEAD] = exact[EMBEDDING].clone()
    for folder, weight in zip(adapters, weights, strict=False):
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(folder / "adapter_model.safetensors")
        for key, a in tensors.items():
            match = re.fullmatch(r"base_model\.model\.(.+)\.lora_(embedding_)?A(\.weight)?", key)
            if match is None:
                continue
            module, embedding = match[1], match[2] is not None
            b = tensors[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
            r, alpha = a.shape[0], config["lora_alpha"]
            s = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
            delta = s * (b.double() @ a.double())
            exact[f"{module}.weight"] += size(weight * (delta.T if embedding else delta))
            if config["lora_bias"]:
                bias = tensors[f"base_model.model.{module}.lora_B.bias"].double()
                exact[f"{module}.bias"] += size(weight * s * bias)
    for path, weight in zip(task_vectors, weights[len(adapters) :], strict=True):
        for name, tau in load_file(path).items():
            exact[name] += size(weight * tau.double())
    return exact


def neighbours(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The representable values either side of each element of `out` (float64), from its bits."""
    width = {4: torch.int32, 2: torch.int16}[out.element_size()]
    bits = out.contiguous().view(width).to(torch.int64)
    sign_bit = 1 << (8 * out.element_size() - 1)
    magnitude, sign = bits & (sign_bit - 1), bits & sign_bit

    def value(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (m | s).to(width).view(out.dtype).double()

    larger = value(magnitude + 1, sign)
    smaller = torch.where(
        magnitude > 0, value((magnitude - 1).clamp(min=0), sign), value(magnitude + 1, sign ^ sign_bit)
    )
    return larger, smaller


def rounding_ulps(out: torch.Tensor, exact: torch.Tensor) -> float:
    """max |out − x| in units of the spacing between `out` and its neighbour on x's side: ≤ ½ everywhere exactly when
    `out` is x rounded to nearest."""
    got, larger, smaller = out.double(), *neighbours(out)
    error = exact - got
    toward = torch.where(torch.sign(error) == torch.sign(larger - got), larger, smaller)
    return float(((error.abs() / (toward - got).abs()).max()) if error.numel() else 0.0)


def max_rounding_ulps(ours: dict, exact: dict) -> float:
    return max(rounding_ulps(tensor, exact[name]) for name, tensor in ours.items())


def max_error_ulps(ours: dict, exact: dict, scale: dict | None = None) -> float:
    """max |out − x| / ulp(|scale|) in the output's dtype (scale: x itself unless given), for the figures printed."""
    scale = scale or exact
    return max(float(((t.double() - exact[n]).abs() / ulp(scale[n], t.dtype)).max()) for n, t in ours.items())


# --- peft


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_three_adapters_are_bitwise_peft_set_scale_merge(tiny, adapters, tmp_path, precision):
    dtype = PRECISIONS[precision]
    weights = [str(w) for w in WEIGHTS]
    ours = combine(tiny.base, tmp_path / "out", "--lora_path", *adapters, "--weights", *weights, precision=precision)
    base = load_weights(tiny.base)
    assert_peft_bits(ours, peft_combination(tiny.base, adapters, list(WEIGHTS), dtype), base, dtype)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.c_fc.weight", EMBEDDING):
        assert not torch.equal(ours[name], base[name].to(dtype)), name  # each adapter's term is there
    assert torch.equal(
        ours["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"].to(dtype)
    )


def test_one_adapter_weighted_is_peft_set_scale(tiny, adapters, tmp_path):
    ours = combine(tiny.base, tmp_path / "out", "--lora_path", adapters[1], "--weights", "-0.35", precision="fp16")
    reference = peft_combination(tiny.base, adapters[1:2], [-0.35], torch.float16)
    assert_peft_bits(ours, reference, load_weights(tiny.base), torch.float16)


def test_a_copy_with_weight_one_is_combined_as_peft_does(tiny, adapters, peft_adapters, tmp_path):
    """A modules_to_save copy (lm_head) of the first adapter, another adapter weighted: as peft's combination."""
    copies = peft_adapters(tiny.base, **STARCODER2_VARIANTS["modules_to_save_lm_head"])
    ours = combine(tiny.base, tmp_path / "out", "--lora_path", copies, adapters[1], "--weights", "1", "-0.5")
    reference = peft_combination(tiny.base, [copies, adapters[1]], [1.0, -0.5], torch.float32)
    assert set(ours) == set(reference) and all(torch.equal(ours[n], reference[n]) for n in ours)


def test_one_adapter_without_weights_is_the_plain_merge(tiny, pipeline, tmp_path):
    out = tmp_path / "out"
    ours = combine(tiny.base, out, "--lora_path", tiny.adapter)
    plain = load_weights(pipeline("fp32").merged)
    assert ours.keys() == plain.keys() and all(torch.equal(ours[n], plain[n]) for n in plain)
    assert not (out / "combination.json").exists()


# --- exact


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_exact_rounding_is_the_closed_form_rounded_once(tiny, adapters, tmp_path, precision):
    weights = [str(w) for w in WEIGHTS]
    args = ["--lora_path", *adapters, "--weights", *weights]
    ours = combine(tiny.base, tmp_path / "exact", *args, precision=precision, rounding="exact")
    exact = closed_form(tiny.base, adapters, list(WEIGHTS))
    assert max_rounding_ulps(ours, exact) <= 0.5
    peft = combine(tiny.base, tmp_path / "peft", *args, precision=precision)
    differ = sum(int((peft[n] != ours[n]).sum()) for n in ours)
    total = sum(t.numel() for t in ours.values())
    scale = closed_form(tiny.base, adapters, list(WEIGHTS), magnitude=True)
    exact_ulps, peft_ulps = max_error_ulps(ours, exact, scale), max_error_ulps(peft, exact, scale)
    print(
        f"{precision}: |out − x| / ulp(|W| + Σ|wΔ|): exact ≤ {exact_ulps:.3f}, peft ≤ {peft_ulps:.3f}; "
        f"they differ in {differ} of {total} elements"
    )


def test_exact_rounding_of_one_adapter_without_weights(tiny, adapters, tmp_path):
    out = tmp_path / "out"
    ours = combine(tiny.base, out, "--lora_path", adapters[0], precision="bf16", rounding="exact")
    assert max_rounding_ulps(ours, closed_form(tiny.base, adapters[:1], [1.0])) <= 0.5
    assert json.loads((out / "combination.json").read_text())["rounding"] == "exact"


# --- task vectors


def fixture_models(root: Path) -> tuple[Path, list[Path], list[float], dict]:
    """The mergekit fixture's base and fine-tunes as model folders, the weights and mergekit's output."""
    tensors = load_file(FIXTURE)
    with safe_open(FIXTURE, "pt") as f:
        metadata = f.metadata()
    part: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        group, name = key.split("/", 1)
        part.setdefault(group, {})[name] = tensor
    folders = []
    for name in ("base", "ft0", "ft1", "ft2"):
        folders.append(root / name)
        folders[-1].mkdir()
        save_file(part["base"] | part[name], folders[-1] / "model.safetensors", {"format": "pt"})
        (folders[-1] / "config.json").write_text(metadata["config"])
    return folders[0], folders[1:], json.loads(metadata["weights"]), part["mergekit"]


def extract(base: Path, finetuned: Path, out: Path) -> Path:
    args = ["--base_model", base, "--finetuned_model", finetuned, "--output_dir", out, "--device", "cpu"]
    assert run_main("extract_task_vectors.py", *args).returncode == 0
    return out / "task_vector.safetensors"


def test_task_vectors_are_bitwise_mergekit_task_arithmetic(tmp_path):
    """mergekit 0.1.5's task_arithmetic (normalize false, float32) of three fine-tunes, recorded in the fixture."""
    base, tuned, weights, mergekit = fixture_models(tmp_path)
    taus = [extract(base, ft, tmp_path / f"tv{i}") for i, ft in enumerate(tuned)]
    args = ["--task_vector_path", *taus, "--weights", *map(str, weights)]
    ours = combine(base, tmp_path / "peft", *args)
    assert ours.keys() == mergekit.keys() and all(torch.equal(ours[n], mergekit[n]) for n in ours)
    exact = combine(base, tmp_path / "exact", *args, rounding="exact")
    closed = closed_form(base, [], weights, taus)
    assert max_rounding_ulps(exact, closed) <= 0.5
    differ = sum(int((exact[n] != mergekit[n]).sum()) for n in ours)
    total = sum(t.numel() for t in ours.values())
    scale = closed_form(base, [], weights, taus, magnitude=True)
    exact_ulps, mergekit_ulps = max_error_ulps(exact, closed, scale), max_error_ulps(mergekit, closed, scale)
    print(
        f"|out − x| / ulp(|W| + Σ|wτ|): exact ≤ {exact_ulps:.3f}, mergekit ≤ {mergekit_ulps:.3f}; "
        f"they differ in {differ} of {total} elements"
    )


def test_an_adapter_minus_its_own_task_vector(tiny, pipeline, tmp_path):
    """Δ − τ: with peft's rounding the merge's own roundings cancel and W comes back within rounding at |W| + |τ|;
    the exact sum keeps what τ recorded of the fp32 merge's error (B@A's products in fp32), rounded once."""
    tau = pipeline("fp32").task_vector_file
    args = ["--lora_path", tiny.adapter, "--task_vector_path", tau, "--weights", "1", "-1"]
    peft = combine(tiny.base, tmp_path / "peft", *args)
    exact = combine(tiny.base, tmp_path / "exact", *args, rounding="exact")
    assert max_rounding_ulps(exact, closed_form(tiny.base, [tiny.adapter], [1.0, -1.0], [tau])) <= 0.5
    base = {n: t.double() for n, t in load_weights(tiny.base).items()}
    magnitude = {n: base[n].abs() + t.double().abs() for n, t in load_file(tau).items()}
    assert max_error_ulps(peft, base, magnitude) <= 1.0
    same, total = sum(int((peft[n] == base[n]).sum()) for n in peft), sum(t.numel() for t in peft.values())
    peft_ulps, exact_ulps = max_error_ulps(peft, base, magnitude), max_error_ulps(exact, base, magnitude)
    print(
        f"W + Δ − τ: peft {peft_ulps:.3f}, exact {exact_ulps:.3f} ulp of |W| + |τ| from W; "
        f"peft gives W back in {same} of {total} elements"
    )


def test_combination_json_records_inputs_and_output(tiny, adapters, pipeline, tmp_path):
    out, tau = tmp_path / "out", pipeline("fp32").task_vector_file
    combine(tiny.base, out, "--lora_path", *adapters[:2], "--task_vector_path", tau, "--weights", "1", "-1", "0.5")
    record = json.loads((out / "combination.json").read_text())
    assert [(x["kind"], x["path"], x["weight"]) for x in record["inputs"]] == [
        ("lora", str(adapters[0]), 1.0),
        ("lora", str(adapters[1]), -1.0),
        ("task_vector", str(tau), 0.5),
    ]
    assert record["rounding"] == "peft" and record["precision"] == "fp32"
    with CheckpointIndex(tiny.base) as base, CheckpointIndex(out) as output, CheckpointIndex(tau) as tv:
        assert record["base_model"]["fingerprint"] == fingerprint(base) == record["inputs"][2]["base_fingerprint"]
        assert record["output_fingerprint"] == fingerprint(output)
        assert record["inputs"][2]["fingerprint"] == fingerprint(tv)
    with CheckpointIndex(extract(tiny.base, out, tmp_path / "tv_out")) as extracted:
        assert extracted.metadata["finetuned_fingerprint"] == record["output_fingerprint"]


# --- what is refused: one line, exit code 2, nothing written


def broken_adapter(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    weights = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("q_proj.lora_B.weight"))
    weights[key] = torch.zeros(96, weights[key].shape[1])
    save_file(weights, folder / "adapter_model.safetensors")
    return folder


def forged_task_vector(tau: Path, path: Path, name: str, shape: tuple[int, ...]) -> Path:
    with safe_open(tau, "pt") as f:
        metadata = f.metadata()
    save_file({name: torch.zeros(shape)}, path, metadata)
    return path


REFUSED = {
    "too_few_weights": (lambda t, a, v, p: ["--lora_path", *a[:2], "--weights", "1"], "--weights gives 1 number for 2"),
    "too_many_weights": (lambda t, a, v, p: ["--lora_path", a[0], "--weights", "1", "2"], "for 1 input"),
    "nan_weight": (lambda t, a, v, p: ["--lora_path", *a[:2], "--weights", "1", "nan"], "finite number, not 'nan'"),
    "inf_weight": (lambda t, a, v, p: ["--lora_path", a[0], "--weights", "inf"], "finite number, not 'inf'"),
    "text_weight": (lambda t, a, v, p: ["--lora_path", a[0], "--weights", "half"], "finite number, not 'half'"),
    "adapter_of_another_model": (
        lambda t, a, v, p: ["--lora_path", a[0], broken_adapter(a[1], p / "wrong"), "--weights", "1", "1"],
        "does not fit",
    ),
    "tau_of_other_shapes": (
        lambda t, a, v, p: [
            "--lora_path",
            a[0],
            "--task_vector_path",
            forged_task_vector(v, p / "t.safetensors", "model.norm.weight", (65,)),
        ],  # noqa: E501
        "model.norm.weight [65] vs [64]",
    ),
    "tau_of_another_model": (
        lambda t, a, v, p: [
            "--task_vector_path",
            forged_task_vector(v, p / "t.safetensors", "transformer.h.0.w", (4,)),
        ],  # noqa: E501
        "lacks (transformer.h.0.w)",
    ),
    "model_given_as_tau": (lambda t, a, v, p: ["--task_vector_path", t.base], "not written by extract_task_vectors.py"),
    "engine_peft": (lambda t, a, v, p: ["--lora_path", *a[:2], "--engine", "peft"], "--engine peft merges one adapter"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_inputs_are_refused_in_one_line(tiny, adapters, pipeline, tmp_path, case):
    make, fragment = REFUSED[case]
    out = tmp_path / "out"
    args = make(tiny, adapters, pipeline("fp32").task_vector_file, tmp_path)
    assert_user_error(run_main("merge_lora.py", "--base_model", tiny.base, "--output_dir", out, *args), fragment)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize(
    ("variant", "weights", "fragment"),
    [
        ("modules_to_save_lm_head", ["1", "1"], "changes lm_head.weight too"),
        ("modules_to_save_lm_head", ["0.5", "1"], "give it weight 1, not 0.5"),
        ("dora", ["-1", "1"], "DoRA magnitudes"),
    ],
)
def test_changes_that_are_not_differences_are_refused_by_name(
    tiny, peft_adapters, tmp_path, variant, weights, fragment
):
    adapter = peft_adapters(tiny.base, **STARCODER2_VARIANTS[variant])
    out = tmp_path / "out"
    args = ["--base_model", tiny.base, "--lora_path", adapter, adapter, "--weights", *weights, "--output_dir", out]
    assert_user_error(run_main("merge_lora.py", *args), fragment)
    assert not out.exists()


def test_an_overflow_is_named_and_nothing_is_written(tiny, adapters, pipeline, tmp_path):
    huge = tmp_path / "huge.safetensors"
    with safe_open(pipeline("fp32").task_vector_file, "pt") as f:
        save_file({"model.norm.weight": torch.full((64,), 1e5)}, huge, f.metadata())
    out = tmp_path / "out"
    args = ["--base_model", tiny.base, "--lora_path", adapters[0], "--task_vector_path", huge, "--output_dir", out]
    assert_user_error(run_main("merge_lora.py", *args, "--precision", "fp16"), "model.norm.weight (overflow at fp16)")
    assert not out.exists()


def test_one_input_and_its_weight_from_config(tiny, adapters, tmp_path):
    config = tmp_path / "merge.yml"
    config.write_text(
        f"base_model: {tiny.base}\nlora_path: {adapters[0]}\nweights: -0.5\noutput_dir: {tmp_path / 'out'}\n"
    )
    result = run_main("merge_lora.py", "--config", config, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "combination.json").read_text())["inputs"][0]["weight"] == -0.5
