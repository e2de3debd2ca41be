"""The fused upsample+conv (dfq/synth/upconv.py) against the plain ``conv(interpolate(x, 2))`` pair."""

import pytest
import torch
from torch import nn

from dfq.synth.generators import build_generator
from dfq.synth.upconv import fusable, transposed_kernel, upsample_conv


def test_one_pixel_by_hand():
    # one input pixel of value 2 -> a 2x2 block of 2s; each output sums the kernel taps over that block
    conv = nn.Conv2d(1, 1, 3, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(1.0, 10.0).view(1, 1, 3, 3))  # rows (1 2 3) (4 5 6) (7 8 9)
    out = upsample_conv(torch.full((1, 1, 1, 1), 2.0), conv, fused=True)
    expected = 2 * torch.tensor([[5 + 6 + 8 + 9, 4 + 5 + 7 + 8], [2 + 3 + 5 + 6, 1 + 2 + 4 + 5]])
    assert torch.equal(out[0, 0], expected.float())


@pytest.mark.parametrize(
    "shape,out_ch,bias,channels_last",
    [((2, 3, 5, 5), 4, True, False), ((3, 6, 4, 7), 5, False, False), ((2, 8, 6, 6), 8, True, True)],
)
def test_same_values_and_gradients_as_the_plain_pair(shape, out_ch, bias, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], out_ch, 3, 1, 1, bias=bias).double()
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        conv.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    plain, fused = upsample_conv(x, conv, fused=False), upsample_conv(x, conv, fused=True)
    assert fused.shape == plain.shape == (shape[0], out_ch, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-12)
    g = torch.randn_like(plain)
    params = [x, *conv.parameters()]
    grads_plain = torch.autograd.grad((plain * g).sum(), params)
    grads_fused = torch.autograd.grad((fused * g).sum(), params)
    for a, b in zip(grads_plain, grads_fused, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)


def test_transposed_kernel_folds_each_axis():
    w = torch.randn(2, 3, 3, 3)
    k = transposed_kernel(w)
    assert k.shape == (3, 2, 4, 4)
    # corner taps are single weights, the middle ones sums of two per axis
    assert torch.equal(k[:, :, 0, 0], w[:, :, 2, 2].T)
    torch.testing.assert_close(
        k[:, :, 1, 2], (w[:, :, 1, 0] + w[:, :, 1, 1] + w[:, :, 2, 0] + w[:, :, 2, 1]).T
    )


@pytest.mark.parametrize(
    "conv", [nn.Conv2d(2, 2, 5, 1, 2), nn.Conv2d(2, 2, 3, 2, 1), nn.Conv2d(2, 2, 3, 1, 1, groups=2)]
)
def test_other_convs_keep_the_plain_pair(conv):
    assert not fusable(conv)
    x = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(upsample_conv(x, conv, fused=True), upsample_conv(x, conv, fused=False))


@pytest.mark.parametrize("kind", ["gdfq", "cbn"])
@pytest.mark.parametrize("options", [{}, {"lka": True}, {"center_condition": True}])
def test_generators_give_the_same_images_either_way(kind, options):
    torch.manual_seed(0)
    fused = build_generator(kind, 10, (3, 30, 30), **options).double().train()
    plain = build_generator(kind, 10, (3, 30, 30), fused_upsample=False, **options).double().train()
    plain.load_state_dict(fused.state_dict())  # the switch is not part of the state
    z, y = torch.randn(8, 100, dtype=torch.float64), torch.arange(8)
    c = torch.rand(8, 2, dtype=torch.float64) if options.get("center_condition") else None
    torch.testing.assert_close(fused(z, y, c), plain(z, y, c), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["gdfq", "cbn"])
@pytest.mark.parametrize("fused_upsample", [True, False])
def test_nhwc_weights_keep_the_generator_nhwc_with_the_same_images(kind, fused_upsample):
    """With ``speed.channels_last`` every upsample block runs NHWC (the first feature map is a view of
    a Linear's output, NCHW): a block left NCHW makes the last conv convert layouts forward and back."""
    from dfq.speed import set_memory_format

    torch.manual_seed(0)
    nchw = build_generator(kind, 10, (3, 16, 16), fused_upsample=fused_upsample).double().train()
    nhwc = build_generator(kind, 10, (3, 16, 16), fused_upsample=fused_upsample).double().train()
    nhwc.load_state_dict(nchw.state_dict())
    set_memory_format([nhwc], True)
    layouts = []
    for m in nhwc.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda m, i, o: layouts.append(i[0].is_contiguous()))
    z, y = torch.randn(4, 100, dtype=torch.float64), torch.arange(4)
    torch.testing.assert_close(nhwc(z, y), nchw(z, y), rtol=0, atol=1e-10)
    # every conv past the upsample ones sees an NHWC (hence not NCHW-contiguous) 64- or 128-channel input
    assert layouts and not any(layouts)
