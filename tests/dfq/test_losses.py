"""L_BNS and the KD reductions against hand-computed values."""

import math

import pytest
import torch
from torch import nn

from dfq.distill import gdfq_student_loss, kd_loss
from dfq.synth.bn_stats import BNStatsRecorder, bns_loss


def test_bns_loss_by_hand():
    # layer 1: MSE([1,2],[0,0]) = 2.5, MSE([1,1],[2,1]) = 0.5 -> 3.0
    # layer 2: MSE([0],[1]) = 1, MSE([3],[3]) = 0 -> 1.0;  L_BNS = (3 + 1) / 2 = 2.0
    loss = bns_loss(
        [torch.tensor([1.0, 2.0]), torch.tensor([0.0])],
        [torch.tensor([1.0, 1.0]), torch.tensor([3.0])],
        [torch.tensor([0.0, 0.0]), torch.tensor([1.0])],
        [torch.tensor([2.0, 1.0]), torch.tensor([3.0])],
    )
    assert loss.item() == pytest.approx(2.0)


def test_bns_loss_rejects_layer_count_mismatch():
    with pytest.raises(ValueError):
        bns_loss([torch.zeros(1)], [torch.zeros(1)], [], [])


def test_recorder_takes_batch_mean_and_biased_variance_of_bn_inputs():
    net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[[[1.0]]], [[[2.0]]]]))
    x = torch.tensor([1.0, 2.0, 3.0, 6.0]).view(2, 1, 1, 2)  # N=2, H=1, W=2
    with BNStatsRecorder(net) as rec:
        net(x)
    # channel 0 sees [1,2,3,6]: mean 3, biased var (4+1+0+9)/4 = 3.5; channel 1 is doubled: 6 and 14
    assert rec.means[0].tolist() == pytest.approx([3.0, 6.0])
    assert rec.vars[0].tolist() == pytest.approx([3.5, 14.0])
    assert rec.running_means[0] is net[1].running_mean
    net(x)
    assert len(rec.means) == 1  # hooks are gone after the context


KL_31 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL([.75,.25] || [.5,.5])


def test_kd_reductions_by_hand():
    s = torch.zeros(1, 2)
    t = torch.tensor([[math.log(3.0), 0.0]])  # softmax -> [0.75, 0.25]
    assert kd_loss(s, t, 1.0, "batchmean").item() == pytest.approx(KL_31, rel=1e-5)
    assert kd_loss(s, t, 1.0, "mean").item() == pytest.approx(KL_31 / 2, rel=1e-5)  # / (N*C) = /2
    assert kd_loss(s, t, 1.0, "batchmean", alpha=20).item() == pytest.approx(20 * KL_31, rel=1e-5)


def test_kd_temperature_scales_by_t_squared():
    s = torch.zeros(2, 2)
    t = torch.tensor([[2 * math.log(3.0), 0.0]] * 2)  # at T=2 the softened teacher is [.75, .25] again
    assert kd_loss(s, t, 2.0, "batchmean").item() == pytest.approx(4 * KL_31, rel=1e-5)
    assert kd_loss(s, t, 2.0, "mean").item() == pytest.approx(4 * KL_31 / 2, rel=1e-5)


def test_gdfq_student_loss_adds_ce():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    total, parts = gdfq_student_loss(s, t, torch.tensor([0]), temperature=1.0, reduction="mean")
    assert parts["s_ce"].item() == pytest.approx(math.log(2.0))
    assert total.item() == pytest.approx(KL_31 / 2 + math.log(2.0), rel=1e-5)


def test_kd_does_not_backprop_into_teacher():
    t = torch.randn(3, 4, requires_grad=True)
    s = torch.randn(3, 4, requires_grad=True)
    kd_loss(s, t, 4.0).backward()
    assert t.grad is None and s.grad is not None
