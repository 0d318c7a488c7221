"""Every LoRA variant real adapters carry, merged by streaming and by peft, on tiny StarCoder2 and GPT-2."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    PRECISIONS,
    STARCODER2_VARIANTS,
    build_peft_adapter,
    load_weights,
    peft_merged_state_dict,
    run_main,
    run_merge,
)

# With tied embeddings, these change the output head and the input embedding differently.
UNTIED = {"embedding_lora", "modules_to_save_lm_head"}
GPT2_VARIANTS = {
    "conv1d": {"r": 4, "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True},
    "conv1d_dora_mlp": {"r": 4, "target_modules": ["c_fc"], "fan_in_fan_out": True, "use_dora": True},
}


def streamed_merge(base, adapter, out, precision):
    result = run_merge(base, adapter, out, "--precision", precision)
    return load_weights(out), result.stdout


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("variant", sorted(set(STARCODER2_VARIANTS) - UNTIED))
def test_variant_is_bitwise_peft(tiny, variant_adapters, tmp_path, variant, precision):
    adapter = variant_adapters[variant]
    ours, _ = streamed_merge(tiny.base, adapter, tmp_path / "out", precision)
    reference = peft_merged_state_dict(tiny.base, adapter, PRECISIONS[precision])
    assert set(reference) - set(ours) == {"lm_head.weight"}  # tied: left out by save_pretrained as well
    base = load_weights(tiny.base)
    changed = 0
    for name, tensor in ours.items():
        assert tensor.dtype == reference[name].dtype, name
        assert torch.equal(tensor, reference[name]), name
        changed += not torch.equal(tensor.float(), base[name].to(tensor.dtype).float())
    assert changed > 0


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("variant", sorted(UNTIED))
def test_tied_head_is_untied_where_the_unmerged_model_keeps_them_apart(
    tiny, variant_adapters, tmp_path, variant, precision
):
    """Every tensor bitwise peft's except the output head, which keeps what the unmerged model computes with."""
    adapter = variant_adapters[variant]
    ours, stdout = streamed_merge(tiny.base, adapter, tmp_path / "out", precision)
    dtype = PRECISIONS[precision]
    reference = peft_merged_state_dict(tiny.base, adapter, dtype)
    for name, tensor in ours.items():
        if name != "lm_head.weight":
            assert torch.equal(tensor, reference[name]), name
    base_embedding = load_weights(tiny.base)["model.embed_tokens.weight"].to(dtype)
    if variant == "embedding_lora":
        assert torch.equal(ours["lm_head.weight"], base_embedding)  # peft writes embed + Δ into the shared head
        assert not torch.equal(ours["model.embed_tokens.weight"], base_embedding)
    else:
        assert torch.equal(ours["lm_head.weight"], reference["lm_head.weight"])  # the trained copy
        assert torch.equal(ours["model.embed_tokens.weight"], base_embedding)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert "untied" in stdout


@pytest.mark.parametrize("variant", sorted(STARCODER2_VARIANTS))
def test_merged_logits_equal_the_unmerged_peft_model(tiny, variant_adapters, tmp_path, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    streamed_merge(tiny.base, variant_adapters[variant], tmp_path / "out", "fp32")
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny.base), variant_adapters[variant])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[1, 3, 7, 100, 42, 5, 9, 300]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def gpt2_adapters(tiny_gpt2, peft_adapters):
    return {name: peft_adapters(tiny_gpt2, **config) for name, config in GPT2_VARIANTS.items()}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("variant", sorted(GPT2_VARIANTS))
def test_gpt2_conv1d_is_bitwise_peft(tiny_gpt2, gpt2_adapters, tmp_path, variant, precision):
    ours, _ = streamed_merge(tiny_gpt2, gpt2_adapters[variant], tmp_path / "out", precision)
    reference = peft_merged_state_dict(tiny_gpt2, gpt2_adapters[variant], PRECISIONS[precision])
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name


def test_peft_engine_and_streaming_engine_agree_bitwise(tiny, variant_adapters, tmp_path):
    adapter = variant_adapters["dora"]
    streamed, _ = streamed_merge(tiny.base, adapter, tmp_path / "stream", "bf16")
    args = ["--base_model", tiny.base, "--lora_path", adapter, "--output_dir", tmp_path / "peft", "--precision", "bf16"]
    result = run_main("merge_lora.py", *args, "--engine", "peft")
    assert result.returncode == 0, result.stderr
    with_peft = load_weights(tmp_path / "peft")
    assert with_peft.keys() == streamed.keys()
    assert all(torch.equal(with_peft[n], streamed[n]) for n in streamed)
    assert (tmp_path / "peft" / "tokenizer.json").is_file()


def test_checkpoint_without_the_model_prefix(tiny_gpt2, gpt2_adapters, tmp_path):
    """The original gpt2 checkpoint names its tensors `h.0…`, the model's modules are `transformer.h.0…`."""
    import shutil

    from safetensors.torch import save_file

    bare = tmp_path / "bare_gpt2"
    shutil.copytree(tiny_gpt2, bare)
    weights = load_weights(tiny_gpt2)
    (bare / "model.safetensors").unlink()
    save_file(
        {k.removeprefix("transformer."): v for k, v in weights.items()}, bare / "model.safetensors", {"format": "pt"}
    )
    ours, _ = streamed_merge(bare, gpt2_adapters["conv1d"], tmp_path / "out", "fp16")
    reference = peft_merged_state_dict(tiny_gpt2, gpt2_adapters["conv1d"], torch.float16)
    assert set(ours) == {k.removeprefix("transformer.") for k in reference} - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[f"transformer.{name}"]), name
    args = ["--base_model", bare, "--finetuned_model", tmp_path / "out", "--output_dir", tmp_path / "tv"]
    assert run_main("extract_task_vectors.py", *args).returncode == 0
    args = [
        "--lora_path",
        gpt2_adapters["conv1d"],
        "--task_vector_path",
        tmp_path / "tv",
        "--output_dir",
        tmp_path / "c",
    ]
    result = run_main("compare_lora_task_vector.py", *args, "--base_model", bare)
    assert result.returncode == 1 and "all within fp16 rounding" in result.stdout
    result = run_main("compare_lora_task_vector.py", *args[:-1], tmp_path / "c2", "--tolerance", "1e-2")
    assert result.returncode == 0, result.stdout


def test_lora_on_the_head_of_an_untied_model(tiny, tmp_path):
    """With its own saved lm_head, a LoRA on the head changes that tensor (and nothing is untied)."""
    import shutil

    from safetensors.torch import save_file

    untied = tmp_path / "untied"
    shutil.copytree(tiny.base, untied)
    config = json.loads((untied / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (untied / "config.json").write_text(json.dumps(config))
    weights = load_weights(tiny.base)
    head = weights["model.embed_tokens.weight"] + 0.01 * torch.randn_like(weights["model.embed_tokens.weight"])
    save_file({"lm_head.weight": head.contiguous()}, untied / "model-head.safetensors", {"format": "pt"})
    index = json.loads((untied / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-head.safetensors"
    (untied / "model.safetensors.index.json").write_text(json.dumps(index))
    adapter = build_peft_adapter(untied, tmp_path / "adapter", r=4, target_modules=["lm_head", "q_proj"])
    for precision in ("fp32", "bf16"):
        ours, stdout = streamed_merge(untied, adapter, tmp_path / precision, precision)
        reference = peft_merged_state_dict(untied, adapter, PRECISIONS[precision])
        assert ours.keys() == reference.keys() and "untied" not in stdout
        assert all(torch.equal(ours[n], reference[n]) for n in ours)
        assert not torch.equal(ours["lm_head.weight"].float(), head.to(PRECISIONS[precision]).float())
