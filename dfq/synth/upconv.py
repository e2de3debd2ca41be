"""Nearest 2x upsampling followed by a 3x3 convolution, computed without the upsampled tensor.

Every generator of the GDFQ family grows its image with ``conv3x3(interpolate(x, scale_factor=2))``.
Those convs carry most of an iteration's arithmetic on small teachers (about 60% of the
multiply-adds for ResNet-20 on 28x28 inputs), yet three quarters of what they read are copies made by
the upsampling. Output pixel ``(2i+a, 2j+b)`` only sees the 2x2 input pixels around ``(i, j)``, with
the 3x3 kernel's rows (and columns) summed in pairs that depend on the phase ``a`` (``b``):

    a = 0:  input rows (i-1, i)  get kernel rows (w0, w1 + w2)
    a = 1:  input rows (i, i+1)  get kernel rows (w0 + w1, w2)

A stride-2 transposed convolution with the 4-tap kernel ``(w2, w1 + w2, w0 + w1, w0)`` per axis and
padding 1 computes exactly those four phases: the same linear map (zero padding included) with 4/9 of
the multiply-adds and no upsampled tensor; only float sums are reassociated. oneDNN and cuDNN run it
as one kernel (1.3-2x faster than the plain pair on this project's CPU, bench/speed.py). The kernel is
rebuilt from the module's own 3x3 weight at every call, so parameters, optimizer state, checkpoints and
gradients are those of the plain form; ``speed.fused_upsample`` switches between the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fusable(conv: nn.Module) -> bool:
    """Whether ``conv`` is the plain 3x3/stride-1/padding-1 conv the phase decomposition assumes."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _fold(w: torch.Tensor, dim: int) -> torch.Tensor:
    """3 taps ``(w0, w1, w2)`` along ``dim`` -> the transposed conv's 4 taps ``(w2, w1+w2, w0+w1, w0)``."""
    k0, k1, k2 = w.unbind(dim)
    return torch.stack([k2, k1 + k2, k0 + k1, k0], dim)


def transposed_kernel(weight: torch.Tensor) -> torch.Tensor:
    """A conv's ``(O, I, 3, 3)`` weight -> the ``(I, O, 4, 4)`` weight of the equivalent transposed conv."""
    return _fold(_fold(weight, 2), 3).transpose(0, 1)


def memory_format_of(weight: torch.Tensor) -> torch.memory_format:
    """NHWC when ``speed.channels_last`` stored this 4-D weight NHWC (dfq/speed.py), else NCHW."""
    nhwc = weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if nhwc and not weight.is_contiguous() else torch.contiguous_format


def upsample_conv(x: torch.Tensor, conv: nn.Module, fused: bool = True) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2))`` (nearest); by one transposed conv when ``fused``.

    The input and the built kernel take the conv weight's memory format. A generator's first
    feature map is a ``view`` of a Linear's output, hence NCHW, and a kernel built by ``stack`` is NCHW
    too: without this, with NHWC weights the generator ran NCHW up to its last conv, which then
    converted layouts forward and backward (copies, and elementwise backward ops on mixed layouts);
    all NHWC, its forward+backward is 10-25% faster on CPU (docs/benchmarks.md). Layout only: the
    values are the same, float sums may be reassociated.
    """
    fmt = memory_format_of(conv.weight)
    x = x.contiguous(memory_format=fmt)
    if not (fused and fusable(conv)):
        return conv(F.interpolate(x, scale_factor=2))
    kernel = transposed_kernel(conv.weight).contiguous(memory_format=fmt)
    return F.conv_transpose2d(x, kernel, conv.bias, stride=2, padding=1)
