"""Training the bundled Fashion-MNIST teachers (there are no pretrained weights offline).

Seeded and recorded in the manifest (recipe, SHA-256, accuracy), so anyone can re-train a teacher and
check they got the same file they would have downloaded elsewhere.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dfq.data import FASHION_MNIST_CLASSES, Preprocess, fashion_mnist
from dfq.evaluate import predict, top1
from dfq.models.checkpoint import save_state_dict
from dfq.models.registry import build_model
from dfq.models.teachers import FMNIST_MEAN, FMNIST_STD, read_manifest, sha256_file, teachers_dir

RECIPES: dict[str, dict] = {
    # A CIFAR-style ResNet-20 at the native 28x28 grey resolution.
    "resnet20_fmnist": {"arch": "resnet20", "input_shape": [1, 28, 28], "epochs": 5, "lr": 0.1, "wd": 5e-4},
    # Unmodified torchvision models need larger, 3-channel inputs: 64x64, grey replicated.
    "resnet18_fmnist": {"arch": "resnet18", "input_shape": [3, 64, 64], "epochs": 4, "lr": 0.1, "wd": 5e-4},
    "mobilenetv2_fmnist": {
        "arch": "mobilenet_v2",
        "input_shape": [3, 64, 64],
        "epochs": 4,
        "lr": 0.1,
        "wd": 1e-4,
    },
}
HALF_PRECISION_MIN_NUMEL = 65536  # large weight tensors are stored as fp16 to keep the repository small


def _augment(x: torch.Tensor, gen: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random +-shift pixel translation (zero padding) and horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def storable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k: (v.half() if v.is_floating_point() and v.numel() >= HALF_PRECISION_MIN_NUMEL else v)
        for k, v in state.items()
    }


def train_teacher(
    name: str,
    out_dir: Path | None = None,
    epochs: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Train one bundled teacher, save it as safetensors and update ``manifest.json``."""
    recipe = dict(RECIPES[name])
    if epochs is not None:
        recipe["epochs"] = epochs
    out_dir = out_dir or teachers_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    c = recipe["input_shape"][0]
    pre = Preprocess(tuple(recipe["input_shape"]), (FMNIST_MEAN,) * c, (FMNIST_STD,) * c)
    train, test = fashion_mnist("train"), fashion_mnist("test")
    model = build_model(recipe["arch"], 10, c).train()
    opt = torch.optim.SGD(
        model.parameters(), lr=recipe["lr"], momentum=0.9, nesterov=True, weight_decay=recipe["wd"]
    )
    steps = len(train) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe["lr"], total_steps=recipe["epochs"] * steps)
    t0 = time.time()
    for epoch in range(recipe["epochs"]):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        bar = tqdm(range(steps), desc=f"{name} epoch {epoch + 1}/{recipe['epochs']}", leave=False)
        for i in bar:
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x = pre(_augment(train.images[idx], gen))
            loss = F.cross_entropy(model(x), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if i % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        acc = top1(predict(model, test.images[:2000], pre), test.labels[:2000])
        log(f"{name} epoch {epoch + 1}: loss {loss.item():.3f}, test[:2000] top-1 {acc:.2f}")
    model.eval()
    path = out_dir / f"{name}.safetensors"
    save_state_dict(storable(model.state_dict()), path, metadata={"arch": recipe["arch"], "name": name})
    # Accuracy of the model exactly as stored (fp16 rounding included).
    from dfq.models.teachers import load_checkpoint_model

    stored, _ = load_checkpoint_model(path, recipe["arch"], tuple(recipe["input_shape"][1:]))
    pred = predict(stored, test.images, pre)
    entry = {
        "file": path.name,
        "sha256": sha256_file(path),
        "arch": recipe["arch"],
        "num_classes": 10,
        "input_shape": recipe["input_shape"],
        "mean": list(pre.mean),
        "std": list(pre.std),
        "preprocess": "28x28 grey in [0,1] -> bilinear resize to input size -> replicate channels -> (x-mean)/std",
        "classes": list(FASHION_MNIST_CLASSES),
        "dataset": "fashion-mnist",
        "fp_top1": round(top1(pred, test.labels), 2),
        "fp_top1_test2000": round(top1(pred[:2000], test.labels[:2000]), 2),
        "train": {
            **recipe,
            "batch_size": batch_size,
            "seed": seed,
            "optimizer": "SGD nesterov 0.9, OneCycle",
            "augment": "2-pixel shifts, horizontal flips",
            "wall_s": round(time.time() - t0, 1),
            "torch": torch.__version__,
        },
        "storage": f"float tensors with >= {HALF_PRECISION_MIN_NUMEL} elements stored as fp16",
    }
    manifest = read_manifest(out_dir)
    manifest[name] = entry
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log(f"{name}: full test top-1 {entry['fp_top1']:.2f}, saved {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return entry
