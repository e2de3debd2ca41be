"""BatchNorm-statistics hooks on the teacher and the GDFQ BN-statistics loss.

The hooks record the batch mean and *biased* variance over (N, H, W) of each BN layer's input, which
is what the teacher's running statistics estimate; matching them is what makes synthetic images look
like the training data to the network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfq.synth.moments import var_mean


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class BNStatsRecorder:
    """Context manager collecting per-layer BN input statistics during forwards of ``model``.

    State is real here (hook handles and the per-forward lists), hence a class. ``inputs`` keeps the
    raw BN inputs for losses that need more than batch moments (per-sample statistics for DSG, ...).
    """

    def __init__(self, model: nn.Module, keep_inputs: bool = False) -> None:
        self.layers = bn_layers(model)
        self.keep_inputs = keep_inputs
        self.means: list[torch.Tensor] = []
        self.vars: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        self._handles: list = []

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = args[0]
        x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x  # fp32 statistics under autocast
        var, mean = var_mean(x, [0, 2, 3] if x.dim() == 4 else [0])
        self.means.append(mean)
        self.vars.append(var)
        if self.keep_inputs:
            self.inputs.append(x)

    def clear(self) -> None:
        self.means, self.vars, self.inputs = [], [], []

    def __enter__(self) -> BNStatsRecorder:
        self._handles = [layer.register_forward_hook(self._hook) for layer in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def running_means(self) -> list[torch.Tensor]:
        return [layer.running_mean for layer in self.layers]

    @property
    def running_vars(self) -> list[torch.Tensor]:
        return [layer.running_var for layer in self.layers]


def bns_loss(
    means: list[torch.Tensor],
    variances: list[torch.Tensor],
    target_means: list[torch.Tensor],
    target_vars: list[torch.Tensor],
) -> torch.Tensor:
    """``L_BNS = (1/L) * sum_l [MSE(mu_l, mu*_l) + MSE(var_l, var*_l)]`` (MSE = mean over channels)."""
    if not means or len(means) != len(target_means):
        raise ValueError(f"BN statistics of {len(means)} layers recorded for {len(target_means)} BN layers")
    total = sum(
        F.mse_loss(m, tm) + F.mse_loss(v, tv)
        for m, v, tm, tv in zip(means, variances, target_means, target_vars, strict=True)
    )
    return total / len(means)
