"""The uniform asymmetric quantizer of the GDFQ family (ZeroQ's ``AsymmetricQuantFunction``).

For k bits and a range [lo, hi]:
    scale = (2^k - 1) / (hi - lo)
    zp    = round(scale * lo) + 2^(k-1)
    q     = clamp(round(scale * x - zp), -2^(k-1), 2^(k-1) - 1)
    x_hat = (q + zp) / scale
Published GDFQ/DSG/FDDA numbers are only comparable under exactly this arithmetic, so it is kept
verbatim (including the signed integer grid and the 1e-8 floor on the range), and the backward pass is
the identity straight-through estimator (no masking of clipped values).
"""

from __future__ import annotations

from typing import Literal

import torch

RANGE_EPS = 1e-8


def int_range(bits: int) -> tuple[int, int]:
    """The signed integer grid [-2^(k-1), 2^(k-1) - 1] the reference quantizes onto."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def asymmetric_params(bits: int, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) for a range; ``lo``/``hi`` may be per-channel vectors."""
    scale = (2**bits - 1) / torch.clamp(hi - lo, min=RANGE_EPS)
    zero_point = torch.round(scale * lo) + 2 ** (bits - 1)
    return scale, zero_point


def _broadcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # per-channel parameters index dim 0 (output channels) of a weight tensor
    return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() == 1 and v.numel() > 1 else v


def quantize_to_int(x: torch.Tensor, bits: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Integer codes q (as floats) on the signed k-bit grid."""
    scale, zp = asymmetric_params(bits, lo, hi)
    scale, zp = _broadcast(scale, x), _broadcast(zp, x)
    qmin, qmax = int_range(bits)
    return torch.clamp(torch.round(scale * x - zp), qmin, qmax)


def dequantize(q: torch.Tensor, bits: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    scale, zp = asymmetric_params(bits, lo, hi)
    return (q + _broadcast(zp, q)) / _broadcast(scale, q)


class _ReferenceFakeQuant(torch.autograd.Function):
    """The reference's ``AsymmetricQuantFunction``: returns the dequantized grid value itself, with an
    identity gradient (no masking of clipped values).

    Why a Function rather than ``x + (xq - x).detach()``: that composition costs two more full passes
    (and a temporary) per quantized tensor, and its float result can differ from ``xq`` in the last
    bit; the forward here runs the reference's six operations in place on one buffer.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):  # type: ignore[override]
        out = torch.mul(scale, x)
        return out.sub_(zero_point).round_().clamp_(qmin, qmax).add_(zero_point).div_(scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None, None, None


class _ClippedFakeQuant(torch.autograd.Function):
    """The same forward; the gradient is zero where the value fell outside the grid (``ste="clipped"``,
    the masking of PyTorch's ``fake_quantize_*`` kernels and of most QAT code)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):  # type: ignore[override]
        out = torch.mul(scale, x).sub_(zero_point).round_()
        ctx.save_for_backward((out >= qmin) & (out <= qmax))
        return out.clamp_(qmin, qmax).add_(zero_point).div_(scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


SteMode = Literal["identity", "clipped"]


def fake_quantize(
    x: torch.Tensor, bits: int, lo: torch.Tensor, hi: torch.Tensor, ste: SteMode = "identity"
) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient w.r.t. ``x``: the identity (the reference)
    or, with ``ste="clipped"``, zero for values the grid clipped.

    The range is treated as a constant (the reference reads it from ``.data``), so no gradient flows
    into ``lo``/``hi``. The forward value is exactly ``dequantize(quantize_to_int(x))``.
    """
    with torch.no_grad():
        scale, zp = asymmetric_params(bits, lo.detach(), hi.detach())
        scale, zp = _broadcast(scale, x), _broadcast(zp, x)
    qmin, qmax = int_range(bits)
    fn = _ClippedFakeQuant if ste == "clipped" and x.requires_grad else _ReferenceFakeQuant
    return fn.apply(x, scale, zp, qmin, qmax)


def fake_quantize_ops(
    x: torch.Tensor, bits: int, lo: torch.Tensor, hi: torch.Tensor, ste: SteMode = "identity"
) -> torch.Tensor:
    """dfq's pre-speed composition ``x + (xq - x).detach()``: same gradient, same forward up to the last
    float bit. Kept as the plain path the equivalence tests compare :func:`fake_quantize` against
    (``ste="clipped"`` keeps the gradient only where the value was inside the grid)."""
    with torch.no_grad():
        lo, hi = lo.detach(), hi.detach()
        xq = dequantize(quantize_to_int(x, bits, lo, hi), bits, lo, hi)
    out = x + (xq - x).detach()
    if ste == "clipped":
        with torch.no_grad():
            scale, zp = asymmetric_params(bits, lo, hi)
            q = torch.round(_broadcast(scale, x) * x - _broadcast(zp, x))
            qmin, qmax = int_range(bits)
            inside = (q >= qmin) & (q <= qmax)
        out = torch.where(inside, out, xq)
    return out


MSE_ALPHAS = tuple(i / 40 for i in range(40, 7, -1))  # 1.0, 0.975, ..., 0.2 of the observed range
MSE_MAX_SAMPLES = 1 << 16


def mse_clipped_range(
    x: torch.Tensor,
    bits: int,
    lo: torch.Tensor,
    hi: torch.Tensor,
    alphas: tuple[float, ...] = MSE_ALPHAS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The range ``alpha * [lo, hi]`` (alpha from ``alphas``) whose k-bit grid reconstructs ``x`` with the
    least squared error (``quant.act_clip = "mse"``).

    Why: a min/max range spends the 2^k levels on a handful of outliers; on MobileNetV2 at 4 bits that
    alone costs ~4 points before any fine-tuning (docs/benchmarks.md). The error is estimated on at most
    2^16 evenly strided elements (no copy, no host sync), so the search is cheap enough to run on every
    calibrating forward. The first alpha wins ties (``alphas`` runs from 1 down), so a range is only
    narrowed where that lowers the error.
    """
    x = x.detach()
    flat = x.permute(0, 2, 3, 1).reshape(-1) if _is_nhwc(x) else x.reshape(-1)
    flat = flat[:: max(1, flat.numel() // MSE_MAX_SAMPLES)].float()
    a = torch.tensor(alphas, dtype=torch.float32, device=x.device)
    los, his = lo.float() * a, hi.float() * a
    scale, zp = asymmetric_params(bits, los, his)
    scale, zp = scale[:, None], zp[:, None]
    qmin, qmax = int_range(bits)
    xq = (torch.clamp(torch.round(scale * flat - zp), qmin, qmax) + zp) / scale
    best = torch.argmin((xq - flat).pow(2).mean(dim=1))
    return los[best], his[best]


def _is_nhwc(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def per_channel_range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of every output channel (dim 0) of a weight tensor."""
    lo, hi = torch.aminmax(w.detach().reshape(w.shape[0], -1), dim=1)  # one pass, the same exact values
    return lo, hi


def per_tensor_range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.detach()
    return w.amin(), w.amax()


def weight_grid(
    w: torch.Tensor, bits: int, per_channel: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight tensor on the grid its quantizer derives from it at every forward (min/max per output
    channel or per tensor): ``(t, scale, zp, extreme)``, ``t = scale * w - zp`` the real-valued codes,
    ``scale``/``zp`` shaped to broadcast against ``w``, ``extreme`` the weights that set the range.

    Why one place: a rounding rule that writes codes back as float weights (adaround, squant) must keep
    ``extreme`` on their nearest codes, or the range, and with it the whole grid, moves at the next forward.
    """
    w = w.detach()
    lo, hi = per_channel_range(w) if per_channel else per_tensor_range(w)
    shape = (-1, *([1] * (w.dim() - 1))) if per_channel else ()
    lo, hi = lo.reshape(shape), hi.reshape(shape)
    scale, zp = asymmetric_params(bits, lo, hi)
    return scale * w - zp, scale, zp, (w == lo) | (w == hi)
