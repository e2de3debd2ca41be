"""``quant.act_mse_weight = "consumer"``: a site's pooled BN range weighted by what its consumer feels."""

import pytest
import torch
from torch import nn

from dfq.models.teachers import load_bundled
from dfq.pipeline import Pipeline
from dfq.quant import quantize
from dfq.quant.bn_ranges import bn_fed_quantizers, bn_mse_range, set_ranges_from_bn, weighted_mse_range
from dfq.quant.consumers import Consumer, channel_weights, sole_consumers
from dfq.spec import JobSpec, QuantSpec


def test_weighted_range_by_hand():
    # 2 bits on [0, alpha * 6]. Channel 0 = [0, 1 x10, 6]: alpha 1 (step 2) rounds the 1s to 0, error
    # 10/12; alpha 0.5 (step 1) keeps them and clips 6 to 3, error 9/12. Channel 1 = [0, 0, 1 x9, 6]: 9/12
    # against 9/12, a tie. So channel 0 alone picks 3, channel 1 alone keeps the widest (6), and equal
    # weights pick 3 (error 19/24 against 18/24).
    a = torch.tensor([[0.0] + [1.0] * 10 + [6.0], [0.0, 0.0] + [1.0] * 9 + [6.0]]).T
    alphas = (1.0, 0.5)
    assert weighted_mse_range(a, 2, torch.tensor([1.0, 0.0]), alphas) == (0.0, 3.0)
    assert weighted_mse_range(a, 2, torch.tensor([0.0, 1.0]), alphas) == (0.0, 6.0)
    assert weighted_mse_range(a, 2, torch.tensor([1.0, 1.0]), alphas) == (0.0, 3.0)
    # weights 1 : 10 toward channel 1: alpha 1 costs (10 + 90) / 12 / 11, alpha 0.5 (9 + 90) / 12 / 11
    assert weighted_mse_range(a, 2, torch.tensor([1.0, 10.0]), alphas) == (0.0, 3.0)


def test_equal_weights_are_the_pooled_rule():
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.1, 0.5, 1.0, 2.0, 0.3, 1.5]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -0.5, 2.0, 0.2, 0.0]))
    from dfq.quant.bn_samples import bn_samples

    a = bn_samples(bn, 0.0, 6.0)
    assert weighted_mse_range(a, 4, torch.ones(6)) == pytest.approx(bn_mse_range(bn, 0.0, 6.0, 4), rel=1e-6)


def test_channel_weights_by_hand():
    conv = nn.Conv2d(2, 2, 1, bias=False)
    bn = nn.BatchNorm2d(2, eps=1.0)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 0.0]]).view(2, 2, 1, 1))
        bn.weight.copy_(torch.tensor([1.0, -2.0]))
        bn.running_var.copy_(torch.tensor([3.0, 0.0]))
    # s = |gamma| / sqrt(var + eps) = (0.5, 2); rows scaled: [0.5, 1], [6, 0]; per input: 0.25 + 36, 1 + 0
    assert channel_weights(Consumer(conv, bn, True), 2).tolist() == [36.25, 1.0]
    assert channel_weights(Consumer(conv, None, True), 2).tolist() == [10.0, 4.0]
    dw = nn.Conv2d(2, 4, (1, 2), groups=2, bias=False)  # depthwise with a channel multiplier of 2
    with torch.no_grad():
        dw.weight.copy_(torch.arange(8.0).view(4, 1, 1, 2))
    # channel 0 feeds outputs 0, 1 (taps 0, 1, 2, 3), channel 1 outputs 2, 3 (taps 4..7)
    assert channel_weights(Consumer(dw, None, True), 2).tolist() == [0 + 1 + 4 + 9, 16 + 25 + 36 + 49]
    assert channel_weights(Consumer(nn.Conv2d(4, 4, 1, groups=2), None, True), 4) is None
    assert channel_weights(Consumer(nn.Linear(8, 3), None, False), 4) is None  # a flattened 2x2 map


class _Net(nn.Module):
    """stem -> ReLU6 -> 1x1 -> BN -> ReLU6 -> mean -> fc; ``twice`` also adds the stem's output to the
    1x1 branch (a second, functional use)."""

    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        self.twice = twice
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU6())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)
        b = self.pw(a)
        if self.twice:
            b = b + a
        return self.fc(b.mean((2, 3)))


def test_sole_consumers_follow_the_graph():
    student = quantize(_Net().eval(), QuantSpec(w_bits=4, a_bits=4, act_clip="bn-mse"))
    found = sole_consumers(student, (3, 8, 8))
    assert set(found) == {"stem.2.1", "pw.2.1"}
    assert found["stem.2.1"] == Consumer(student.pw[0], student.pw[1], True)
    assert found["pw.2.1"] == Consumer(student.fc, None, False)  # through the mean
    twice = quantize(_Net(twice=True).eval(), QuantSpec(w_bits=4, a_bits=4, act_clip="bn-mse"))
    assert set(sole_consumers(twice, (3, 8, 8))) == set()  # stem's output is used twice; the add is no layer


def test_bundled_mobilenet_consumers():
    model, info = load_bundled("mobilenetv2_fmnist")
    student = quantize(model, QuantSpec(w_bits=4, a_bits=4, act_clip="bn-mse"))
    found = sole_consumers(student, info.input_shape)
    assert set(found) == set(bn_fed_quantizers(student, info.input_shape))  # all 35 sites
    assert found["features.18.2.1"] == Consumer(student.classifier[1], None, False)
    project = found["features.3.conv.1.2.1"]
    assert (project.layer, project.bn, project.direct) == (
        student.features[3].conv[2],
        student.features[3].conv[3],
        True,
    )


def test_consumer_weighting_moves_pooled_ranges_only():
    model, info = load_bundled("mobilenetv2_fmnist")
    ranges = {}
    for weighting in ("uniform", "consumer"):
        student = quantize(model, QuantSpec(w_bits=4, a_bits=3, act_clip="bn-mse"))
        set_ranges_from_bn(student, info.input_shape, weighting)
        ranges[weighting] = {
            n: tuple(float(v) for v in m.range())
            for n, m in student.named_modules()
            if n in bn_fed_quantizers(student, info.input_shape)
        }
    moved = [n for n in ranges["uniform"] if ranges["uniform"][n] != ranges["consumer"][n]]
    assert len(moved) >= 10  # most of the 35 pooled ranges change; every one stays a valid [0, hi]
    assert all(lo == 0.0 and 0 < hi <= 6.0 for lo, hi in ranges["consumer"].values())


def test_a_job_weights_at_start_and_the_spec_guards_it(tiny_spec):
    model, info = load_bundled("mobilenetv2_fmnist")
    quant = {"act_clip": "bn-mse", "act_mse_weight": "consumer"}
    spec = tiny_spec.model_copy(update={"quant": tiny_spec.quant.model_copy(update=quant)})
    pipe = Pipeline(spec, model, 10, info.input_shape, "cpu")
    reference = quantize(model, spec.quant)
    set_ranges_from_bn(reference, info.input_shape, "consumer")
    site = "features.3.conv.1.2.1"
    got = dict(pipe.student.named_modules())[site].range()
    assert [float(v) for v in got] == [float(v) for v in dict(reference.named_modules())[site].range()]
    assert JobSpec.model_validate(spec.canonical()).quant.act_mse_weight == "consumer"
    assert JobSpec.model_validate({}).quant.act_mse_weight == "uniform"
    with pytest.raises(ValueError, match="act_mse_weight needs"):
        JobSpec.model_validate({"quant": {"act_mse_weight": "consumer"}})


def test_equalising_leaves_the_other_sites_weighted_as_without_it():
    # one pass: the consumer weights are read before any BN is rescaled, so the 18 sites not equalised
    # keep the ranges they get without equalisation
    model, info = load_bundled("mobilenetv2_fmnist")
    ranges, rules = {}, {}
    for equalize in (False, True):
        student = quantize(model, QuantSpec(w_bits=4, a_bits=3, act_clip="bn-mse"))
        rules[equalize] = set_ranges_from_bn(student, info.input_shape, "consumer", equalize)
        ranges[equalize] = {n: m.range() for n, m in student.named_modules() if n in rules[equalize]}
    others = [n for n, rule in rules[True].items() if rule != "equalised"]
    assert len(others) == 18 and {rules[True][n] for n in others} == {"weighted"}
    assert all(ranges[True][n] == ranges[False][n] for n in others)
    assert rules[False] == {n: "weighted" for n in rules[False]}
