"""``quant.round_act = "lsq"``: activation steps learnt with the block rounding (dfq/quant/adaround.py)."""

import pytest
import torch

from dfq.model_card import _switches
from dfq.pipeline import Pipeline
from dfq.quant.adaround import LearntStep, reconstruct_unit
from dfq.quant.modules import ActQuant, QuantConv2d
from dfq.spec import JobSpec, QuantSpec
from tests.dfq.test_adaround import _quantized_block, _spec


def _quantizer(bits: int, lo: float, hi: float) -> ActQuant:
    q = ActQuant(bits, ste="clipped")
    q.fix_range(lo, hi)
    return q


def test_learnt_step_forward_and_gradients_by_hand():
    # 2 bits on [0, 1.5]: scale 3 / 1.5 = 2, so delta 0.5; zp = round(0) + 2 = 2; the grid q in [-2, 1]
    q = _quantizer(2, 0.0, 1.5)
    step = LearntStep.of(q)
    assert float(step.delta.detach()) == pytest.approx(0.5) and float(step.zp) == 2.0
    x = torch.tensor([0.2, 0.6, 2.0], requires_grad=True)
    out = step(x)
    # u = x / 0.5 - 2 = -1.6, -0.8, 2.0 -> round -2, -1, 2 -> clamp -2, -1, 1 -> (q + 2) * 0.5
    assert out.tolist() == pytest.approx([0.0, 0.5, 1.5])
    assert torch.equal(out.detach(), q(x.detach()))  # the quantizer's own value where nothing was learnt
    out.sum().backward()
    # d/d delta: inside q + zp - x / delta = (0 - 0.4) + (1 - 1.2); clipped: q + zp = 3 -> 2.4
    assert float(step.delta.grad) == pytest.approx(-0.4 - 0.2 + 3.0)
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # LSQ's: straight through inside the grid, 0 where clipped


@pytest.mark.parametrize(("bits", "lo", "hi"), [(4, 0.0, 6.0), (3, -1.0, 2.0)])
def test_write_back_keeps_the_zero_point_and_sets_the_learnt_step(bits, lo, hi):
    q = _quantizer(bits, lo, hi)
    x = torch.linspace(-2, 8, 1001)
    before = q(x)
    step = LearntStep.of(q)
    assert step.write_back() == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(q(x), before, atol=1e-5)  # the same grid (lo moved to the zero point's)
    with torch.no_grad():
        step.delta.mul_(1.25)
    assert step.write_back() == pytest.approx(0.25, rel=1e-6)
    assert torch.allclose(q(x), step(x).detach(), atol=1e-5)  # the quantizer now is the learnt one
    assert q.fixed and float(q.range()[1] - q.range()[0]) == pytest.approx(1.25 * (hi - lo), rel=1e-3)


def test_a_block_learns_a_badly_set_step_and_writes_it_back(tiny_teacher):
    """Inside resnet20's layer2.0 the quantizer after relu1 is given three times its calibrated range;
    learnt with the rounding, its step shrinks, the block's error ends below the same rounding with the
    range held, and the range the quantizer holds afterwards is the one the error was measured with."""

    def run(act_lr: float) -> tuple[dict, ActQuant, torch.nn.Module, torch.Tensor, torch.Tensor]:
        block, layers, inputs, target, _ = _quantized_block(tiny_teacher)
        inner = next(m for m in block.modules() if isinstance(m, ActQuant))
        lo, hi = (float(v) for v in inner.range())
        inner.fix_range(lo, lo + 3 * (hi - lo))
        gen = torch.Generator().manual_seed(0)
        figures = reconstruct_unit(block, layers, inputs, target, None, 150, 32, 1e-2, gen, act_lr=act_lr)
        return figures, inner, block, inputs, target

    held, *_ = run(0.0)
    learnt, inner, block, inputs, target = run(1e-2)
    assert "act_step_change" not in held
    assert learnt["err_nearest"] == pytest.approx(held["err_nearest"], rel=1e-6)  # same start
    assert learnt["act_step_change"] < -0.1
    assert learnt["err_rounded"] < held["err_rounded"]
    assert inner.fixed and not any("forward" in vars(m) for m in block.modules())
    with torch.no_grad():
        assert float((block(inputs) - target).pow(2).sum(1).mean()) == pytest.approx(
            learnt["err_rounded"], rel=1e-5
        )
        for layer in (m for m in block.modules() if isinstance(m, QuantConv2d)):
            assert torch.allclose(layer.quantized_weight(), layer.weight, atol=1e-6)


def test_learnt_steps_need_a_quantizer_in_the_unit(tiny_teacher):
    _, layers, inputs, target, _ = _quantized_block(tiny_teacher)
    conv = layers[0]
    with pytest.raises(ValueError, match="no activation quantizer to learn"):
        reconstruct_unit(conv, [conv], inputs, target, None, 2, 32, act_lr=1e-3)


def test_round_act_needs_block_units_and_is_named_in_the_model_card():
    with pytest.raises(ValueError, match=r"round_act 'lsq' needs quant\.round_unit 'block'"):
        QuantSpec(weight_round="adaround", round_act="lsq")
    with pytest.raises(ValueError, match="round_act 'lsq' needs"):
        QuantSpec(round_act="lsq")
    with pytest.raises(ValueError, match="greater than 0"):
        QuantSpec(weight_round="adaround", round_unit="block", round_act="lsq", round_act_lr=0)
    quant = {"weight_round": "adaround", "round_unit": "block", "round_act": "lsq"}
    rows = dict(_switches(JobSpec.model_validate({"quant": quant})))
    assert rows["weight rounding"] == (
        "adaround (1000 steps per block on 1024 images from generator, activation steps learnt (LSQ, lr 4e-05))"
    )


def _ranges(model: torch.nn.Module) -> dict[str, list[float]]:
    return {n: [float(v) for v in m.range()] for n, m in model.named_modules() if isinstance(m, ActQuant)}


def test_pipeline_learns_the_steps_of_every_block_and_a_resume_keeps_them(tiny_teacher, tiny_spec, tmp_path):
    """Against the same job with the ranges held (identical up to the rounding): every block's two
    quantizers end on other ranges, the stem's (in no block) on the same; a resume from the checkpoint
    written after the rounding keeps the learnt ranges."""
    held = Pipeline(_spec(tiny_spec, round_unit="block"), tiny_teacher, 10, (1, 28, 28))
    held.run()
    spec = _spec(tiny_spec, round_unit="block", round_act="lsq", round_act_lr=1e-2)
    pipe = Pipeline(spec, tiny_teacher, 10, (1, 28, 28))
    state = tmp_path / "state.pt"
    pipe.run(checkpoint_path=state)
    report = pipe.history["rounded"]
    blocks = [name for name in report if name.startswith("layer")]
    assert len(blocks) == 9 and all(report[b]["act_step_change"] != 0 for b in blocks)
    assert "act_step_change" not in report["conv1"] and "act_step_change" not in report["fc"]
    before, after = _ranges(held.student), _ranges(pipe.student)
    assert after["relu_aq0"] == before["relu_aq0"]
    assert [n for n in before if after[n] != before[n]] == [n for n in before if n.startswith("layer")]
    again = Pipeline(spec, tiny_teacher, 10, (1, 28, 28))
    again.load(state)
    again.run(checkpoint_path=state)
    assert _ranges(again.student) == after
