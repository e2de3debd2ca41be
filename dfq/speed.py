"""Run-time switches of the training loop that change speed, not the method (``JobSpec.speed``).

Kept apart from the pipeline so each switch is one small, testable function, and so the loop reads
the same with every switch off. What each switch does to results is in docs/methods.md ("Speed").
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)


def set_memory_format(modules: list[nn.Module], channels_last: bool) -> None:
    """Store every 4-D parameter/buffer NHWC (or back to NCHW).

    oneDNN (CPU) and cuDNN pick NHWC kernels when a conv's weight is NHWC, and their outputs stay NHWC,
    so converting the weights converts the whole forward; on this project's small-channel convs NHWC is
    1.4-3x faster on CPU (bench/speed.py). Values are unchanged; only float sums are reassociated.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for module in modules:
        module.to(memory_format=fmt)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for the networks' convs/linears when ``speed.bf16`` is on (a no-op otherwise)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """Statistics, ranges and losses are computed in float32 even under bf16 autocast (a no-op in fp32)."""
    return x.float() if x.dtype in LOW_PRECISION else x
