"""``quant.act_equalize = "depthwise"``: per-channel activation ranges folded into depthwise filters."""

import pytest
import torch
from torch import nn

from dfq.models.teachers import load_bundled
from dfq.pipeline import Pipeline
from dfq.quant import ActQuant, quantize
from dfq.quant.adaround import adaround, capture
from dfq.quant.bn_ranges import set_ranges_from_bn
from dfq.quant.consumers import sole_consumers
from dfq.quant.equalize import channel_mse_upper, depthwise_consumer
from dfq.quant.modules import FLOAT_BITS, QuantLayer, float_twin
from dfq.spec import JobSpec, QuantSpec


def test_channel_ranges_by_hand():
    # 2 bits, grid {0, hi/3, 2hi/3, hi}. Channel 0 = [0, 1 x10, 6]: alpha 1 (step 2) rounds every 1 to 0
    # (half to even): squared error 10; alpha 0.5 (hi 3, step 1) keeps the 1s and clips 6 to 3: error 9,
    # so 3. Channel 1 = [0, 0, 1 x9, 6]: 9 against 9, a tie, and the wider range (first alpha) stays: 6.
    a = torch.tensor([[0.0] + [1.0] * 10 + [6.0], [0.0, 0.0] + [1.0] * 9 + [6.0]]).T
    assert channel_mse_upper(a, 2, (1.0, 0.5)).tolist() == [3.0, 6.0]


class _Net(nn.Module):
    """stem -> ReLU6 -> depthwise -> ReLU6 -> 1x1; ``shortcut`` also adds the stem's output to the
    depthwise branch, a second (functional) use of the stem's activations."""

    def __init__(self, shortcut: bool = False) -> None:
        super().__init__()
        self.shortcut = shortcut
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(4, 5, 1, bias=False), nn.BatchNorm2d(5))
        self.fc = nn.Linear(5, 3)
        with torch.no_grad():  # one wide channel, one that often passes 6, two narrow ones
            self.stem[1].weight.copy_(torch.tensor([2.0, 3.0, 0.05, -0.2]))
            self.stem[1].bias.copy_(torch.tensor([1.0, 5.0, 0.1, 0.3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)
        b = self.dw(a)
        if self.shortcut:
            b = b + a
        return self.fc(self.pw(b).mean((2, 3)))


def _student(net: nn.Module, bits: str = "W4A3", equalize: bool = False) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    student = quantize(net.eval(), QuantSpec(**JobSpec.model_validate({"bits": bits}).quant.model_dump()))
    return student, set_ranges_from_bn(student, (3, 8, 8), equalize=equalize)


def _equalised(rules: dict) -> list[str]:
    return [name for name, rule in rules.items() if rule == "equalised"]


def test_only_a_sole_depthwise_consumer_counts():
    (plain, _), (shortcut, rules) = _student(_Net()), _student(_Net(shortcut=True), equalize=True)
    found = {n: depthwise_consumer(c) for n, c in sole_consumers(plain, (3, 8, 8)).items()}
    assert [n for n, conv in found.items() if conv is not None] == ["stem.2.1"]  # not dw's: a 1x1 uses it
    assert found["stem.2.1"] is plain.dw[0]
    assert all(depthwise_consumer(c) is None for c in sole_consumers(shortcut, (3, 8, 8)).values())
    assert _equalised(rules) == []  # the add is a second use
    assert rules == {"dw.2.1": "pooled", "stem.2.1": "pooled"}


def _per_channel_quant(q: ActQuant, hi: torch.Tensor) -> None:
    """Replace a quantizer with per-channel ranges [0, hi_c] on the same k-bit grid (test reference)."""
    step = (hi / (2**q.bits - 1)).view(1, -1, 1, 1)
    top = hi.view(1, -1, 1, 1)
    q.forward = lambda x: torch.round(torch.minimum(x.clamp_min(0), top) / step) * step


def test_equalised_student_is_per_channel_activation_quantization():
    reference, _ = _student(_Net())
    student, rules = _student(_Net(), equalize=True)
    assert rules == {"dw.2.1": "pooled", "stem.2.1": "equalised"}
    assert reference.dw[2][1].range() == student.dw[2][1].range()  # the other site as without it
    e = reference.stem[1].weight / student.stem[1].weight  # the rescale, read back from the BN
    assert (e > 0).all() and (e <= 1).all() and e.max() == 1 and e.min() < 0.1
    q = student.stem[2][1]
    lo, hi = (v.item() for v in q.range())
    assert lo == 0.0 and 0 < hi <= 6.0 and q.fixed
    # the depthwise filters' codes did not move: their dequantized values scaled by e exactly
    torch.testing.assert_close(
        student.dw[0].quantized_weight(), reference.dw[0].quantized_weight() * e.view(-1, 1, 1, 1)
    )
    # the whole network equals the unscaled one with channel c quantized on its own [0, e_c * hi]
    _per_channel_quant(reference.stem[2][1], e * hi)
    x = torch.randn(16, 3, 8, 8) * 2
    torch.testing.assert_close(student(x), reference(x), rtol=1e-5, atol=1e-5)
    # and the ReLU6 case was exercised: channel 1 (beta 5) passes 6 on some pixels before the rescale
    assert (reference.stem[1](reference.stem[0](x))[:, 1] > 6).any()


def test_qdrop_float_inputs_are_in_the_equalised_students_units():
    """QDrop mixes float inputs into the quantized ones element by element, so both must be in one unit.
    After equalisation the depthwise conv's input is the teacher's divided by e per channel (below the
    ReLU6 clamp); the student's float twin gives that, the teacher does not."""
    net = _Net().eval()
    student, rules = _student(net, equalize=True)
    assert _equalised(rules) == ["stem.2.1"]
    e = (net.stem[1].weight / student.stem[1].weight).view(1, -1, 1, 1)
    x = torch.randn(64, 3, 8, 8) * 2
    twin = float_twin(student)
    assert all(m.w_bits == FLOAT_BITS for m in twin.modules() if isinstance(m, QuantLayer))
    assert student.dw[0].w_bits == 4  # the student itself keeps its quantizers
    (quantized,) = capture(student, student.dw[0], x, 32, "input")
    (in_twin,) = capture(twin, twin.dw[0], x, 32, "input")
    (in_teacher,) = capture(net, net.dw[0], x, 32, "input")
    below = in_teacher < 6 * e  # where the rescaled ReLU6 does not clamp
    assert below.float().mean() > 0.5
    torch.testing.assert_close((in_twin * e)[below], in_teacher[below], rtol=1e-5, atol=1e-6)
    assert (quantized - in_twin).abs().mean() < 0.5 * (quantized - in_teacher).abs().mean()
    # and adaround takes its float inputs from the twin when given one: other inputs, other codes
    codes = {}
    for source in ("teacher", "twin"):
        s, _ = _student(net, equalize=True)
        adaround(
            s, net, x, iters=100, lr=1e-2, drop=0.5, float_model=float_twin(s) if source == "twin" else None
        )
        codes[source] = s.dw[0].weight.detach().clone()
    assert not torch.equal(codes["teacher"], codes["twin"])


def test_bundled_mobilenet_sites_and_resnets_have_none():
    model, info = load_bundled("mobilenetv2_fmnist")
    student = quantize(model, QuantSpec(w_bits=4, a_bits=4, act_clip="bn-mse"))
    rules = set_ranges_from_bn(student, info.input_shape, equalize=True)
    # MobileNetV2: the stem and the 16 expansions (blocks 2-17) feed a depthwise conv; block 1 has none
    assert (len(_equalised(rules)), len(rules)) == (17, 35)
    model, info = load_bundled("resnet20_fmnist")
    student = quantize(model, QuantSpec(w_bits=4, a_bits=4, act_clip="bn-mse"))
    assert _equalised(set_ranges_from_bn(student, info.input_shape, equalize=True)) == []


def test_a_job_equalises_at_start(tiny_spec):
    model, info = load_bundled("mobilenetv2_fmnist")
    quant = {"act_clip": "bn-mse", "act_equalize": "depthwise"}
    spec = tiny_spec.model_copy(update={"quant": tiny_spec.quant.model_copy(update=quant)})
    pipe = Pipeline(spec, model, 10, info.input_shape, "cpu")
    bn = pipe.student.features[1].conv[0][1]  # block 1's depthwise BN: a 1x1 consumer, untouched
    assert torch.equal(bn.weight, model.features[1].conv[0][1].weight)
    stem_bn = pipe.student.features[0][1]
    assert not torch.equal(stem_bn.weight, model.features[0][1].weight)
    assert JobSpec.model_validate(spec.canonical()).quant.act_equalize == "depthwise"


def test_a_job_rounds_an_equalised_student_against_its_twins_inputs(tiny_spec, monkeypatch):
    import dfq.pipeline

    twins = []

    def recorded(model: nn.Module) -> nn.Module:  # the real float_twin, its result kept for the asserts
        twins.append(float_twin(model))
        return twins[-1]

    monkeypatch.setattr(dfq.pipeline, "float_twin", recorded)
    model, info = load_bundled("mobilenetv2_fmnist")
    quant = {"act_clip": "bn-mse", "act_equalize": "depthwise", "weight_round": "adaround"}
    quant |= {"round_drop": 0.5, "round_iters": 2, "round_images": 32}
    spec = tiny_spec.model_copy(update={"quant": tiny_spec.quant.model_copy(update=quant)})
    pipe = Pipeline(spec, model, 10, info.input_shape, "cpu")
    pipe.run()
    assert len(pipe.history["rounded"]) == 53 and len(twins) == 1
    stem_bn = twins[0].features[0][1]  # rescaled, as the student's, not the teacher's
    assert torch.equal(stem_bn.weight, pipe.student.features[0][1].weight)
    assert not torch.equal(stem_bn.weight, model.features[0][1].weight)
    assert all(m.bits == FLOAT_BITS for m in twins[0].modules() if isinstance(m, ActQuant))
    assert pipe.student.features[0][2][1].bits == 4  # a copy: the student keeps its quantizers


def test_spec_refuses_equalising_without_bn_ranges_or_per_channel_weights():
    assert JobSpec.model_validate({}).quant.act_equalize == "none"
    with pytest.raises(ValueError, match="act_clip 'bn-mse'"):
        JobSpec.model_validate({"quant": {"act_equalize": "depthwise"}})
    with pytest.raises(ValueError, match="per-channel"):
        JobSpec.model_validate(
            {"quant": {"act_clip": "bn-mse", "act_equalize": "depthwise", "per_channel": False}}
        )
    with pytest.raises(ValueError, match="act_equalize"):
        JobSpec.model_validate({"quant": {"act_clip": "bn-mse", "act_equalize": "all"}})


class _TwoBranches(nn.Module):
    """The stem's BN feeds two ReLU6 sites: one read by a depthwise conv only, one by a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.act_a, self.act_b = nn.ReLU6(), nn.ReLU6()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.stem[1].weight.copy_(torch.tensor([2.0, 3.0, 0.05, -0.2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)
        return (self.dw(self.act_a(a)) + self.pw(self.act_b(a))).mean((2, 3))


def test_a_bn_that_feeds_two_sites_is_not_rescaled():
    # rescaling the stem's BN for the depthwise branch would also scale what the 1x1 branch reads
    student, rules = _student(_TwoBranches(), equalize=True)
    assert list(rules.values()) == ["pooled", "pooled"]
    found = {n: depthwise_consumer(c) for n, c in sole_consumers(student, (3, 8, 8)).items()}
    assert [n for n, conv in found.items() if conv is not None] == [next(iter(rules))]  # else eligible
    assert torch.equal(student.stem[1].weight, torch.tensor([2.0, 3.0, 0.05, -0.2]))
