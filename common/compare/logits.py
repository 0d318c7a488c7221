"""Behaviour, not only weights: does the merged model pick the same next tokens as base + adapter?

The reference is base + adapter **unmerged** (peft's `PeftModel`, as in training and in unmerged inference), loaded
at `precision` or, for a QLoRA adapter, with the base 4-bit (bitsandbytes NF4/FP4, as it was trained). The candidate
is the merged model, at the dtype it is stored in. Both run the same token sequences; one model is in memory at a time
and only the reference's logits are kept (positions × vocabulary in fp32, on the host) while the candidate runs.

Per prompt and over all positions:
- max |Δ logit|, the merged model's logits minus the reference's;
- KL(reference ‖ merged) per position, Σ p_ref·(log p_ref − log p_merged), in nats, float64 from log-softmax;
- top-1 agreement: positions whose argmax is the same;
- greedy continuation: how many of the first k tokens generated greedily (each model continuing its own text) are
  the same, counted up to the first that differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import UserError
from common.io.safetensors_io import CheckpointIndex
from common.io.sources import resolve_model
from common.model.layout import fingerprint, read_config, stored_dtype
from common.numerics.precision import short_name
from common.quiet import quiet_libraries

DEFAULT_SEQUENCES = 8
DEFAULT_LENGTH = 128
CONTINUATION = 16
QUANT_TYPES = ("nf4", "fp4")


@dataclass(frozen=True)
class Reference:
    """How base + adapter is loaded: at `precision`, or 4-bit with bitsandbytes (`quant_type` nf4 / fp4, double
    quantization or not, computing in `precision`)."""

    precision: torch.dtype
    quant_type: str | None = None
    double_quant: bool = False

    def describe(self) -> str:
        if self.quant_type is None:
            return f"base + adapter unmerged at {short_name(self.precision)}"
        double = ", double quantization" if self.double_quant else ""
        return f"base + adapter unmerged, base 4-bit ({self.quant_type}{double}, {short_name(self.precision)} compute)"


@dataclass
class PromptFigures:
    """One prompt: the reference against the merged model."""

    prompt: int
    positions: int
    max_abs_logit_diff: float
    mean_kl: float
    max_kl: float
    top1_agree: int
    continuation_agree: int  # leading greedy tokens that agree, of `continuation_tokens`
    continuation_tokens: int


@dataclass
class LogitComparison:
    reference: str
    candidate: str
    inputs: str
    prompts: list[PromptFigures]

    @property
    def positions(self) -> int:
        return sum(p.positions for p in self.prompts)

    def summary(self) -> dict:
        positions = self.positions
        return {
            "reference": self.reference,
            "merged_model": self.candidate,
            "inputs": self.inputs,
            "prompts": len(self.prompts),
            "positions": positions,
            "max_abs_logit_diff": max(p.max_abs_logit_diff for p in self.prompts),
            "mean_kl": sum(p.mean_kl * p.positions for p in self.prompts) / positions,
            "max_kl": max(p.max_kl for p in self.prompts),
            "top1_agreement": sum(p.top1_agree for p in self.prompts) / positions,
            "top1_agree": sum(p.top1_agree for p in self.prompts),
            "continuation_tokens": self.prompts[0].continuation_tokens,
            "continuations_identical": sum(p.continuation_agree == p.continuation_tokens for p in self.prompts),
            "mean_continuation_agree": sum(p.continuation_agree for p in self.prompts) / len(self.prompts),
        }


def default_sequences(vocab_size: int, max_positions: int | None, seed: int = 0) -> list[torch.Tensor]:
    """DEFAULT_SEQUENCES sequences of DEFAULT_LENGTH token ids drawn uniformly from the vocabulary (seeded: the same
    on every machine), shorter when the model's positions leave no room for the continuation."""
    length = _room(DEFAULT_LENGTH, max_positions)
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (length,), generator=generator) for _ in range(DEFAULT_SEQUENCES)]


def prompt_sequences(path: Path, tokenizer_dir: Path, max_positions: int | None) -> list[torch.Tensor]:
    """One sequence per non-empty line of `path`, tokenized with the base's tokenizer (cut to leave room for the
    continuation)."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"--prompts {path}: not UTF-8 text") from None
    if not lines:
        raise UserError(f"--prompts {path}: no prompts in it (one text per line)")
    tokenizer = _tokenizer(tokenizer_dir)
    length = _room(None, max_positions)
    sequences = []
    for line in lines:
        ids = tokenizer(line, return_tensors="pt")["input_ids"][0]
        if len(ids) == 0:
            raise UserError(f"--prompts {path}: a line tokenizes to nothing ({line[:40]!r})")
        sequences.append(ids[:length] if length else ids)
    return sequences


def _room(length: int | None, max_positions: int | None) -> int | None:
    if max_positions is None:
        return length
    room = max_positions - CONTINUATION
    if room < 2:
        raise UserError(f"the model has {max_positions} positions: too few for a {CONTINUATION}-token continuation")
    return room if length is None else min(length, room)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _tokenizer(folder: Path):
    """The base's own tokenizer (transformers would make an empty one from config.json alone: files are required)."""
    from transformers import AutoTokenizer

    try:
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise OSError
        with quiet_libraries():
            return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError):
        raise UserError(
            f"--prompts needs the base's tokenizer, and {folder} has none: leave out --prompts (the default "
            "sequences need no tokenizer) or give a base folder with its tokenizer"
        ) from None


def load_reference(base_dir: Path, adapter_dir: Path, reference: Reference, device: torch.device):
    """base + adapter, unmerged, in eval mode on `device`."""
    from peft import PeftModel

    quantization = None
    if reference.quant_type is not None:
        quantization = _bnb_config(reference)
    base = _load(base_dir, reference.precision, device, quantization)
    with quiet_libraries():
        return PeftModel.from_pretrained(base, adapter_dir).eval()


def _bnb_config(reference: Reference):
    from common.model.quantization import FourBit, bnb_config

    return bnb_config(FourBit(reference.quant_type, reference.double_quant), reference.precision)


def load_merged(folder: Path, dtype: torch.dtype, device: torch.device):
    return _load(folder, dtype, device, None).eval()


def _load(folder: Path, dtype: torch.dtype, device: torch.device, quantization):
    from transformers import AutoModelForCausalLM

    try:
        with quiet_libraries():
            return AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, device_map={"": str(device)}, quantization_config=quantization
            )
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{folder}: transformers cannot load it as a causal LM ({e})") from None


@torch.no_grad()
def run(model, sequences: list[torch.Tensor], continuation: int) -> list[tuple[torch.Tensor, list[int]]]:
    """For each sequence, the logits at every position (fp32, on the host) and the model's greedy continuation of
    it. Sequences of one length run as one batch (no padding: no row attends to another's tokens)."""
    results: dict[int, tuple[torch.Tensor, list[int]]] = {}
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(sequences):
        by_length.setdefault(len(ids), []).append(i)
    for rows in by_length.values():
        batch = torch.stack([sequences[i] for i in rows])
        logits, tokens = _run_batch(model, batch, continuation)
        results |= {i: (logits[j], tokens[j]) for j, i in enumerate(rows)}
    return [results[i] for i in range(len(sequences))]


def _run_batch(model, ids: torch.Tensor, continuation: int) -> tuple[torch.Tensor, list[list[int]]]:
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), use_cache=True)
    logits = out.logits.float().cpu()
    steps, past, following = [], out.past_key_values, out.logits[:, -1].argmax(-1)
    for _ in range(continuation):
        steps.append(following.cpu())
        if len(steps) == continuation:
            break
        out = model(input_ids=following[:, None], past_key_values=past, use_cache=True)
        past, following = out.past_key_values, out.logits[:, -1].argmax(-1)
    tokens = torch.stack(steps, dim=1) if steps else torch.zeros(len(ids), 0, dtype=torch.long)
    return logits, tokens.tolist()


def prompt_figures(index: int, reference: tuple, merged: tuple) -> PromptFigures:
    (ref_logits, ref_tokens), (logits, tokens) = reference, merged
    log_p, log_q = ref_logits.double().log_softmax(-1), logits.double().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)
    agree = 0
    while agree < len(ref_tokens) and ref_tokens[agree] == tokens[agree]:
        agree += 1
    return PromptFigures(
        prompt=index,
        positions=ref_logits.shape[0],
        max_abs_logit_diff=float((logits - ref_logits).abs().max()),
        mean_kl=float(kl.mean()),
        max_kl=float(kl.max()),
        top1_agree=int((ref_logits.argmax(-1) == logits.argmax(-1)).sum()),
        continuation_agree=agree,
        continuation_tokens=len(ref_tokens),
    )


@dataclass(frozen=True)
class LogitCheck:
    """What the logit check runs: the two models and the token sequences."""

    base_dir: Path
    merged_dir: Path
    merged_dtype: torch.dtype
    reference: Reference
    sequences: list[torch.Tensor]
    inputs: str  # the sequences, in words


def plan_logit_check(
    base_dir: Path,
    merged: str | None,
    task_vector: CheckpointIndex,
    prompts: Path | None,
    precision: torch.dtype | None,
    quant_type: str | None,
    double_quant: bool,
) -> LogitCheck:
    """The merged model (given, or the finetuned model τ's header records, which must be the one τ was extracted
    from), its dtype, the reference's settings and the sequences; every mistake refused before anything runs."""
    merged_dir = merged_model(merged, task_vector)
    base_config, merged_config = read_config(base_dir), read_config(merged_dir)
    for key, what in (("model_type", "architecture"), ("vocab_size", "vocabulary size")):
        if base_config.get(key) != merged_config.get(key):
            raise UserError(
                f"--check_logits: the merged model {merged_dir} has another {what} than the base {base_dir} "
                f"({merged_config.get(key)} against {base_config.get(key)})"
            )
    with CheckpointIndex(merged_dir) as index:
        check_extracted_from(index, task_vector)
        merged_dtype = stored_dtype(index)
    positions = base_config.get("max_position_embeddings") or base_config.get("n_positions")
    if prompts is None:
        sequences = default_sequences(int(base_config["vocab_size"]), positions)
        inputs = f"{len(sequences)} seeded random sequences of {len(sequences[0])} tokens"
    else:
        sequences = prompt_sequences(prompts, base_dir, positions)
        inputs = f"{len(sequences)} prompts from {prompts}"
    reference = Reference(precision or merged_dtype, quant_type, double_quant)
    return LogitCheck(base_dir, merged_dir, merged_dtype, reference, sequences, inputs)


def merged_model(given: str | None, task_vector: CheckpointIndex) -> Path:
    """The merged model's folder: --finetuned_model, else the one τ's header records."""
    recorded = task_vector.metadata.get("finetuned_model")
    if given is None and recorded is None:
        raise UserError(
            f"--check_logits: {task_vector.source} does not record its merged model: give --finetuned_model"
        )
    try:
        folder = resolve_model(given or recorded, "merged model")
    except UserError as e:
        if given is not None:
            raise
        raise UserError(f"--check_logits: {e} (τ's header records it): give --finetuned_model") from None
    return folder


def check_extracted_from(merged: CheckpointIndex, task_vector: CheckpointIndex) -> None:
    """The merged model must be the model τ was extracted from (its fingerprint, when τ records one): otherwise the
    logits would judge another model than the weights did."""
    expected = task_vector.metadata.get("finetuned_fingerprint")
    found = fingerprint(merged) if expected else None
    if found != expected:
        raise UserError(
            f"--check_logits: the merged model {merged.source} is not the model {task_vector.source} was extracted "
            f"from (fingerprint {found}, τ's header records {expected})"
        )


def compare_logits(check: LogitCheck, adapter_dir: Path, device: torch.device) -> LogitComparison:
    """Run the reference on every sequence, keep its logits, free it; then the merged model, compared as it runs."""
    model = load_reference(check.base_dir, adapter_dir, check.reference, device)
    outputs = run(model, check.sequences, CONTINUATION)
    del model
    _free(device)
    model = load_merged(check.merged_dir, check.merged_dtype, device)
    merged = run(model, check.sequences, CONTINUATION)
    pairs = enumerate(zip(outputs, merged, strict=True))
    prompts = [prompt_figures(i, reference, ours) for i, (reference, ours) in pairs]
    del model
    _free(device)
    candidate = f"{check.merged_dir} at {short_name(check.merged_dtype)}"
    return LogitComparison(check.reference.describe(), candidate, check.inputs, prompts)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def console_line(summary: dict) -> str:
    """What the figures mean, in one line."""
    same = summary["top1_agree"] == summary["positions"]
    picks = "picks the same next token as" if same else "differs in its next token from"
    count = summary["positions"] if same else summary["positions"] - summary["top1_agree"]
    return (
        f"LOGITS: the merged model {picks} base + adapter at {count}/{summary['positions']} positions "
        f"({summary['inputs']}); max |Δ logit| {summary['max_abs_logit_diff']:.2g}, mean KL "
        f"{summary['mean_kl']:.2g} nats (max {summary['max_kl']:.2g}); greedy continuations of "
        f"{summary['continuation_tokens']} tokens identical in {summary['continuations_identical']}/"
        f"{summary['prompts']} prompts"
    )
