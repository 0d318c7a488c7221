"""compare's verdict: one cause, read off the evidence compare gathered, with its line and its numbers.

Every rule is a measurement against a stated threshold (docs/diagnosis.md):
- a difference is *rounding* when it is within the most a merge at the recorded dtype can round: proven element
  by element with the base (`within_rounding`, `reproduces_merge`), else against `rounding_floor`, that bound at
  the tensor's largest magnitudes (the base's from task_vector_stats.json);
- a *scale* c (the least-squares fit of τ ≈ c·Δ) differs from 1, or from another value, when the gap exceeds
  SIGMAS standard deviations of c under independent noise (‖τ − cΔ‖ / (‖Δ‖√n)) plus the merge dtype's epsilon
  (the most a rounding of Δ itself moves c); the fit *explains* τ when it leaves at most FIT_EXPLAINS of ‖τ − Δ‖;
  alpha/r and alpha/√r mixed up show as c = √r (or 1/√r) with each tensor's own r (rank_pattern), a wrong alpha as
  one c in every tensor;
- cosines are *near 0* below UNRELATED_COSINE: under 1% of τ's energy along Δ.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field

import torch

from common.compare.comparison import Comparison
from common.numerics.metrics import TensorComparison
from common.numerics.precision import a_dtype, short_name
from common.taskvec.task_vector import TauStatus

SIGMAS = 6.0  # a 6σ deviation of independent noise has probability ~2e-9
FIT_EXPLAINS = 0.5  # ‖τ − cΔ‖ ≤ ½‖τ − Δ‖: the fit removes at least 3/4 of ‖τ − Δ‖²
UNRELATED_COSINE = 0.1  # cos² < 1%: under 1% of ‖τ‖² lies along Δ
SHOWN = 3
UNTOUCHED = (TauStatus.UNCHANGED.value, TauStatus.ROUNDING_ARTIFACT.value)
CAUSES = (
    "equivalent",
    "wrong_base",
    "quantized_base",
    "not_merged",
    "partially_merged",
    "unrelated",
    "sign_flip",
    "rslora_mismatch",
    "scale_mismatch",
    "changes_outside_adapter",
    "tolerance_below_rounding",
    "precision_rounding",
    "unexplained",
)  # the order a primary cause is chosen in


@dataclass
class Diagnosis:
    """The verdict: `cause` (one of CAUSES), every cause that holds, the line that says it, and the numbers."""

    cause: str
    causes: list[str]
    reason: str
    evidence: dict = field(default_factory=dict)

    @property
    def equivalent(self) -> bool:
        return self.cause == "equivalent"


def diagnose(comparison: Comparison) -> Diagnosis:
    """The primary cause and every other that holds (see the module docstring for the rules)."""
    evidence = _evidence(comparison)
    found: dict[str, str] = {}
    for cause, line in _findings(comparison, evidence):
        found.setdefault(cause, line)  # the first line found for a cause (the header's evidence before the scale's)
    if comparison.quantized is not None:  # what the quantization explains is not another cause
        found = {k: v for k, v in found.items() if k in ("sign_flip", "not_merged", "partially_merged")}
        if comparison.identity.differs:
            found["wrong_base"] = _identity_line(comparison)
        found["quantized_base"] = _quantized_line(comparison, evidence)
    if not found:
        found["unexplained"] = _unexplained(comparison, evidence)
    causes = [c for c in CAUSES if c in found]
    return Diagnosis(causes[0], causes, found[causes[0]], evidence)


def _findings(c: Comparison, evidence: dict) -> list[tuple[str, str]]:
    """Every cause that holds, with its line."""
    if not c.shared:
        return [("unrelated", "no LoRA-adapted tensor is in the task vector: it is of another model")]
    found = []
    if c.identity.differs:
        found.append(("wrong_base", _identity_line(c)))
    if c.identity.swapped:
        found.append(("sign_flip", _swapped_line(c)))
    untouched = _untouched(c)
    if untouched:
        found.append(_merge_missing(c, untouched))
    merged = [t for t in c.shared if t.name not in untouched]  # where the merged model holds a change at all
    mean_cosine = statistics.fmean(t.cosine for t in merged) if merged else None
    if mean_cosine is not None and abs(mean_cosine) < UNRELATED_COSINE:
        found.append(("unrelated", _unrelated_line(c, mean_cosine)))
    scale = _common_scale(c, merged)
    scaled = _scale_cause(c, merged, scale)
    if scaled is not None:
        found.append(scaled)
    others = [n for n, s in c.task_vector_only.items() if s == TauStatus.CHANGED]
    if others and c.merge_dtype == torch.float32:
        others += [n for n, s in c.task_vector_only.items() if s == TauStatus.UNCLASSIFIED]  # fp32 cannot round
    agreeing = [t for t in c.shared if _agrees(t)]
    if others and c.task_vector_only and len(others) == len(c.task_vector_only) and not agreeing:
        found.append(("wrong_base", _base_like_line(c, others)))
    elif others and len(agreeing) == len(c.shared):
        found.append(("changes_outside_adapter", _outside_line(c, others)))
    rounding = _rounding_cause(c, evidence, scaled is not None)
    if rounding is not None:
        found.append(rounding)
    if not found and _is_equivalent(c):
        found.append(("equivalent", "LoRA and Task Vectors are mathematically equivalent!"))
    return found


def _is_equivalent(c: Comparison) -> bool:
    return (
        all(t.status == "match" for t in c.shared)
        and not c.lora_only
        and not any(s in (TauStatus.CHANGED, TauStatus.UNCLASSIFIED) for s in c.task_vector_only.values())
    )


def _rounded(t: TensorComparison) -> bool | None:
    """Is τ − Δ on this tensor the rounding of a merge at the recorded dtype? None when it cannot be told."""
    if t.within_rounding is not None:
        return bool(t.within_rounding or t.reproduces_merge)
    if t.rounding_floor is not None:
        return t.max_abs_diff <= t.rounding_floor
    return None


def _agrees(t: TensorComparison) -> bool:
    return t.status == "match" or bool(_rounded(t))


def _untouched(c: Comparison) -> list[str]:
    """Adapted tensors the merged model holds as the base had them (zero, or the base rounded), while Δ is not
    zero there: tensors the merge left out."""
    shared = [t.name for t in c.shared if t.tau_status in UNTOUCHED and t.norm_lora > 0 and t.status != "match"]
    return shared + [n for n in c.lora_only if c.lora_only_status.get(n) in UNTOUCHED]


def _merge_missing(c: Comparison, untouched: list[str]) -> tuple[str, str]:
    adapted = len(c.shared) + len(c.lora_only)
    low = c.merge_dtype not in (None, torch.float32)
    rounded = f" (but for the base's rounding to {short_name(c.merge_dtype)})" if low else ""
    if len(untouched) == adapted:
        holds = f"only the base's rounding to {short_name(c.merge_dtype)}" if low else "zero"
        return "not_merged", (
            f'τ is {holds} on all {adapted} adapted tensors: the "merged" model is the base, the adapter was not '
            "merged into it"
        )
    rest = [t for t in c.shared if t.name not in untouched]
    how = "match" if all(_agrees(t) for t in rest) else "differ too"
    return "partially_merged", (
        f"{len(untouched)} of {adapted} adapted tensors are unchanged{rounded} in the merged model "
        f"({_names(untouched)}) while the other {adapted - len(untouched)} {how}: the merge left them out"
    )


def _common_scale(c: Comparison, merged: list[TensorComparison]) -> float | None:
    """c when τ ≈ c·Δ explains every merged adapted tensor with one c ≠ 1 (beyond noise), else None."""
    tensors = [t for t in merged if t.norm_lora > 0 and math.isfinite(t.scale)]
    if not tensors or any(t.fit_residual > FIT_EXPLAINS for t in tensors):
        return None
    eps = _epsilon(c)
    scale = statistics.fmean(t.scale for t in tensors)
    if any(abs(t.scale - scale) > SIGMAS * t.scale_sigma + eps * abs(scale) for t in tensors):
        return None
    if abs(scale - 1) <= SIGMAS * max(t.scale_sigma for t in tensors) + eps:
        return None
    return scale


def _scaled(merged: list[TensorComparison]) -> list[TensorComparison]:
    """The merged adapted tensors a scale fit says something about."""
    return [t for t in merged if t.norm_lora > 0 and math.isfinite(t.scale)]


def _scale_cause(c: Comparison, merged: list[TensorComparison], scale: float | None) -> tuple[str, str] | None:
    """A sign flip, alpha/r and alpha/√r mixed up (c = √r or 1/√r, each tensor's own r), or another scale."""
    tolerance = SIGMAS * max(t.scale_sigma for t in c.shared) + _epsilon(c)
    if scale is not None and abs(scale + 1) <= tolerance:
        head = f"τ = {scale:.6g}·Δ in every adapted tensor"
        return "sign_flip", f"{head}: base and finetuned were swapped (τ was extracted as base − finetuned)"
    mixed = _rslora_mixup(c, merged, tolerance)
    if mixed is not None:
        return "rslora_mismatch", mixed
    if scale is None:
        return None
    return "scale_mismatch", _scale_line(c, merged, scale)


def _rslora_factor(c: Comparison, name: str) -> float:
    """What mixing up alpha/r and alpha/√r multiplies a tensor's Δ by: √r when the adapter says alpha/r, 1/√r when
    it says alpha/√r (rsLoRA); 1 for a tensor no LoRA scales (a trained copy)."""
    scaling = c.scalings.get(name)
    if scaling is None:
        return 1.0
    root = math.sqrt(scaling.rank)
    return 1 / root if c.config.use_rslora else root


def _rslora_mixup(c: Comparison, merged: list[TensorComparison], tolerance: float) -> str | None:
    """The line when τ ≈ f·Δ in every merged adapted tensor, f = √r (or 1/√r) with the tensor's own rank, and some
    r > 1; else None."""
    tensors = _scaled(merged)
    if not tensors or any(t.fit_residual > FIT_EXPLAINS for t in tensors):
        return None
    factors = {t.name: _rslora_factor(c, t.name) for t in tensors}
    if all(f == 1 for f in factors.values()) or any(abs(t.scale / factors[t.name] - 1) > tolerance for t in tensors):
        return None
    ranks = sorted({c.scalings[t.name].rank for t in tensors if t.name in c.scalings})
    name, says, used = (
        ("1/√r", "alpha/√r (rsLoRA)", "alpha/r") if c.config.use_rslora else ("√r", "alpha/r", "alpha/√r (rsLoRA)")
    )
    each = f"for r = {ranks[0]}" if len(ranks) == 1 else f"for each tensor's own r ({', '.join(map(str, ranks))})"
    return (
        f"{_scale_head(tensors)}: c = {name} {each}, so alpha/r and alpha/√r were mixed up: the adapter says {says}, "
        f"the merge used {used}"
    )


def _scale_head(tensors: list[TensorComparison]) -> str:
    scales = [t.scale for t in tensors]
    if max(scales) - min(scales) <= 1e-6 * max(abs(s) for s in scales):
        return f"τ = {statistics.fmean(scales):.6g}·Δ in every adapted tensor"
    return f"τ = c·Δ in every adapted tensor, c from {min(scales):.6g} to {max(scales):.6g}"


def _scale_line(c: Comparison, merged: list[TensorComparison], scale: float) -> str:
    """One scale c in every tensor: the merge scaled each tensor's B@A by c times its own scaling, as if every alpha
    (lora_alpha, and alpha_pattern's) were c times the adapter's."""
    config = c.config
    what = "alpha/√r" if config.use_rslora else "alpha/r"
    own = sorted({c.scalings[t.name].scaling for t in _scaled(merged) if t.name in c.scalings})
    adapters = f"{what} of each layer ({own[0]:.6g} to {own[-1]:.6g})" if len(own) > 1 else what
    adapters += f" = {own[0]:.6g}" if len(own) == 1 else ""
    alpha = config.lora_alpha
    as_if = f"as if lora_alpha were {scale * alpha:.6g} instead of {alpha:g}"
    if config.alpha_pattern:
        was = ", ".join(f"{json.dumps(k)}: {v:g}" for k, v in config.alpha_pattern.items())
        now = ", ".join(f"{json.dumps(k)}: {scale * v:.6g}" for k, v in config.alpha_pattern.items())
        as_if = (
            f"as if every alpha were {scale:.4g}× its own: lora_alpha {scale * alpha:.6g} instead of {alpha:g}, "
            f"alpha_pattern {{{now}}} instead of {{{was}}}"
        )
    return (
        f"τ = {scale:.6g}·Δ in every adapted tensor, a scaling mismatch: the merge scaled B@A by {scale:.4g}× the "
        f"adapter's {adapters}, {as_if}"
    )


def _rounding_cause(c: Comparison, evidence: dict, scaled: bool) -> tuple[str, str] | None:
    """Every difference is what a merge at the recorded dtype rounds (after the scale, when one was found)."""
    if c.merge_dtype is None:
        return None
    failing = [t for t in c.shared if t.status != "match"]
    if scaled:
        ok = [t.rounding_floor is not None and t.max_abs_fit_residual <= t.rounding_floor for t in c.shared]
        if not all(ok) or c.merge_dtype == torch.float32:
            return None
        return "precision_rounding", f"after the scale, what is left is {short_name(c.merge_dtype)} rounding"
    judged = [_rounded(t) for t in failing]
    unclassified = [n for n, s in c.task_vector_only.items() if s == TauStatus.UNCLASSIFIED]
    if not failing and not (unclassified and c.merge_dtype != torch.float32):
        return None
    if any(j is False for j in judged):
        return None
    dtype = short_name(c.merge_dtype)
    proven = bool(failing) and all(t.within_rounding is not None for t in failing)
    floor = evidence.get("rounding_floor")
    count = f"{len(failing)}/{len(c.shared)} tensors differ by more than {c.tolerance:g}" if failing else ""
    if any(j is None for j in judged) or not failing:
        if c.merge_dtype == torch.float32 or not _scale_near_one(c):
            return None
        lead = count or f"{len(unclassified)} tensors the adapter does not touch are non-zero"
        return "precision_rounding", (
            f"{lead}, as {a_dtype(dtype)} merge's rounding makes them: likely a correct {dtype} merge; pass "
            "--base_model to prove it element by element"
        )
    if c.merge_dtype == torch.float32:
        return "tolerance_below_rounding", (
            f"{count} (up to {evidence['max_abs_diff']:.3g}), all within fp32 rounding of the merged weights (an fp32 "
            f"merge rounds these tensors by up to {floor:.3g}): --tolerance {c.tolerance:g} is below what an fp32 "
            f"merge rounds; use --tolerance {_above(floor)} or more"
        )
    exact = all(t.reproduces_merge for t in c.shared if t.reproduces_merge is not None) and proven
    how = f"; τ is bit for bit what {a_dtype(dtype)} merge of this adapter gives" if exact else ""
    into = f" into the {c.base_4bit} 4-bit base" if c.base_4bit else ""
    if proven:
        return "precision_rounding", (
            f"{count}, all within {dtype} rounding of the merged weights{how}: a correct {dtype} merge{into}; merge at "
            "fp32 to compare exactly"
        )
    return "precision_rounding", (
        f"{count}, all within what {a_dtype(dtype)} merge rounds at these weights' magnitudes (up to {floor:.3g}): "
        f"likely a correct {dtype} merge{into}; pass --base_model to prove it element by element"
    )


def _scale_near_one(c: Comparison) -> bool:
    tensors = [t for t in c.shared if t.norm_lora > 0 and math.isfinite(t.scale)]
    eps = _epsilon(c)
    return all(abs(t.scale - 1) <= SIGMAS * t.scale_sigma + eps for t in tensors)


def _epsilon(c: Comparison) -> float:
    return torch.finfo(c.merge_dtype or torch.float32).eps


def _above(floor: float) -> str:
    """A tolerance just above the floor, rounded up to one significant digit."""
    exponent = math.floor(math.log10(floor)) if floor > 0 else -12
    return f"{math.ceil(floor / 10**exponent)}e{exponent}"


def _identity_line(c: Comparison) -> str:
    ident = c.identity
    return (
        f"τ was extracted against another base: its header records {ident.recorded} (fingerprint "
        f"{ident.recorded_fingerprint}), --base_model is {ident.given} (fingerprint {ident.given_fingerprint}); "
        "pass the base τ was extracted against, or extract τ again against this one"
    )


def _swapped_line(c: Comparison) -> str:
    return (
        f"the base given ({c.identity.given}) is the model τ's header records as finetuned: base and finetuned were "
        "swapped in the extraction (τ = base − finetuned); extract again with them the right way round"
    )


def _base_like_line(c: Comparison, others: list[str]) -> str:
    return (
        f"every tensor changed, the {len(others)} the adapter does not touch included ({_names(others)}), and no "
        "adapted tensor matches its LoRA delta: τ was extracted against another base (another revision, or "
        "another model of the same shape)"
    )


def _outside_line(c: Comparison, others: list[str]) -> str:
    return (
        f"the {len(c.shared)} adapted tensors match, but {_count(others, 'tensor')} the adapter does not touch changed "
        f"({_names(others)}): the finetuned model holds more than this adapter (further training, or parts the "
        "adapter does not describe)"
    )


def _unrelated_line(c: Comparison, mean_cosine: float) -> str:
    return (
        f"cosines near 0 (mean {mean_cosine:.3f}: under {100 * UNRELATED_COSINE**2:g}% of ‖τ‖² lies along Δ): "
        "τ is of another adapter or model"
    )


def _quantized_line(c: Comparison, evidence: dict) -> str:
    """τ of a merge into a 4-bit base: proven with the base (which quantization, which merge), else likely."""
    q = c.quantized
    outside = f"{_count(q.outside, 'weight')} a 4-bit load quantizes"
    if not q.proven:
        return (
            f"exactly the {outside} changed outside the adapter ({_names(q.outside)}) and the adapted tensors differ "
            f"from Δ (mean cosine {evidence['mean_cosine']:.4f}): likely a merge into a 4-bit (QLoRA) base; pass "
            "--base_model to prove it and name the quantization"
        )
    flags = f"--bnb_4bit_quant_type {q.four_bit.quant_type}" + (
        " --bnb_4bit_use_double_quant" if q.four_bit.double_quant else ""
    )
    merges = {
        "dequantized": "the merge into the dequantized 4-bit base (the weights the adapter was trained on)",
        "requantized": "merge_and_unload on the 4-bit model, re-quantized, then dequantized",
    }
    adapted = (
        f"the {q.adapted} adapted tensors are bit for bit {merges[q.merge]}"
        if q.merge
        else "the adapted tensors are not reproduced bit for bit by either QLoRA merge"
    )
    verdict = "a correct QLoRA merge" if q.merge else "a merge into a 4-bit base"
    return (
        f"outside the adapter the {outside} are deq(Q(W)) − W bit for bit ({q.four_bit.describe()}), and {adapted}: "
        f"{verdict}; to compare τ with Δ exactly, extract against the 4-bit base ({flags})"
    )


def _unexplained(c: Comparison, evidence: dict) -> str:
    failing = [t for t in c.shared if t.status != "match"]
    parts = [f"{len(failing)}/{len(c.shared)} tensors differ by more than {c.tolerance:g}"]
    if c.shared:
        parts.append(
            f"max |τ − Δ| {evidence['max_abs_diff']:.3g}, mean cosine {evidence['mean_cosine']:.6f}, scale "
            f"{evidence['min_scale']:.6g}–{evidence['max_scale']:.6g}"
        )
    if c.lora_only:
        parts.append(f"{len(c.lora_only)} adapted tensors are missing from the task vector ({_names(c.lora_only)})")
    unclassified = [n for n, s in c.task_vector_only.items() if s == TauStatus.UNCLASSIFIED]
    if unclassified:
        parts.append(
            f"{len(unclassified)} tensors the adapter does not touch are non-zero ({_names(unclassified)}): pass "
            "--base_model (or keep task_vector_stats.json beside τ) to tell rounding from change"
        )
    return "; ".join(parts) + ": no known cause fits these measurements"


def _evidence(c: Comparison) -> dict:
    """The numbers behind the verdict (comparison_report.json's summary.evidence)."""
    shared = c.shared
    floors = [t.rounding_floor for t in shared if t.rounding_floor is not None]
    scales = [t.scale for t in shared if math.isfinite(t.scale)]
    return {
        "failing": sum(t.status != "match" for t in shared),
        "max_abs_diff": max((t.max_abs_diff for t in shared), default=None),
        "mean_cosine": statistics.fmean(t.cosine for t in shared) if shared else None,
        "min_scale": min(scales, default=None),
        "max_scale": max(scales, default=None),
        "max_scale_sigma": max((t.scale_sigma for t in shared), default=None),
        "rounding_floor": max(floors, default=None),
        "within_rounding_proven": c.with_base and bool(shared),
        "untouched_adapted": _untouched(c),
        "changed_outside": [n for n, s in c.task_vector_only.items() if s == TauStatus.CHANGED],
        "base_recorded": c.identity.recorded,
        "base_recorded_fingerprint": c.identity.recorded_fingerprint,
        "base_given": c.identity.given,
        "base_given_fingerprint": c.identity.given_fingerprint,
    }


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'s' * (len(items) != 1)}"


def _names(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (" …" if len(names) > SHOWN else "")
