"""LRQ — long-range zero-shot generative quantization (Neural Networks 2023, arXiv 2211.06816).

No usable public code; dfq's choices are documented in docs/methods.md:
- large-kernel attention (as in VAN): ``attn = Conv1x1(DWConv7x7_dil3(DWConv5x5(x)))``, ``out = x * attn``,
  placed after each upsample-conv block of the GDFQ generator;
- Adversarial Margin Add: the teacher's penultimate feature f and FC weights W (class centers) give
  ``cos_j``; the target logit becomes ``s * cos(theta_y + m)`` (ArcFace form) in the generator's CE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfq.synth.polyphase import dilated_depthwise


class LargeKernelAttention(nn.Module):
    def __init__(self, channels: int, polyphase: bool = True) -> None:
        super().__init__()
        # the dilated conv through its polyphase components (dfq/synth/polyphase.py): the same map, a
        # plain attribute so checkpoints do not depend on it
        self.polyphase = polyphase
        self.dw = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.dw_dilated = nn.Conv2d(channels, channels, 7, padding=9, dilation=3, groups=channels)
        self.pw = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.pw(dilated_depthwise(self.dw(x), self.dw_dilated, self.polyphase))


def cosine_logits(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``cos_j = <f/|f|, W_j/|W_j|>``: N x classes."""
    return F.normalize(features, dim=1) @ F.normalize(weight, dim=1).t()


def margin_logits(cos: torch.Tensor, labels: torch.Tensor, margin: float, scale: float) -> torch.Tensor:
    """``s * cos_j`` for j != y and ``s * cos(theta_y + m)`` for the target class."""
    cos = cos.clamp(-1 + 1e-7, 1 - 1e-7)
    theta_y = torch.acos(cos.gather(1, labels[:, None]))
    target = torch.cos(theta_y + margin)
    return scale * cos.scatter(1, labels[:, None], target)


def ama_loss(
    features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, margin: float, scale: float
) -> torch.Tensor:
    return F.cross_entropy(margin_logits(cosine_logits(features, weight), labels, margin, scale), labels)


@torch.no_grad()
def angular_stats(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean angle (degrees) between each feature and its class center, and the mean pairwise angle
    between features of the same class (the intra-class spread AMA should enlarge)."""
    cos = cosine_logits(features, weight).clamp(-1, 1)
    theta = torch.rad2deg(torch.acos(cos.gather(1, labels[:, None]))).mean().item()
    f = F.normalize(features, dim=1)
    sim = (f @ f.t()).clamp(-1, 1)
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    out = {"diag_theta_y": theta}
    if same.any():  # a batch with no two samples of one class has no intra-class angle to report
        out["diag_intra_angle"] = torch.rad2deg(torch.acos(sim[same])).mean().item()
    return out
