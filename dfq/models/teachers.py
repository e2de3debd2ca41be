"""Bundled teachers and resolution of ``--teacher NAME_OR_PATH``.

No pretrained weights can be downloaded here, so dfq trains its own teachers on Fashion-MNIST and
ships them under ``teachers/`` with a manifest that pins each file's SHA-256 and says how inputs
must be preprocessed: a teacher is only meaningful together with its input pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from dfq.data import Preprocess
from dfq.models.checkpoint import CheckpointError, apply_state_dict, load_state_dict, require_batchnorm
from dfq.models.registry import build_model, get_arch

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def teachers_dir() -> Path:
    env = os.environ.get("DFQ_TEACHERS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "teachers"


@dataclass
class TeacherInfo:
    """Everything besides weights that a run needs to know about a teacher."""

    name: str
    arch: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] = field(default_factory=list)
    fp_top1: float | None = None  # on the full labelled test set, from the manifest
    dataset: str | None = None
    sha256: str | None = None

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.input_shape, self.mean, self.std)

    def to_json(self) -> dict:
        return asdict(self)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(directory: Path | None = None) -> dict[str, dict]:
    path = (directory or teachers_dir()) / "manifest.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def bundled_names() -> list[str]:
    return sorted(read_manifest())


def infer_shape_args(arch: str, state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(num_classes, in_channels) read off the checkpoint's first conv and last linear layer."""
    probe = build_model(arch, 10, 3)
    convs = [n for n, m in probe.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in probe.named_modules() if isinstance(m, nn.Linear)]
    try:
        in_channels = state[f"{convs[0]}.weight"].shape[1]
        num_classes = state[f"{linears[-1]}.weight"].shape[0]
    except (IndexError, KeyError) as exc:
        raise CheckpointError(f"checkpoint does not match architecture {arch!r}: missing key {exc}") from None
    return int(num_classes), int(in_channels)


def load_checkpoint_model(
    path: str | Path,
    arch: str,
    input_size: tuple[int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> tuple[nn.Module, TeacherInfo]:
    """A user's checkpoint of a registered architecture, validated, in eval mode."""
    info = get_arch(arch)
    state = load_state_dict(path)
    num_classes, in_channels = infer_shape_args(arch, state)
    model = apply_state_dict(build_model(arch, num_classes, in_channels), state, arch)
    require_batchnorm(model)
    size = input_size or info.default_input[1:]
    teacher = TeacherInfo(
        name=Path(path).stem,
        arch=arch,
        num_classes=num_classes,
        input_shape=(in_channels, *size),
        mean=mean or (0.0,) * in_channels,
        std=std or (1.0,) * in_channels,
        sha256=sha256_file(path),
    )
    return model.eval(), teacher


def load_bundled(
    name: str, directory: Path | None = None, verify: bool = True
) -> tuple[nn.Module, TeacherInfo]:
    directory = directory or teachers_dir()
    manifest = read_manifest(directory)
    if name not in manifest:
        raise CheckpointError(
            f"unknown bundled teacher {name!r}; bundled: {', '.join(sorted(manifest)) or 'none'}"
        )
    entry = manifest[name]
    path = directory / entry["file"]
    if verify and sha256_file(path) != entry["sha256"]:
        raise CheckpointError(f"{path} does not match the SHA-256 in the manifest (corrupt or modified)")
    model, info = load_checkpoint_model(path, entry["arch"])
    info = TeacherInfo(
        name=name,
        arch=entry["arch"],
        num_classes=entry["num_classes"],
        input_shape=tuple(entry["input_shape"]),
        mean=tuple(entry["mean"]),
        std=tuple(entry["std"]),
        classes=list(entry.get("classes", [])),
        fp_top1=entry.get("fp_top1"),
        dataset=entry.get("dataset"),
        sha256=entry["sha256"],
    )
    return model, info


def resolve_teacher(
    ref: str,
    arch: str | None = None,
    input_size: tuple[int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> tuple[nn.Module, TeacherInfo]:
    """``ref`` is a bundled teacher's name or a checkpoint path (which then needs ``arch``)."""
    if ref in read_manifest() and not Path(ref).exists():
        return load_bundled(ref)
    if not Path(ref).exists():
        raise CheckpointError(
            f"{ref!r} is neither a bundled teacher ({', '.join(bundled_names()) or 'none'}) nor a file"
        )
    if arch is None:
        raise CheckpointError("a checkpoint file needs --arch (a registry name such as resnet20)")
    return load_checkpoint_model(ref, arch, input_size, mean, std)
