"""Measuring a quantized model: top-1 on real labels, agreement with its teacher, per-layer error."""

from __future__ import annotations

import torch
from torch import nn

from dfq.data import LabelledSet, Preprocess


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    preprocess: Preprocess | None = None,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Arg-max class for every image, in batches so a 10k set never sits on the device at once."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        if preprocess is not None:
            x = preprocess(x)
        out.append(model(x.to(device)).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def top1(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent correct."""
    return 100.0 * (pred == labels).float().mean().item()


def evaluate_pair(
    teacher: nn.Module,
    student: nn.Module,
    data: LabelledSet,
    preprocess: Preprocess,
    device: torch.device | str = "cpu",
    teacher_pred: torch.Tensor | None = None,
) -> dict[str, float]:
    """FP and quantized top-1 on real labels plus their top-1 agreement (percent)."""
    if teacher_pred is None:
        teacher_pred = predict(teacher, data.images, preprocess, device=device)
    student_pred = predict(student, data.images, preprocess, device=device)
    return {
        "fp_top1": top1(teacher_pred, data.labels),
        "q_top1": top1(student_pred, data.labels),
        "agreement": top1(student_pred, teacher_pred),
        "n_eval": len(data),
    }


@torch.no_grad()
def agreement_on(teacher: nn.Module, student: nn.Module, images: torch.Tensor) -> float:
    """Top-1 agreement on given (e.g. synthetic) inputs, for runs without a labelled set."""
    return top1(student(images).argmax(1), teacher(images).argmax(1))


@torch.no_grad()
def layer_errors(student: nn.Module) -> list[dict[str, float | str | int]]:
    """Relative weight error ||w - q(w)||^2 / ||w||^2 of every quantized layer.

    Tells users which layers the bit-width hurts most (often the first and last), which is what the
    F8L8 switch is for.
    """
    from dfq.quant.modules import QuantLayer

    rows = []
    for name, m in student.named_modules():
        if isinstance(m, QuantLayer):
            w = m.weight.detach()
            err = (w - m.quantized_weight().detach()).pow(2).sum() / w.pow(2).sum().clamp_min(1e-12)
            rows.append({"layer": name, "bits": m.w_bits, "rel_mse": err.item(), "params": w.numel()})
    return rows
