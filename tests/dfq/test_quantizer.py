"""The GDFQ quantizer against values worked out by hand (methods.md section 0).

torch.round rounds half to even, like the reference; the hand computations below say where that matters.
"""

import pytest
import torch

from dfq.quant.modules import ActQuant
from dfq.quant.quantizer import asymmetric_params, fake_quantize, int_range, per_channel_range


def _fq(x, bits, lo, hi):
    return fake_quantize(torch.tensor(x), bits, torch.tensor(lo), torch.tensor(hi))


def test_int_range():
    assert int_range(2) == (-2, 1)
    assert int_range(4) == (-8, 7)
    assert int_range(8) == (-128, 127)


def test_2bit_by_hand():
    # range [0, 3]: scale = 3/3 = 1, zp = round(0) + 2 = 2, q = clamp(round(x - 2), -2, 1), x^ = q + 2
    # x - 2 = [-2, -1.6, -1.4, -0.5, 0.5, 1, 2, -3] -> round (half even) [-2, -2, -1, 0, 0, 1, 2, -3]
    # -> clamp [-2, -2, -1, 0, 0, 1, 1, -2] -> x^ = [0, 0, 1, 2, 2, 3, 3, 0]
    x = [0.0, 0.4, 0.6, 1.5, 2.5, 3.0, 4.0, -1.0]
    assert _fq(x, 2, 0.0, 3.0).tolist() == [0, 0, 1, 2, 2, 3, 3, 0]


def test_3bit_by_hand():
    # range [-1, 0.75]: scale = 7 / 1.75 = 4, zp = round(-4) + 4 = 0, x^ = clamp(round(4x), -4, 3) / 4
    # 4x = [-4, -1.2, 0.4, 0.5, 1.5, 3, 8] -> [-4, -1, 0, 0, 2, 3, 3]
    x = [-1.0, -0.3, 0.1, 0.125, 0.375, 0.75, 2.0]
    assert _fq(x, 3, -1.0, 0.75).tolist() == [-1.0, -0.25, 0.0, 0.0, 0.5, 0.75, 0.75]


def test_4bit_by_hand():
    # range [0, 1.875]: scale = 15 / 1.875 = 8, zp = 0 + 8 = 8, q = clamp(round(8x - 8), -8, 7), x^ = (q + 8) / 8
    # 8x - 8 = [-8, -7.5, -6.5, 0, 7, 12, -12] -> round [-8, -8, -6, 0, 7, 12, -12] -> clamp -> x^ below
    x = [0.0, 0.0625, 0.1875, 1.0, 1.875, 2.5, -0.5]
    assert _fq(x, 4, 0.0, 1.875).tolist() == [0.0, 0.0, 0.25, 1.0, 1.875, 1.875, 0.0]


def test_8bit_by_hand():
    # range [-1, 1.5]: scale = 255 / 2.5 = 102, zp = round(-102) + 128 = 26, x^ = (clamp(round(102x - 26)) + 26) / 102
    scale, zp = asymmetric_params(8, torch.tensor(-1.0), torch.tensor(1.5))
    assert scale.item() == 102.0 and zp.item() == 26.0
    # 102x - 26 = [-128, -26, 25, 127, -24.98, 178] -> [-128, -26, 25, 127, -25, 127]
    x = [-1.0, 0.0, 0.5, 1.5, 0.01, 2.0]
    expected = [-102 / 102, 0.0, 51 / 102, 153 / 102, 1 / 102, 153 / 102]
    assert _fq(x, 8, -1.0, 1.5).tolist() == pytest.approx(expected, abs=1e-7)


def test_per_channel_weights_use_their_own_range():
    w = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]], [[[-1.0, -0.3], [0.375, 0.75]]]])  # 2 out-channels
    lo, hi = per_channel_range(w)
    assert lo.tolist() == [0.0, -1.0] and hi.tolist() == [3.0, 0.75]
    got = fake_quantize(w, 2, lo, hi)
    assert got[0].flatten().tolist() == _fq([0.0, 1.0, 2.0, 3.0], 2, 0.0, 3.0).tolist()
    assert got[1].flatten().tolist() == _fq([-1.0, -0.3, 0.375, 0.75], 2, -1.0, 0.75).tolist()


def test_straight_through_gradient_is_identity_even_when_clipped():
    x = torch.tensor([-5.0, 0.3, 0.7, 5.0], requires_grad=True)
    (
        fake_quantize(x, 2, torch.tensor(0.0), torch.tensor(1.0)) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    ).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def _observe(q: ActQuant, lo: float, hi: float, times: int) -> None:
    q.calibrating = True
    for _ in range(times):
        q(torch.tensor([lo, 0.5 * (lo + hi), hi]))


def test_debiased_ema_of_a_constant_range_is_exact_from_the_first_update():
    q = ActQuant(4, beta=0.9, ema="debiased")
    for updates in (1, 1, 18):  # after 1, 2 and 20 updates
        _observe(q, 0.0, 2.0, updates)
        lo, hi = q.range()
        assert (lo.item(), hi.item()) == pytest.approx((0.0, 2.0), rel=1e-5)


def test_debiased_ema_by_hand():
    # raw_1 = 0.1*2 = 0.2, raw_2 = 0.9*0.2 + 0.1*4 = 0.58; range = 0.58 / (1 - 0.81) = 3.0526...
    q = ActQuant(4, beta=0.9, ema="debiased")
    _observe(q, 0.0, 2.0, 1)
    _observe(q, 0.0, 4.0, 1)
    assert q.range()[1].item() == pytest.approx(0.58 / 0.19, rel=1e-6)


def test_plain_ema_starts_at_first_batch():
    # FDDA: m_1 = 2 (first batch), m_2 = 0.9*2 + 0.1*4 = 2.2
    q = ActQuant(4, beta=0.9, ema="plain")
    _observe(q, 0.0, 2.0, 1)
    assert q.range()[1].item() == pytest.approx(2.0)
    _observe(q, 0.0, 4.0, 1)
    assert q.range()[1].item() == pytest.approx(2.2)


def test_gdfq_compounding_parity_inflates_a_constant_range():
    # reference: m_t = (0.9 m_{t-1} + 0.1 v) / (1 - 0.9^t); m_1 = v, m_2 = (0.9v + 0.1v) / 0.19 = 5.263v
    q = ActQuant(4, beta=0.9, ema="gdfq-compounding")
    _observe(q, 0.0, 1.0, 1)
    assert q.range()[1].item() == pytest.approx(1.0)
    _observe(q, 0.0, 1.0, 1)
    assert q.range()[1].item() == pytest.approx(1.0 / 0.19, rel=1e-5)
    _observe(q, 0.0, 1.0, 18)
    assert q.range()[1].item() > 1000.0  # the many-fold inflation methods.md warns about


def test_frozen_quantizer_keeps_its_range_and_uncalibrated_one_refuses():
    q = ActQuant(4)
    with pytest.raises(RuntimeError, match="no range yet"):
        q(torch.ones(3))
    _observe(q, 0.0, 1.0, 3)
    q.calibrating = False
    before = q.range()
    q(torch.tensor([0.0, 100.0]))
    assert q.range() == before


@pytest.mark.parametrize("ema", ["debiased", "plain", "gdfq-compounding"])
def test_a_loaded_quantizer_has_the_saved_range_and_count(ema):
    # the count the forward reads is a Python mirror of the `updates` buffer: loading must restore both
    q = ActQuant(4, ema=ema)
    _observe(q, 0.0, 2.0, 3)
    _observe(q, -1.0, 5.0, 2)
    q.calibrating = False
    fresh = ActQuant(4, ema=ema)
    fresh.load_state_dict(q.state_dict())
    assert fresh.n_updates == int(fresh.updates) == 5
    assert [v.item() for v in fresh.range()] == [v.item() for v in q.range()]
    x = torch.linspace(-2.0, 6.0, 17)
    assert torch.equal(fresh(x), q(x))


def test_frozen_quantizer_forward_reads_no_tensor_on_the_host():
    # no .item() or tensor truth value in the forward: dynamo traces it as one graph without a break,
    # which on a GPU means no host-device sync per quantizer and one torch.compile graph (issue 8)
    q = ActQuant(4)
    _observe(q, 0.0, 2.0, 4)
    q.calibrating = False
    x = torch.linspace(-1.0, 3.0, 9)
    explained = torch._dynamo.explain(q)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    assert torch.equal(torch.compile(q, backend="eager")(x), q(x))


def test_clipped_ste_by_hand():
    # range [0, 1.5], 2 bits: scale 2, zp 2, q = round(2x - 2) on [-2, 1]:
    # x = -1 -> -4 (clipped), 0.3 -> -1, 0.9 -> 0, 1.5 -> 1 (on the grid's edge), 2 -> 2 (clipped)
    x = torch.tensor([-1.0, 0.3, 0.9, 1.5, 2.0], requires_grad=True)
    y = fake_quantize(x, 2, torch.tensor(0.0), torch.tensor(1.5), ste="clipped")
    y.backward(torch.arange(1.0, 6.0))
    assert y.tolist() == [0.0, 0.5, 1.0, 1.5, 1.5]
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]
    x.grad = None
    same = fake_quantize(x, 2, torch.tensor(0.0), torch.tensor(1.5))  # the reference: identity everywhere
    same.backward(torch.arange(1.0, 6.0))
    assert torch.equal(same, y) and x.grad.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_act_quant_passes_its_ste_mode():
    q = ActQuant(2, ste="clipped")
    _observe(q, 0.0, 1.5, 1)
    q.calibrating = False
    x = torch.tensor([-1.0, 0.9, 2.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]


def test_clipped_ste_matches_the_plain_composition():
    from dfq.quant.quantizer import fake_quantize_ops

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 5, 5, generator=g) * 2).requires_grad_()
    up = torch.randn(4, 3, 5, 5, generator=g)
    lo, hi = torch.tensor(-1.0), torch.tensor(1.5)
    fast = fake_quantize(x, 3, lo, hi, ste="clipped")
    (gx_fast,) = torch.autograd.grad(fast, x, up)
    plain = fake_quantize_ops(x, 3, lo, hi, ste="clipped")
    (gx_plain,) = torch.autograd.grad(plain, x, up)
    assert torch.allclose(fast, plain, atol=1e-6) and torch.equal(gx_fast, gx_plain)
    assert 0 < int((gx_fast == 0).sum()) < x.numel()  # some values clipped, some not
