"""DSG, FDDA, ACQ and LRQ losses against values worked out by hand (or an independent numpy formula)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from dfq.attention import attention_center, attention_map, default_stage
from dfq.distill import dkd_loss, student_loss
from dfq.models.registry import build_model
from dfq.spec import JobSpec
from dfq.synth import acq, dsg, fdda, lrq

# ----------------------------------------------------------------------------------------- DSG


def test_hinge_and_the_reference_abs_bug():
    gap = torch.tensor([0.5, 1.5, 3.0])
    assert dsg.hinge(gap, 1.0).tolist() == [0.0, 0.5, 2.0]
    assert dsg.hinge(gap, 1.0, extra_abs=True).tolist() == [0.5, 0.5, 2.0]  # penalises inside the slack


def _layer_input():
    # N=2, C=1, H=1, W=2: sample 0 = [1, 3], sample 1 = [5, 7]
    return torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])


def test_sda_batch_form_by_hand():
    x = _layer_input()  # batch mean 4, biased var (9+1+1+9)/4 = 5, std sqrt(5)
    rm, rv = torch.tensor([1.0]), torch.tensor([1.0])
    # mean: max(|4-1| - 1, 0)^2 = 4;  std: max(|sqrt5 - 1| - 0.5, 0)^2
    expected_std = 4.0 + (math.sqrt(5) - 1 - 0.5) ** 2
    got = dsg.sda_loss([x], [rm], [rv], torch.tensor([1.0]), torch.tensor([0.5]), per_sample=False)
    assert got.item() == pytest.approx(expected_std, rel=1e-5)
    # var variant (the QAT reference code): max(|5 - 1| - 0.5, 0)^2 = 12.25
    got = dsg.sda_loss(
        [x], [rm], [rv], torch.tensor([1.0]), torch.tensor([0.5]), per_sample=False, stat="var"
    )
    assert got.item() == pytest.approx(4.0 + 12.25, rel=1e-5)


def test_sda_per_sample_with_lse_by_hand():
    # per-sample means [2, 6], stds [1, 1]; running mean 1, std 1; margins 1 / 0
    # per-sample terms: mean max(|2-1|-1,0)^2 = 0, max(|6-1|-1,0)^2 = 16; std terms 0 -> per = [0, 16]
    # two identical layers, L = 2: layer 0 emphasises sample 0 (weights [2,1]) -> mean(0, 16) = 8
    #                              layer 1 emphasises sample 1 (weights [1,2]) -> mean(0, 32) = 16
    # loss = (8 + 16) / 2 = 12
    x = _layer_input()
    one = torch.tensor([1.0])
    got = dsg.sda_loss(
        [x, x],
        [one, one],
        [one, one],
        torch.tensor([1.0, 1.0]),
        torch.tensor([0.0, 0.0]),
        per_sample=True,
        lse_factor=2.0,
    )
    assert got.item() == pytest.approx(12.0, rel=1e-5)
    plain = dsg.sda_loss(
        [x, x],
        [one, one],
        [one, one],
        torch.tensor([1.0, 1.0]),
        torch.tensor([0.0, 0.0]),
        per_sample=True,
        lse_factor=1.0,
    )
    assert plain.item() == pytest.approx(8.0, rel=1e-5)


def test_margin_estimator_percentile():
    est = dsg.MarginEstimator(1, percentile=50, per_sample=False, stat="std")
    for m in (1.0, 2.0, 3.0):  # batch means m+... -> gaps to running mean 0 are 2, 3, 4 (x = [m, m+2])
        x = torch.tensor([[[[m, m + 2.0]]]])
        est.observe([x], [torch.tensor([0.0])], [torch.tensor([1.0])])
    mean_m, std_m = est.margins()
    assert mean_m.tolist() == pytest.approx([3.0])  # median of 2, 3, 4
    assert std_m.tolist() == pytest.approx([0.0], abs=1e-5)  # std of [m, m+2] is 1 = running std


def test_sci_two_sample_case_by_hand():
    # fake: a = [1, 0], b = [1, 1]/sqrt2 -> S = [[1, c], [c, 1]], c = 1/sqrt2, eigenvalues 1-c, 1+c
    # noise: orthonormal rows -> S = I, eigenvalues [1, 1]; min-max weights are all 0 (span floored)
    # L = 1e-4 * mean((1-c-1)^2, (1+c-1)^2) = 1e-4 * c^2 = 5e-5
    fake = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    noise = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert dsg.sci_loss(fake, noise).item() == pytest.approx(5e-5, rel=1e-4)


def test_sci_of_a_batch_against_itself_is_the_summed_minmax_eigenvalues():
    # identical eigenpairs: magnitude 0, structure -1 per pair -> |sum(minmax(vals) * -1)|
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    phi = x.flatten(1).numpy().astype(np.float64)
    phi /= np.linalg.norm(phi, axis=1, keepdims=True)
    vals = np.linalg.eigvalsh(phi @ phi.T)
    expected = ((vals - vals.min()) / (vals.max() - vals.min())).sum()
    assert dsg.sci_loss(x, x).item() == pytest.approx(expected, rel=1e-4)


def test_sci_has_gradient_and_correlation_diagnostic():
    x = torch.randn(6, 1, 5, 5, requires_grad=True)
    dsg.sci_loss(x, torch.randn(6, 1, 5, 5)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    same = torch.ones(3, 4)
    assert dsg.mean_abs_correlation(same) == pytest.approx(1.0)
    assert dsg.mean_abs_correlation(torch.eye(3)) == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------- FDDA


def test_fdda_start_layer():
    assert fdda.start_layer(20) == 8  # ResNet-18's 20 BN layers -> reference start_layer 8
    assert fdda.start_layer(21) == 9
    assert fdda.start_layer(2) == 0


def _centers():
    # class 1 of 2; layer 0 is below the start layer and must be ignored
    return fdda.ClassCenters(
        [torch.zeros(2, 2), torch.tensor([[9.0, 9.0], [0.0, 0.0]])],
        [torch.zeros(2, 2), torch.tensor([[9.0, 9.0], [2.0, 1.0]])],
        torch.tensor([True, True]),
    )


def test_fdda_centralized_by_hand():
    # layer 1: MSE([1,2],[0,0]) = 2.5 + MSE([1,1],[2,1]) = 0.5 -> 3.0 over 1 layer
    means = [torch.tensor([100.0, 100.0]), torch.tensor([1.0, 2.0])]
    vars_ = [torch.tensor([100.0, 100.0]), torch.tensor([1.0, 1.0])]
    assert fdda.centralized_loss(means, vars_, _centers(), 1, start=1).item() == pytest.approx(3.0)


def test_fdda_distorted_draws_targets_around_the_center():
    means = [torch.zeros(2), torch.tensor([1.0, 2.0])]
    vars_ = [torch.zeros(2), torch.tensor([1.0, 1.0])]
    c = _centers()
    # zero noise: identical to the centralized loss
    assert fdda.distorted_loss(means, vars_, c, 1, 1, 0.0, 0.0).item() == pytest.approx(3.0)
    # with noise: the same draws, recomputed independently
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = fdda.distorted_loss(means, vars_, c, 1, 1, 0.5, 1.0, generator=g1).item()
    tm = torch.tensor([0.0, 0.0]) + 0.5 * torch.randn(2, generator=g2)
    tv = torch.tensor([2.0, 1.0]) + 1.0 * torch.randn(2, generator=g2)
    expected = ((means[1] - tm) ** 2).mean() + ((vars_[1] - tv) ** 2).mean()
    assert got == pytest.approx(expected.item(), rel=1e-6)


def test_class_centers_round_trip():
    c = _centers()
    again = fdda.ClassCenters.from_state_dict(c.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(c.means + c.vars, again.means + again.vars, strict=True))


# ----------------------------------------------------------------------------------------- ACQ


def test_attention_center_by_hand():
    f = torch.zeros(1, 1, 2, 2)
    f[0, 0, 0, 1] = 3.0  # all energy at row 0, column 1 -> x = 0.75, y = 0.25
    assert attention_center(attention_map(f)).tolist() == [[0.75, 0.25]]
    f2 = torch.ones(1, 4, 2, 2)  # uniform -> the image center
    assert attention_center(attention_map(f2)).tolist() == [[0.5, 0.5]]
    assert acq.center_matching_loss(f, torch.tensor([[0.25, 0.25]])).item() == pytest.approx(0.25)


def test_pair_loss_by_hand():
    # attention vectors: s0 = [1,0], s1 = [1,0] (first half); s2 = [0,1], s3 = [1,0] (second half)
    # d_A = mean(|[1,0]-[0,1]|, |[1,0]-[1,0]|) = 0.5; z: d_z = mean(1,1,2,2) = 1.5 -> 1 / (1/3 + 1e-5)
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]).view(4, 1, 1, 2)
    z = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    assert acq.pair_loss(f, z).item() == pytest.approx(1 / (0.5 / 1.5 + 1e-5), rel=1e-6)


def test_consistency_by_hand_and_twin_leaves_teacher_alone():
    a = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    b = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    assert acq.consistency_loss(a, b).item() == pytest.approx(2.0)
    teacher = build_model("resnet20", 10, 1).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    twin = acq.batch_stats_copy(teacher)
    x = torch.randn(4, 1, 28, 28) * 3 + 1
    with torch.no_grad():
        assert not torch.allclose(twin(x), teacher(x))  # batch statistics differ from running ones
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_default_attention_stage():
    assert default_stage(build_model("resnet20", 10, 1), (1, 28, 28)) == "layer3"  # 7x7
    assert default_stage(build_model("resnet18", 10, 3), (3, 64, 64)) == "layer3"  # 4x4; layer4 is 2x2
    assert default_stage(build_model("mobilenet_v2", 10, 3), (3, 64, 64)) == "features.13"


# ----------------------------------------------------------------------------------------- LRQ


def test_margin_logits_by_hand():
    cos = torch.tensor([[0.5, 0.2]])
    got = lrq.margin_logits(cos, torch.tensor([0]), margin=0.3, scale=2.0)
    target = 0.5 * math.cos(0.3) - math.sqrt(3) / 2 * math.sin(0.3)  # cos(pi/3 + 0.3)
    assert got.tolist()[0] == pytest.approx([2 * target, 0.4], rel=1e-5)
    ce = -math.log(math.exp(2 * target) / (math.exp(2 * target) + math.exp(0.4)))
    feats, weight = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cos = [1, 0]
    loss = lrq.ama_loss(feats, weight, torch.tensor([0]), margin=0.0, scale=1.0)
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-5)
    assert ce > 0


def test_lka_is_multiplicative_attention():
    block = lrq.LargeKernelAttention(4)
    x = torch.randn(2, 4, 9, 9)
    assert block(x).shape == x.shape
    nn.init.zeros_(block.pw.weight)
    nn.init.ones_(block.pw.bias)
    assert torch.allclose(block(x), x)  # attn == 1 -> identity


def test_angular_stats():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    stats = lrq.angular_stats(torch.tensor([[2.0, 0.0], [1.0, 1.0]]), w, torch.tensor([0, 0]))
    assert stats["diag_theta_y"] == pytest.approx(22.5, rel=1e-4)  # angles 0 and 45 to class 0
    assert stats["diag_intra_angle"] == pytest.approx(45.0, rel=1e-4)


def test_dkd_by_hand():
    s = torch.zeros(1, 3)
    # teacher [ln2, 0, 0], target 0: p_t = [.5,.25,.25]; TCKD = KL([.5,.5]||[1/3,2/3]); NCKD = 0
    t1 = torch.tensor([[math.log(2.0), 0.0, 0.0]])
    tckd1 = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)
    loss, parts = dkd_loss(s, t1, torch.tensor([0]), temperature=1.0, alpha=1.0, beta=8.0)
    assert parts["s_tckd"].item() == pytest.approx(tckd1, rel=1e-5)
    assert parts["s_nckd"].item() == pytest.approx(0.0, abs=1e-6)
    # teacher [0, ln3, 0]: p_t = [.2,.6,.2]; TCKD = KL([.2,.8]||[1/3,2/3]); NCKD = KL([.75,.25]||[.5,.5])
    t2 = torch.tensor([[0.0, math.log(3.0), 0.0]])
    tckd2 = 0.2 * math.log(0.6) + 0.8 * math.log(1.2)
    nckd2 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    loss, _ = dkd_loss(s, t2, torch.tensor([0]), temperature=1.0, alpha=1.0, beta=8.0)
    assert loss.item() == pytest.approx(tckd2 + 8 * nckd2, rel=1e-5)
    # temperature: the KLs are scaled by T^2 (logits scaled by T give the same distributions)
    loss_t, _ = dkd_loss(s, 2 * t2, torch.tensor([0]), temperature=2.0, alpha=1.0, beta=8.0)
    assert loss_t.item() == pytest.approx(4 * (tckd2 + 8 * nckd2), rel=1e-5)


def test_student_loss_ramps_dkd_in():
    method = JobSpec.model_validate({"method": {"preset": "lrq", "lrq": {"dkd_warmup_epochs": 4}}}).method
    s = torch.zeros(1, 3)
    t = torch.tensor([[0.0, math.log(3.0), 0.0]])
    y = torch.tensor([0])
    ce = math.log(3.0)
    dkd = (0.2 * math.log(0.6) + 0.8 * math.log(1.2)) * 16 + 8 * (
        0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    ) * 16
    t4 = t * 4  # T = 4: the same distributions as above at T = 1, times T^2 = 16
    loss0, _ = student_loss(method, s, t4, y, epoch=0, total_epochs=20)
    loss9, _ = student_loss(method, s, t4, y, epoch=9, total_epochs=20)
    assert loss0.item() == pytest.approx(ce + 0.25 * dkd, rel=1e-4)
    assert loss9.item() == pytest.approx(ce + dkd, rel=1e-4)
    # counted from the student's first epoch: epoch 5 is the first of a run with 5 warm-up epochs
    late0, _ = student_loss(method, s, t4, y, epoch=5, total_epochs=20, first_epoch=5)
    late2, _ = student_loss(method, s, t4, y, epoch=7, total_epochs=20, first_epoch=5)
    assert late0.item() == pytest.approx(ce + 0.25 * dkd, rel=1e-4)
    assert late2.item() == pytest.approx(ce + 0.75 * dkd, rel=1e-4)
    # during the generator's warm-up (logged, not stepped) DKD is off, not negative
    early, parts = student_loss(method, s, t4, y, epoch=1, total_epochs=20, first_epoch=5)
    assert early.item() == pytest.approx(ce, rel=1e-4)
    assert parts["s_kd"].item() == pytest.approx(dkd, rel=1e-4)  # still measured, for the charts
