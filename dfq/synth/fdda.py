"""FDDA — Fine-grained Data Distribution Alignment (Zhong et al., ECCV 2022).

Per-class "BNS centers" (the BN-input mean/var a class produces in each layer) give the generator a
class-specific target in the deeper half of the network: a centralized loss pulls a single-class batch
to its class center, a distorted loss to a center perturbed afresh every step (Gaussian noise, std 0.5
on means and 1.0 on variances, as in the reference code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def start_layer(n_layers: int) -> int:
    """First BN layer FDDA aligns: ``s = floor((L + 1) / 2) - 2`` (the reference's ``start_layer``)."""
    return max(int((n_layers + 1) / 2) - 2, 0)


class ClassCenters:
    """Per-class, per-layer BN-input statistics; state that must survive a resume, hence tensors."""

    def __init__(self, means: list[torch.Tensor], vars_: list[torch.Tensor], valid: torch.Tensor) -> None:
        # means[l]: num_classes x C_l; valid: classes whose center the teacher classifies correctly
        self.means, self.vars, self.valid = means, vars_, valid

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"mean.{l}": m for l, m in enumerate(self.means)}
        out |= {f"var.{l}": v for l, v in enumerate(self.vars)}
        out["valid"] = self.valid
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> ClassCenters:
        n = sum(k.startswith("mean.") for k in state)
        return cls(
            [state[f"mean.{l}"] for l in range(n)], [state[f"var.{l}"] for l in range(n)], state["valid"]
        )

    def to(self, device) -> ClassCenters:
        return ClassCenters(
            [m.to(device) for m in self.means], [v.to(device) for v in self.vars], self.valid.to(device)
        )


def centers_from_stats(
    per_class: list[tuple[list[torch.Tensor], list[torch.Tensor]]], correct: torch.Tensor
) -> ClassCenters:
    """``per_class[c] = (means per layer, vars per layer)`` -> stacked :class:`ClassCenters`."""
    n_layers = len(per_class[0][0])
    means = [torch.stack([per_class[c][0][l] for c in range(len(per_class))]) for l in range(n_layers)]
    vars_ = [torch.stack([per_class[c][1][l] for c in range(len(per_class))]) for l in range(n_layers)]
    return ClassCenters(means, vars_, correct.bool())


def centralized_loss(
    means: list[torch.Tensor], vars_: list[torch.Tensor], centers: ClassCenters, cls: int, start: int
) -> torch.Tensor:
    """``L_CBNS = 1/(L-s) sum_{l>=s} MSE(mu_l, mu_c^l) + MSE(var_l, var_c^l)``."""
    terms = [
        F.mse_loss(means[l], centers.means[l][cls]) + F.mse_loss(vars_[l], centers.vars[l][cls])
        for l in range(start, len(means))
    ]
    return torch.stack(terms).sum() / len(terms)


def distorted_loss(
    means: list[torch.Tensor],
    vars_: list[torch.Tensor],
    centers: ClassCenters,
    cls: int,
    start: int,
    mean_std: float = 0.5,
    var_std: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``L_DBNS``: as ``L_CBNS`` with targets drawn each call from N(mu_c^l, mean_std), N(var_c^l, var_std)."""
    terms = []
    for l in range(start, len(means)):
        tm = centers.means[l][cls] + mean_std * torch.randn(
            centers.means[l][cls].shape, generator=generator, device=means[l].device
        )
        tv = centers.vars[l][cls] + var_std * torch.randn(
            centers.vars[l][cls].shape, generator=generator, device=vars_[l].device
        )
        terms.append(F.mse_loss(means[l], tm) + F.mse_loss(vars_[l], tv))
    return torch.stack(terms).sum() / len(terms)
