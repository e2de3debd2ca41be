"""A dilated depthwise convolution computed as a dense one on the image's polyphase components.

LRQ's large-kernel attention (dfq/synth/lrq.py) runs a 7x7 depthwise conv with dilation 3 after every
upsample block of the generator. CPU backends have no fast kernel for dilated depthwise convs: on this
project's CPUs its forward took ~10x and its backward ~4x the time of a dense 7x7 depthwise conv of the
same size, and the two LKA blocks were about two thirds of an LRQ iteration on the 3x64x64 teachers
(docs/benchmarks.md).

With stride 1, a dilation-``d`` conv only ever combines pixels whose coordinates agree modulo ``d``:
output ``(d*a + r, d*b + s)`` reads input ``(d*(a+i) + r, d*(b+j) + s)``. So the image splits into its
``d*d`` polyphase components ``x[:, :, r::d, s::d]``, each goes through the *dense* (dilation 1) conv with
the same weight and padding ``(k-1)/2``, and the outputs interleave back. Zero padding is the same: a
component's rows past the image are zero, as are the padded rows of the dilated form. Same products,
float sums reassociated (``speed.polyphase_dilated`` switches it; tested equal in float64).

The components are stacked along the batch dimension in NHWC order, the layout the dense depthwise
kernel is fast in; the split and the interleave are strided copies, each the other's backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def polyphasable(conv: nn.Module) -> bool:
    """Whether ``conv`` is a stride-1, 'same'-padded, dilated depthwise conv (what the split assumes)."""
    if not isinstance(conv, nn.Conv2d):
        return False
    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    return (
        conv.groups == conv.in_channels == conv.out_channels
        and conv.stride == (1, 1)
        and dh == dw > 1
        and kh % 2 == 1
        and kw % 2 == 1
        and conv.padding == (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
        and conv.padding_mode == "zeros"
    )


def _split(p: torch.Tensor, d: int, h: int, w: int) -> torch.Tensor:
    """NHWC ``(N, H, W, C)`` -> ``(N, d, d, h, w, C)``: component ``(r, s)`` is ``p[:, r::d, s::d]``,
    zero-padded to ``h x w`` (components starting further in are a row or column shorter)."""
    n, _, _, c = p.shape
    out = p.new_empty(n, d, d, h, w, c)
    for r in range(d):
        for s in range(d):
            src = p[:, r::d, s::d]
            hr, ws = src.shape[1], src.shape[2]
            out[:, r, s, :hr, :ws] = src
            out[:, r, s, hr:] = 0
            out[:, r, s, :hr, ws:] = 0
    return out


def _merge(o: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse interleave: ``(N, d, d, h, w, C)`` -> NHWC ``(N, height, width, C)``."""
    n, d, _, _, _, c = o.shape
    out = o.new_empty(n, height, width, c)
    for r in range(d):
        for s in range(d):
            dst = out[:, r::d, s::d]
            dst.copy_(o[:, r, s, : dst.shape[1], : dst.shape[2]])
    return out


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: torch.Tensor, d: int) -> torch.Tensor:
        height, width = p.shape[1], p.shape[2]
        ctx.size = (height, width)
        return _split(p, d, -(-height // d), -(-width // d))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _merge(grad, *ctx.size), None


class _Merge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o: torch.Tensor, height: int, width: int) -> torch.Tensor:
        ctx.d, ctx.hw = o.shape[1], (o.shape[3], o.shape[4])
        return _merge(o, height, width)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _split(grad, ctx.d, *ctx.hw), None, None


def dilated_depthwise(x: torch.Tensor, conv: nn.Conv2d, polyphase: bool = True) -> torch.Tensor:
    """``conv(x)``; through the polyphase components when ``polyphase`` and the conv allows it.

    The result has ``x``'s memory format (NHWC under ``speed.channels_last``)."""
    if not (polyphase and polyphasable(conv)):
        return conv(x)
    n, c, height, width = x.shape
    d = conv.dilation[0]
    parts = _Split.apply(x.permute(0, 2, 3, 1), d)  # NHWC view of x (a copy-free view when NHWC)
    h, w = parts.shape[3], parts.shape[4]
    dense = parts.view(n * d * d, h, w, c).permute(0, 3, 1, 2)  # NCHW-shaped, NHWC in memory
    pad = ((conv.kernel_size[0] - 1) // 2, (conv.kernel_size[1] - 1) // 2)
    out = F.conv2d(dense, conv.weight, conv.bias, padding=pad, groups=c)
    out = _Merge.apply(out.permute(0, 2, 3, 1).reshape(n, d, d, h, w, c), height, width)
    out = out.permute(0, 3, 1, 2)
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return out if nhwc else out.contiguous()
