"""The GDFQ quantizer written as ONNX QuantizeLinear/DequantizeLinear (QDQ).

Reference (``quantizer.py``), k bits, range [lo, hi]::

    scale = (2^k-1) / (hi-lo);  zp = round(scale*lo) + 2^(k-1)
    q = clamp(round(scale*x - zp), -2^(k-1), 2^(k-1)-1);  x_hat = (q + zp) / scale

ONNX: ``Q(x) = saturate(round(x / s) + z)``, ``DQ(c) = (c - z) * s``. So ``s = 1/scale`` and the
integer stored for reference code ``q`` is ``c = q + shift`` with zero point ``z = shift - zp``.
``shift`` is free; it is chosen so every stored code and ``z`` fit in int8:

- activations (``bottom``): the k-bit grid's lowest code is stored as -128. For a post-ReLU range
  (lo = 0) that makes ``z = -128`` = the type minimum, the form onnxruntime needs to drop the ReLU
  before a QuantizeLinear and fuse integer kernels. The k-bit grid is narrower than int8 for k < 8,
  so its top is enforced by an extra int8 ``Clip`` between Q and DQ (saturation does it at k = 8).
- weights (``zero``): zero point 0 in every channel (stored code ``q + zp``) wherever that fits
  int8, which it always does for k <= 7 when the range contains 0. onnxruntime's integer conv
  kernels need one zero point shared by all channels; at k = 8 the reference's per-channel
  asymmetric grid has one only by chance, so 8-bit weights usually fall back to bottom-aligned
  codes with per-channel zero points (valid QDQ, but no integer kernel in onnxruntime).

Where the codes cannot fit int8 (k > 8, or a range far from 0) the quantizer is written in float
instead: weights become a float initializer holding the exact fake-quant values (an int32
DequantizeLinear would be legal ONNX, but onnxruntime 1.32 then fuses it into a QLinearConv that
it rejects as invalid); activations become ``(clip(round(x*scale - zp)) + zp) / scale``, the
reference formula op for op. No runtime has fast kernels for those, and the report says so.

Where ONNX and the reference can differ (activations only; weight codes are copied, not
recomputed): ``round(x / s)`` with ``s = fl(1/scale)`` is not always ``round(fl(scale*x))``, and
rounding before adding the integer zero point is not rounding after subtracting it at exact ties
when zp is odd (half-to-even). Both move a code by exactly one step, and only where ``scale*x - zp``
is within a few float32 ulps of a half-integer; ``tests/dfq/test_qdq.py`` measures it.
DequantizeLinear multiplies by ``fl(1/scale)`` where the reference divides by ``scale``: at most
about one ulp of difference per dequantized value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from dfq.quant.quantizer import asymmetric_params, fake_quantize, int_range

INT8_MIN, INT8_MAX = -128, 127
Align = Literal["bottom", "zero"]


@dataclass(frozen=True)
class QDQParams:
    """How one quantizer (per-tensor or per-channel) is stored in ONNX.

    ``int8`` False means the float fallback (see module docstring); then ``onnx_zero_point`` and
    ``shift`` are zero, and :func:`stored_codes` gives the integers ``q + zp`` (int32) that
    multiply ``onnx_scale`` directly; the exporter writes no Q/DQ for such a quantizer.
    """

    bits: int
    scale: torch.Tensor  # reference scale, float32
    zero_point: torch.Tensor  # reference zp, float32 holding integers
    onnx_scale: torch.Tensor  # 1 / scale, float32
    onnx_zero_point: torch.Tensor  # int8 (or int32 0 for the fallback)
    shift: torch.Tensor  # int64: stored code = reference code + shift
    grid_min: torch.Tensor  # stored code of the k-bit grid's lowest level (int64)
    grid_max: torch.Tensor  # stored code of its highest level (int64)
    int8: bool

    @property
    def narrow(self) -> bool:
        """True when the k-bit grid does not fill int8, so saturation alone cannot clamp it."""
        return bool((self.grid_min > INT8_MIN).any() or (self.grid_max < INT8_MAX).any())


def qdq_params(bits: int, lo: torch.Tensor, hi: torch.Tensor, align: Align) -> QDQParams:
    """ONNX parameters reproducing the reference quantizer for range ``[lo, hi]``."""
    scale, zp = asymmetric_params(bits, lo.float(), hi.float())
    qmin, qmax = int_range(bits)
    zero_code = (-zp).to(torch.int64)  # the reference code of real 0 (may lie off the grid)
    low = torch.minimum(zero_code, torch.full_like(zero_code, qmin))
    high = torch.maximum(zero_code, torch.full_like(zero_code, qmax))
    int8 = bits <= 8 and bool((high - low <= INT8_MAX - INT8_MIN).all())
    onnx_scale = torch.reciprocal(scale)
    if not int8:
        zeros = torch.zeros_like(zero_code)
        return QDQParams(
            bits, scale, zp, onnx_scale, zeros.to(torch.int32), zeros, zeros + qmin, zeros + qmax, False
        )
    shift = INT8_MIN - low  # bottom-aligned: always fits once the span does
    if align == "zero" and bool(
        (qmin - zero_code >= INT8_MIN).all() and (qmax - zero_code <= INT8_MAX).all()
    ):
        shift = -zero_code  # z = 0 in every channel: stored code = q + zp
    z = (zero_code + shift).to(torch.int8)
    return QDQParams(bits, scale, zp, onnx_scale, z, shift, qmin + shift, qmax + shift, True)


def stored_codes(q: torch.Tensor, p: QDQParams) -> torch.Tensor:
    """Reference codes ``q`` (float tensor of integers) -> the integers written to ONNX."""
    if p.int8:
        shift = p.shift.reshape(-1, *([1] * (q.dim() - 1))) if p.shift.dim() == 1 else p.shift
        return (q.to(torch.int64) + shift).to(torch.int8)
    zp = p.zero_point.reshape(-1, *([1] * (q.dim() - 1))) if p.zero_point.dim() == 1 else p.zero_point
    return (q + zp).to(torch.int32)  # (q + zp) * (1/scale), zero point 0


def onnx_quantize(x: torch.Tensor, p: QDQParams) -> torch.Tensor:
    """What ONNX QuantizeLinear (+ the grid Clip) computes, in torch: stored int codes (as int64).

    Used by tests to locate where ONNX and the reference disagree; per-tensor parameters only.
    """
    codes = torch.round(x / p.onnx_scale) + p.onnx_zero_point.to(torch.float32)
    return torch.clamp(codes, INT8_MIN, INT8_MAX).clamp(p.grid_min, p.grid_max).to(torch.int64)


# ------------------------------------------------------------------------------------------ symbolics


class DequantizedWeight(torch.autograd.Function):
    """Torch: returns the precomputed dequantized weight. ONNX: DequantizeLinear(codes) per channel."""

    @staticmethod
    def forward(ctx, w_hat, codes, scale, zero_point):  # type: ignore[override]
        return w_hat

    @staticmethod
    def symbolic(g, w_hat, codes, scale, zero_point):
        if scale.type().sizes():  # a 1-D vector of per-output-channel scales
            return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=0)
        return g.op("DequantizeLinear", codes, scale, zero_point)


class QDQActivation(torch.autograd.Function):
    """Torch: the reference fake quantization. ONNX: Q -> [int8 Clip] -> DQ, or the float formula.

    ``mode`` is ``qdq`` (the k-bit grid fills int8), ``qdq-clip`` (narrower grid: int8 Clip between
    Q and DQ) or ``float`` (the reference formula in float ops).
    """

    @staticmethod
    def forward(ctx, x, lo, hi, scale, zp, onnx_scale, onnx_zp, grid_min, grid_max, qmin, qmax, bits, mode):  # type: ignore[override]
        return fake_quantize(x, bits, lo, hi)

    @staticmethod
    def symbolic(g, x, lo, hi, scale, zp, onnx_scale, onnx_zp, grid_min, grid_max, qmin, qmax, bits, mode):
        if mode == "float":
            t = g.op("Sub", g.op("Mul", x, scale), zp)
            t = g.op("Clip", g.op("Round", t), qmin, qmax)
            return g.op("Div", g.op("Add", t, zp), scale)
        q = g.op("QuantizeLinear", x, onnx_scale, onnx_zp)
        if mode == "qdq-clip":
            q = g.op("Clip", q, grid_min, grid_max)
        return g.op("DequantizeLinear", q, onnx_scale, onnx_zp)
