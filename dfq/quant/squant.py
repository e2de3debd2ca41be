"""Data-free weight rounding by flipping (``quant.weight_round = "squant"``), SQuant (Guo et al., ICLR 2022,
"SQuant: On-the-Fly Data-Free Quantization via Diagonal Hessian Approximation").

Why: nearest rounding minimises each weight's own error, but a layer's output error depends on how the
errors add up over the weights that meet the same inputs. SQuant approximates the layer's Hessian by three
diagonal blocks (element, kernel, output channel) and so asks, without any data, that the rounding
errors of every kernel (one output channel's weights on one input channel) and of every output channel
sum to at most half a grid step. Its progressive algorithm, followed here as the authors' code does it:

1. *E*: every code starts at nearest rounding; its error ``e = q - t`` (``t`` the real-valued code).
2. *K*: in each kernel with error sum ``s``, flip the ``round(|s|)`` weights whose flip costs least (the
   largest ``|e|`` among those rounded against the needed direction) one step toward ``-sign(s)``. That
   leaves one candidate per kernel for the next level: after an overshoot (``round(|s|) >= |s|``) the last
   weight flipped, which may be flipped back; otherwise the next weight in line, in the same direction,
   each ranked by its current ``|e|``.
3. *C*: in each output channel, the same with the channel's error sum over those candidates.

Kernels of one weight (1x1 convs, linear layers) skip step 2, and step 3 ranks all their weights, as the
authors' code does. The grid is the quantizer's own (per-channel or per-tensor min/max), so only the
floor/ceil choice changes; the weights that set a channel's range keep their nearest code (as in
``adaround``, so the range the quantizer re-derives from the weights at every forward stays the same;
the authors' code fixes only the codes at the grid's ends), and no code leaves the grid. The result is
written back as float weights on the grid. Each weight moves at most one step from nearest.
"""

from __future__ import annotations

import torch
from torch import nn

from dfq.quant.modules import FLOAT_BITS, QuantLayer
from dfq.quant.quantizer import int_range, weight_grid


def _ranks(priority: torch.Tensor) -> torch.Tensor:
    """Each element's place in its row, highest priority first (ties in index order)."""
    order = priority.argsort(dim=-1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(-1, order, torch.arange(priority.shape[-1]).expand_as(order))


def _level(
    err: torch.Tensor, up_pri: torch.Tensor, down_pri: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level of SQuant on rows of ``err`` (one row per kernel or channel): flip ``round(|row sum|)``
    candidates, highest priority first, toward the row sum's opposite sign. Returns the step per element
    (+1, -1 or 0) and the next level's up and down priorities (one candidate per row)."""
    total = err.sum(-1, keepdim=True)
    up = total < 0
    priority = torch.where(up, up_pri, down_pri)
    rank = _ranks(priority)
    k = total.abs().round()
    step = torch.where(up, 1.0, -1.0)
    flip = (rank < k) & (priority > 0)
    moved = err + flip * step
    over = (k >= total.abs()) & (k > 0)
    back = over & (rank == k - 1) & flip  # the last one flipped may go back the other way
    onward = ~over & (rank == k) & (priority > 0)  # or the next in line goes the same way
    cand = moved.abs()
    next_up = torch.where((back & ~up) | (onward & up), cand, 0.0)
    next_down = torch.where((back & up) | (onward & ~up), cand, 0.0)
    return flip * step, next_up, next_down


def squant_codes(
    t: torch.Tensor,
    movable_up: torch.Tensor,
    movable_down: torch.Tensor,
    levels: str = "kc",
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """SQuant's codes for real-valued codes ``t`` shaped (out, in, k): nearest rounding (clamped to
    ``grid``, as the quantizer clamps), then the kernel level (when ``k > 1``) and the channel level;
    ``levels`` names the levels run ("kc"; "k", "c" or "" are the paper's SQuant-K, -C and -E ablations).
    ``movable_up``/``movable_down`` say which weights may take the code above/below nearest (not a
    range-setting weight, not off the grid)."""
    q = torch.round(t) if grid is None else torch.clamp(torch.round(t), *grid)
    err = q - t
    up_pri = torch.where(movable_up & (err < 0), err.abs(), 0.0)
    down_pri = torch.where(movable_down & (err > 0), err.abs(), 0.0)
    if t.shape[2] > 1 and "k" in levels:
        step, up_pri, down_pri = _level(err, up_pri, down_pri)
        q, err = q + step, err + step
    if "c" not in levels:
        return q
    out = t.shape[0]
    step, _, _ = _level(err.reshape(out, -1), up_pri.reshape(out, -1), down_pri.reshape(out, -1))
    return q + step.view_as(q)


@torch.no_grad()
def squant_layer(layer: QuantLayer) -> dict[str, float]:
    """Round ``layer``'s weights by SQuant on its own grid and write them back; returns the share of weights
    rounded unlike nearest and the largest kernel and channel error sums (in grid steps) before and after."""
    w = layer.weight
    t, scale, zp, extreme = weight_grid(w, layer.w_bits, layer.per_channel)
    qmin, qmax = int_range(layer.w_bits)
    nearest = torch.clamp(torch.round(t), qmin, qmax)
    t3 = t.reshape(w.shape[0], w.shape[1], -1)
    n3 = nearest.reshape_as(t3)
    free = ~extreme.reshape_as(t3)
    up, down = free & (n3 + 1 <= qmax), free & (n3 - 1 >= qmin)
    codes = squant_codes(t3, up, down, grid=(qmin, qmax)).reshape_as(w)
    layer.weight.copy_((codes + zp) / scale)

    def worst(q: torch.Tensor) -> tuple[float, float]:
        e = (q - t).reshape_as(t3)
        return float(e.sum(-1).abs().max()), float(e.sum((1, 2)).abs().max())

    (k0, c0), (k1, c1) = worst(nearest), worst(codes)
    return {
        "changed": float((codes != nearest).float().mean()),
        "kernel_sum_nearest": k0,
        "kernel_sum": k1,
        "channel_sum_nearest": c0,
        "channel_sum": c1,
    }


def squant(student: nn.Module) -> dict[str, dict[str, float]]:
    """SQuant every quantized weight layer of ``student`` (module docstring); no images, no teacher."""
    return {
        name: squant_layer(m)
        for name, m in student.named_modules()
        if isinstance(m, QuantLayer) and m.w_bits < FLOAT_BITS
    }
