"""ACQ — attention correction for generative DFQ (Pattern Recognition 2024, arXiv 2301.07266).

There is no public code; every choice below is dfq's, documented in docs/methods.md:
- the generator receives a center condition c ~ U[0,1]^2 (embedded linearly and added to its input);
- center matching: ``||center(A(G(z, y, c))) - c||^2`` on the teacher's attention at one stage;
- adversarial pair loss: samples come in pairs sharing (y, c) with different z; a mode-seeking term
  (MSGAN form) rewards their attention-space distance relative to their latent distance;
- consistency: ``||A_eval(x) - A_train(x)||^2`` between the teacher's attention with running BN
  statistics and with batch statistics (computed on a copy, so the teacher's running stats never move).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dfq.attention import attention_center, attention_map, attention_vector


def center_matching_loss(features: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between each sample's attention center and its requested center."""
    return (attention_center(attention_map(features)) - centers).pow(2).sum(1).mean()


def pair_loss(features: torch.Tensor, z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mode seeking on pairs (first half vs second half of the batch, same (y, c), different z):
    ``1 / (mean|A1 - A2| / mean|z1 - z2| + eps)`` with A the normalised attention vectors."""
    half = features.shape[0] // 2
    a = attention_vector(features)
    d_a = (a[:half] - a[half : 2 * half]).abs().mean()
    d_z = (z[:half] - z[half : 2 * half]).abs().mean()
    return 1.0 / (d_a / d_z + eps)


def consistency_loss(eval_features: torch.Tensor, train_features: torch.Tensor) -> torch.Tensor:
    """``||A_eval - A_train||^2`` per sample, averaged over the batch (normalised attention vectors)."""
    return (attention_vector(eval_features) - attention_vector(train_features)).pow(2).sum(1).mean()


def batch_stats_copy(teacher: nn.Module) -> nn.Module:
    """A frozen copy of the teacher whose BN layers normalise with batch statistics.

    BN in train mode updates running statistics; doing it on a copy keeps the real teacher untouched
    (the copy's running stats drift, but they are never read).
    """
    twin = copy.deepcopy(teacher)
    for p in twin.parameters():
        p.requires_grad_(False)
    twin.eval()
    for m in twin.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return twin


@torch.no_grad()
def center_spread(features: torch.Tensor) -> float:
    """Std of attention centers over the batch (mean over x and y): the diagnostic ACQ should raise."""
    return attention_center(attention_map(features)).std(0).mean().item()
