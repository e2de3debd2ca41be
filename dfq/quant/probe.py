"""One forward of a zero batch through a student, for hooks that follow tensors through it.

Why a shared helper: finding which BN feeds a quantizer (dfq/quant/bn_ranges.py) and which layer consumes
it (dfq/quant/consumers.py) both trace a forward, and both must leave the student exactly as it was: its
quantizers' bits and calibration flags, its mode, and no hook left behind.
"""

from __future__ import annotations

import torch
from torch import nn

from dfq.quant.modules import FLOAT_BITS, ActQuant


def probe_forward(
    model: nn.Module, input_shape: tuple[int, ...], hooks: list, grad: bool = False
) -> torch.Tensor:
    """One forward of a zero batch, for hooks that follow tensors through the model: every ActQuant an
    identity for it (no range needed, none touched), ``hooks`` removed and the model's mode and quantizers
    restored afterwards. ``grad`` records the autograd graph (for counting a tensor's uses)."""
    saved = {m: (m.bits, m.calibrating) for m in model.modules() if isinstance(m, ActQuant)}
    for m in saved:
        m.bits, m.calibrating = FLOAT_BITS, False
    was_training = model.training
    p = next(model.parameters())
    try:
        with torch.set_grad_enabled(grad):
            x = torch.zeros(2, *input_shape, device=p.device, dtype=p.dtype, requires_grad=grad)
            return model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
        for m, (bits, calibrating) in saved.items():
            m.bits, m.calibrating = bits, calibrating
        model.train(was_training)
