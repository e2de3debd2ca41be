"""Fake-quantized layers: weights quantized at every forward, activations after every ReLU.

State that must survive a resume (activation ranges and their update counts) lives in buffers, so a
student's ``state_dict`` is its complete quantization state.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dfq.quant.quantizer import SteMode, fake_quantize, per_channel_range, per_tensor_range

FLOAT_BITS = 32  # "bits = 32" means: leave this tensor in floating point

EmaMode = Literal["debiased", "plain", "gdfq-compounding"]


class QuantLayer:
    """Mixin for Conv2d/Linear whose weight is fake-quantized from its own current min/max."""

    w_bits: int
    per_channel: bool
    weight: torch.Tensor

    def quantized_weight(self) -> torch.Tensor:
        if self.w_bits >= FLOAT_BITS:
            return self.weight
        lo, hi = per_channel_range(self.weight) if self.per_channel else per_tensor_range(self.weight)
        return fake_quantize(self.weight, self.w_bits, lo, hi)

    def extra_repr(self) -> str:  # shown by print(model)
        return f"{super().extra_repr()}, w_bits={self.w_bits}, per_channel={self.per_channel}"


class QuantConv2d(QuantLayer, nn.Conv2d):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: int, per_channel: bool = True) -> QuantConv2d:
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        q.load_state_dict(conv.state_dict())
        q.w_bits, q.per_channel = bits, per_channel
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(QuantLayer, nn.Linear):
    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, per_channel: bool = True) -> QuantLinear:
        q = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        q.load_state_dict(linear.state_dict())
        q.w_bits, q.per_channel = bits, per_channel
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


class ActQuant(nn.Module):
    """Per-tensor activation quantizer with an EMA (beta) of batch min/max while calibrating.

    ``ema`` selects how the running range is formed (methods.md section 0):
    - ``debiased`` (default): Adam-style bias correction done right: the raw EMA ``m_t`` starts at 0
      and the range used is ``m_t / (1 - beta^t)``.
    - ``plain``: FDDA's EMA, initialised with the first batch's value, no correction.
    - ``gdfq-compounding``: the GDFQ/ZeroQ reference, which stores the *corrected* value and corrects it
      again at every update, inflating ranges early on. Parity switch only.

    A quantizer can instead hold a fixed range (:meth:`fix_range`, ``quant.act_clip = "bn-mse"``) that
    calibration leaves alone.
    """

    def __init__(
        self, bits: int, beta: float = 0.9, ema: EmaMode = "debiased", ste: SteMode = "identity"
    ) -> None:
        super().__init__()
        self.bits, self.beta, self.ema, self.ste = bits, beta, ema, ste
        self.fixed = False  # set again by the job at every start (resume included), so not a buffer
        self.calibrating = False
        self.register_buffer("raw_min", torch.zeros(()))
        self.register_buffer("raw_max", torch.zeros(()))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        # The update count mirrored as a Python int: the bias correction and the no-range guard read it at
        # every forward, and reading the buffer (``.item()``) would sync the host with the device there
        # (~2 syncs per quantizer per forward on a GPU) and break a torch.compile graph at each quantizer.
        # The buffer stays the checkpointed truth; _load_from_state_dict re-reads it.
        self.n_updates = 0

    def extra_repr(self) -> str:
        return f"bits={self.bits}, beta={self.beta}, ema={self.ema}, ste={self.ste}, fixed={self.fixed}"

    @torch.no_grad()
    def fix_range(self, lo: float, hi: float) -> None:
        """Hold [lo, hi] from now on, stored as one EMA update so ``range()`` and checkpoints read it."""
        scale = 1 - self.beta if self.ema == "debiased" else 1.0
        self.raw_min.fill_(lo * scale)
        self.raw_max.fill_(hi * scale)
        self.updates.fill_(1)
        self.n_updates, self.fixed = 1, True

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        if self.fixed:
            return
        lo, hi = torch.aminmax(x.detach())
        b = self.beta
        if self.ema == "plain" and self.n_updates == 0:
            self.raw_min.copy_(lo)
            self.raw_max.copy_(hi)
        else:
            self.raw_min.mul_(b).add_((1 - b) * lo)
            self.raw_max.mul_(b).add_((1 - b) * hi)
        self.updates += 1
        self.n_updates += 1
        if self.ema == "gdfq-compounding":
            correction = 1 - b**self.n_updates
            self.raw_min.div_(correction)
            self.raw_max.div_(correction)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.n_updates = int(self.updates)  # one sync per load, not per forward

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ema == "debiased":
            correction = 1 - self.beta**self.n_updates
            return self.raw_min / correction, self.raw_max / correction
        return self.raw_min, self.raw_max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16):  # ranges and the grid stay float32 under autocast
            x = x.float()
        if self.calibrating:
            self.observe(x)
        if self.bits >= FLOAT_BITS:
            return x
        if self.n_updates == 0:
            raise RuntimeError(
                "activation quantizer has no range yet: run calibration (set_calibration(model, True) "
                "and forward some inputs) before using the quantized model"
            )
        lo, hi = self.range()
        return fake_quantize(x, self.bits, lo, hi, self.ste)


def set_calibration(model: nn.Module, on: bool) -> None:
    """Switch range updates of every activation quantizer on or off (GDFQ's unfreeze/freeze)."""
    for m in model.modules():
        if isinstance(m, ActQuant):
            m.calibrating = on


def float_twin(model: nn.Module) -> nn.Module:
    """A copy of a quantized model with every weight and activation quantizer off: the float network in
    the student's own units. Why: QDrop takes its float inputs from the model being quantized with
    quantization switched off, and where ``quant.act_equalize`` rescaled the student's channels the
    teacher's activations are in other units than the student's."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, QuantLayer):
            m.w_bits = FLOAT_BITS
        elif isinstance(m, ActQuant):
            m.bits = FLOAT_BITS
            m.calibrating = False
    return twin.eval()


def activation_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    return {
        n: tuple(float(v) for v in m.range()) for n, m in model.named_modules() if isinstance(m, ActQuant)
    }
