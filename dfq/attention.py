"""Attention maps and attention centers of a feature map (used by ACQ and shown on the dashboard).

The attention map is attention transfer's spatial map (Zagoruyko & Komodakis 2017): the channel-wise
sum of squared activations. For a *center* it is normalised to sum to one over pixels, so the center
is a proper A-weighted mean of pixel coordinates in [0, 1] (pixel centers at (i + 0.5) / H).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """N x C x H x W -> N x H x W, each map summing to 1 (a distribution over pixels)."""
    a = features.pow(2).sum(1)
    return a / a.flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1)


def attention_vector(features: torch.Tensor) -> torch.Tensor:
    """Attention transfer's L2-normalised flattened map, the usual space for comparing two maps."""
    return F.normalize(features.pow(2).mean(1).flatten(1), dim=1)


def attention_center(attn: torch.Tensor) -> torch.Tensor:
    """N x H x W distribution -> N x 2 center (x, y) in [0, 1]."""
    _, h, w = attn.shape
    ys = (torch.arange(h, device=attn.device, dtype=attn.dtype) + 0.5) / h
    xs = (torch.arange(w, device=attn.device, dtype=attn.dtype) + 0.5) / w
    cy = (attn.sum(2) * ys).sum(1)
    cx = (attn.sum(1) * xs).sum(1)
    return torch.stack([cx, cy], dim=1)


def spatial_stages(
    model: nn.Module, input_shape: tuple[int, int, int], min_size: int = 4
) -> list[tuple[str, tuple[int, int]]]:
    """Stages whose output is a feature map of at least ``min_size`` x ``min_size``, in forward order.

    Stages are the model's top-level children; when none of those qualifies (MobileNet's whole
    backbone is one top-level ``features`` Sequential), the children of top-level Sequentials. The
    last one is the deepest stage that still has spatial layout to place an attention center in.
    """
    top: list[tuple[str, tuple[int, int]]] = []
    inner: list[tuple[str, tuple[int, int]]] = []
    handles = []

    def watch(name: str, module: nn.Module, into: list) -> None:
        def hook(mod, args, out) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4 and min(out.shape[-2:]) >= min_size:
                into.append((name, tuple(out.shape[-2:])))

        handles.append(module.register_forward_hook(hook))

    for name, child in model.named_children():
        watch(name, child, top)
        if isinstance(child, nn.Sequential):
            for sub, grandchild in child.named_children():
                watch(f"{name}.{sub}", grandchild, inner)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # on the model's device: a CPU probe into a CUDA model fails (this stopped every GPU job once)
            param = next(model.parameters(), None)
            model(torch.zeros(1, *input_shape, device=param.device if param is not None else None))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return top or inner


def default_stage(model: nn.Module, input_shape: tuple[int, int, int]) -> str | None:
    stages = spatial_stages(model, input_shape)
    return stages[-1][0] if stages else None


class FeatureTap:
    """Context manager keeping the output of one named submodule from the last forward."""

    def __init__(self, model: nn.Module, name: str) -> None:
        self.module = model.get_submodule(name)
        self.output: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module, args, out) -> None:
        self.output = out

    def __enter__(self) -> FeatureTap:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
