"""Weight rounding learnt layer by layer (or block by block) on synthetic images (``quant.weight_round = "adaround"``).

Why: rounding every weight to its nearest grid point minimises each weight's own error, not the error of
the layer's output, and at 4 bits that costs MobileNetV2 about as much as its activations do
(docs/benchmarks.md "Equalised activation ranges"). AdaRound (Nagel et al. 2020, "Up or Down? Adaptive
Rounding for Post-Training Quantization") chooses, per weight, floor or ceil so that the layer's output on
sample inputs is reconstructed, through a continuous relaxation:

    W~ = s * clamp(floor(W / s) + h(V), n, p),   h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)
    min_V  || f(W x) - f(W~ x~) ||^2  +  lambda * sum_i (1 - |2 h(V_i) - 1|^beta)

with zeta = 1.1, gamma = -0.1, lambda = 0.01 and beta annealed from 20 to 2 after the first 20% of the
iterations (during which the regulariser is off); V starts where h(V) equals the fractional part, so the
soft weight starts at W; the hard result rounds up where V >= 0. Constants and schedule are the published
ones (AdaRound section 4, BRECQ's ``LinearTempDecay``). As AdaRound's asymmetric reconstruction, ``x~`` is
the layer's input in the quantized network (earlier layers already rounded, activations quantized) and
``f(W x)`` the float network's output, here the *teacher's* (the quantized student's own float weights
may carry the rescale of ``quant.act_equalize``, whose ReLU6 clamp differs from the teacher's); the images
are the generator's, so no real data is used (as Genie and the data-free AdaRound variants do).

dfq choices, each documented in docs/methods.md: the loss is taken after the BN that consumes the layer's
output (AdaRound folds BN into the weights first, so its loss is post-BN; dfq quantizes unfolded weights
as GDFQ does and weights each output channel by ``(gamma / sigma)^2`` instead); the weights that are a
channel's minimum or maximum keep their nearest code, so the per-channel range, which the quantizer
re-derives from the weights at every forward, and with it the grid, stay exactly as they were. The result
is written back as float weights that sit on the grid, so export, packing and a resumed job need nothing
new.

``quant.round_drop`` adds QDrop (Wei et al. 2022, "QDrop: Randomly Dropping Quantization for Extremely
Low-bit Post-Training Quantization"): at every step each element of the layer's input is, with probability
``drop``, the float network's (here the teacher's) instead of the quantized network's, as QDrop's
``layer_reconstruction`` mixes ``cur_inp`` and ``cur_sym`` (its ``input_prob`` is ``1 - drop``). Why here:
the rounding is learnt on synthetic images and judged on real ones, and QDrop's case is that a rounding
learnt against a mix of quantized and float inputs sits in a flatter minimum that carries better from
calibration data to test data. The float network is the teacher, except where ``quant.act_equalize``
rescaled the student's channels: there the teacher's activations are in other units than the student's, so
the float inputs come from the student's float twin (:func:`dfq.quant.modules.float_twin`, the rescaled
network with quantization off), as QDrop's come from its own model with quantization off.

``quant.round_unit = "block"`` reconstructs a residual block at a time, as BRECQ (Li et al. 2021) and
QDrop's headline results do (:func:`rounding_units`, :func:`reconstruct_unit`): its weight layers learn
their rounding together against the teacher's output of the block, its activation quantizers on (and,
with the drop, each dropping at every step). On resnet20 W3A3 and MobileNetV2 W4A4 it did not beat the
layer-wise rounding alone (docs/benchmarks.md "Block reconstruction"); with ``quant.round_act = "lsq"``
(:class:`LearntStep`) the block's activation steps are learnt too, as QDrop does, and that is what gains
(resnet20 W3A3 +1.4 to +2.1 on five seeds, MobileNetV2 W4A4 within a point of FP; docs/benchmarks.md
"Learnt activation steps in block reconstruction"). ``layer`` and fixed ranges stay the defaults, so a job
that did not ask computes as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dfq.quant.consumers import bn_scale, sole_bn_after
from dfq.quant.modules import FLOAT_BITS, ActQuant, QuantConv2d, QuantLayer
from dfq.quant.probe import probe_forward
from dfq.quant.quantizer import asymmetric_params, int_range, weight_grid

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound eq. 23)
REG_WEIGHT = 0.01  # lambda
BETA_START, BETA_END, WARMUP = 20.0, 2.0, 0.2
STEP_FLOOR = 1e-8  # a learnt activation step is kept above this (the quantizer's own range floor)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V): a sigmoid stretched to (gamma, zeta) and clipped to [0, 1], so it reaches 0 and 1 exactly."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """sum (1 - |2h - 1|^beta): zero only where every h is 0 or 1, so it drives each weight to a rounding."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def beta_at(step: int, total: int) -> float | None:
    """The annealed exponent at ``step`` of ``total``; None during the warm-up, when the regulariser is off."""
    start = WARMUP * total
    if step < start:
        return None
    progress = (step - start) / max(total - start, 1)
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1 - progress)


@dataclass
class SoftRounding:
    """One layer's grid and rounding variables: codes ``floor + h(V)``, except the fixed ones."""

    floor: torch.Tensor  # floor(scale * w - zp), as floats
    nearest: torch.Tensor  # the nearest code, kept where ``fixed``
    fixed: torch.Tensor  # bool: a channel's min or max weight (keeps the range) or a clamped code
    scale: torch.Tensor  # broadcast against the weight
    zp: torch.Tensor
    qmin: int
    qmax: int
    v: torch.Tensor  # the learnt variable, one per weight

    @classmethod
    def of(cls, layer: QuantLayer) -> SoftRounding:
        t, scale, zp, extreme = weight_grid(layer.weight, layer.w_bits, layer.per_channel)
        qmin, qmax = int_range(layer.w_bits)
        floor = torch.floor(t)
        nearest = torch.clamp(torch.round(t), qmin, qmax)
        fixed = extreme | (floor < qmin) | (floor + 1 > qmax)
        rest = (t - floor).clamp(1e-4, 1 - 1e-4)  # h(V) = rest at the start (AdaRound's initialisation)
        v = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        return cls(floor, nearest, fixed, scale, zp, qmin, qmax, v.requires_grad_(True))

    def codes(self, hard: bool = False) -> torch.Tensor:
        up = (self.v >= 0).to(self.floor) if hard else rectified_sigmoid(self.v)
        return torch.where(self.fixed, self.nearest, torch.clamp(self.floor + up, self.qmin, self.qmax))

    def weight(self, hard: bool = False) -> torch.Tensor:
        return (self.codes(hard) + self.zp) / self.scale

    def h(self) -> torch.Tensor:
        """h(V) of the weights that are free to round either way (the regulariser's terms)."""
        return rectified_sigmoid(self.v[~self.fixed])


def layer_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, QuantConv2d):
        return layer._conv_forward(x, weight, layer.bias)
    return F.linear(x, weight, layer.bias)


def drop_quantization(
    quantized: torch.Tensor, float_: torch.Tensor, drop: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """QDrop's input: each element the float one with probability ``drop``, else the quantized one."""
    # drawn on the CPU, where the reconstruction's seeded generator lives, then moved
    pick = (torch.rand(quantized.shape, generator=generator) < drop).to(quantized.device)
    return torch.where(pick, float_, quantized)


@contextlib.contextmanager
def _patched_forwards(modules: list[nn.Module], forwards: list[Callable[[torch.Tensor], torch.Tensor]]):
    """Give each module another forward for the duration (an instance attribute, which ``nn.Module``'s
    call takes before the class's), so a block's own forward (a traced graph, say) runs through them."""
    for m, f in zip(modules, forwards, strict=True):
        m.forward = f
    try:
        yield
    finally:
        for m in modules:
            del m.forward


def _forward_with(
    layer: QuantLayer, weight: Callable[[], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer's forward on ``weight()``, read at every call: the soft rounding's weight changes
    with each step, a hard rounding's is fixed."""
    return lambda x: layer_forward(layer, x, weight())


@dataclass
class LearntStep:
    """One activation quantizer's step size, learnt with the rounding (``quant.round_act = "lsq"``).

    Why: the BN-derived ranges are chosen for each activation alone; QDrop (after BRECQ) learns every
    activation step of the unit it reconstructs by the same output loss as the rounding, with LSQ's
    straight-through gradient (Esser et al. 2020), so ranges and roundings fit each other. As QDrop's
    ``UniformAffineQuantizer`` the step ``delta`` is the parameter and the integer zero point stays fixed:

        x^ = (round(clamp(x / delta - zp, qmin, qmax)) + zp) * delta

    (the quantizer's own value: with integer bounds clamping before rounding changes nothing, and it is
    LSQ's order, which leaves no element on the grid's edge a float away from counting as clipped); round
    passes the gradient straight through, so d x^ / d delta = q + zp - x / delta inside the grid and
    q + zp where it clipped, and d x^ / d x = 1 inside, 0 outside (LSQ's). The result is written back as the
    quantizer's fixed range [lo, hi] with the same zero point and step (:meth:`write_back`)."""

    quantizer: ActQuant
    zp: torch.Tensor
    qmin: int
    qmax: int
    start: float  # the step before learning
    delta: torch.Tensor  # the learnt parameter

    @classmethod
    def of(cls, quantizer: ActQuant) -> LearntStep:
        lo, hi = (v.detach().float() for v in quantizer.range())
        scale, zp = asymmetric_params(quantizer.bits, lo, hi)
        qmin, qmax = int_range(quantizer.bits)
        delta = (1 / scale).clone()
        return cls(quantizer, zp, qmin, qmax, float(delta), delta.requires_grad_(True))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        u = torch.clamp(x / self.delta - self.zp, self.qmin, self.qmax)
        return (u + (torch.round(u) - u).detach() + self.zp) * self.delta  # round, gradient straight through

    @torch.no_grad()
    def write_back(self) -> float:
        """Fix the quantizer's range to the learnt step around the same zero point; returns the step's
        relative change."""
        delta = float(self.delta.clamp(min=STEP_FLOOR))
        lo = float(self.zp - (self.qmax + 1)) * delta  # round(lo / delta) + 2^(k-1) = zp again
        self.quantizer.fix_range(lo, lo + (self.qmax - self.qmin) * delta)
        return delta / self.start - 1


def _dropped_forward(
    quantize_: Callable[[torch.Tensor], torch.Tensor], drop: float, generator: torch.Generator | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """QDrop inside a block: the activation quantizer's output, each element kept float with ``drop``."""
    return lambda x: drop_quantization(quantize_(x), x, drop, generator)


def _own_forward(quantizer: ActQuant) -> Callable[[torch.Tensor], torch.Tensor]:
    return type(quantizer).forward.__get__(quantizer)


def _learnable(quantizers: list[nn.Module]) -> list[ActQuant]:
    """The activation quantizers among ``quantizers`` whose step ``quant.round_act`` can learn (not float)."""
    return [m for m in quantizers if isinstance(m, ActQuant) and m.bits < FLOAT_BITS]


def reconstruct_unit(
    unit: nn.Module,
    layers: list[QuantLayer],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    channel_weight: torch.Tensor | None,
    iters: int,
    batch_size: int,
    lr: float = 1e-3,
    generator: torch.Generator | None = None,
    float_inputs: torch.Tensor | None = None,
    drop: float = 0.0,
    act_lr: float = 0.0,
) -> dict[str, float]:
    """Learn the rounding of every layer in ``layers`` (all inside ``unit``, or ``unit`` itself) together,
    so ``unit(inputs)`` (its quantized input; the unit's own activation quantizers on) reproduces
    ``targets`` (the float network's output of the unit), then write the rounded weights back. The
    regulariser sums over the layers, as BRECQ's block loss does. With ``drop`` > 0 each step's inputs are
    mixed with ``float_inputs`` (:func:`drop_quantization`), and so is the output of every activation
    quantizer inside the unit (QDrop drops each quantizer of the block it reconstructs); the errors reported
    are on the quantized path alone, the path the deployed model takes. With ``act_lr`` > 0 the step of
    every activation quantizer inside the unit is learnt too (:class:`LearntStep`; Adam at ``act_lr``,
    cosine-annealed to 0 over the steps, as QDrop's ``a_opt``) and written back as its range. Returns the
    output error before (nearest rounding, ranges as they were) and after, over all ``inputs``, the share of
    weights rounded unlike nearest and, with ``act_lr``, the largest relative change of a step."""
    if drop and float_inputs is None:
        raise ValueError("reconstruct_unit: drop > 0 needs float_inputs to mix in")
    softs = [SoftRounding.of(layer) for layer in layers]
    w = channel_weight.view(1, -1, *([1] * (targets.dim() - 2))) if channel_weight is not None else None
    quantizers = [m for m in unit.modules() if isinstance(m, ActQuant)] if drop or act_lr else []
    learnt = {q: LearntStep.of(q) for q in _learnable(quantizers)} if act_lr else {}
    if act_lr and not learnt:
        raise ValueError("reconstruct_unit: act_lr > 0 but the unit holds no activation quantizer to learn")
    steps = list(learnt.values())

    def error(out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        sq = (out - tgt).pow(2)
        return (sq * w if w is not None else sq).sum(1).mean()  # BRECQ's lp_loss: sum over channels

    @torch.no_grad()
    def full_error(weights: list[torch.Tensor]) -> float:
        with _patched_forwards(
            layers, [_forward_with(la, lambda wt=wt: wt) for la, wt in zip(layers, weights, strict=True)]
        ):
            chunks = [
                error(unit(x), t) * len(x)
                for x, t in zip(inputs.split(batch_size), targets.split(batch_size), strict=True)
            ]
        return float(sum(chunks) / len(inputs))

    before = full_error([(s.nearest + s.zp) / s.scale for s in softs])
    opt = torch.optim.Adam([s.v for s in softs], lr=lr)
    a_opt = torch.optim.Adam([st.delta for st in steps], lr=act_lr) if steps else None
    a_sched = torch.optim.lr_scheduler.CosineAnnealingLR(a_opt, T_max=iters, eta_min=0.0) if a_opt else None
    n = len(inputs)
    forwards = [_forward_with(la, s.weight) for la, s in zip(layers, softs, strict=True)]
    for q in quantizers:
        own = learnt.get(q) or _own_forward(q)
        forwards.append(_dropped_forward(own, drop, generator) if drop else own)
    with _patched_forwards([*layers, *quantizers], forwards):
        for step in range(iters):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=generator)
            x = inputs[idx]
            if drop:
                x = drop_quantization(x, float_inputs[idx], drop, generator)
            loss = error(unit(x), targets[idx])
            beta = beta_at(step, iters)
            if beta is not None:
                loss = loss + REG_WEIGHT * sum(rounding_regularizer(s.h(), beta) for s in softs)
            opt.zero_grad(set_to_none=True)
            if a_opt is not None:
                a_opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if a_opt is not None:
                a_opt.step()
                a_sched.step()
                with torch.no_grad():
                    for st in steps:
                        st.delta.clamp_(min=STEP_FLOOR)
    with torch.no_grad():
        hard = [s.weight(hard=True) for s in softs]
        moved = [st.write_back() for st in steps]
        after = full_error(hard)
        changed = sum(float((s.codes(hard=True) != s.nearest).sum()) for s in softs)
        total = sum(s.v.numel() for s in softs)
        for layer, wt in zip(layers, hard, strict=True):
            layer.weight.copy_(wt)
    report = {"err_nearest": before, "err_rounded": after, "changed": changed / total}
    if steps:
        report["act_step_change"] = max(moved, key=abs)
    return report


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward is not needed."""


@torch.no_grad()
def capture(
    model: nn.Module, module: nn.Module, images: torch.Tensor, batch_size: int, *what: str
) -> tuple[torch.Tensor, ...]:
    """``module``'s input and/or output over ``images``, one tensor per name in ``what`` ("input",
    "output"), the forward stopped right there. Several names share one forward, so QDrop's float input
    and the target come from a single pass of the teacher."""
    if not what or set(what) - {"input", "output"}:
        raise ValueError(f"capture: what must name 'input' and/or 'output', got {what}")
    got: list[list[torch.Tensor]] = [[] for _ in what]

    def hook(m, inputs, out):
        for kept, w in zip(got, what, strict=True):
            kept.append((inputs[0] if w == "input" else out).detach().float())
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        for x in images.split(batch_size):
            with contextlib.suppress(_Stop):
                model(x)
    finally:
        handle.remove()
    return tuple(torch.cat(kept) for kept in got)


# The captured inputs and targets of one layer are held whole (float32) while it is reconstructed: a cap, so
# a spec that would exhaust the worker's memory fails as the job starts (dfq/validate.py), not after training.
MAX_CAPTURE_BYTES = 8 * 2**30


def _layer_calls(
    model: nn.Module, input_shape: tuple[int, ...], kinds: tuple[type, ...], only: set[str] | None = None
) -> list[tuple[str, int, int]]:
    """``(name, input elements, output elements)`` per image of every call to a ``kinds`` module (or, with
    ``only``, to the modules of those names) in one probe forward, in call order."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[tuple[str, int, int]] = []

    def hook(m, inputs, out):
        calls.append((names[m], inputs[0][0].numel(), out[0].numel()))

    probe_forward(
        model,
        input_shape,
        [
            m.register_forward_hook(hook)
            for m, n in names.items()
            if (n in only if only is not None else isinstance(m, kinds))
        ],
    )
    return calls


def rounding_units(
    model: nn.Module, input_shape: tuple[int, ...], by: str = "layer"
) -> list[tuple[str, list[str]]]:
    """``(unit, its weight layers)`` in the order one forward first reaches them: with ``by`` "layer" each
    Conv2d/Linear is its own unit (AdaRound); with "block" every weight layer inside a block is reconstructed
    with the rest of its block (BRECQ, Li et al. 2021, which QDrop follows). A block is the outermost module
    that is not a container (``nn.Sequential`` and its subclasses, such as torchvision's
    ``Conv2dNormActivation``, ``nn.ModuleList``, ``nn.ModuleDict``) and holds two weight layers or more:
    a ResNet's BasicBlock or Bottleneck, a MobileNetV2 InvertedResidual; layers outside any block (a stem
    conv, the classifier) stay units of their own."""
    if by not in ("layer", "block"):
        raise ValueError(f"rounding_units: by must be 'layer' or 'block', got {by!r}")
    kinds = (nn.Conv2d, nn.Linear)
    order = list(dict.fromkeys(c[0] for c in _layer_calls(model, input_shape, kinds)))
    owner: dict[str, str] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, kinds):
                continue
            inside = [f"{path}.{n}" for n, m in child.named_modules() if n and isinstance(m, kinds)]
            if (
                by == "layer"
                or len(inside) < 2
                or isinstance(child, nn.Sequential | nn.ModuleList | nn.ModuleDict)
            ):
                visit(f"{path}.", child)
            else:
                owner.update(dict.fromkeys(inside, path))

    visit("", model)
    units: dict[str, list[str]] = {}
    for layer in order:
        units.setdefault(owner.get(layer, layer), []).append(layer)
    return list(units.items())


def capture_bytes(
    model: nn.Module, input_shape: tuple[int, ...], images: int, float_inputs: bool = False, by: str = "layer"
) -> tuple[int, str]:
    """The largest capture :func:`adaround` holds for one unit (:func:`rounding_units`) over ``images``
    images (float32: the input, the output and, with ``float_inputs`` (``quant.round_drop``), the float
    input too), and that unit's name."""
    units = {name for name, _ in rounding_units(model, input_shape, by)}
    calls = _layer_calls(model, input_shape, (nn.Conv2d, nn.Linear), units)
    if not calls:
        return 0, ""
    name, elements = max(((n, i * (2 if float_inputs else 1) + o) for n, i, o in calls), key=lambda c: c[1])
    return elements * 4 * images, name


def adaround(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    iters: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    on_layer: Callable[[int, int, str, dict[str, float]], None] | None = None,
    drop: float = 0.0,
    float_model: nn.Module | None = None,
    by: str = "layer",
    act_lr: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Round every quantized weight layer of ``student``, unit by unit (:func:`rounding_units` ``by``
    "layer" or "block") in call order (module docstring); ``teacher`` is the float model with the same
    module names, and with ``drop`` > 0 (QDrop) also the source of each unit's float inputs unless
    ``float_model`` (same names; the student's float twin where its channels were rescaled) is given.
    With ``act_lr`` > 0 the steps of the activation quantizers inside each unit are learnt too (a unit
    without one, a stem conv say, learns its rounding alone). Returns each unit's :func:`reconstruct_unit`
    figures."""
    student.eval()
    teacher.eval()
    t_modules = dict(teacher.named_modules())
    s_modules = dict(student.named_modules())
    f_modules = dict(float_model.named_modules()) if float_model is not None else {}
    shape = tuple(images.shape[1:])
    bn_after = sole_bn_after(teacher, shape)
    units = [
        (unit, quantized)
        for unit, layers in rounding_units(student, shape, by)
        if unit in t_modules
        and (quantized := [s_modules[n] for n in layers if s_modules[n].w_bits < FLOAT_BITS])
    ]
    gen = torch.Generator().manual_seed(seed)
    report = {}
    capture_batch = 128
    for i, (name, layers) in enumerate(units):
        unit = s_modules[name]
        (x,) = capture(student, unit, images, capture_batch, "input")
        from_teacher = ("output", "input") if drop and float_model is None else ("output",)
        y, *rest = capture(teacher, t_modules[name], images, capture_batch, *from_teacher)
        xf = rest[0] if rest else None
        if drop and float_model is not None:
            (xf,) = capture(float_model, f_modules[name], images, capture_batch, "input")
        # a layer's loss is weighted by the BN it feeds; a block's output is past its ReLU: unweighted
        bn = bn_after.get(name) if unit in layers else None
        cw = bn_scale(bn).pow(2).to(x.device) if bn is not None else None
        with torch.enable_grad():
            inner = _learnable(list(unit.modules()))  # none in a stem conv: its rounding is learnt alone
            report[name] = reconstruct_unit(
                unit, layers, x, y, cw, iters, batch_size, lr, gen, xf, drop, act_lr if inner else 0.0
            )
        if on_layer is not None:
            on_layer(i + 1, len(units), name, report[name])
    return report
