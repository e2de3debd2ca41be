"""Hostile and broken checkpoint files, built on the spot, for the intake tests and the benchmark.

Each builder writes one file and the table says what the uploader must be told (a regex on the
rejection reason). The pickle builders plant ``os.system("touch MARKER")``: the marker existing
afterwards would mean an upload ran code on the server.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.modules.batchnorm
from safetensors.torch import save_file

from dfq.models.registry import build_model


class RunsCode:
    """Unpickling this runs a shell command (what a hostile "checkpoint" would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _r20_state(num_classes: int = 10, in_channels: int = 1) -> dict[str, torch.Tensor]:
    return {
        k: v.contiguous() for k, v in build_model("resnet20", num_classes, in_channels).state_dict().items()
    }


def zip_pickle_rce(path: Path, marker: Path) -> None:
    torch.save({"conv1.weight": torch.zeros(1), "evil": RunsCode(marker)}, path)


def legacy_pickle_rce(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"conv1.weight": RunsCode(marker)}))


def zip_bomb(path: Path, marker: Path, expanded: int = 256 * 2**20) -> None:
    """A torch-looking archive whose one entry deflates to ``expanded`` bytes of zeros."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": 0}))
        with zf.open("archive/data/0", "w", force_zip64=True) as f:
            chunk = b"\0" * 2**20
            for _ in range(expanded // len(chunk)):
                f.write(chunk)


def truncated(path: Path, marker: Path) -> None:
    full = path.with_suffix(".full")
    save_file(_r20_state(), str(full))
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) * 2 // 3])


def random_bytes(path: Path, marker: Path) -> None:
    rng = random.Random(6)
    data = bytearray(rng.randbytes(1 << 16))
    data[0] = 0x07  # not 'P' (zip), 0x80 (pickle) or a plausible safetensors length
    path.write_bytes(bytes(data))


def forged_header_length(path: Path, marker: Path) -> None:
    path.write_bytes((10**12).to_bytes(8, "little") + b'{"w":' + b" " * 64)


def forged_header_shapes(path: Path, marker: Path) -> None:
    """A well-formed header promising a 40 GB tensor in a file of a few hundred bytes."""
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [100_000, 100_000], "data_offsets": [0, 40_000_000_000]}}
    ).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)


def wrong_architecture(path: Path, marker: Path) -> None:
    save_file(dict(build_model("resnet32", 10, 1).state_dict()), str(path))


def without_batchnorm(path: Path, marker: Path) -> None:
    """A ResNet-20 whose BatchNorm layers were fused away or never existed: only conv/fc weights."""
    model = build_model("resnet20", 10, 1)
    bn = {f"{n}." for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(bn))}
    save_file(state, str(path))


def torchscript(path: Path, marker: Path) -> None:
    torch.jit.script(build_model("resnet20", 10, 1)).save(str(path))


def full_module_pickle(path: Path, marker: Path) -> None:
    torch.save(build_model("resnet20", 10, 1), path)


# name -> (builder, regex the rejection reason must match); uploaded as arch resnet20
HOSTILE: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "zip_pickle_rce": (zip_pickle_rce, "could not be loaded safely"),
    "legacy_pickle_rce": (legacy_pickle_rce, "legacy pickle"),
    "zip_bomb": (zip_bomb, "zip bomb"),
    "truncated": (truncated, "not a valid safetensors"),
    "random_bytes": (random_bytes, "not a checkpoint"),
    "forged_header_length": (forged_header_length, "header length exceeds"),
    "forged_header_shapes": (forged_header_shapes, "not a valid safetensors"),
    "wrong_architecture": (wrong_architecture, "does not match architecture 'resnet20'"),
    "without_batchnorm": (without_batchnorm, "no BatchNorm"),
    "torchscript": (torchscript, "TorchScript"),
    "full_module_pickle": (full_module_pickle, "could not be loaded safely"),
}


def build_all(directory: Path, marker: Path) -> dict[str, Path]:
    """Every hostile file under ``directory``; returns name -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (build, _) in HOSTILE.items():
        paths[name] = directory / f"{name}.bin"
        build(paths[name], marker)
    return paths
