"""Knowledge-distillation losses for the student.

The KL reduction is explicit because published tables mix two conventions: GDFQ's ``nn.KLDivLoss()``
defaults to ``mean`` over all N*C elements (an effective per-sample weight of alpha*T^2/C), while
IntraQ, HAST and FDDA use ``batchmean`` (the true KL per sample) with alpha = 20.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    reduction: Literal["mean", "batchmean"] = "mean",
    alpha: float = 1.0,
) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T))`` with the chosen reduction."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_p_s, p_t, reduction="sum")
    # Spelled out rather than left to F.kl_div, whose 'mean' is slated to change meaning upstream.
    denom = student_logits.numel() if reduction == "mean" else student_logits.shape[0]
    return alpha * temperature**2 * kl / denom


def gdfq_student_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 20.0,
    reduction: Literal["mean", "batchmean"] = "mean",
    alpha: float = 1.0,
    ce_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GDFQ's ``L_S = alpha*T^2*KL + CE(S(x), y)``; returns the total and its parts for logging."""
    kd = kd_loss(student_logits, teacher_logits, temperature, reduction, alpha)
    ce = F.cross_entropy(student_logits, labels)
    return kd + ce_weight * ce, {"s_kd": kd.detach(), "s_ce": ce.detach()}


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``, each KL * T^2, batchmean.

    TCKD compares the binary distributions [p_target, 1 - p_target]; NCKD compares the distributions over
    the non-target classes, renormalised (the target logit is masked out before the softmax).
    """
    t = temperature
    mask = F.one_hot(labels, student_logits.shape[1]).bool()
    p_s = F.softmax(student_logits / t, dim=1)
    p_t = F.softmax(teacher_logits.detach() / t, dim=1)
    # the target's probability by gather, not p[mask]: boolean indexing waits on the device for the count
    target = labels[:, None]
    b_s = torch.stack([p_s.gather(1, target).squeeze(1), p_s.masked_fill(mask, 0).sum(1)], dim=1)
    b_t = torch.stack([p_t.gather(1, target).squeeze(1), p_t.masked_fill(mask, 0).sum(1)], dim=1)
    n = student_logits.shape[0]
    tckd = F.kl_div(b_s.clamp_min(1e-12).log(), b_t, reduction="sum") * t**2 / n
    log_q_s = F.log_softmax(student_logits / t - 1000.0 * mask, dim=1)
    q_t = F.softmax(teacher_logits.detach() / t - 1000.0 * mask, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * t**2 / n
    return alpha * tckd + beta * nckd, {"s_tckd": tckd.detach(), "s_nckd": nckd.detach()}


def student_loss(
    method,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    epoch: int,
    total_epochs: int,
    first_epoch: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_S for a :class:`dfq.spec.MethodSpec`: GDFQ's KD + CE, or LRQ's CE + ramped DKD.

    DKD's ramp counts from ``first_epoch``, the student's first trained epoch (after the generator's
    warm-up): in DKD the ramp covers the student's first epochs, which here start late. Before that
    epoch the loss is only logged (the student is not stepped), and the ramp is 0 there: a negative
    ramp made the logged ``s_loss`` of every LRQ warm-up negative (CE minus 3x DKD, say)."""
    lrq = method.lrq
    if lrq is None or not lrq.dkd:
        return gdfq_student_loss(
            student_logits,
            teacher_logits,
            labels,
            method.kd_temperature,
            method.kd_reduction,
            method.kd_alpha,
            method.s_ce_weight,
        )
    warmup = (
        lrq.dkd_warmup_epochs if lrq.dkd_warmup_epochs is not None else max(1, round(0.05 * total_epochs))
    )
    ramp = min(max(epoch - first_epoch + 1, 0) / warmup, 1.0) if warmup > 0 else 1.0
    dkd, parts = dkd_loss(
        student_logits, teacher_logits, labels, lrq.dkd_temperature, lrq.dkd_alpha, lrq.dkd_beta
    )
    ce = F.cross_entropy(student_logits, labels)
    return method.s_ce_weight * ce + ramp * dkd, {"s_ce": ce.detach(), "s_kd": dkd.detach(), **parts}
