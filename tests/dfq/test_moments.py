"""dfq.synth.moments.var_mean (two-pass, hand-written backward) against torch.var_mean."""

import pytest
import torch

from dfq.synth.moments import var_mean


def test_small_case_by_hand():
    # channel 0 holds 1, 3 (mean 2, var 1); channel 1 holds 2, 2 (mean 2, var 0)
    x = torch.tensor([[[[1.0]], [[2.0]]], [[[3.0]], [[2.0]]]])  # N=2, C=2, 1x1
    var, mean = var_mean(x, [0, 2, 3])
    assert torch.equal(mean, torch.tensor([2.0, 2.0]))
    assert torch.equal(var, torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize(
    "shape,dims,channels_last",
    [
        ((4, 3, 5, 6), [0, 2, 3], False),  # BN batch statistics
        ((4, 3, 5, 6), [0, 2, 3], True),
        ((4, 3, 5, 6), [2, 3], True),  # DSG per-sample statistics
        ((7, 5), [0], False),  # BatchNorm1d
        ((4, 3, 5, 6), [-1, -2], False),  # negative dims, unsorted
    ],
)
def test_same_values_and_gradients_as_torch(shape, dims, channels_last):
    torch.manual_seed(0)
    x = 3 + 2 * torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    var_a, mean_a = var_mean(a, dims)
    var_b, mean_b = torch.var_mean(b, dim=dims, correction=0)
    assert var_a.shape == var_b.shape and mean_a.shape == mean_b.shape
    torch.testing.assert_close(var_a, var_b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean_a, mean_b, rtol=1e-12, atol=1e-12)
    gv, gm = torch.randn_like(var_b), torch.randn_like(mean_b)
    ((var_a * gv).sum() + (mean_a * gm).sum()).backward()
    ((var_b * gv).sum() + (mean_b * gm).sum()).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("use", ["var", "mean"])
def test_gradient_when_only_one_output_is_used(use):
    torch.manual_seed(1)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    out = var_mean(x, [0, 2, 3])[0 if use == "var" else 1].pow(2).sum()
    ref = torch.var_mean(y, dim=[0, 2, 3], correction=0)[0 if use == "var" else 1].pow(2).sum()
    out.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_gradcheck():
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: var_mean(t, [0, 2, 3]), (x,))


def test_keeps_no_second_copy_of_the_input_for_backward():
    """Autograd through the two-pass form would also save ``x - mean``; this keeps x and the mean."""
    x = torch.randn(8, 4, 6, 6, requires_grad=True)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        var_mean(x, [0, 2, 3])
    assert sum(saved) == x.numel() + 4
