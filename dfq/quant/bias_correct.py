"""Empirical bias correction: give every quantized layer's output the float layer's mean again.

Why: rounding and clipping do not average out. A filter whose codes round up more often than down, fed a
post-ReLU activation (positive mean), shifts its whole output channel, and the next layer sees the shift
as a bias the float model never had. Nagel et al. ("Data-Free Quantization Through Weight Equalization
and Bias Correction", ICCV 2019, section 4.2) measure that shift on images and take it off the bias
("empirical" bias correction). Here the images are the generator's (data-free) or ``quant.round_data``'s
real ones.

Where the shift is taken off: a layer whose output goes straight into a BatchNorm has no bias of its own
(every bundled teacher's convs), and adding the shift to that BN's ``running_mean`` is the same as taking
it off the layer's bias; a layer with a bias and no BN after it (the classifier) has its bias moved.
Layers are corrected in forward order during one pass over one batch: when the pass reaches a layer,
every layer before it is corrected already, as in the paper's layer-by-layer procedure, for one forward
of the student and one of the teacher.

Divergence from the paper, named: the shift is measured against the *teacher's* output on the same
images (``E[student] - E[teacher]``), not against the mean the BN stores. On synthetic images the two
differ (the generator matches BN means only roughly; setting the student's BN means to the generator
images' own, the other reading, cost resnet20 W4A4 2.45 points in a probe), and only the difference is
the quantization's.
"""

from __future__ import annotations

import torch
from torch import nn

from dfq.quant.modules import QuantLayer

_BN = nn.modules.batchnorm._BatchNorm


def _channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every axis but the channel axis (1), in float64: the shifts are small differences."""
    return x.detach().double().mean(dim=[d for d in range(x.dim()) if d != 1])


def _forward_with(model: nn.Module, images: torch.Tensor, hooks: list) -> None:
    """One forward of ``images`` without autograd, with ``hooks`` in place; they are removed after."""
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()


def _hook_targets(model: nn.Module, targets: dict[str, str], on_bn, on_output) -> list:
    """``on_bn(module, input, name)`` before each ``bn`` target, ``on_output(module, output, name)``
    after each ``bias`` target (its return value, if any, replaces the output)."""
    by_name = dict(model.named_modules())
    missing = [n for n in targets if n not in by_name]
    if missing:
        raise ValueError(f"bias correction: the teacher has no module {missing[0]!r} the student has")
    return [
        by_name[n].register_forward_pre_hook(lambda m, a, n=n: on_bn(m, a[0], n))
        if kind == "bn"
        else by_name[n].register_forward_hook(lambda m, a, o, n=n: on_output(m, o, n))
        for n, kind in targets.items()
    ]


def correction_targets(student: nn.Module, probe: torch.Tensor) -> dict[str, str]:
    """``{module name: "bn" | "bias"}``: each BatchNorm whose input is a quantized layer's output, and
    each quantized layer with a bias whose output no BatchNorm takes. Found on one forward of ``probe``
    (one image is enough) by following the output tensors themselves. The order does not matter: the
    corrections are hooks, and they fire in the order of the forward."""
    layers = {m: n for n, m in student.named_modules() if isinstance(m, QuantLayer)}
    bns = {m: n for n, m in student.named_modules() if isinstance(m, _BN)}
    outputs: dict[str, torch.Tensor] = {}  # held, so the identity test compares live tensors
    fed_by: dict[str, str] = {}  # BN name -> the layer whose output it takes

    def on_bn(m, args):
        layer = next((n for n, t in outputs.items() if t is args[0]), None)
        if layer is not None:
            fed_by[bns[m]] = layer

    hooks = [m.register_forward_hook(lambda m, a, out: outputs.__setitem__(layers[m], out)) for m in layers]
    hooks += [m.register_forward_pre_hook(on_bn) for m in bns]
    _forward_with(student, probe, hooks)
    fed, by_name = set(fed_by.values()), dict(student.named_modules())
    biased = [n for n in outputs if n not in fed and getattr(by_name[n], "bias", None) is not None]
    return {n: "bn" for n in fed_by} | {n: "bias" for n in biased}


def _teacher_means(
    teacher: nn.Module, targets: dict[str, str], images: torch.Tensor
) -> dict[str, torch.Tensor]:
    means: dict[str, torch.Tensor] = {}
    hooks = _hook_targets(
        teacher,
        targets,
        lambda m, x, n: means.__setitem__(n, _channel_mean(x)),
        lambda m, out, n: means.__setitem__(n, _channel_mean(out)),
    )
    _forward_with(teacher, images, hooks)
    return means


@torch.no_grad()
def bias_correct(student: nn.Module, teacher: nn.Module, images: torch.Tensor) -> dict[str, dict[str, float]]:
    """Correct ``student`` in place on ``images`` (one batch, in the teacher's input space); returns
    ``{module name: {"shift": mean |shift|, "kind": 0 (BN mean) or 1 (bias)}}`` for the report."""
    targets = correction_targets(student, images[:1])
    reference = _teacher_means(teacher, targets, images)
    report: dict[str, dict[str, float]] = {}

    def shift_of(name: str, x: torch.Tensor) -> torch.Tensor:
        delta = _channel_mean(x) - reference[name]
        report[name] = {"shift": float(delta.abs().mean()), "kind": float(targets[name] == "bias")}
        return delta

    def on_bn(m, x, name):
        m.running_mean.add_(shift_of(name, x).to(m.running_mean.dtype))

    def on_bias(m, out, name):
        delta = shift_of(name, out).to(out.dtype)
        m.bias.sub_(delta)
        return out - delta.view(1, -1, *([1] * (out.dim() - 2)))  # the layers after it see it corrected

    hooks = _hook_targets(student, targets, on_bn, on_bias)
    was_training = student.training
    student.eval()
    try:
        _forward_with(student, images, hooks)
    finally:
        student.train(was_training)
    return report
