"""The activations a BatchNorm describes, drawn from a fixed seed.

Why a module of its own: the pooled and weighted BN ranges (dfq/quant/bn_ranges.py) and the equalised
per-channel ranges (dfq/quant/equalize.py) all measure their quantization error on the same draws, and the
range pass that chooses between them per site imports both.
"""

from __future__ import annotations

import torch
from torch import nn

from dfq.quant.quantizer import MSE_MAX_SAMPLES

# draws per channel where each channel's own error counts (the pooled 2^16 can leave a channel ~70)
CHANNEL_SAMPLES = 4096


def bn_samples(
    bn: nn.Module, lower: float, upper: float, seed: int = 0, per_channel: int | None = None
) -> torch.Tensor:
    """``samples x channels`` draws of ``clamp(N(beta_c, gamma_c^2), lower, upper)`` from a fixed seed: the
    activations the BN describes. ``per_channel`` draws each (default: 2^16 in all, at least 16 each)."""
    gamma = bn.weight.detach().float().cpu() if bn.weight is not None else torch.ones(bn.num_features)
    beta = bn.bias.detach().float().cpu() if bn.bias is not None else torch.zeros(bn.num_features)
    per_channel = per_channel or max(16, MSE_MAX_SAMPLES // gamma.numel())
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(per_channel, gamma.numel(), generator=g) * gamma.abs() + beta).clamp(lower, upper)
