"""Activation ranges read off the teacher's BatchNorm layers (``quant.act_clip = "bn-mse"``).

Why: the synthetic images match the teacher's BN statistics on average, not the tails of real
activations, and a range calibrated on them is the wrong width. A range chosen by least squared error on
synthetic activations clips far too much (MobileNetV2 W4A4: 76.88 against 88.87 with min/max, n=2,
docs/benchmarks.md); the same rule on real activations gains 10 points before any fine-tuning. A BN's
affine parameters *are* a record of the real data: at a ``BN -> ReLU`` site, each channel's pre-activation
on real data has mean ``beta_c`` and standard deviation ``|gamma_c|``. The range is the least-squared-error
range of the rectified Gaussian mixture they describe (the idea of Nagel et al. 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction", section 4.2, with an MSE search instead of
their fixed ``beta + n * gamma``). Sites not fed straight by a BN (a ReLU after a residual add, a
functional ``F.relu``) keep the reference's min/max EMA over synthetic batches.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Literal

import torch
from torch import nn

from dfq.quant.bn_samples import CHANNEL_SAMPLES, bn_samples
from dfq.quant.consumers import channel_weights, sole_consumers
from dfq.quant.equalize import depthwise_consumer, equalize_site
from dfq.quant.modules import FLOAT_BITS, ActQuant
from dfq.quant.probe import probe_forward
from dfq.quant.quantizer import MSE_ALPHAS, RANGE_EPS, fake_quantize, mse_clipped_range

_BN = (nn.BatchNorm2d, nn.BatchNorm1d)
MseWeight = Literal["uniform", "consumer"]
RangeRule = Literal["pooled", "weighted", "equalised"]


def bn_fed_quantizers(
    model: nn.Module, input_shape: tuple[int, ...]
) -> dict[str, tuple[nn.Module, float, float]]:
    """``{quantizer name: (bn, relu lower bound, relu upper bound)}`` for every ActQuant whose input is
    ``relu(bn(...))``, found by following tensors through one forward of a dummy batch (so call sites in
    traced blocks and in-place ReLUs count, whatever the module layout)."""
    bn_out: dict[int, nn.Module] = {}
    relu_out: dict[int, tuple[nn.Module, float, float]] = {}
    found: dict[str, tuple[nn.Module, float, float]] = {}
    keep: list[torch.Tensor] = []  # ids stay unique while every tensor seen is alive
    names = {m: n for n, m in model.named_modules()}

    def on_bn(m, inputs, out):
        keep.append(out)
        bn_out[id(out)] = m

    def on_relu(m, inputs, out):
        keep.append(out)
        if id(inputs[0]) in bn_out:
            lo, hi = (0.0, math.inf) if isinstance(m, nn.ReLU) else (float(m.min_val), float(m.max_val))
            relu_out[id(out)] = (bn_out[id(inputs[0])], lo, hi)

    def on_quant(m, inputs):
        if id(inputs[0]) in relu_out:
            found[names[m]] = relu_out[id(inputs[0])]

    hooks = []
    for m in model.modules():
        if isinstance(m, _BN):
            hooks.append(m.register_forward_hook(on_bn))
        elif isinstance(m, nn.ReLU | nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
            hooks.append(m.register_forward_hook(on_relu))
        elif isinstance(m, ActQuant):
            hooks.append(m.register_forward_pre_hook(on_quant))
    probe_forward(model, input_shape, hooks)
    return found


def bn_mse_range(bn: nn.Module, lower: float, upper: float, bits: int, seed: int = 0) -> tuple[float, float]:
    """The k-bit least-squared-error range of ``clamp(N(beta_c, gamma_c^2), lower, upper)`` pooled over
    channels, on a fixed-seed sample (at most 2^16 draws, equally many per channel)."""
    a = bn_samples(bn, lower, upper, seed)
    lo, hi = torch.aminmax(a)
    lo, hi = mse_clipped_range(a.reshape(-1), bits, lo, hi)
    return float(lo), float(hi)


def weighted_mse_range(
    a: torch.Tensor, bits: int, weight: torch.Tensor, alphas: tuple[float, ...] = MSE_ALPHAS
) -> tuple[float, float]:
    """The range ``alpha * [min, max]`` of ``a`` (``samples x channels``) whose k-bit grid reconstructs it
    with the least squared error, channel c's mean error weighted by ``weight[c]``. With equal weights
    this is :func:`mse_clipped_range` over all of ``a`` (equal draws per channel)."""
    lo, hi = torch.aminmax(a)
    w = weight.float() / weight.float().sum().clamp_min(RANGE_EPS)
    errs = torch.stack([(fake_quantize(a, bits, lo * al, hi * al) - a).pow(2).mean(0) @ w for al in alphas])
    best = alphas[int(errs.argmin())]  # argmin takes the first (widest) of equal minima
    return float(lo * best), float(hi * best)


def weighted_bn_mse_range(
    bn: nn.Module, lower: float, upper: float, bits: int, weight: torch.Tensor, seed: int = 0
) -> tuple[float, float]:
    """:func:`bn_mse_range` with channel c's squared error weighted by ``weight[c]``
    (``quant.act_mse_weight = "consumer"``), on :data:`CHANNEL_SAMPLES` draws per channel so that every
    channel's own error is measured, however many channels share the range."""
    return weighted_mse_range(bn_samples(bn, lower, upper, seed, per_channel=CHANNEL_SAMPLES), bits, weight)


def set_ranges_from_bn(
    model: nn.Module,
    input_shape: tuple[int, ...],
    weighting: MseWeight = "uniform",
    equalize: bool = False,
) -> dict[str, RangeRule]:
    """Fix the range of every BN-fed activation quantizer of a fresh student, each site by one rule;
    returns ``{site: rule}``.

    Rules, first that applies: ``equalised`` (``equalize``, ``quant.act_equalize = "depthwise"``: a site
    whose only consumer is a depthwise conv gets per-channel ranges folded into that conv,
    :func:`dfq.quant.equalize.equalize_site`), ``weighted`` (``weighting="consumer"``: each channel's
    squared error weighted by what it adds to the output of the layer that consumes the site,
    :func:`dfq.quant.consumers.channel_weights`, as a per-tensor range pooled over channels otherwise spends
    its levels on wide channels whose errors the next layer barely feels), ``pooled`` (every channel alike).
    One pass that picks per site, so no range is computed to be overwritten. The consumer weights are all
    read before any site is equalised: an equalised site rescales its BN, which is the BN after an
    earlier site's consumer."""
    sites = bn_fed_quantizers(model, input_shape)
    consumers = sole_consumers(model, input_shape) if weighting == "consumer" or equalize else {}
    weights = {
        name: channel_weights(consumers[name], bn.num_features)
        for name, (bn, _, _) in sites.items()
        if weighting == "consumer" and name in consumers
    }
    feeds = Counter(id(bn) for bn, _, _ in sites.values())  # a BN feeding two sites is rescaled by neither
    modules = dict(model.named_modules())
    rules: dict[str, RangeRule] = {}
    for name, (bn, lower, upper) in sites.items():
        q = modules[name]
        if q.bits >= FLOAT_BITS:
            continue
        conv = depthwise_consumer(consumers.get(name)) if equalize and feeds[id(bn)] == 1 else None
        if conv is not None and equalize_site(q, bn, conv, lower, upper):
            rules[name] = "equalised"
        elif weights.get(name) is not None:
            q.fix_range(*weighted_bn_mse_range(bn, lower, upper, q.bits, weights[name]))
            rules[name] = "weighted"
        else:
            q.fix_range(*bn_mse_range(bn, lower, upper, q.bits))
            rules[name] = "pooled"
    return dict(sorted(rules.items()))
