"""The registry's architecture names, importable without torch.

The API process lists architectures on the upload page and must stay light (importing torchvision
takes seconds and hundreds of MB), so the names live here and ``dfq.models.registry`` builds its
entries from exactly these lists: one source of truth, two import costs.
"""

from __future__ import annotations

CIFAR_DEPTHS = (20, 32, 44, 56)

# torchvision classification models with BatchNorm (generative DFQ needs it) and ReLU/ReLU6
# activations (the GDFQ quantizer sits after those; SiLU/Hardswish nets such as EfficientNet or
# MobileNetV3 would get no activation quantizer at all, so they are left out on purpose).
TORCHVISION_ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "mobilenet_v2",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "mnasnet0_5",
    "mnasnet1_0",
    "regnet_x_400mf",
    "regnet_y_400mf",
)


def cifar_names() -> list[str]:
    return [f"resnet{d}" for d in CIFAR_DEPTHS]


def arch_names() -> list[str]:
    """Every registered architecture name, sorted (what ``--arch`` and the API's ``arch`` accept)."""
    return sorted([*cifar_names(), *TORCHVISION_ARCHS])


def arch_family(name: str) -> str | None:
    """``cifar`` (32x32 inputs by default), ``torchvision`` (224x224) or None for unknown names."""
    if name in cifar_names():
        return "cifar"
    return "torchvision" if name in TORCHVISION_ARCHS else None
