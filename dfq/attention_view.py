"""Pictures of where the teacher and the quantized student look, on the same synthetic images.

ACQ and LRQ claim to change the generator's images so that the student's attention follows the
teacher's; a number alone does not convince anyone, so every run writes a figure: for each sample,
the image, the teacher's attention map and the student's, side by side (one row per class), plus
two per-sample numbers comparing the maps (total-variation distance and attention-center shift).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import make_grid, save_image

from dfq.attention import FeatureTap, attention_center, attention_map
from dfq.images import to_display
from dfq.quant.modules import ActQuant

if TYPE_CHECKING:
    from dfq.models.teachers import TeacherInfo
    from dfq.pipeline import Pipeline

# A perceptual dark-to-bright ramp (black, purple, red, orange, pale yellow), like matplotlib's
# inferno, so that "more attention" reads as "brighter" whatever the display.
_RAMP = torch.tensor(
    [[0.0, 0.0, 0.02], [0.34, 0.06, 0.43], [0.73, 0.21, 0.33], [0.98, 0.55, 0.04], [0.99, 1.0, 0.64]]
)
MIN_TILE = 64  # small inputs (28x28) are upscaled so the maps stay readable


@contextlib.contextmanager
def frozen_ranges(model: nn.Module) -> Iterator[None]:
    """Activation ranges are not updated by the forwards inside (restored as they were after):
    looking at the student mid-run must not change what it learns."""
    quants = [m for m in model.modules() if isinstance(m, ActQuant)]
    saved = [q.calibrating for q in quants]
    for q in quants:
        q.calibrating = False
    try:
        yield
    finally:
        for q, flag in zip(quants, saved, strict=True):
            q.calibrating = flag


@torch.no_grad()
def attention_pair(
    teacher: nn.Module, student: nn.Module, images: torch.Tensor, stage: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """N x h x w attention maps (each a distribution over pixels) of teacher and student at ``stage``.

    Both models see the same ``images`` (teacher input space); neither model's state changes.
    """
    device = next(teacher.parameters()).device
    x = images.to(device)
    maps = []
    for model in (teacher, student):
        was_training = model.training
        model.eval()
        try:
            with frozen_ranges(model), FeatureTap(model, stage) as tap:
                model(x)
        finally:
            model.train(was_training)
        if tap.output is None or tap.output.dim() != 4:
            raise ValueError(f"stage {stage!r} does not output a feature map")
        maps.append(attention_map(tap.output.float()).cpu())
    return maps[0], maps[1]


def map_stats(teacher_maps: torch.Tensor, student_maps: torch.Tensor) -> dict[str, list[float]]:
    """Per sample: total-variation distance of the two maps (0 same, 1 disjoint) and the distance
    between their attention centers (in image widths)."""
    tv = 0.5 * (teacher_maps - student_maps).abs().flatten(1).sum(1)
    shift = (attention_center(teacher_maps) - attention_center(student_maps)).norm(dim=1)
    return {"tv": [round(v, 4) for v in tv.tolist()], "center_shift": [round(v, 4) for v in shift.tolist()]}


def heat(maps: torch.Tensor, size: tuple[int, int], scale: torch.Tensor) -> torch.Tensor:
    """N x h x w maps -> N x 3 x H x W colours, each map divided by its sample's ``scale``."""
    a = F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    # A diverged student can hand back NaN maps; they draw as cold rather than crash the job.
    a = (a / scale.clamp_min(1e-12).view(-1, 1, 1)).nan_to_num(0.0).clamp(0, 1)
    pos = a * (len(_RAMP) - 1)
    lo = pos.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (pos - lo).unsqueeze(-1)
    rgb = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac  # N x H x W x 3
    return rgb.permute(0, 3, 1, 2)


def attention_figure(
    images: torch.Tensor,
    teacher_maps: torch.Tensor,
    student_maps: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    per_row: int,
) -> torch.Tensor:
    """3 x H x W picture: ``per_row`` samples a row, each as [image | teacher map | student map].

    Both maps of a sample share one colour scale (the larger of their peaks), so a student that
    attends more diffusely than its teacher also looks dimmer, not just differently shaped.
    """
    x = to_display(images, mean, std)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[-1] < MIN_TILE:
        x = F.interpolate(x, scale_factor=MIN_TILE // x.shape[-1] or 1, mode="nearest")
    size = (x.shape[-2], x.shape[-1])
    scale = torch.maximum(teacher_maps.flatten(1).amax(1), student_maps.flatten(1).amax(1))
    grey = x.mean(1, keepdim=True)
    overlay = [0.35 * grey + 0.65 * heat(m, size, scale) for m in (teacher_maps, student_maps)]
    triples = [
        make_grid(torch.stack([x[i], overlay[0][i], overlay[1][i]]), nrow=3, padding=1, pad_value=1.0)
        for i in range(len(x))
    ]
    return make_grid(torch.stack(triples), nrow=per_row, padding=6, pad_value=1.0)


def save_attention(
    teacher: nn.Module,
    student: nn.Module,
    images: torch.Tensor,
    stage: str,
    path: str | Path,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    per_row: int,
) -> dict[str, Any]:
    """Write the teacher-vs-student figure to ``path`` (PNG) and its numbers next to it (``.json``).

    ``images`` arrive grouped by class (``per_row`` per class, as the sample grids), so each figure
    row is one class. Returns what the JSON holds.
    """
    t_maps, s_maps = attention_pair(teacher, student, images, stage)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(attention_figure(images.cpu(), t_maps, s_maps, mean, std, per_row), path)
    stats = map_stats(t_maps, s_maps)
    summary = {
        "stage": stage,
        "map_size": list(t_maps.shape[-2:]),
        "per_row": per_row,
        "columns": ["image", "teacher", "student"],
        "tv_mean": round(sum(stats["tv"]) / len(stats["tv"]), 4),
        "center_shift_mean": round(sum(stats["center_shift"]) / len(stats["center_shift"]), 4),
        **stats,
    }
    path.with_suffix(".json").write_text(json.dumps(summary) + "\n")
    return summary


ATTENTION_PER_CLASS = 2  # samples per class in the figure: enough to see a pattern, small to store


def write_attention(
    pipe: Pipeline, info: TeacherInfo, images: torch.Tensor, path: str | Path, samples_per_class: int
) -> dict[str, Any] | None:
    """The figure for a run's sample images (grouped ``samples_per_class`` per class), at the stage
    the run's objective watches (ACQ's stage, else the deepest spatial one); None when the teacher
    has no spatial stage to look at."""
    stage = pipe.objective.stage
    if stage is None:
        return None
    keep = min(ATTENTION_PER_CLASS, samples_per_class)
    groups = images.reshape(-1, samples_per_class, *images.shape[1:])[:, :keep]
    x = groups.reshape(-1, *images.shape[1:])
    return save_attention(pipe.teacher, pipe.student, x, stage, path, info.mean, info.std, keep)
