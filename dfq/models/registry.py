"""Architecture registry: a name -> a freshly initialised model.

Names are what users type (CLI ``--arch``, the API's ``arch`` field), so they are stable strings:
the CIFAR-style ResNets of the GDFQ literature plus torchvision's classification models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torchvision
from torch import nn

from dfq.models.cifar_resnet import CifarResNet
from dfq.models.names import CIFAR_DEPTHS, TORCHVISION_ARCHS


@dataclass(frozen=True)
class ArchInfo:
    """What a registry entry needs besides its builder: the input it expects by default."""

    build: Callable[[int, int], nn.Module]  # (num_classes, in_channels) -> model
    default_input: tuple[int, int, int]
    family: str


def _cifar(depth: int) -> Callable[[int, int], nn.Module]:
    return lambda num_classes, in_channels: CifarResNet(depth, num_classes, in_channels)


def _torchvision(name: str) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, in_channels: int) -> nn.Module:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        if in_channels != 3:
            _replace_first_conv(model, in_channels)
        return model

    return build


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """torchvision models hard-code 3 input channels; swap the stem conv for other channel counts."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    child.groups if child.groups == 1 else in_channels,
                    child.bias is not None,
                )
                setattr(parent, name, new)
                return


ARCHS: dict[str, ArchInfo] = {
    **{f"resnet{d}": ArchInfo(_cifar(d), (3, 32, 32), "cifar") for d in CIFAR_DEPTHS},
    **{name: ArchInfo(_torchvision(name), (3, 224, 224), "torchvision") for name in TORCHVISION_ARCHS},
}


class UnknownArchitecture(ValueError):
    pass


def arch_names() -> list[str]:
    return sorted(ARCHS)


def get_arch(name: str) -> ArchInfo:
    try:
        return ARCHS[name]
    except KeyError:
        raise UnknownArchitecture(
            f"unknown architecture {name!r}; known: {', '.join(arch_names())}"
        ) from None


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A randomly initialised model of a registered architecture, in eval mode."""
    model = get_arch(name).build(num_classes, in_channels)
    return model.eval()
