"""bench/upconv_forms.py times three forms of one linear map; they must be that same map."""

from __future__ import annotations

import pytest
import torch

from tests.bench.scripts import load_bench


@pytest.mark.parametrize("side", [3, 5])
def test_the_three_upsample_conv_forms_are_one_map_with_the_same_gradients(side: int):
    bench = load_bench("upconv_forms")
    gen = torch.Generator().manual_seed(side)
    x0 = torch.randn(2, 3, side, side, dtype=torch.float64, generator=gen).contiguous(
        memory_format=bench.NHWC
    )
    w0 = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=gen)
    b0 = torch.randn(4, dtype=torch.float64, generator=gen)
    grad = torch.randn(2, 4, 2 * side, 2 * side, dtype=torch.float64, generator=gen)
    seen = {}
    for name, form in bench.FORMS.items():
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        y = form(x, w, b)
        y.backward(grad)
        seen[name] = (y.detach(), x.grad, w.grad, b.grad)
    for name in ("transposed", "phases"):
        for got, want in zip(seen[name], seen["plain"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
