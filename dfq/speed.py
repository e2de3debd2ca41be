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


def compile_networks(modules: list[nn.Module], on: bool) -> None:
    """``torch.compile`` the modules in place (``speed.compile``), or hand them back eager.

    In place (``nn.Module.compile``), so parameters, state_dict keys, hooks and the optimizers'
    references are the eager modules' own, and checkpoints do not depend on the switch. The activation
    quantizers keep their update count as a Python int (no host sync per forward); dynamo would
    specialise on it and recompile the student at every calibrating step, so ints on modules are
    compiled unspecialised (``allow_unspec_int_on_nn_module``, a process-wide dynamo setting). Undone at
    the end of a run because export traces the modules again (torch.export, ONNX) and wants them eager.
    """
    if on:
        torch._dynamo.config.allow_unspec_int_on_nn_module = True
    for module in modules:
        if on:
            module.compile()
        else:  # what nn.Module.compile set; no public API to undo it
            module._compiled_call_impl = None


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for the networks' convs/linears when ``speed.bf16`` is on (a no-op otherwise)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """Statistics, ranges and losses are computed in float32 even under bf16 autocast (a no-op in fp32)."""
    return x.float() if x.dtype in LOW_PRECISION else x
