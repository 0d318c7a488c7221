"""common/numerics/precision.py: the finiteness test the merge runs on every tensor it writes."""

from __future__ import annotations

import pytest
import torch

from common.numerics.finite import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_finds_one_nan_or_inf_anywhere(dtype):
    x = torch.randn(1000).to(dtype)
    assert all_finite(x) and all_finite(x[:0]) and all_finite(torch.arange(5))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for position in (0, 501, 999):
            y = x.clone()
            y[position] = bad
            assert not all_finite(y), (bad, position)
    mostly_nan = torch.full((100_000,), float("nan"), dtype=dtype)
    mostly_nan[7] = 1.0
    assert not all_finite(mostly_nan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ulp_is_the_spacing_of_dtype_at_each_magnitude(dtype):
    from common.numerics.precision import ulp

    info = torch.finfo(dtype)
    tiny = info.smallest_normal
    x = torch.cat([torch.randn(5000).double() * 10.0 ** torch.randint(-12, 4, (5000,)), torch.tensor([0.0, tiny / 3])])
    x = x.abs().clamp_max(info.max / 4)
    representable = x.to(dtype)  # the spacing next to a representable value, upwards from it
    above = torch.nextafter(representable, torch.tensor(float("inf"), dtype=dtype))
    spacing = above.double() - representable.double()
    assert torch.equal(ulp(representable.double(), dtype), spacing)
    _, exponent = torch.frexp(x.clamp_min(tiny))  # the definition: eps · 2^(e−1), |x| = m·2^e, m in [½, 1)
    assert torch.equal(ulp(x, dtype), torch.ldexp(torch.full_like(x, info.eps), exponent - 1))


def test_rounding_residual_in_chunks_is_the_whole_tensor_computation(monkeypatch):
    import common.numerics.metrics as metrics
    from common.numerics.precision import ulp

    torch.manual_seed(0)
    weight = torch.randn(300, 70) * 0.02
    lora_b, lora_a = torch.randn(300, 4) * 0.01, torch.randn(4, 70) * 0.01
    delta = 2.0 * (lora_b.double() @ lora_a.double())
    magnitude = 2.0 * (lora_b.abs().double() @ lora_a.abs().double())
    merged = (weight.to(torch.bfloat16).float() + (2.0 * lora_b @ lora_a)).to(torch.bfloat16)
    tau = merged.float() - weight.to(torch.bfloat16).float()
    exact_tau, tau = tau, tau.clone()
    tau[17, 3] += 1e-3  # one element no rounding explains
    whole = metrics.rounding_residual(weight, delta, tau, torch.bfloat16, 4, magnitude, sample_size=1000)
    monkeypatch.setattr(metrics, "chunk_elements", lambda device: 997)  # dividing neither rows nor the step
    chunked = metrics.rounding_residual(weight, delta, tau, torch.bfloat16, 4, magnitude, sample_size=1000)
    ulps = (tau.double() - delta) / ulp(weight.double().abs() + delta.abs(), torch.bfloat16)
    step = ulps.numel() // 1000
    for result in (whole, chunked):
        assert result.max_ulps == float(ulps.abs().max())
        assert result.rms_ulps == pytest.approx(float(ulps.square().mean().sqrt()), rel=1e-12)
        assert torch.equal(result.ulp_sample, ulps.flatten()[::step].float())
        assert result.within_rounding is False
    assert metrics.rounding_residual(weight, delta, exact_tau, torch.bfloat16, 4, magnitude).within_rounding is True
    assert metrics.rounding_residual(weight, delta, exact_tau, torch.bfloat16, 4).within_rounding is None


def test_compare_tensor_in_chunks_is_the_whole_tensor_computation(monkeypatch):
    import common.numerics.metrics as metrics

    torch.manual_seed(1)
    delta = torch.randn(300, 70, dtype=torch.float64)
    tau = (1.5 * delta + 1e-3 * torch.randn(300, 70, dtype=torch.float64)).float()
    results = [metrics.compare_tensor("t", delta, tau)]
    monkeypatch.setattr(metrics, "chunk_elements", lambda device: 997)
    results.append(metrics.compare_tensor("t", delta, tau))
    t = tau.double()
    scale = float((t * delta).sum() / delta.square().sum())
    for r in results:
        assert r.cosine == pytest.approx(float((t * delta).sum() / (t.norm() * delta.norm())), rel=1e-14)
        assert r.max_abs_diff == float((t - delta).abs().max())
        assert r.scale == pytest.approx(scale, rel=1e-14) and r.scale == pytest.approx(1.5, rel=1e-3)
        assert r.max_abs_fit_residual == pytest.approx(float((t - scale * delta).abs().max()), rel=1e-12)
        assert r.fit_residual == pytest.approx(float((t - scale * delta).norm() / (t - delta).norm()), rel=1e-12)
        assert r.rel_error == pytest.approx(float((t - delta).norm() / delta.norm()), rel=1e-14)
