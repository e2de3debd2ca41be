"""The dilated depthwise conv through polyphase components (dfq/synth/polyphase.py) against the plain conv."""

import pytest
import torch
from torch import nn

from dfq.synth.generators import build_generator
from dfq.synth.lrq import LargeKernelAttention
from dfq.synth.polyphase import dilated_depthwise, polyphasable


def test_one_pixel_by_hand():
    # a single 1 at (4, 4) of a 9x9 image: a dilation-3 3x3 kernel puts tap (i, j) at (4 - 3(i-1), 4 - 3(j-1))
    conv = nn.Conv2d(1, 1, 3, padding=3, dilation=3, groups=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(1.0, 10.0).view(1, 1, 3, 3))
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    out = dilated_depthwise(x, conv)[0, 0]
    expected = torch.zeros(9, 9)
    for i in range(3):
        for j in range(3):
            expected[4 - 3 * (i - 1), 4 - 3 * (j - 1)] = conv.weight[0, 0, i, j]
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "shape,kernel,dilation,bias,channels_last",
    [
        ((2, 3, 9, 9), 3, 3, True, False),  # sizes divisible by d
        ((2, 4, 13, 10), 7, 3, True, True),  # not divisible: components of unequal length
        ((3, 2, 8, 11), 5, 2, False, True),
        ((1, 5, 4, 4), 7, 3, True, False),  # kernel reach beyond the image
    ],
)
def test_same_values_and_gradients_as_the_dilated_conv(shape, kernel, dilation, bias, channels_last):
    torch.manual_seed(0)
    c = shape[1]
    pad = dilation * (kernel - 1) // 2
    conv = nn.Conv2d(c, c, kernel, padding=pad, dilation=dilation, groups=c, bias=bias).double()
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        conv.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    plain, split = dilated_depthwise(x, conv, polyphase=False), dilated_depthwise(x, conv, polyphase=True)
    assert split.shape == plain.shape == shape
    # the result keeps the input's layout (NHWC under speed.channels_last)
    assert split.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    torch.testing.assert_close(split, plain, rtol=0, atol=1e-12)
    g = torch.randn_like(plain)
    params = [x, *conv.parameters()]
    for a, b in zip(
        torch.autograd.grad((plain * g).sum(), params),
        torch.autograd.grad((split * g).sum(), params),
        strict=True,
    ):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 2, 3, padding=1, groups=2),  # not dilated
        nn.Conv2d(2, 2, 3, padding=3, dilation=3),  # not depthwise
        nn.Conv2d(2, 2, 3, padding=2, dilation=3, groups=2),  # not 'same'
        nn.Conv2d(2, 2, 3, stride=2, padding=3, dilation=3, groups=2),
        nn.Conv2d(2, 2, 3, padding=(3, 6), dilation=(3, 6), groups=2),
    ],
)
def test_other_convs_keep_the_plain_conv(conv):
    assert not polyphasable(conv)
    x = torch.randn(1, 2, 7, 7)
    torch.testing.assert_close(dilated_depthwise(x, conv), conv(x), rtol=0, atol=0)


def test_lka_is_polyphasable_and_the_switch_is_not_state():
    lka = LargeKernelAttention(4)
    assert polyphasable(lka.dw_dilated) and lka.polyphase
    assert "polyphase" not in str(list(lka.state_dict()))


@pytest.mark.parametrize("kind", ["gdfq", "cbn"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lrq_generators_give_the_same_images_either_way(kind, channels_last):
    from dfq.speed import set_memory_format

    torch.manual_seed(0)
    split = build_generator(kind, 10, (3, 28, 28), lka=True).double().train()
    plain = build_generator(kind, 10, (3, 28, 28), lka=True, polyphase_dilated=False).double().train()
    plain.load_state_dict(split.state_dict())
    set_memory_format([split, plain], channels_last)
    z, y = torch.randn(6, 100, dtype=torch.float64), torch.arange(6)
    a, b = split(z, y), plain(z, y)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    ga = torch.autograd.grad(a.square().sum(), list(split.parameters()))
    gb = torch.autograd.grad(b.square().sum(), list(plain.parameters()))
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)
