import pytest
import torch

from dfq.synth.generators import build_generator


@pytest.mark.parametrize("kind", ["gdfq", "cbn"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 64, 64), (3, 30, 26)])
def test_output_shape_follows_teacher_input(kind, shape):
    g = build_generator(kind, 10, shape).train()
    z, y = g.sample_inputs(4, torch.Generator().manual_seed(0))
    assert g(z, y).shape == (4, *shape)


@pytest.mark.parametrize("kind", ["gdfq", "cbn"])
def test_label_conditions_the_output(kind):
    torch.manual_seed(0)
    g = build_generator(kind, 10, (1, 28, 28)).train()
    if kind == "cbn":  # conditional BN starts as identity; give classes distinct affine params
        for m in g.modules():
            if hasattr(m, "gamma"):
                torch.nn.init.normal_(m.gamma.weight, 1.0, 0.5)
    z = torch.randn(4, 100)
    a = g(z, torch.tensor([0, 0, 0, 0]))
    b = g(z, torch.tensor([1, 1, 1, 1]))
    assert not torch.allclose(a, b)


def test_final_bn_standardises_in_train_mode():
    g = build_generator("gdfq", 10, (3, 32, 32)).train()
    x = g(torch.randn(64, 100), torch.randint(0, 10, (64,)))
    assert x.mean((0, 2, 3)).abs().max() < 1e-4
    assert (x.var((0, 2, 3), correction=0) - 1).abs().max() < 1e-2


def test_unknown_generator():
    with pytest.raises(ValueError, match="unknown generator"):
        build_generator("vae", 10, (1, 28, 28))
