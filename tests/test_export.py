"""--export_lora: τ as a peft adapter by truncated SVD, loaded back with peft and checked against τ and the source."""

from __future__ import annotations

import gc
import json
import os
import re
import types
import warnings

import pytest
import torch
from conftest import assert_user_error, load_weights, run_in_process, run_main, run_merge

import analyze_lora_vs_task_vector_math as analyze
from common.analysis.export import ExportRequest, LoraExporter
from common.model.module_kinds import ModuleKinds

TOKENS = torch.tensor([[1, 17, 200, 33, 41, 99, 7, 300, 5, 2]])


def exported_model(base, adapter):
    """The base model with an adapter loaded by peft, as a user would, fp32 on CPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    os.environ["HF_HUB_OFFLINE"] = "1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.double()


def analyze_and_export(out, *args) -> dict:
    """analyze's main in-process (the scripts' imports are already paid for), without plots; analysis.json back."""
    result = run_main(
        "analyze_lora_vs_task_vector_math.py", *args, "--output_dir", out, "--device", "cpu", "--skip_plots"
    )
    assert result.returncode == 0, result.stderr
    return json.loads((out / "analysis.json").read_text())


@pytest.fixture(scope="module")
def rank8_fp32(tiny, pipeline, tmp_path_factory):
    """A rank-8 export of the fp32 task vector, Δ from the adapter, run as a user runs it (its main, in-process)."""
    out = tmp_path_factory.mktemp("export_fp32") / "out"
    args = ["--lora_path", tiny.adapter, "--task_vector_file", pipeline("fp32").task_vector_file]
    result = run_main(
        "analyze_lora_vs_task_vector_math.py", *args, "--output_dir", out, "--export_lora", 8, "--skip_plots"
    )
    assert result.returncode == 0, result.stderr
    return json.loads((out / "analysis.json").read_text()), out, result.stdout


def test_exported_adapter_merges_to_base_plus_task_vector(tiny, pipeline, rank8_fp32):
    report, out, _ = rank8_fp32
    merged = exported_model(tiny.base, out / "exported_lora").merge_and_unload().state_dict()
    base, tau = load_weights(tiny.base), load_weights(pipeline("fp32").task_vectors)
    assert len(report["export_lora"]["tensors"]) == 8
    for t in report["export_lora"]["tensors"]:
        name = t["name"]
        error = (merged[name].double() - base[name].double() - tau[name].double()).norm() / tau[name].double().norm()
        assert error < 1e-6, name
    untouched = [n for n in base if n not in {t["name"] for t in report["export_lora"]["tensors"]}]
    assert all(torch.equal(merged[n], base[n]) for n in untouched)


def test_exported_adapter_computes_what_the_source_adapter_computes(tiny, rank8_fp32):
    _, out, _ = rank8_fp32
    exported = exported_model(tiny.base, out / "exported_lora")
    with exported.disable_adapter():
        base_only = logits(exported)
    source = logits(exported_model(tiny.base, tiny.adapter))
    assert (source - base_only).abs().max() > 1e-3  # the adapter does change the output
    torch.testing.assert_close(logits(exported), source, rtol=0, atol=2e-6)


def test_adapter_config_says_scaling_one_on_the_exact_modules(tiny, rank8_fp32):
    report, out, stdout = rank8_fp32
    config = json.loads((out / "exported_lora" / "adapter_config.json").read_text())
    source = json.loads((tiny.adapter / "adapter_config.json").read_text())
    modules = [t["name"].removesuffix(".weight") for t in report["tensors"]]
    assert config["target_modules"] == modules and len(modules) == 8
    assert config["r"] == config["lora_alpha"] == 8 and config["rank_pattern"] == config["alpha_pattern"] == {}
    assert config["peft_type"] == "LORA" and config["task_type"] == source["task_type"]
    assert config["base_model_name_or_path"] == str(tiny.base)
    assert config["lora_dropout"] == 0 and config["bias"] == "none" and config["fan_in_fan_out"] is False
    from safetensors.torch import load_file

    factors = load_file(out / "exported_lora" / "adapter_model.safetensors")
    assert len(factors) == 16 and all(f.dtype == torch.float32 for f in factors.values())
    assert factors[f"base_model.model.{modules[0]}.lora_A.weight"].shape[0] == 8
    assert "Exported τ as a peft adapter (exported_lora/: 8 as lora)" in stdout
    assert "8 matrices as LoRA factors, truncated SVD at rank 8" in stdout
    assert "## Exported LoRA (exported_lora/)" in (out / "report.md").read_text()


@pytest.fixture(scope="module")
def energy_fp16(tiny, pipeline, tmp_path_factory):
    """An export keeping 99 % of each tensor's energy, from the fp16 task vector, Δ from compare's file."""
    root = tmp_path_factory.mktemp("export_fp16")
    tau = pipeline("fp16").task_vector_file
    compare_args = ["--lora_path", tiny.adapter, "--task_vector_path", tau, "--output_dir", root / "cmp"]
    result = run_main("compare_lora_task_vector.py", *compare_args, "--device", "cpu")
    assert result.returncode in (0, 1), result.stderr
    deltas = root / "cmp" / "lora_deltas.safetensors"
    report = analyze_and_export(
        root / "out", "--lora_file", deltas, "--task_vector_file", tau, "--export_lora_energy", 0.99
    )
    return report, root / "out"


def test_energy_export_keeps_the_fraction_at_about_the_lora_rank(tiny, pipeline, energy_fp16):
    report, out = energy_fp16
    tensors = report["export_lora"]["tensors"]
    assert len(tensors) == 8 and report["export_lora"]["energy"] == 0.99
    for t in tensors:
        assert 1 <= t["rank"] <= 8 + 2 and t["kept_energy"] >= 0.99, t["name"]
    config = json.loads((out / "exported_lora" / "adapter_config.json").read_text())
    ranks = {t["name"].removesuffix(".weight"): t["rank"] for t in tensors}
    # peft searches rank_pattern's keys as regular expressions: each is the module's path, escaped
    patterns = {re.escape(m): r for m, r in ranks.items() if r != config["r"]}
    assert patterns == config["rank_pattern"] == config["alpha_pattern"]
    # peft builds each module at its own rank, and merges each to within the reported error of base + τ
    model = exported_model(tiny.base, out / "exported_lora")
    for module, rank in ranks.items():
        assert model.get_submodule(f"base_model.model.{module}").lora_A["default"].weight.shape[0] == rank
    merged = model.merge_and_unload().state_dict()
    base, tau = load_weights(tiny.base), load_weights(pipeline("fp16").task_vectors)
    for t in tensors:
        name = t["name"]
        error = (merged[name].double() - base[name].double() - tau[name].double()).norm() / tau[name].double().norm()
        assert abs(error - t["rel_error"]) < 1e-6, name


def test_eckart_young_error_squared_plus_kept_energy_is_one(rank8_fp32, energy_fp16):
    for report in (rank8_fp32[0], energy_fp16[0]):
        for t in report["export_lora"]["tensors"]:
            assert abs(t["rel_error"] ** 2 + t["kept_energy"] - 1) < 1e-9, t["name"]


def test_rank_k_error_falls_with_k_and_is_the_optimal_tail(pipeline):
    """Eckart–Young: the rank-k error is √(Σ_{i>k} σᵢ²)/‖τ‖ of the full SVD, so it falls as k grows."""
    tau = load_weights(pipeline("fp16").task_vectors)
    delta = load_weights(pipeline("fp32").task_vectors)  # Δ to 1e-7
    name = "model.layers.1.self_attn.v_proj.weight"
    sigma = torch.linalg.svdvals(tau[name].double())
    errors = []
    for k in (1, 2, 4, 8, 16):
        exporter = LoraExporter(ExportRequest(rank=k), ModuleKinds(None, "starcoder2"), {name: tuple(tau[name].shape)})
        exporter.add(name, tau[name], lora_delta=delta[name])
        (t,) = exporter.export.tensors
        assert t.rank == k
        assert abs(t.rel_error - float(sigma[k:].square().sum().sqrt() / sigma.square().sum().sqrt())) < 1e-9
        errors.append(t.rel_error)
    assert all(coarser > finer for coarser, finer in zip(errors[:-1], errors[1:], strict=True))


def reachable_tensor_bytes(root: object) -> int:
    """The bytes of every tensor reachable from `root` (its attributes, their containers, and so on), each storage
    counted once."""
    seen, storages, stack = set(), {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type | types.ModuleType | types.FunctionType):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        else:
            stack.extend(gc.get_referents(obj))
    return sum(storages.values())


def test_exporter_holds_no_factor_in_memory(tmp_path):
    """--export_lora streams: each tensor's factors (and each copy) go to a scratch file in the output's folder as
    they are made, and the adapter is assembled from it at the end; the exporter holds no tensor however many it
    was given (it used to hold every factor until the write: tensors × r × (m + n) floats)."""
    torch.manual_seed(0)
    names = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(6) for p in "qv"] + ["model.norm.weight"]
    shapes = {name: (256, 256) for name in names[:-1]} | {"model.norm.weight": (256,)}
    kinds = ModuleKinds(None, "starcoder2")
    with LoraExporter(ExportRequest(rank=16), kinds, shapes, scratch_dir=tmp_path) as exporter:
        for name in names:
            exporter.add(name, torch.randn(shapes[name]), base=torch.ones(shapes[name]))
            assert reachable_tensor_bytes(exporter) == 0, name
        exporter.write(tmp_path / "exported_lora", None, None)
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "exported_lora" / "adapter_model.safetensors")
    assert sum(t.nbytes for t in adapter.values()) == 12 * 16 * (256 + 256) * 4 + 256 * 4
    assert [p.name for p in tmp_path.iterdir()] == ["exported_lora"]  # the scratch file had no name


@pytest.fixture(scope="module")
def variants(tiny, tiny_gpt2, peft_adapters, tmp_path_factory):
    """LoRA on a GPT-2's Conv1D layers (stored in × out) and on a StarCoder2 embedding: merged at fp32,
    extracted, analysed with --lora_path (and --base_model: peft saves the embedding's base weights too) and
    exported at the adapters' rank."""
    root = tmp_path_factory.mktemp("export_variants")
    configs = {
        "conv1d": (tiny_gpt2, {"r": 4, "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),
        "embedding": (tiny.base, {"r": 4, "target_modules": ["embed_tokens", "q_proj"]}),
    }
    built = {}
    for variant, (base, config) in configs.items():
        adapter = peft_adapters(base, **config)  # the adapters test_merge_variants and test_extract use too
        merged, tvs = root / variant / "merged", root / variant / "tv"
        run_merge(base, adapter, merged, "--device", "cpu")
        extract_args = ["--base_model", base, "--finetuned_model", merged, "--output_dir", tvs, "--device", "cpu"]
        result = run_main("extract_task_vectors.py", *extract_args)
        assert result.returncode == 0, result.stderr
        tau = tvs / "task_vector.safetensors"
        args = ["--lora_path", adapter, "--base_model", base, "--task_vector_file", tau, "--export_lora", 4]
        report = analyze_and_export(root / variant / "out", *args)
        built[variant] = (base, adapter, tvs, root / variant / "out", report)
    return built


@pytest.mark.parametrize("variant", ["conv1d", "embedding"])
def test_conv1d_and_embedding_exports_compute_what_the_source_computes(variants, variant):
    base, adapter, tvs, out, report = variants[variant]
    forms = {t["name"]: (t["form"], t["layout"]) for t in report["export_lora"]["tensors"]}
    config = json.loads((out / "exported_lora" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (variant == "conv1d")
    assert report["export_lora"]["skipped"] == {}
    if variant == "conv1d":
        assert set(forms.values()) == {("lora", "conv1d")}
    else:  # StarCoder2 ties its head to the embedding; the merge unties them: both go as copies (peft would merge
        # an embedding LoRA into the tied weight twice), the head's as the base's, its τ being zero
        assert forms.pop("model.embed_tokens.weight") == forms.pop("lm_head.weight") == ("copy", "other")
        assert set(forms.values()) == {("lora", "linear")}
        assert config["modules_to_save"] == ["model.embed_tokens", "lm_head"] and not config["ensure_weight_tying"]
    exported = exported_model(base, out / "exported_lora")
    torch.testing.assert_close(logits(exported), logits(exported_model(base, adapter)), rtol=0, atol=2e-6)
    merged, weights, tau = exported.merge_and_unload().state_dict(), load_weights(base), load_weights(tvs)
    for t in report["export_lora"]["tensors"]:
        name = t["name"]
        before = weights.get(name, weights.get("model.embed_tokens.weight"))  # the tied head: the embedding's weight
        if t["form"] == "copy":
            assert torch.equal(merged[name], (before.double() + tau[name].double()).float()), name
        else:
            error = (merged[name].double() - before.double() - tau[name].double()).norm() / tau[name].double().norm()
            assert error < 1e-6, name


def without_its_base(task_vector, folder, **metadata):
    """A copy of τ whose header records a base that is not at hand (and `metadata` changed: None removes a key)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(task_vector, "pt") as f:
        header = f.metadata() | {"base_model": "/nonexistent/base"}
    header = {k: v for k, v in (header | metadata).items() if v is not None}
    folder.mkdir()
    save_file(load_weights(task_vector.parent), folder / "task_vector.safetensors", metadata=header)
    return folder / "task_vector.safetensors"


@pytest.mark.parametrize(
    "metadata, fragments",
    [({}, ("a gpt2 model", "Conv1D")), ({"model_type": None}, ("no config.json of the base model", "Conv1D"))],
    ids=["gpt2", "no-model-type"],
)
def test_conv1d_layers_without_the_base_are_refused_before_the_analysis(variants, tmp_path, metadata, fragments):
    _, _, tvs, _, _ = variants["conv1d"]
    tau = without_its_base(tvs / "task_vector.safetensors", tmp_path / "tv", **metadata)
    args = ["--lora_file", tau, "--task_vector_file", tau, "--output_dir", tmp_path / "o", "--export_lora", 4]
    result = run_main("analyze_lora_vs_task_vector_math.py", *args)
    assert_user_error(result, "--export_lora", *fragments, "--base_model")
    assert not (tmp_path / "o").exists() and "FINDINGS" not in result.stdout


def test_names_suffice_where_the_model_type_has_no_conv1d(tiny, pipeline, tmp_path):
    """τ's header records the model type: a StarCoder2 τ exports without its base, and merges back as base + τ."""
    tau = without_its_base(pipeline("fp32").task_vector_file, tmp_path / "tv")
    report = analyze_and_export(
        tmp_path / "o", "--lora_path", tiny.adapter, "--task_vector_file", tau, "--export_lora", 8
    )
    assert len(report["export_lora"]["tensors"]) == 8 and report["export_lora"]["skipped"] == {}
    merged = exported_model(tiny.base, tmp_path / "o" / "exported_lora").merge_and_unload().state_dict()
    base, weights = load_weights(tiny.base), load_weights(tau.parent)
    for t in report["export_lora"]["tensors"]:
        name = t["name"]
        error = (merged[name].double() - base[name].double() - weights[name].double()).norm() / weights[
            name
        ].double().norm()
        assert error < 1e-6, name


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--export_lora", "0"], "--export_lora: expected a positive integer"),
        (["--export_lora", "2.5"], "--export_lora: expected a positive integer"),
        (["--export_lora_energy", "0"], "--export_lora_energy: expected a number in (0, 1]"),
        (["--export_lora_energy", "1.01"], "--export_lora_energy: expected a number in (0, 1]"),
        (
            ["--export_lora", "4", "--export_lora_energy", "0.9"],
            "--export_lora and --export_lora_energy exclude each other",
        ),
    ],
)
def test_bad_export_values_are_one_line_usage_errors(tmp_path, flags, message):
    args = ["--lora_file", tmp_path / "x", "--task_vector_file", tmp_path / "y", "--output_dir", tmp_path / "o"]
    code, _, err = run_in_process(analyze.main, *args, *flags)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
