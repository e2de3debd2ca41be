"""Turning synthetic images (teacher input space) into pictures people can look at."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image


def to_display(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Undo the teacher's normalisation and clamp to [0, 1]."""
    c = images.shape[1]
    m = torch.tensor(mean[:c] if len(mean) >= c else mean * c, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std[:c] if len(std) >= c else std * c, dtype=images.dtype).view(1, -1, 1, 1)
    return (images.cpu() * s + m).clamp(0, 1)


def save_grid(
    images: torch.Tensor, path: str | Path, mean: tuple[float, ...], std: tuple[float, ...], per_row: int
) -> Path:
    """One row per class (images arrive grouped by class), upscaled so small inputs stay visible."""
    x = to_display(images, mean, std)
    if x.shape[-1] < 64:
        x = torch.nn.functional.interpolate(x, scale_factor=64 // x.shape[-1] or 1, mode="nearest")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(x, nrow=per_row, padding=2, pad_value=1.0), path)
    return path
