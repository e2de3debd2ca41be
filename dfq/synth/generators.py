"""Generators of the GDFQ family; output shape follows the teacher's input shape.

Both variants start from a (H/4 x W/4) map, upsample twice, and end in ``BatchNorm(affine=False)`` so
that, in train mode, images come out per-channel standardised like a normalised dataset.
``BatchNorm(..., eps=0.8)`` is a DCGAN-tutorial quirk of the reference, kept for parity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dfq.synth.lrq import LargeKernelAttention
from dfq.synth.upconv import upsample_conv


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine, followed by a per-class gamma/beta (GDFQ's ImageNet generator)."""

    def __init__(self, num_classes: int, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, affine=False)
        self.gamma = nn.Embedding(num_classes, num_features)
        self.beta = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.gamma(y)[:, :, None, None] * self.bn(x) + self.beta(y)[:, :, None, None]


class _GeneratorBase(nn.Module):
    def __init__(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int],
        latent_dim: int,
        lka: bool = False,
        center_condition: bool = False,
        fused_upsample: bool = True,
        polyphase_dilated: bool = True,
    ) -> None:
        super().__init__()
        # upsample+conv pairs as one transposed conv (dfq/synth/upconv.py): same map, a plain attribute
        # so checkpoints do not depend on it
        self.fused_upsample = fused_upsample
        self.num_classes, self.image_shape, self.latent_dim = num_classes, tuple(image_shape), latent_dim
        _, h, w = image_shape
        self.init_hw = (math.ceil(h / 4), math.ceil(w / 4))
        self.l1 = nn.Linear(latent_dim, 128 * self.init_hw[0] * self.init_hw[1])
        # LRQ: large-kernel attention after each upsample-conv block
        self.lka1 = LargeKernelAttention(128, polyphase_dilated) if lka else None
        self.lka2 = LargeKernelAttention(64, polyphase_dilated) if lka else None
        # ACQ: an attention-center condition c in [0,1]^2, embedded and added to the latent input
        self.center_fc = nn.Linear(2, latent_dim) if center_condition else None

    def _condition(self, h: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if self.center_fc is None:
            return h
        if c is None:
            raise ValueError("this generator is center-conditioned (ACQ): pass centers c")
        return h + self.center_fc(c)

    def _up_conv(self, x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
        return upsample_conv(x, conv, self.fused_upsample)

    @staticmethod
    def _maybe(block: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        return x if block is None else block(x)

    def _fit(self, img: torch.Tensor) -> torch.Tensor:
        # Sizes not divisible by 4 come out slightly larger; crop to the teacher's input.
        h, w = self.image_shape[1:]
        return img[:, :, :h, :w]

    def sample_inputs(self, n: int, generator: torch.Generator | None = None, device="cpu"):
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        y = torch.randint(0, self.num_classes, (n,), generator=generator, device=device)
        return z, y


class GDFQGenerator(_GeneratorBase):
    """GDFQ's CIFAR generator: ``Embedding(y) * z -> Linear -> BN -> up -> conv... -> Tanh -> BN``."""

    def __init__(
        self, num_classes: int, image_shape: tuple[int, int, int], latent_dim: int = 100, **options
    ) -> None:
        super().__init__(num_classes, image_shape, latent_dim, **options)
        self.label_emb = nn.Embedding(num_classes, latent_dim)
        self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(128))
        self.conv_blocks1 = nn.Sequential(
            nn.Conv2d(128, 128, 3, 1, 1), nn.BatchNorm2d(128, eps=0.8), nn.LeakyReLU(0.2, inplace=True)
        )
        self.conv_blocks2 = nn.Sequential(
            nn.Conv2d(128, 64, 3, 1, 1),
            nn.BatchNorm2d(64, eps=0.8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(64, image_shape[0], 3, 1, 1),
            nn.Tanh(),
            nn.BatchNorm2d(image_shape[0], affine=False),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        out = self.l1(self._condition(self.label_emb(y) * z, c)).view(z.shape[0], 128, *self.init_hw)
        img = self.conv_blocks1[1:](self._up_conv(self.conv_blocks0(out), self.conv_blocks1[0]))
        img = self._maybe(self.lka1, img)
        img = self.conv_blocks2[1:3](self._up_conv(img, self.conv_blocks2[0]))
        img = self._maybe(self.lka2, img)
        return self._fit(self.conv_blocks2[3:](img))


class CBNGenerator(_GeneratorBase):
    """GDFQ's ImageNet generator: no label embedding; class enters through conditional BN."""

    def __init__(
        self, num_classes: int, image_shape: tuple[int, int, int], latent_dim: int = 100, **options
    ) -> None:
        super().__init__(num_classes, image_shape, latent_dim, **options)
        self.bn0 = ConditionalBatchNorm2d(num_classes, 128)
        self.conv1 = nn.Conv2d(128, 128, 3, 1, 1)
        self.bn1 = ConditionalBatchNorm2d(num_classes, 128, eps=0.8)
        self.conv2 = nn.Conv2d(128, 64, 3, 1, 1)
        self.bn2 = ConditionalBatchNorm2d(num_classes, 64, eps=0.8)
        self.conv3 = nn.Conv2d(64, image_shape[0], 3, 1, 1)
        self.bn_out = nn.BatchNorm2d(image_shape[0], affine=False)

    def forward(self, z: torch.Tensor, y: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        out = self.l1(self._condition(z, c)).view(z.shape[0], 128, *self.init_hw)
        img = self._up_conv(self.bn0(out, y), self.conv1)
        img = self._maybe(self.lka1, F.leaky_relu(self.bn1(img, y), 0.2))
        img = self._up_conv(img, self.conv2)
        img = self._maybe(self.lka2, F.leaky_relu(self.bn2(img, y), 0.2))
        return self._fit(self.bn_out(torch.tanh(self.conv3(img))))


GENERATORS = {"gdfq": GDFQGenerator, "cbn": CBNGenerator}


def build_generator(
    kind: str,
    num_classes: int,
    image_shape: tuple[int, int, int],
    latent_dim: int = 100,
    lka: bool = False,
    center_condition: bool = False,
    fused_upsample: bool = True,
    polyphase_dilated: bool = True,
) -> nn.Module:
    try:
        cls = GENERATORS[kind]
    except KeyError:
        raise ValueError(f"unknown generator {kind!r}; known: {', '.join(GENERATORS)}") from None
    return cls(
        num_classes,
        tuple(image_shape),
        latent_dim,
        lka=lka,
        center_condition=center_condition,
        fused_upsample=fused_upsample,
        polyphase_dilated=polyphase_dilated,
    )
