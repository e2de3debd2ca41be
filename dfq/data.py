"""Labelled image sets for training bundled teachers and measuring accuracy.

The quantizer itself never sees real data; these sets exist to tell users how good the result is.
All sets come back as float tensors already in the teacher's input space (resized, channel-replicated
and normalised as the teacher's manifest says), so evaluation code needs no transforms.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def fashion_mnist_dir() -> Path:
    """Debian's install path, unless ``DFQ_FASHION_MNIST_DIR`` names a copy (a machine without the
    package, e.g. a lent GPU machine that receives the files with the working tree)."""
    env = os.environ.get("DFQ_FASHION_MNIST_DIR")
    return Path(env) if env else FASHION_MNIST_DIR


FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Preprocess:
    """How raw [0, 1] images become a teacher's input; stored in the teacher manifest."""

    input_shape: tuple[int, int, int]  # C, H, W the model takes
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: N x C' x H' x W' floats in [0, 1] -> N x C x H x W normalised."""
        c, h, w = self.input_shape
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        if x.shape[1] != c:
            if x.shape[1] != 1:
                raise DataError(f"cannot map {x.shape[1]} image channels to the model's {c}")
            x = x.expand(-1, c, -1, -1)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()


@dataclass
class LabelledSet:
    images: torch.Tensor  # N x C x H x W in [0, 1], not yet preprocessed
    labels: torch.Tensor  # N, int64
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None) -> LabelledSet:
        """The first n images: a fixed slice, so repeated measurements compare like with like."""
        if n is None or n >= len(self):
            return self
        return LabelledSet(self.images[:n], self.labels[:n], f"{self.name}[:{n}]")


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def fashion_mnist(split: str = "test", root: Path | None = None) -> LabelledSet:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (no download)."""
    root = fashion_mnist_dir() if root is None else root
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.exists():
        raise DataError(
            f"Fashion-MNIST not found at {root}; install it with: apt-get install -y dataset-fashion-mnist"
        )
    images = _read_idx(img_path, 16).reshape(-1, 1, 28, 28)
    labels = _read_idx(lbl_path, 8).astype(np.int64)
    x = torch.from_numpy(images.copy()).float().div_(255.0)
    return LabelledSet(x, torch.from_numpy(labels), f"fashion-mnist-{split}")


def npz_set(path: str | Path) -> LabelledSet:
    """``.npz`` with ``x`` (N,H,W | N,C,H,W | N,H,W,C; uint8 or float in [0,1]) and ``y`` (N)."""
    with np.load(path, allow_pickle=False) as data:
        if "x" not in data or "y" not in data:
            raise DataError(f"{path}: an .npz evaluation set needs arrays 'x' and 'y'")
        x, y = data["x"], data["y"]
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or len(x) != len(y):
        raise DataError(f"{path}: expected x of N images and y of N labels, got {x.shape} and {y.shape}")
    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    if x.dtype == np.uint8:
        t = t / 255.0
    return LabelledSet(t, torch.from_numpy(y.astype(np.int64)), Path(path).name)


def image_folder(path: str | Path, size: tuple[int, int]) -> LabelledSet:
    """torchvision ``ImageFolder`` layout (one folder per class, sorted names -> class indices)."""
    from torchvision import datasets, transforms

    ds = datasets.ImageFolder(
        str(path), transform=transforms.Compose([transforms.Resize(size), transforms.ToTensor()])
    )
    if len(ds) == 0:
        raise DataError(f"{path}: no images found")
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return LabelledSet(torch.stack(xs), torch.tensor(ys), Path(path).name)


def load_eval_set(ref: str, input_shape: tuple[int, int, int], limit: int | None = None) -> LabelledSet:
    """Resolve an evaluation-set reference: ``fashion-mnist`` (test split), ``fashion-mnist-train``,
    a ``.npz`` file or an ImageFolder directory."""
    if ref in ("fashion-mnist", "fashion-mnist-test"):
        ds = fashion_mnist("test")
    elif ref == "fashion-mnist-train":
        ds = fashion_mnist("train")
    elif ref.endswith(".npz"):
        ds = npz_set(ref)
    elif Path(ref).is_dir():
        ds = image_folder(ref, input_shape[1:])
    else:
        raise DataError(
            f"unknown evaluation set {ref!r}: use 'fashion-mnist', a .npz file or an ImageFolder directory"
        )
    return ds.subset(limit)
