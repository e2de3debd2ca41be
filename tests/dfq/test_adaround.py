"""``quant.weight_round = "adaround"``: learnt floor/ceil rounding (dfq/quant/adaround.py)."""

import math

import pytest
import torch
from torch import nn

from dfq.data import LabelledSet
from dfq.models.registry import build_model
from dfq.pipeline import Cancelled, Event, Pipeline
from dfq.quant import quantize
from dfq.quant.adaround import (
    SoftRounding,
    adaround,
    beta_at,
    capture,
    capture_bytes,
    drop_quantization,
    reconstruct_unit,
    rectified_sigmoid,
    rounding_regularizer,
    rounding_units,
)
from dfq.quant.consumers import sole_bn_after
from dfq.quant.modules import ActQuant, QuantConv2d, QuantLinear
from dfq.quant.quantizer import quantize_to_int
from dfq.spec import JobSpec, QuantSpec
from dfq.validate import SpecError, validate_for_teacher
from tests.dfq.conftest import calibrate


def test_rectified_sigmoid_by_hand():
    # sigmoid(0) = 1/2 -> 1/2 * 1.2 - 0.1 = 0.5; sigmoid(ln 3) = 3/4 -> 0.8; far out it is clipped to 0 / 1
    got = rectified_sigmoid(torch.tensor([0.0, math.log(3), 20.0, -20.0]))
    assert got.tolist() == pytest.approx([0.5, 0.8, 1.0, 0.0])


def test_regularizer_by_hand():
    # 1 - |2h - 1|^2 for h = 0, 0.5, 1, 0.25: 0 + 1 + 0 + (1 - 0.25) = 1.75
    assert float(rounding_regularizer(torch.tensor([0.0, 0.5, 1.0, 0.25]), 2.0)) == pytest.approx(1.75)


def test_beta_schedule():
    # off for the first 20%, then 20 falling linearly to 2 at the end (BRECQ's LinearTempDecay)
    assert beta_at(19, 100) is None
    assert beta_at(20, 100) == pytest.approx(20.0)
    assert beta_at(60, 100) == pytest.approx(11.0)
    assert beta_at(100, 100) == pytest.approx(2.0)


def _layer(bits: int = 4, per_channel: bool = True) -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.from_float(nn.Linear(16, 6), bits, per_channel)


@pytest.mark.parametrize("per_channel", [True, False])
def test_soft_rounding_starts_at_the_weight_and_hard_codes_are_floor_or_ceil(per_channel):
    layer = _layer(per_channel=per_channel)
    soft = SoftRounding.of(layer)
    step = 1 / soft.scale.max()
    # h(V) starts at the fractional part (clamped to [1e-4, 1 - 1e-4]), so a free soft weight is the
    # weight; the fixed ones (each channel's min and max) sit on their nearest grid point from the start
    free = ~soft.fixed
    assert torch.allclose(soft.weight()[free], layer.weight[free], atol=float(step) * 2e-4)
    assert torch.allclose(soft.weight()[soft.fixed], layer.quantized_weight()[soft.fixed])
    assert int(soft.fixed.sum()) >= (12 if per_channel else 2)
    soft.v.data = torch.randn_like(soft.v) * 3
    hard = soft.codes(hard=True)
    assert bool(((hard[free] == soft.floor[free]) | (hard[free] == soft.floor[free] + 1)).all())
    assert torch.equal(hard[soft.fixed], soft.nearest[soft.fixed])  # channel extremes keep nearest


def test_reconstruct_beats_nearest_and_keeps_the_grid():
    """A layer whose inputs are correlated: learnt rounding lowers the output error that nearest rounding
    leaves, and the written-back weights are grid points the quantizer reproduces (same range, same
    codes), so the layer quantizes them onto themselves."""
    layer = _layer(bits=3)
    torch.manual_seed(1)
    x = torch.randn(512, 4) @ torch.randn(4, 16)  # rank 4: rounding errors can cancel along 12 directions
    with torch.no_grad():
        target = nn.functional.linear(x, layer.weight, layer.bias)
        nearest_codes = quantize_to_int(layer.weight, 3, *torch.aminmax(layer.weight, dim=1))
    figures = reconstruct_unit(layer, [layer], x, target, None, iters=400, batch_size=64, lr=1e-2)
    assert figures["err_rounded"] < 0.7 * figures["err_nearest"]
    assert 0 < figures["changed"] < 0.5
    lo, hi = torch.aminmax(layer.weight.detach(), dim=1)
    codes = quantize_to_int(layer.weight.detach(), 3, lo, hi)
    assert torch.allclose(layer.quantized_weight(), layer.weight, atol=1e-6)
    assert (codes - nearest_codes).abs().max() <= 1  # each weight moved at most one step from nearest
    assert (codes != nearest_codes).float().mean() == pytest.approx(figures["changed"])


def test_channel_weight_decides_which_channels_are_reconstructed():
    """A linear layer's rows round independently, so with all weight on output channel 0 that channel
    ends exactly where it does unweighted (same draws), while the zero-weight channels, left to the
    regulariser alone, lose the reconstruction's gain."""
    torch.manual_seed(2)
    x = torch.randn(256, 4) @ torch.randn(4, 16)
    errs = {}
    for name, cw in (("plain", None), ("weighted", torch.tensor([1.0, 0, 0, 0, 0, 0]))):
        layer = _layer(bits=3)
        with torch.no_grad():
            target = nn.functional.linear(x, layer.weight, layer.bias)
            nearest = (layer(x) - target).pow(2).mean(0)
        draws = torch.Generator().manual_seed(5)
        reconstruct_unit(layer, [layer], x, target, cw, iters=400, batch_size=64, lr=1e-2, generator=draws)
        with torch.no_grad():
            errs[name] = (layer(x) - target).pow(2).mean(0)
    assert errs["weighted"][0] == pytest.approx(float(errs["plain"][0]), rel=1e-5)
    assert errs["weighted"][0] < 0.5 * nearest[0]
    assert errs["weighted"][1:].sum() > 1.5 * errs["plain"][1:].sum()


def test_drop_quantization_mixes_element_by_element():
    quantized, float_ = torch.zeros(100, 100), torch.ones(100, 100)
    mixed = drop_quantization(quantized, float_, 0.3, torch.Generator().manual_seed(0))
    assert set(mixed.unique().tolist()) == {0.0, 1.0}  # every element one or the other, never a blend
    assert float(mixed.mean()) == pytest.approx(0.3, abs=0.02)  # 10k draws: 4 standard deviations
    again = drop_quantization(quantized, float_, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(mixed, again)  # the seeded generator decides
    assert torch.equal(drop_quantization(quantized, float_, 0.0), quantized)


def test_reconstruct_learns_from_the_float_inputs_it_drops_in():
    """Quantized inputs that carry nothing (all zero) leave the reconstruction nothing to learn: only the
    regulariser moves the rounding, and it ends on nearest. With QDrop's mix the float inputs show through,
    and the rounding lowers the error on them. The reported errors stay on the quantized inputs."""
    torch.manual_seed(1)
    x = torch.randn(512, 4) @ torch.randn(4, 16)
    zeros = torch.zeros_like(x)
    err_on_float = {}
    for drop in (0.0, 0.9):
        layer = _layer(bits=3)
        with torch.no_grad():
            target = nn.functional.linear(x, layer.weight, layer.bias)
            nearest = (layer(x) - target).pow(2).sum(1).mean()
        draws = torch.Generator().manual_seed(5)
        figures = reconstruct_unit(layer, [layer], zeros, target, None, 400, 64, 1e-2, draws, x, drop)
        assert figures["err_rounded"] == pytest.approx(figures["err_nearest"])  # both: bias against target
        with torch.no_grad():
            err_on_float[drop] = float((layer(x) - target).pow(2).sum(1).mean() / nearest)
        if drop == 0.0:
            assert figures["changed"] == 0
    assert err_on_float[0.0] == pytest.approx(1.0)
    assert err_on_float[0.9] < 0.8
    with pytest.raises(ValueError, match="drop > 0 needs float_inputs"):
        layer = _layer()
        reconstruct_unit(layer, [layer], zeros, zeros[:, :6], None, 1, 8, drop=0.5)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Conv2d(4, 4, 1)  # its output goes to an add, not to a BN
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        return self.fc((self.b(a) + a).mean((2, 3)))


def test_sole_bn_after_and_rounding_units_in_call_order():
    net = _Net().eval()
    found = sole_bn_after(net, (3, 8, 8))
    assert list(found) == ["a.0"] and found["a.0"] is net.a[1]
    student = quantize(net, QuantSpec(w_bits=4, a_bits=32))
    assert rounding_units(student, (3, 8, 8)) == [("a.0", ["a.0"]), ("b", ["b"]), ("fc", ["fc"])]
    # a Sequential is a container, not a block, and no other module holds two weight layers
    assert rounding_units(student, (3, 8, 8), "block") == rounding_units(student, (3, 8, 8))
    with pytest.raises(ValueError, match="by must be 'layer' or 'block'"):
        rounding_units(student, (3, 8, 8), "stage")


def test_block_units_of_resnet20_and_mobilenetv2():
    """The residual blocks are the units, each with its weight layers in call order (a projection
    shortcut's conv runs first in dfq's BasicBlock); the stem conv and the classifier stay alone. The
    student (traced blocks with activation quantizers) has the teacher's units."""
    teacher = build_model("resnet20", 10, 1).eval()
    student = quantize(teacher, QuantSpec(w_bits=3, a_bits=3))
    units = rounding_units(student, (1, 28, 28), "block")
    assert [u for u, _ in units] == ["conv1", *(f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)), "fc"]
    assert dict(units)["layer2.0"] == ["layer2.0.downsample.0", "layer2.0.conv1", "layer2.0.conv2"]
    assert dict(units)["layer1.1"] == ["layer1.1.conv1", "layer1.1.conv2"]
    assert rounding_units(teacher, (1, 28, 28), "block") == units
    mobile = dict(rounding_units(build_model("mobilenet_v2", 10, 3).eval(), (3, 32, 32), "block"))
    # Conv2dNormActivation is a Sequential: the stem and the last 1x1 conv are layers of their own
    assert list(mobile)[:2] == ["features.0.0", "features.1"] and list(mobile)[-2:] == [
        "features.18.0",
        "classifier.1",
    ]
    assert mobile["features.2"] == ["features.2.conv.0.0", "features.2.conv.1.0", "features.2.conv.2"]
    assert len(mobile) == 20  # stem, 17 inverted residuals, last conv, classifier


def test_capture_returns_the_module_input_and_output():
    net = _Net().eval()
    x = torch.randn(10, 3, 8, 8)
    with torch.no_grad():
        a = net.a(x)
    assert torch.allclose(capture(net, net.b, x, 4, "input")[0], a)
    assert torch.allclose(capture(net, net.b, x, 4, "output")[0], net.b(a))
    out, inp = capture(net, net.b, x, 4, "output", "input")
    assert torch.allclose(out, net.b(a)) and torch.allclose(inp, a)


def test_capture_takes_both_tensors_from_one_forward():
    net = _Net().eval()
    calls = []
    handle = net.a.register_forward_hook(lambda m, i, o: calls.append(1))
    capture(net, net.b, torch.randn(10, 3, 8, 8), 4, "output", "input")
    handle.remove()
    assert len(calls) == 3  # three batches of at most 4 images, one forward each
    with pytest.raises(ValueError, match=r"input.*output"):
        capture(net, net.b, torch.randn(2, 3, 8, 8), 4, "weight")


def test_adaround_rounds_every_layer_and_lowers_the_network_error():
    torch.manual_seed(3)
    net = _Net().eval()
    with torch.no_grad():  # non-trivial BN statistics
        net.a[1].running_var.uniform_(0.5, 2.0)
    student = quantize(net, QuantSpec(w_bits=3, a_bits=32))
    x = torch.randn(256, 3, 8, 8)
    with torch.no_grad():
        before = (student(x) - net(x)).pow(2).mean()
    seen = []
    report = adaround(
        student, net, x, iters=300, lr=1e-2, on_layer=lambda i, n, name, f: seen.append((i, n, name))
    )
    assert seen == [(1, 3, "a.0"), (2, 3, "b"), (3, 3, "fc")]
    assert set(report) == {"a.0", "b", "fc"}
    with torch.no_grad():
        after = (student(x) - net(x)).pow(2).mean()
        for m in student.modules():
            if isinstance(m, QuantConv2d | QuantLinear):
                assert torch.allclose(m.quantized_weight(), m.weight, atol=1e-6)
    assert after < before


def _quantized_block(tiny_teacher, drop: float = 0.0) -> tuple:
    """resnet20's layer2.0 (projection shortcut: three convs) quantized W3A3 and calibrated, with its
    captured quantized input, the teacher's output of the block and the teacher's input to it."""
    student = quantize(tiny_teacher, QuantSpec(w_bits=3, a_bits=3))
    torch.manual_seed(6)
    x = torch.randn(96, 1, 28, 28) * 0.5 + 0.2
    calibrate(student, x)
    block = dict(student.named_modules())["layer2.0"]
    (inputs,) = capture(student, block, x, 32, "input")
    target, float_inputs = capture(tiny_teacher, tiny_teacher.layer2[0], x, 32, "output", "input")
    layers = [m for m in block.modules() if isinstance(m, QuantConv2d)]
    return block, layers, inputs, target, float_inputs


def test_block_reconstruction_rounds_its_layers_together_and_restores_the_forwards(tiny_teacher):
    """BRECQ's unit: the three convs of a residual block learn their rounding against the block's output
    (its activation quantizers on); the block's error falls below nearest rounding's, every conv ends on
    its grid, and no patched forward stays behind."""
    block, layers, inputs, target, _ = _quantized_block(tiny_teacher)
    assert len(layers) == 3
    with torch.no_grad():
        nearest = float((block(inputs) - target).pow(2).sum(1).mean())
    figures = reconstruct_unit(
        block, layers, inputs, target, None, 150, 32, 1e-2, torch.Generator().manual_seed(0)
    )
    assert figures["err_nearest"] == pytest.approx(nearest, rel=1e-5)  # the block's own forward, unrounded
    assert figures["err_rounded"] < figures["err_nearest"]
    assert 0 < figures["changed"] < 0.5
    assert not any("forward" in vars(m) for m in block.modules())
    with torch.no_grad():
        assert float((block(inputs) - target).pow(2).sum(1).mean()) == pytest.approx(
            figures["err_rounded"], rel=1e-5
        )
        for layer in layers:
            assert torch.allclose(layer.quantized_weight(), layer.weight, atol=1e-6)


def test_block_drop_mixes_every_activation_quantizer_inside(tiny_teacher):
    """QDrop in a block: each activation quantizer's output, during the reconstruction only, is element by
    element the quantized value or (at the asked share) the float one; the reported errors stay on the
    quantized path, so they match a run without the drop before any rounding is learnt."""
    block, layers, inputs, target, float_inputs = _quantized_block(tiny_teacher)
    quantizers = [m for m in block.modules() if isinstance(m, ActQuant)]
    assert len(quantizers) == 2  # after relu1 and at the block's output
    seen: list[tuple[int, int, bool]] = []

    def count(m, args, out):
        x, quantized = args[0], type(m).forward(m, args[0])
        differ = quantized != x  # where the float value is not already a grid point
        picked = bool(((out == x) | (out == quantized)).all())
        seen.append((int((out[differ] == x[differ]).sum()), int(differ.sum()), picked))

    handles = [q.register_forward_hook(count) for q in quantizers]
    try:
        figures = reconstruct_unit(
            block,
            layers,
            inputs,
            target,
            None,
            4,
            32,
            1e-2,
            torch.Generator().manual_seed(0),
            float_inputs,
            0.5,
        )
    finally:
        for h in handles:
            h.remove()
    # 3 batches x 2 quantizers for the error before, 4 steps x 2 dropped, then the error after
    assert len(seen) == 6 + 8 + 6 and all(picked for *_, picked in seen)
    for floats, differ, _ in seen[6:14]:
        assert 0.4 < floats / differ < 0.6
    assert all(floats == 0 for floats, _, _ in seen[:6] + seen[14:])
    plain, *_ = _quantized_block(tiny_teacher)[:1]
    with torch.no_grad():
        assert figures["err_nearest"] == pytest.approx(
            float((plain(inputs) - target).pow(2).sum(1).mean()), rel=1e-5
        )


def test_adaround_by_block_rounds_every_unit(tiny_teacher):
    student = quantize(tiny_teacher, QuantSpec(w_bits=3, a_bits=32))
    torch.manual_seed(7)
    x = torch.randn(64, 1, 28, 28) * 0.5 + 0.2
    with torch.no_grad():
        before = (student(x) - tiny_teacher(x)).pow(2).sum(1).mean()
    seen = []
    report = adaround(
        student,
        tiny_teacher,
        x,
        iters=60,
        lr=1e-2,
        by="block",
        on_layer=lambda i, n, name, f: seen.append((i, n, name)),
    )
    assert (
        [name for _, _, name in seen]
        == list(report)
        == [u for u, _ in rounding_units(student, (1, 28, 28), "block")]
    )
    assert seen[0][:2] == (1, 11)
    with torch.no_grad():
        after = (student(x) - tiny_teacher(x)).pow(2).sum(1).mean()
        for m in student.modules():
            if isinstance(m, QuantConv2d | QuantLinear):
                assert torch.allclose(m.quantized_weight(), m.weight, atol=1e-6)
    assert after < before


def test_round_unit_needs_adaround_and_sizes_the_capture_by_block():
    with pytest.raises(ValueError, match=r"round_unit needs quant\.weight_round 'adaround'"):
        QuantSpec(round_unit="block")
    assert QuantSpec(weight_round="adaround", round_unit="block").round_unit == "block"

    class Block(nn.Module):  # not a container: two convs with a ReLU between, as a residual block's body
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.relu, self.conv2 = (
                nn.Conv2d(1, 4, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(4, 1, 3, padding=1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(self.relu(self.conv1(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blk, self.fc = Block(), nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.blk(x).flatten(1))

    net = Net()
    # layers: conv 64 in + 256 out, conv 256 + 64, fc 64 + 10; the block: 64 in + 64 out
    assert capture_bytes(net, (1, 8, 8), 100) == (320 * 4 * 100, "blk.conv1")
    assert capture_bytes(net, (1, 8, 8), 100, by="block") == (128 * 4 * 100, "blk")


def test_pipeline_rounds_block_by_block(tiny_teacher, tiny_spec):
    spec = _spec(tiny_spec, round_unit="block")
    events: list[Event] = []
    pipe = Pipeline(spec, tiny_teacher, 10, (1, 28, 28))
    pipe.run(events.append)
    rounds = [e.metrics for e in events if e.kind == "round"]
    assert [(r["layer"], r["layers"]) for r in rounds] == [(i, 11) for i in range(1, 12)]
    assert list(pipe.history["rounded"])[1:3] == ["layer1.0", "layer1.1"]


def _spec(tiny_spec: JobSpec, **quant) -> JobSpec:
    data = tiny_spec.canonical()
    data["quant"] |= {"weight_round": "adaround", "round_iters": 5, "round_images": 32, **quant}
    return JobSpec.model_validate(data)


@pytest.mark.parametrize("rounding", ["adaround", "squant"])
def test_pipeline_rounds_once_after_training_and_a_resume_keeps_it(
    tiny_teacher, tiny_spec, tmp_path, rounding
):
    spec = _spec(tiny_spec, weight_round=rounding)  # squant (dfq/quant/squant.py) takes the same path
    events: list[Event] = []
    pipe = Pipeline(spec, tiny_teacher, 10, (1, 28, 28))
    state = tmp_path / "state.pt"
    pipe.run(events.append, checkpoint_path=state)
    rounds = [e for e in events if e.kind == "round"]
    assert len(rounds) == len(pipe.history["rounded"]) == 22  # resnet20: 21 convs + fc
    assert [e.metrics["layer"] for e in rounds] == list(range(1, 23))
    assert not spec.real_data_used
    assert events[-1].kind == "checkpoint" and events[-1].phase == "round"
    weights = {k: v.clone() for k, v in pipe.student.state_dict().items()}
    for m in pipe.student.modules():
        if isinstance(m, QuantConv2d | QuantLinear):
            assert torch.allclose(m.quantized_weight(), m.weight, atol=1e-6)
    again = Pipeline(spec, tiny_teacher, 10, (1, 28, 28))
    again.load(state)
    later: list[Event] = []
    again.run(later.append, checkpoint_path=state)
    assert not [e for e in later if e.kind == "round"]  # finished and rounded: nothing to do again
    assert all(torch.equal(v, weights[k]) for k, v in again.student.state_dict().items())


@pytest.mark.parametrize(("unit", "units"), [("layer", 22), ("block", 11)])
def test_pipeline_cancel_while_rounding(tiny_teacher, tiny_spec, unit, units):
    pipe = Pipeline(_spec(tiny_spec, round_unit=unit), tiny_teacher, 10, (1, 28, 28))
    calls = []

    def cancel_in_rounding() -> bool:
        calls.append(pipe.step)
        return pipe.step == pipe.total  # only once training is over

    with pytest.raises(Cancelled, match=f"rounding weights \\({unit} 1/{units}\\)"):
        pipe.run(should_cancel=cancel_in_rounding)
    assert "rounded" not in pipe.history


def test_round_drop_needs_adaround():
    with pytest.raises(ValueError, match=r"round_drop needs quant\.weight_round 'adaround'"):
        QuantSpec(round_drop=0.5)
    # with equalised channels the float inputs come from the student's float twin (test_equalize.py)
    assert QuantSpec(weight_round="adaround", round_drop=0.5, act_clip="bn-mse", act_equalize="depthwise")
    with pytest.raises(ValueError):
        QuantSpec(weight_round="adaround", round_drop=1.0)  # all float: nothing of the quantized path left
    assert QuantSpec(weight_round="adaround", round_drop=0.5).round_drop == 0.5


def test_adaround_with_drop_mixes_in_the_teachers_inputs():
    """With activations quantized the student's inputs to ``b`` and ``fc`` differ from the teacher's, so
    QDrop's mix changes what those layers learn; every layer still ends on its grid."""
    torch.manual_seed(3)
    net = _Net().eval()
    x = torch.randn(128, 3, 8, 8)
    weights = {}
    for drop in (0.0, 0.5):
        student = quantize(net, QuantSpec(w_bits=3, a_bits=3))
        calibrate(student, x, steps=1)
        adaround(student, net, x, iters=200, lr=1e-2, drop=drop)
        weights[drop] = {n: m.weight.detach().clone() for n, m in student.named_modules() if n in ("b", "fc")}
        for m in student.modules():
            if isinstance(m, QuantConv2d | QuantLinear):
                assert torch.allclose(m.quantized_weight(), m.weight, atol=1e-6)
    assert any(not torch.equal(weights[0.0][n], weights[0.5][n]) for n in ("b", "fc"))


def test_round_data_needs_adaround_and_marks_real_data():
    with pytest.raises(ValueError, match=r"round_data needs quant\.weight_round 'adaround'"):
        QuantSpec(round_data="fashion-mnist-train")
    generator = JobSpec.model_validate({"quant": {"weight_round": "adaround"}})
    real = JobSpec.model_validate(
        {"quant": {"weight_round": "adaround", "round_data": "fashion-mnist-train"}}
    )
    assert not generator.real_data_used and real.real_data_used
    fewshot = JobSpec.model_validate({"method": "fdda-fewshot"})
    assert fewshot.real_data_used


def test_capture_bytes_is_the_largest_layer_input_plus_output():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(256, 10))
    # conv: 1x8x8 in + 4x8x8 out = 320 floats; linear: 256 + 10; float32, 100 images
    assert capture_bytes(model, (1, 8, 8), 100) == (320 * 4 * 100, "0")
    # with QDrop's float inputs held too: conv 64 + 320 = 384, linear 256 + 266 = 522, the larger
    assert capture_bytes(model, (1, 8, 8), 100, float_inputs=True) == (522 * 4 * 100, "3")


def test_validation_refuses_a_rounding_capture_over_the_cap(tiny_teacher):
    # resnet20's 16-channel stage at 64x64: (16 + 16) * 64 * 64 * 4 bytes an image, 16 GiB for 32768 images
    big = JobSpec.model_validate({"quant": {"weight_round": "adaround", "round_images": 32768}})
    with pytest.raises(SpecError, match=r"16\.0 GiB, over the 8 GiB adaround holds; use at most 16384") as e:
        validate_for_teacher(big, tiny_teacher, (1, 64, 64), 10)
    assert e.value.field == "quant.round_images"
    validate_for_teacher(big, tiny_teacher, (1, 28, 28), 10)  # 3.1 GiB: fits
    nearest = JobSpec.model_validate({"quant": {"round_images": 32768}})
    validate_for_teacher(nearest, tiny_teacher, (1, 64, 64), 10)  # no rounding, nothing captured


def test_round_images_come_from_the_real_set_when_given(tiny_teacher, tiny_spec):
    spec = _spec(tiny_spec, round_data="some-set", round_images=40)
    torch.manual_seed(4)
    real = LabelledSet(torch.rand(100, 1, 28, 28), torch.zeros(100, dtype=torch.long), "some-set")
    pipe = Pipeline(spec, tiny_teacher, 10, (1, 28, 28), round_set=real)
    images = pipe._round_images()
    assert images.shape == (40, 1, 28, 28)
    flat = real.images.reshape(100, -1)
    assert all(bool((flat == x.reshape(1, -1)).all(1).any()) for x in images)  # each one of the set's
    assert len({tuple(x.reshape(-1)[:4].tolist()) for x in images}) == 40  # drawn without replacement
    generated = Pipeline(spec, tiny_teacher, 10, (1, 28, 28))._round_images()
    assert not any(bool((flat == x.reshape(1, -1)).all(1).any()) for x in generated)


def test_model_card_names_where_the_rounding_images_came_from():
    from dfq.model_card import _switches

    def row(quant: dict) -> str:
        rows = dict((k, v) for k, v in _switches(JobSpec.model_validate({"quant": quant})))
        return f"{rows['weight rounding']} | real data used: {rows['real data used']}"

    assert row({}) == "nearest | real data used: False"
    assert row({"weight_round": "adaround"}) == (
        "adaround (1000 steps per layer on 1024 images from generator) | real data used: False"
    )
    assert row({"weight_round": "adaround", "round_drop": 0.5}) == (
        "adaround (1000 steps per layer on 1024 images from generator, QDrop input drop 0.5) | real data "
        "used: False"
    )
    assert row({"weight_round": "adaround", "round_unit": "block", "round_drop": 0.5}) == (
        "adaround (1000 steps per block on 1024 images from generator, QDrop input drop 0.5) | real data "
        "used: False"
    )
    assert row({"weight_round": "adaround", "round_data": "fashion-mnist-train"}) == (
        "adaround (1000 steps per layer on 1024 images from fashion-mnist-train) | real data used: True"
    )
