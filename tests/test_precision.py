"""common/precision.py: the finiteness test the merge runs on every tensor it writes."""

from __future__ import annotations

import pytest
import torch

from common.finite import all_finite


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
