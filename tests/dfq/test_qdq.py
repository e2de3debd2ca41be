"""The quantizer's ONNX (QDQ) parameters against hand-computed values and against the reference."""

import torch

from dfq.quant.qdq import onnx_quantize, qdq_params, stored_codes
from dfq.quant.quantizer import asymmetric_params, dequantize, quantize_to_int


def test_post_relu_activation_params_by_hand():
    # 4 bits, [0, 1.5]: scale = 15 / 1.5 = 10, zp = round(0) + 8 = 8; the grid's lowest code -8 is
    # stored as -128 (shift -120), so z = -zp + shift = -128 and the grid top is -128 + 15 = -113
    p = qdq_params(4, torch.tensor(0.0), torch.tensor(1.5), "bottom")
    assert p.int8 and p.narrow
    assert float(p.scale) == 10.0 and float(p.zero_point) == 8.0
    assert torch.isclose(p.onnx_scale, torch.tensor(0.1))
    assert int(p.onnx_zero_point) == -128 and int(p.shift) == -120
    assert (int(p.grid_min), int(p.grid_max)) == (-128, -113)


def test_eight_bit_activation_grid_fills_int8():
    p = qdq_params(8, torch.tensor(0.0), torch.tensor(2.55), "bottom")
    assert p.int8 and not p.narrow
    assert int(p.onnx_zero_point) == -128 and int(p.shift) == 0


def test_weight_params_use_zero_point_zero_by_hand():
    # 4 bits, [-1, 0.5]: scale = 10, zp = round(-10) + 8 = -2; real 0 is reference code 2, so
    # shift = -2 gives zero point 0 and stored codes q - 2 in [-10, 5]
    lo, hi = torch.tensor([-1.0, -0.2]), torch.tensor([0.5, 1.3])
    p = qdq_params(4, lo, hi, "zero")
    assert p.int8 and p.onnx_zero_point.tolist() == [0, 0]
    assert p.shift.tolist()[0] == -2
    w = torch.tensor([[-1.0, 0.5, 0.0, 0.31], [-0.2, 1.3, 0.0, 0.7]])
    codes = stored_codes(quantize_to_int(w, 4, lo, hi), p)
    assert codes.dtype == torch.int8
    assert codes[0].tolist() == [-10, 5, 0, 3]  # round(10 * w)
    # DequantizeLinear: (c - z) * s equals the reference (q + zp) / scale to within an ulp
    deq = (codes.float() - p.onnx_zero_point.float()[:, None]) * p.onnx_scale[:, None]
    ref = dequantize(quantize_to_int(w, 4, lo, hi), 4, lo, hi)
    assert torch.allclose(deq, ref, rtol=2.5e-7, atol=0)


def test_range_far_from_zero_falls_back_to_float():
    # 8 bits over [10, 11]: real 0 sits 2550 codes below the grid; int8 cannot hold both
    assert not qdq_params(8, torch.tensor(10.0), torch.tensor(11.0), "bottom").int8
    assert not qdq_params(12, torch.tensor(0.0), torch.tensor(1.0), "bottom").int8  # > 8 bits
    # at 4 bits there is room: the zero code is 150 below a 16-level grid
    p = qdq_params(4, torch.tensor(10.0), torch.tensor(11.0), "bottom")
    assert p.int8 and int(p.onnx_zero_point) == -128


def test_onnx_quantize_matches_reference_except_at_rounding_boundaries():
    """Where ONNX's round(x / s) + z can differ from the reference round(scale*x - zp), and by how much."""
    torch.manual_seed(0)
    for bits, lo, hi in ((8, 0.0, 3.7), (4, 0.0, 1.3), (2, 0.0, 0.9), (6, -0.4, 2.2)):
        lo_t, hi_t = torch.tensor(lo), torch.tensor(hi)
        p = qdq_params(bits, lo_t, hi_t, "bottom")
        x = torch.rand(200_000) * (hi - lo) * 1.2 + lo - 0.1 * (hi - lo)
        ref = stored_codes(quantize_to_int(x, bits, lo_t, hi_t), p).long()
        got = onnx_quantize(x, p)
        diff = (got - ref).abs()
        assert int(diff.max()) <= 1, bits
        scale, zp = asymmetric_params(bits, lo_t, hi_t)
        t = scale * x - zp
        dist = (t - t.floor() - 0.5).abs()  # distance of the scaled value to the rounding boundary
        assert bool((dist[diff > 0] < 1e-4).all()), bits  # only ulps away from a half-integer
        assert float((diff > 0).double().mean()) < 1e-3
    # and right at the boundaries they do differ sometimes: the tolerance is not hiding nothing
    p = qdq_params(8, torch.tensor(0.0), torch.tensor(3.7), "bottom")
    scale, zp = asymmetric_params(8, torch.tensor(0.0), torch.tensor(3.7))
    x = ((torch.arange(255, dtype=torch.float64) + 0.5 + float(zp)) / float(scale)).float()
    ref = stored_codes(quantize_to_int(x, 8, torch.tensor(0.0), torch.tensor(3.7)), p).long()
    assert int((onnx_quantize(x, p) != ref).sum()) > 0
