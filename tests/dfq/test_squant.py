"""``quant.weight_round = "squant"``: data-free flip rounding (dfq/quant/squant.py). The pipeline's rounding
step (once after training, kept across a resume) is tested for both roundings in test_adaround.py."""

import numpy as np
import pytest
import torch

from dfq.quant import quantize
from dfq.quant.modules import QuantConv2d
from dfq.quant.quantizer import asymmetric_params, per_channel_range, per_tensor_range
from dfq.quant.squant import squant, squant_codes, squant_layer
from dfq.spec import JobSpec, QuantSpec


def _codes(t: list, levels: str = "kc") -> list:
    x = torch.tensor(t)
    free = torch.ones_like(x, dtype=torch.bool)
    return squant_codes(x, free, free, levels).tolist()


def test_kernel_level_by_hand():
    # errors -0.4 -0.3 -0.2 -0.45 sum to -1.35: round(1.35) = 1 flip up, the cheapest (0.45 -> code 1);
    # the kernel is left at -0.35 and so is its channel, which rounds to no flip
    assert _codes([[[0.4, 0.3, 0.2, 0.45]]]) == [[[0.0, 0.0, 0.0, 1.0]]]
    # E alone is nearest rounding
    assert _codes([[[0.4, 0.3, 0.2, 0.45]]], "") == [[[0.0, 0.0, 0.0, 0.0]]]


def test_channel_level_by_hand():
    # kernel A: errors -0.3, -0.35 (sum -0.65) -> flip 0.35 up, kernel at +0.35, candidate: it, back (0.65)
    # kernel B: -0.2, -0.4 (-0.6) -> flip 0.4 up, at +0.4, candidate back at priority 0.6
    # kernel C: -0.1, -0.45 (-0.55) -> flip 0.45 up, at +0.45, candidate back at 0.55
    # channel: 0.35 + 0.4 + 0.45 = 1.2 -> one flip down, the highest priority: A's (0.65) goes back to 0
    got = _codes([[[0.3, 0.35], [0.2, 0.4], [0.1, 0.45]]])
    assert got == [[[0.0, 0.0], [0.0, 1.0], [0.0, 1.0]]]
    # K alone keeps all three flips
    assert _codes([[[0.3, 0.35], [0.2, 0.4], [0.1, 0.45]]], "k") == [[[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]]


def test_a_kernel_short_of_its_flips_offers_the_next_in_line():
    # A (twice): errors -0.4, -0.05 (sum -0.45): no flip; candidate the next in line, 0.4 up (priority 0.4)
    # B: -0.45, -0.3 (-0.75): one flip, 0.45 up, B at +0.25; candidate: it, back down (priority 0.55)
    # channel: -0.45 - 0.45 + 0.25 = -0.65 -> one flip up: the first A's 0.4 (B's candidate goes down)
    got = _codes([[[0.4, 0.05], [0.4, 0.05], [0.45, 0.3]]])
    assert got == [[[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]]]


def _reference(t: np.ndarray) -> np.ndarray:
    """The authors' loop (squant_function.py / quant_modules.adaptive_round), written out plainly with
    nothing fixed: an independent check of the vectorised version."""
    q = np.round(t)
    err = q - t
    up_num, up_err = q + 1, err + 1
    up_pri = np.where(err < 0, -err, 0.0)
    down_num, down_err = q - 1, err - 1
    down_pri = np.where(err > 0, err, 0.0)

    def level(q, err, up_pri, down_pri, groups):
        new_up, new_down = np.zeros_like(up_pri), np.zeros_like(down_pri)
        for g in groups:
            s = err[g].sum()
            up = s < 0
            pri = up_pri[g] if up else down_pri[g]
            order = np.argsort(-pri, kind="stable")
            k = int(np.round(abs(s)))
            idx = tuple(a[order] for a in g)
            for j in range(k):
                i = tuple(a[j] for a in idx)
                q[i], err[i] = (up_num[i], up_err[i]) if up else (down_num[i], down_err[i])
            if k >= abs(s) and k > 0:
                i = tuple(a[k - 1] for a in idx)
                (new_down if up else new_up)[i] = abs(err[i])
            elif k < abs(s):
                i = tuple(a[k] for a in idx)
                (new_up if up else new_down)[i] = abs(err[i])
        return new_up, new_down

    out, inp, n = t.shape
    if n > 1:
        kernels = [(np.full(n, o), np.full(n, c), np.arange(n)) for o in range(out) for c in range(inp)]
        up_pri, down_pri = level(q, err, up_pri, down_pri, kernels)
        # a flip from a kernel moved err one step: the next level's up/down codes start from there
        up_num, up_err, down_num, down_err = q + 1, err + 1, q - 1, err - 1
    channels = [
        (np.full(inp * n, o), np.repeat(np.arange(inp), n), np.tile(np.arange(n), inp)) for o in range(out)
    ]
    level(q, err, up_pri, down_pri, channels)
    return q


@pytest.mark.parametrize("shape", [(6, 5, 9), (4, 7, 1), (3, 1, 9)])
def test_matches_the_reference_loop_on_random_codes(shape):
    rng = np.random.default_rng(sum(shape))
    t = rng.uniform(-6, 6, size=shape)
    free = torch.ones(shape, dtype=torch.bool)
    got = squant_codes(torch.tensor(t), free, free).numpy()
    np.testing.assert_array_equal(got, _reference(t))


@pytest.mark.parametrize("per_channel", [True, False])
def test_squant_layer_keeps_the_grid_and_bounds_the_error_sums(per_channel):
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(torch.nn.Conv2d(8, 6, 3), bits=4, per_channel=per_channel)
    ranges = per_channel_range if per_channel else per_tensor_range
    w = conv.weight.detach().clone()
    scale, zp = asymmetric_params(4, *ranges(w))
    scale, zp = (scale.view(-1, 1, 1, 1), zp.view(-1, 1, 1, 1)) if per_channel else (scale, zp)
    t = scale * w - zp
    figures = squant_layer(conv)
    scale2, zp2 = asymmetric_params(4, *ranges(conv.weight))
    scale2, zp2 = (scale2.view(-1, 1, 1, 1), zp2.view(-1, 1, 1, 1)) if per_channel else (scale2, zp2)
    assert torch.allclose(scale2, scale) and torch.equal(
        zp2, zp
    )  # the grid the weights re-derive is the same
    codes = (scale * conv.weight - zp).detach()
    assert torch.allclose(codes, codes.round(), atol=1e-4)  # on the grid
    assert codes.min() > -8 - 1e-4 and codes.max() < 7 + 1e-4  # and inside it
    assert ((codes - t.round()).abs() <= 1 + 1e-4).all()  # at most one step from nearest
    channel = (codes - t).detach().sum((1, 2, 3)).abs()
    assert float(channel.max()) <= 0.5 + 1e-4
    assert figures["channel_sum"] == pytest.approx(float(channel.max()), abs=1e-4)
    assert figures["channel_sum_nearest"] > 0.5 and 0 < figures["changed"] < 0.5
    assert torch.allclose(conv.quantized_weight(), conv.weight, atol=1e-6)


def test_squant_rounds_every_quantized_layer_and_leaves_float_ones():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 10))
    student = quantize(net, QuantSpec(w_bits=4, a_bits=4, last_layer_bits=32))
    last = student[2].weight.detach().clone()
    report = squant(student)
    assert set(report) == {"0"}
    assert torch.equal(student[2].weight, last)


def test_model_card_names_squant_and_the_job_stays_data_free():
    from dfq.model_card import _switches

    spec = JobSpec.model_validate({"quant": {"weight_round": "squant"}})
    rows = dict(_switches(spec))
    assert rows["weight rounding"] == "squant"
    assert rows["real data used"] is False
