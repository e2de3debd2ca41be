"""Activation ranges equalised across channels where that is free (``quant.act_equalize = "depthwise"``).

Why: one per-tensor activation quantizer after ``BN -> ReLU6`` spends its 2^k levels on the widest
channel, and in MobileNetV2 the channels' BN ranges differ by orders of magnitude, so most channels get a
handful of levels. Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", section 4.1) rescales channel c of one layer's output by ``1/e_c`` and
the next layer's input by ``e_c``. Where the next layer is a depthwise conv with per-channel weight ranges
the rescale costs the weights nothing: filter c, its range and its grid all scale by ``e_c``, and its
integer codes do not change. So only the activation grid gains. Elsewhere (a 1x1 conv that mixes channels)
the rescale moves error onto the weights; dfq does not do that (docs/benchmarks.md "Equalised activation
ranges": on MobileNetV2 W4A4 it undid the gain).

``e_c`` is channel c's own least-squared-error range ``r_c`` (of the Gaussian its BN describes, as
``bn-mse`` does for the pooled channels) over the widest channel's, at least ``MIN_SCALE``, and the site's
range is ``[0, max r]``, so each channel is quantized on its own range (a near-dead channel on
``max r * MIN_SCALE``). The producer's ReLU6 still clamps at 6 in the rescaled units, not at ``6 / e_c``;
as ``e_c <= 1`` and ``max r <= 6``, the quantizer clamps first wherever the two differ. The quantized
network is exactly per-channel activation quantization on ranges ``e_c * max r``, and the exported model
is an ordinary one.
"""

from __future__ import annotations

import torch
from torch import nn

from dfq.quant.bn_samples import CHANNEL_SAMPLES, bn_samples
from dfq.quant.consumers import Consumer
from dfq.quant.modules import FLOAT_BITS, ActQuant, QuantConv2d
from dfq.quant.quantizer import MSE_ALPHAS, RANGE_EPS, fake_quantize

MIN_SCALE = 1 / 64  # a dead channel (range ~0) is not blown up by more than this


def channel_mse_upper(a: torch.Tensor, bits: int, alphas: tuple[float, ...] = MSE_ALPHAS) -> torch.Tensor:
    """Per channel of ``a`` (``samples x channels``, non-negative), the upper bound ``alpha * max`` whose
    k-bit grid on ``[0, alpha * max]`` (the activation quantizer's own, :func:`fake_quantize`) reconstructs
    that channel with the least squared error (first alpha wins ties, so a range is only narrowed where
    that lowers the error). ``mse_clipped_range``'s rule, one range per channel."""
    per_channel = a.T  # channels first: a per-channel range indexes dim 0
    zero = torch.zeros(per_channel.shape[0], dtype=a.dtype)
    his = torch.tensor(alphas, dtype=a.dtype)[:, None] * a.amax(0).clamp_min(RANGE_EPS)  # alphas x channels
    errs = torch.stack(
        [(fake_quantize(per_channel, bits, zero, hi) - per_channel).pow(2).mean(1) for hi in his]
    )
    return his.gather(0, errs.argmin(0, keepdim=True))[0]  # argmin takes the first of equal minima


def _is_depthwise(conv: nn.Module) -> bool:
    return (
        isinstance(conv, QuantConv2d)
        and conv.groups == conv.in_channels == conv.out_channels > 1
        and (conv.per_channel or conv.w_bits >= FLOAT_BITS)
    )


def depthwise_consumer(consumer: Consumer | None) -> QuantConv2d | None:
    """The depthwise QuantConv2d (per-channel weight ranges) that takes a site's output directly, if that
    is the site's sole consumer (:func:`dfq.quant.consumers.sole_consumers`): only there is the rescale
    free."""
    if consumer is not None and consumer.direct and _is_depthwise(consumer.layer):
        return consumer.layer
    return None


@torch.no_grad()
def equalize_site(q: ActQuant, bn: nn.Module, conv: QuantConv2d, lower: float, upper: float) -> bool:
    """Rescale one site ``relu(bn(.)) -> q -> conv`` (module docstring) and fix ``q``'s range; False, and
    nothing touched, where the BN has no affine parameters to carry the rescale or the ReLU's lower bound
    is not 0. Called by :func:`dfq.quant.bn_ranges.set_ranges_from_bn` (``equalize=True``), which finds
    the sites."""
    if lower != 0 or bn.weight is None or bn.bias is None:
        return False
    a = bn_samples(bn, lower, upper, per_channel=CHANNEL_SAMPLES)
    r = channel_mse_upper(a, q.bits)
    e = (r / r.max()).clamp_min(MIN_SCALE)
    bn.weight.div_(e.to(bn.weight))
    bn.bias.div_(e.to(bn.bias))
    conv.weight.mul_(e.to(conv.weight).view(-1, 1, 1, 1))
    q.fix_range(0.0, float(r.max()))  # channel c's own range r_c, in the rescaled units
    return True
