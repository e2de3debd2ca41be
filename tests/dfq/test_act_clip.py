"""``quant.act_clip = "bn-mse"``: activation ranges from the teacher's BN, chosen by least squared error."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from dfq.models.teachers import load_bundled
from dfq.pipeline import Pipeline
from dfq.quant import ActQuant, quantize
from dfq.quant.bn_ranges import bn_fed_quantizers, bn_mse_range, set_ranges_from_bn
from dfq.quant.quantizer import MSE_ALPHAS, MSE_MAX_SAMPLES, mse_clipped_range
from dfq.spec import JobSpec


def _range(x, bits, lo, hi, alphas=MSE_ALPHAS):
    lo, hi = mse_clipped_range(torch.tensor(x), bits, torch.tensor(lo), torch.tensor(hi), alphas)
    return lo.item(), hi.item()


def test_2bit_by_hand_clipping_wins():
    # x = [0, 1 (ten times), 6], 2 bits, signed grid [-2, 1]:
    # alpha 1, [0, 6]: scale 0.5, zp 2; x=1 -> round(0.5 - 2 = -1.5) = -2 (half even) -> 0, error 1 each;
    #   x=6 -> 1 -> 6 and x=0 -> 0 exact: squared error sum 10.
    # alpha 0.5, [0, 3]: scale 1, zp 2; x=1 -> -1 -> 1 exact; x=6 -> clamp(4) = 1 -> 3, error 9: sum 9.
    assert _range([0.0] + [1.0] * 10 + [6.0], 2, 0.0, 6.0, (1.0, 0.5)) == (0.0, 3.0)


def test_2bit_by_hand_a_tie_keeps_the_full_range():
    # nine 1s: alpha 1 sums 9, alpha 0.5 sums 9 as well; the first alpha (the wider range) wins the tie
    assert _range([0.0] + [1.0] * 9 + [6.0], 2, 0.0, 6.0, (1.0, 0.5)) == (0.0, 6.0)


def _numpy_reference(x, bits, lo, hi, alphas=MSE_ALPHAS):
    # an independent brute force of the same rule, one candidate at a time, in float64
    best = None
    for a in alphas:
        lo_a, hi_a = lo * a, hi * a
        scale = (2**bits - 1) / max(hi_a - lo_a, 1e-8)
        zp = np.round(scale * lo_a) + 2 ** (bits - 1)
        q = np.clip(np.round(scale * x - zp), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        err = np.mean(((q + zp) / scale - x) ** 2)
        if best is None or err < best[0]:
            best = (err, lo_a, hi_a)
    return best[1], best[2]


@pytest.mark.parametrize("bits", [3, 4])
def test_search_matches_an_independent_numpy_search(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.relu(torch.randn(2, 3, 8, 8, generator=g)) ** 2  # heavy-tailed, post-ReLU like
    lo, hi = torch.aminmax(x)
    got = mse_clipped_range(x, bits, lo, hi)
    want = _numpy_reference(x.double().numpy().ravel(), bits, lo.item(), hi.item())
    assert want[1] < hi.item()  # the data is chosen so that clipping helps
    assert [v.item() for v in got] == pytest.approx(list(want), rel=1e-6)


def test_channels_last_and_subsampling_see_the_same_elements():
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(64, 16, 12, 12, generator=g)) ** 3  # 147,456 elements: every 2nd is used
    lo, hi = torch.aminmax(x)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    for t, flat in ((nhwc, nhwc.permute(0, 2, 3, 1).reshape(-1)), (x, x.reshape(-1))):
        want = _numpy_reference(flat[::2].double().numpy(), 4, lo.item(), hi.item())
        assert [v.item() for v in mse_clipped_range(t, 4, lo, hi)] == pytest.approx(list(want), rel=1e-6)


class _Block(nn.Module):
    """A ResNet basic block: one ReLU module called after bn1 and again after the residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU6(inplace=True),
        _Block(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    ).eval()


def test_bn_fed_sites_are_found_by_following_tensors():
    student = quantize(_tiny(), JobSpec.model_validate({"bits": "W4A4"}).quant)
    names = [n for n, m in student.named_modules() if isinstance(m, ActQuant)]
    assert names == ["2.1", "3.relu_aq0", "3.relu_aq1"]
    found = bn_fed_quantizers(student, (1, 6, 6))
    # the ReLU6 after BN "1" and the block's first ReLU call (after bn1); not the ReLU after the add
    assert found == {"2.1": (student[1], 0.0, 6.0), "3.relu_aq0": (student[3].bn1, 0.0, math.inf)}
    assert all(
        m.bits == 4 and not m.calibrating and m.n_updates == 0
        for m in student.modules()
        if isinstance(m, ActQuant)
    )


def test_bn_range_is_the_mse_range_of_the_rectified_gaussians():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -0.5, 2.0]))  # a negative gamma spreads like |gamma|
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    lo, hi = bn_mse_range(bn, 0.0, 6.0, 4)
    # the same draws, by hand: N(beta_c, gamma_c^2) per channel, clamped to the ReLU6's [0, 6]
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(MSE_MAX_SAMPLES // 3, 3, generator=g) * torch.tensor([1.0, 0.5, 2.0])
    a = (draws + torch.tensor([0.0, 1.0, -1.0])).clamp(0.0, 6.0).double().numpy().ravel()
    assert (lo, hi) == pytest.approx(_numpy_reference(a, 4, a.min(), a.max()), rel=1e-6)
    assert lo == 0.0 and 1.0 < hi < a.max()  # clipped below the largest draw


@pytest.mark.parametrize("ema", ["debiased", "plain", "gdfq-compounding"])
def test_a_fixed_range_is_read_back_and_calibration_leaves_it(ema):
    q = ActQuant(4, ema=ema)
    q.fix_range(0.0, 2.5)
    q.calibrating = True
    q(torch.tensor([-3.0, 0.0, 40.0]))
    assert [v.item() for v in q.range()] == pytest.approx([0.0, 2.5])
    fresh = ActQuant(4, ema=ema)
    fresh.load_state_dict(q.state_dict())
    assert [v.item() for v in fresh.range()] == pytest.approx([0.0, 2.5])


@pytest.mark.parametrize(
    ("teacher", "fixed", "total"), [("mobilenetv2_fmnist", 35, 35), ("resnet20_fmnist", 10, 19)]
)
def test_bundled_teachers_sites(teacher, fixed, total):
    # every MobileNetV2 ReLU6 follows a BN; a CIFAR ResNet-20 has 1 stem + 9 bn1 sites, 9 after an add
    model, info = load_bundled(teacher)
    student = quantize(model, JobSpec.model_validate({"bits": "W4A4"}).quant)
    names = set_ranges_from_bn(student, info.input_shape)
    quants = {n: m for n, m in student.named_modules() if isinstance(m, ActQuant)}
    assert (len(names), len(quants)) == (fixed, total)
    assert all(quants[n].fixed and 0.0 < quants[n].range()[1].item() <= 6.0 for n in names)


def test_a_job_keeps_the_bn_ranges_and_calibrates_the_rest(tiny_teacher, tiny_spec):
    spec = tiny_spec.model_copy(update={"quant": tiny_spec.quant.model_copy(update={"act_clip": "bn-mse"})})
    pipe = Pipeline(spec, tiny_teacher, 10, (1, 28, 28), "cpu")
    quants = {n: m for n, m in pipe.student.named_modules() if isinstance(m, ActQuant)}
    before = {n: [v.item() for v in m.range()] for n, m in quants.items() if m.fixed}
    assert 0 < len(before) < len(quants)
    pipe.run()
    assert {n: [v.item() for v in quants[n].range()] for n in before} == before
    assert all(int(m.updates) == 6 for m in quants.values() if not m.fixed)  # 2 epochs x 3 batches


def test_spec_default_is_the_reference_and_bad_values_fail():
    assert (JobSpec.model_validate({}).quant.act_clip, JobSpec.model_validate({}).quant.act_ste) == (
        "minmax",
        "identity",
    )
    assert JobSpec.model_validate({"quant": {"act_clip": "bn-mse"}}).quant.act_clip == "bn-mse"
    with pytest.raises(ValueError, match="act_clip"):
        JobSpec.model_validate({"quant": {"act_clip": "mse"}})
