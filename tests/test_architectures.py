"""The merge on the architectures people fine-tune, with the adapters peft makes for them, against peft itself.

Every tiny model is built once per module with transformers (random weights, every tensor perturbed), every
adapter once with peft (all trainable tensors randomised). Each merge is checked bitwise against peft's own
`merge_and_unload` at fp32, fp16 and bf16, written back through transformers' own `save_pretrained` (so fused
MoE experts are compared in the checkpoint's own layout), and the fp32 merge's logits against the unmerged
PeftModel. The full matrix is marked slow; the default run keeps one precision per case.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, load_weights, run_script

import analyze_lora_vs_task_vector_math
import compare_lora_task_vector
import extract_task_vectors
import merge_lora
from common.errors import UserError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
SMALL.update(num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
NEW_TOKENS = 8


@dataclass(frozen=True)
class Arch:
    """A tiny model of one architecture, and the names its modules go by."""

    config: str  # transformers config class
    kwargs: dict
    attention: tuple[str, ...] = ("q_proj", "v_proj")  # LoRA targets of the init and vocabulary variants
    embedding: str = "embed_tokens"  # modules_to_save after a resize
    head: str = "lm_head"


GPT2 = dict(vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
ARCHITECTURES = {
    "llama_tied": Arch("LlamaConfig", {**SMALL, "tie_word_embeddings": True}),
    "llama": Arch("LlamaConfig", {**SMALL, "tie_word_embeddings": False}),
    "qwen2": Arch("Qwen2Config", {**SMALL, "tie_word_embeddings": False}),
    "mistral": Arch("MistralConfig", {**SMALL, "head_dim": 8}, ("q_proj", "o_proj")),
    "phi3": Arch("Phi3Config", SMALL, ("qkv_proj", "o_proj")),
    "gemma2": Arch("Gemma2Config", {**SMALL, "head_dim": 8}),
    "mixtral": Arch("MixtralConfig", {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "gpt_neox": Arch("GPTNeoXConfig", SMALL, ("query_key_value", "dense"), "embed_in"),  # lm_head: saved as embed_out
    "starcoder2": Arch("Starcoder2Config", {**SMALL, "use_bias": True}, ("q_proj", "c_fc")),
    "gpt2": Arch("GPT2Config", GPT2, ("c_attn", "c_proj"), "wte"),
}
# MoE layouts: experts saved per expert under other names (Mixtral, Qwen3-MoE), or fused in the checkpoint with
# a transposed layout and biases (GPT-OSS).
MOE_EXTRA = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "head_dim": 8}
DEEPSEEK = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, first_k_dense_replace=0, n_group=1)
DEEPSEEK.update(
    topk_group=1,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    num_key_value_heads=4,
)
MOE = {
    "mixtral": ARCHITECTURES["mixtral"],
    "qwen3_moe": Arch("Qwen3MoeConfig", {**SMALL, **MOE_EXTRA}),
    # DeepSeek-V3 keeps its router (`gate.weight`) in fp32 even at bf16 (`_keep_in_fp32_modules_strict`).
    "deepseek_v3": Arch("DeepseekV3Config", {**SMALL, **DEEPSEEK}, ("q_a_proj", "kv_a_proj_with_mqa")),
    "gpt_oss": Arch(
        "GptOssConfig",
        {
            **SMALL,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "head_dim": 8,
            "layer_types": ["full_attention"],
        },
    ),
}
# Variants: (LoraConfig arguments, how the adapter is made). "all_linear" is what most users ask peft for; on a
# MoE model, transformers 5 + peft add the experts and the router as target_parameters.
VARIANTS = ("all_linear", "pissa", "olora", "resized_vocabulary")


def _quiet():
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_base(arch: Arch, folder: Path, seed: int = 0) -> Path:
    import transformers
    from transformers import AutoModelForCausalLM

    _quiet()
    torch.manual_seed(seed)
    config = getattr(transformers, arch.config)(**arch.kwargs)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


def build_adapter(base: Path, arch: Arch, variant: str, folder: Path, seed: int = 1) -> tuple[Path, Path]:
    """A peft adapter of one variant, its trainable tensors randomised as training would; and the base it
    belongs on (for the vocabulary variant: the base resized with `resize_token_embeddings`, saved beside)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _quiet()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = dict(r=4, lora_alpha=8, target_modules=list(arch.attention), init_lora_weights=False)
    if variant == "all_linear":
        config["target_modules"] = "all-linear"
    elif variant == "experts":
        config["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    elif variant in ("pissa", "olora"):
        config["init_lora_weights"] = variant
    elif variant == "pissa_dora_rslora":
        config.update(init_lora_weights="pissa", use_dora=True, use_rslora=True)
    elif variant == "resized_vocabulary":
        model.resize_token_embeddings(model.config.vocab_size + NEW_TOKENS, mean_resizing=False)
        base = folder.parent / f"{folder.name}_resized_base"
        model.save_pretrained(base)
        config["modules_to_save"] = [arch.embedding, arch.head]
    peft_model = get_peft_model(model, LoraConfig(**config))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param) * (param.abs().mean() + 0.1))
    peft_model.save_pretrained(folder)
    return folder, base


class Models:
    """Bases and adapters built on first use, once per module."""

    def __init__(self, root: Path):
        self.root = root
        self.bases: dict[str, Path] = {}
        self.adapters: dict[tuple[str, str], tuple[Path, Path]] = {}

    def base(self, name: str) -> Path:
        if name not in self.bases:
            self.bases[name] = build_base({**ARCHITECTURES, **MOE}[name], self.root / name)
        return self.bases[name]

    def adapter(self, name: str, variant: str) -> tuple[Path, Path]:
        """(adapter, the base peft loads it on)."""
        if (name, variant) not in self.adapters:
            arch = {**ARCHITECTURES, **MOE}[name]
            built = build_adapter(self.base(name), arch, variant, self.root / f"{name}_{variant}")
            self.adapters[name, variant] = built
        return self.adapters[name, variant]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    return Models(tmp_path_factory.mktemp("architectures"))


def merge(base: Path, adapter: Path, out: Path, precision: str, *flags: str) -> dict[str, torch.Tensor]:
    args = ["--base_model", str(base), "--lora_path", str(adapter), "--output_dir", str(out), "--device", "cpu"]
    assert merge_lora.main([*args, "--precision", precision, *flags]) == 0
    return load_weights(out)


def peft_merge_saved(base: Path, adapter: Path, out: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload, saved by transformers' own save_pretrained (the checkpoint's own layout)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return load_weights(out)


def assert_bitwise(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Every tensor peft saved is ours, bit for bit (a head peft leaves out as tied may be written untied)."""
    assert set(reference) <= set(ours), set(reference) - set(ours)
    assert set(ours) - set(reference) <= {"lm_head.weight"}
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name


def assert_logits_match_unmerged(merged: Path, base: Path, adapter: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.tensor([[1, 3, 7, 50, 42, 5, 9, 90, model.config.vocab_size - 1]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unmerged(ids).logits, rtol=1e-4, atol=1e-4)


# peft's OLoRA ignores fan_in_fan_out: on GPT-2's non-square Conv1D layers its factors do not fit (refused below).
NOT_MERGEABLE = {("gpt2", "olora")}


def _cases(names, variants) -> list:
    """Every (architecture, variant, precision); all but fp32 marked slow."""
    cases = []
    for name in names:
        for variant in variants:
            if (name, variant) in NOT_MERGEABLE:
                continue
            for precision in PRECISIONS:
                marks = [] if precision == "fp32" else [pytest.mark.slow]
                cases.append(pytest.param(name, variant, precision, marks=marks, id=f"{name}-{variant}-{precision}"))
    return cases


@pytest.mark.parametrize(("name", "variant", "precision"), _cases(ARCHITECTURES, VARIANTS))
def test_merge_is_bitwise_peft(models, tmp_path, name, variant, precision):
    adapter, peft_base = models.adapter(name, variant)
    dtype = PRECISIONS[precision]
    ours = merge(models.base(name), adapter, tmp_path / "ours", precision)
    reference = peft_merge_saved(peft_base, adapter, tmp_path / "peft", dtype)
    assert_bitwise(ours, reference, dtype)
    base = load_weights(models.base(name))
    changed = [
        n for n in base if n in ours and ours[n].shape == base[n].shape and not torch.equal(ours[n], base[n].to(dtype))
    ]
    assert changed, "the adapter changed nothing"
    if precision == "fp32":
        assert_logits_match_unmerged(tmp_path / "ours", peft_base, adapter)


MOE_CASES = _cases(["mixtral", "qwen3_moe", "deepseek_v3"], ["all_linear"]) + _cases(MOE, ["experts"])


@pytest.mark.parametrize(("name", "variant", "precision"), MOE_CASES)
def test_target_parameters_on_moe_experts_are_bitwise_peft(models, tmp_path, name, variant, precision):
    adapter, base = models.adapter(name, variant)
    assert json.loads((adapter / "adapter_config.json").read_text())["target_parameters"]
    ours = merge(base, adapter, tmp_path / "ours", precision)
    reference = peft_merge_saved(base, adapter, tmp_path / "peft", PRECISIONS[precision])
    assert_bitwise(ours, reference, PRECISIONS[precision])
    experts = [n for n in ours if ".experts." in n and not n.endswith("bias")]
    original = load_weights(base)
    assert experts and all(not torch.equal(ours[n], original[n].to(ours[n].dtype)) for n in experts)
    if precision == "fp32":
        assert_logits_match_unmerged(tmp_path / "ours", base, adapter)
    if name == "deepseek_v3" and precision == "bf16":
        assert ours["model.layers.0.mlp.gate.weight"].dtype == torch.float32


@pytest.mark.parametrize(("name", "variant", "precision"), _cases(["llama", "gpt2"], ["pissa_dora_rslora"]))
def test_pissa_with_dora_and_rslora_is_bitwise_peft(models, tmp_path, name, variant, precision):
    adapter, base = models.adapter(name, variant)
    ours = merge(base, adapter, tmp_path / "ours", precision)
    assert_bitwise(
        ours, peft_merge_saved(base, adapter, tmp_path / "peft", PRECISIONS[precision]), PRECISIONS[precision]
    )


def test_resized_vocabulary_merges_into_the_original_base_as_into_the_resized_one(models, tmp_path):
    """The trained copies define the whole embedding and head: the original base gives the same model."""
    for name in ("llama_tied", "gpt_neox", "gpt2"):
        adapter, resized = models.adapter(name, "resized_vocabulary")
        into_original = merge(models.base(name), adapter, tmp_path / name / "original", "bf16")
        into_resized = merge(resized, adapter, tmp_path / name / "resized", "bf16")
        assert into_original.keys() == into_resized.keys()
        assert all(torch.equal(into_original[n], into_resized[n]) for n in into_original)
        config = json.loads((tmp_path / name / "original" / "config.json").read_text())
        assert config["vocab_size"] == SMALL["vocab_size"] + NEW_TOKENS
        merged = merge(models.base(name), adapter, tmp_path / name / "fp32", "fp32")
        embedding = next(n for n in merged if n.endswith(f"{ARCHITECTURES[name].embedding}.weight"))
        assert merged[embedding].shape[0] == SMALL["vocab_size"] + NEW_TOKENS
        assert_logits_match_unmerged(tmp_path / name / "fp32", resized, adapter)


def test_resized_vocabulary_without_the_head_s_copy_names_the_missing_copy(models, tmp_path):
    adapter, _ = models.adapter("llama", "resized_vocabulary")
    edited = tmp_path / "adapter"
    shutil.copytree(adapter, edited)
    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(edited / "adapter_model.safetensors").items() if "lm_head" not in k}
    save_file(tensors, edited / "adapter_model.safetensors", {"format": "pt"})
    with pytest.raises(
        UserError, match="modules_to_save lists lm_head, but the adapter's file holds no copy of lm_head"
    ):
        merge(models.base("llama"), edited, tmp_path / "out", "fp32")


def test_raw_pissa_matches_the_model_it_was_trained_as(models, tmp_path):
    """peft's own training-time model (residual base + trained factors), merged, is what our merge writes; and
    with the residual base saved at initialisation, --residual_base merges it as a plain LoRA to the same."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = models.base("llama")
    torch.manual_seed(5)
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, init_lora_weights="pissa",
                             target_modules=["q_proj", "down_proj"]))  # fmt: skip
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    trained.save_pretrained(tmp_path / "adapter")
    reference = {k: v.clone() for k, v in trained.merge_and_unload().state_dict().items()}
    ours = merge(base, tmp_path / "adapter", tmp_path / "ours", "fp32")
    assert all(torch.equal(ours[n], reference[n]) for n in ours)
    torch.manual_seed(5)
    residual = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, init_lora_weights="pissa",
                              target_modules=["q_proj", "down_proj"]))  # fmt: skip
    residual.unload().save_pretrained(tmp_path / "residual")
    plain = merge(tmp_path / "residual", tmp_path / "adapter", tmp_path / "plain", "fp32", "--residual_base")
    assert all(torch.equal(plain[n], ours[n]) for n in ours)
    without_flag = merge(tmp_path / "residual", tmp_path / "adapter", tmp_path / "twice", "fp32")
    assert not torch.equal(
        without_flag["model.layers.0.self_attn.q_proj.weight"], ours["model.layers.0.self_attn.q_proj.weight"]
    )


@pytest.mark.parametrize("init", ["pissa_niter_4", "corda", "loftq", "lora_ga", "something_new"])
def test_base_rewriting_inits_peft_cannot_redo_are_refused_with_both_ways_out(models, tmp_path, init):
    adapter, _ = models.adapter("llama", "pissa")
    edited = tmp_path / "adapter"
    shutil.copytree(adapter, edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    config["init_lora_weights"] = init
    (edited / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as error:
        merge(models.base("llama"), edited, tmp_path / "out", "fp32")
    message = str(error.value)
    assert f'init_lora_weights "{init}"' in message
    assert "path_initial_model_for_weight_conversion" in message and "--residual_base" in message
    assert not (tmp_path / "out").exists()
    merged = merge(models.base("llama"), edited, tmp_path / "residual", "fp32", "--residual_base")
    assert merged


def test_refusal_is_one_line_exit_2(models, tmp_path):
    adapter, _ = models.adapter("llama", "pissa")
    edited = tmp_path / "adapter"
    shutil.copytree(adapter, edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    config["init_lora_weights"] = "corda"
    (edited / "adapter_config.json").write_text(json.dumps(config))
    args = ["--base_model", models.base("llama"), "--lora_path", edited, "--output_dir", tmp_path / "out"]
    assert_user_error(run_script("merge_lora.py", *args), "corda", "activation statistics", "--residual_base")


def test_olora_on_a_non_square_conv1d_layer_is_refused_as_peft_cannot_merge_it(models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _quiet()
    model = AutoModelForCausalLM.from_pretrained(models.base("gpt2"))
    get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights="olora")).save_pretrained(
        tmp_path / "adapter"
    )
    with pytest.raises(UserError, match="OLoRA on the Conv1D layer .* peft cannot merge it either"):
        merge(models.base("gpt2"), tmp_path / "adapter", tmp_path / "out", "fp32")


def test_lora_bias_on_a_layer_without_bias_says_peft_cannot_merge_it(models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _quiet()
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(models.base("llama")),
        LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(UserError, match=r"lora_bias=True on 1 layer without a bias .*\(the base layer has no bias\)"):
        merge(models.base("llama"), tmp_path / "adapter", tmp_path / "out", "fp32")


def test_an_adapter_of_another_model_is_called_so_and_a_partial_fit_is_not(models, tmp_path):
    adapter, _ = models.adapter("gpt_neox", "all_linear")
    with pytest.raises(UserError, match="built for another model"):
        merge(models.base("llama"), adapter, tmp_path / "other", "fp32")
    adapter, _ = models.adapter("llama", "all_linear")
    from safetensors.torch import load_file, save_file

    truncated = tmp_path / "one_layer"
    shutil.copytree(models.base("llama"), truncated)
    weights = {k: v for k, v in load_file(truncated / "model.safetensors").items() if "layers.0.mlp" not in k}
    save_file(weights, truncated / "model.safetensors", {"format": "pt"})
    with pytest.raises(UserError, match="another revision or variant") as error:
        merge(truncated, adapter, tmp_path / "partial", "fp32")
    assert "built for another model" not in str(error.value)


def pipeline_at_fp32(
    base: Path, adapter: Path, root: Path, *extract_flags: str, precision: str = "fp32"
) -> tuple[int, dict, list[str]]:
    """merge → extract → compare --base_model, in-process: compare's exit code, its report, and its arguments."""
    merge(base, adapter, root / "merged", precision)
    args = ["--base_model", str(base), "--finetuned_model", str(root / "merged"), "--device", "cpu"]
    assert extract_task_vectors.main([*args, "--output_dir", str(root / "tv"), *extract_flags]) == 0
    args = ["--lora_path", str(adapter), "--task_vector_path", str(root / "tv" / "task_vector.safetensors")]
    code = compare_lora_task_vector.main([*args, "--output_dir", str(root / "c"), "--base_model", str(base)])
    return code, json.loads((root / "c" / "comparison_report.json").read_text()), args


@pytest.mark.parametrize(("name", "variant"), [("mixtral", "all_linear"), ("gpt_oss", "experts")])
def test_compare_proves_a_target_parameters_merge_per_expert(models, tmp_path, name, variant):
    adapter, base = models.adapter(name, variant)
    code, report, args = pipeline_at_fp32(base, adapter, tmp_path)
    assert code == 0, report["summary"]["reason"]
    rows = {row["name"]: row for row in report["tensors"]}
    experts = [n for n in rows if "expert" in n and rows[n]["status"] == "match"]
    assert len(experts) >= 2 and all(rows[n]["reproduces_merge"] for n in experts)
    with pytest.raises(UserError, match="target_parameters.*pass --base_model"):
        compare_lora_task_vector.main([*args, "--output_dir", str(tmp_path / "c2")])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_compare_takes_the_same_delta_for_pissa_and_olora(models, tmp_path, init):
    adapter, base = models.adapter("qwen2", init)
    code, report, args = pipeline_at_fp32(base, adapter, tmp_path)
    assert code == 0, report["summary"]["reason"]
    with pytest.raises(UserError, match=f"{init.upper()}-initialised LoRA updates.*pass --base_model"):
        compare_lora_task_vector.main([*args, "--output_dir", str(tmp_path / "c2")])
    tv = str(tmp_path / "tv" / "task_vector.safetensors")
    args = ["--lora_path", str(adapter), "--task_vector_file", tv, "--base_model", str(base), "--device", "cpu"]
    assert analyze_lora_vs_task_vector_math.main([*args, "--output_dir", str(tmp_path / "a")]) == 0
    tensors = json.loads((tmp_path / "a" / "analysis.json").read_text())["tensors"]
    assert tensors and all(t["within_rounding"] and t["rel_error"] < 1e-5 for t in tensors)
    assert all(not t["lora_spectrum_from_factors"] for t in tensors)  # Δ = s(BA − B₀A₀) has rank up to 2r


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_at_bf16_the_pissa_and_olora_delta_starts_from_the_merges_own_factors(models, tmp_path, init):
    """A bf16 merge takes its SVD / QR of the bf16 weight: Δ does too, so every difference is bf16 rounding."""
    adapter, base = models.adapter("llama", init)
    code, report, _ = pipeline_at_fp32(base, adapter, tmp_path, precision="bf16")
    shared = [row for row in report["tensors"] if row["status"] in ("match", "mismatch")]
    assert code == 1 and shared
    assert all(row["within_rounding"] and row["reproduces_merge"] for row in shared), shared


def test_a_resized_vocabulary_is_compared_on_the_rows_both_models_have(models, tmp_path):
    """Merged into the original base, extracted with --allow_shape_mismatch: τ and Δ cover the original rows."""
    adapter, _ = models.adapter("llama", "resized_vocabulary")
    code, report, _ = pipeline_at_fp32(models.base("llama"), adapter, tmp_path, "--allow_shape_mismatch")
    stats = json.loads((tmp_path / "tv" / "task_vector_stats.json").read_text())
    assert any("first 96 rows compared" in line for line in stats["shape_mismatch"])
    assert code == 0, report["summary"]["reason"]
    rows = {row["name"]: row for row in report["tensors"]}
    assert rows["model.embed_tokens.weight"]["status"] == "match"
    assert rows["lm_head.weight"]["status"] == "match"


@pytest.mark.parametrize(
    "architecture",
    ["GptOssForCausalLM", "DeepseekV3ForCausalLM", "Glm4MoeForCausalLM", "Ernie4_5_MoeForCausalLM",
     "Qwen3MoeForCausalLM", "MixtralForCausalLM", "LlamaForCausalLM", "Gemma2ForCausalLM", "Starcoder2ForCausalLM"],
)  # fmt: skip
def test_the_fp32_kept_modules_read_from_source_are_the_classes_own(architecture):
    """kept_in_fp32 reads transformers' source instead of importing the class (seconds): it must agree."""
    import transformers

    from common.model.layout import class_attributes

    model_class = getattr(transformers, architecture)
    config = {"architectures": [architecture], "model_type": model_class.config_class.model_type}
    names = ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict")
    read = class_attributes(config, names)
    for name in names:
        assert sorted(read[name]) == sorted(getattr(model_class, name) or []), name
