"""The generative DFQ loop (GDFQ): one generator step, then one student step on the same batch.

It knows nothing of Celery or HTTP: it takes a ``JobSpec``, a teacher, an event callback and a cancel
check, and saves/loads its complete state so a killed run resumes where its last checkpoint left it
and continues bit-for-bit as if it had never stopped (on CPU).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dfq import oom
from dfq.data import LabelledSet, Preprocess
from dfq.distill import student_loss
from dfq.evaluate import predict, top1
from dfq.quant import ActQuant, quantize, set_calibration
from dfq.quant.adaround import adaround
from dfq.quant.bias_correct import bias_correct
from dfq.quant.bn_ranges import set_ranges_from_bn
from dfq.quant.modules import FLOAT_BITS, float_twin
from dfq.quant.squant import squant
from dfq.spec import JobSpec, same_spec
from dfq.speed import as_float32, autocast, compile_networks, set_memory_format
from dfq.synth.bn_stats import bn_layers
from dfq.synth.generators import build_generator
from dfq.synth.objective import GeneratorObjective

STATE_VERSION = 1


class Cancelled(Exception):
    """Raised when the cancel check returned True; the state was saved first."""


@dataclass
class Event:
    """What the loop reports; the CLI shows it as a progress bar, the worker stores and publishes it.

    kind: ``phase`` (a new phase began), ``step`` (an iteration finished, with its losses),
    ``samples`` (a grid of synthetic images), ``eval`` (accuracy on the labelled set), ``checkpoint``.
    """

    kind: str
    phase: str
    step: int
    total: int
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    images: torch.Tensor | None = None  # N x C x H x W in the teacher's (normalised) input space
    labels: torch.Tensor | None = None


EventCallback = Callable[[Event], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _grads_finite(module: nn.Module) -> bool:
    """False when a loss produced inf/NaN gradients (e.g. eigh on a degenerate Gram matrix); the step is
    then skipped and logged as ``g_skipped`` rather than corrupting the generator."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return bool(torch.isfinite(torch.stack([g.abs().sum() for g in grads]).sum())) if grads else True


class DivergedError(ValueError):
    """The student's gradient or weights became non-finite: nothing worth evaluating or exporting."""


def _student_grad_norm(student: nn.Module, clip: float | None) -> float:
    """The global L2 norm of the student's gradient (before clipping), clipped to ``clip`` if set.

    Logged at every step because it is the first sign of a student about to diverge; clipping is off
    unless ``budget.clip_grad_s`` asks for it (no reference clips).
    """
    params = [p for p in student.parameters() if p.grad is not None]
    if clip is None:
        return float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    return float(torch.nn.utils.clip_grad_norm_(params, clip))


class Pipeline:
    """One run's models, optimizers and counters (state is real here, hence a class)."""

    def __init__(
        self,
        spec: JobSpec,
        teacher: nn.Module,
        num_classes: int,
        input_shape: tuple[int, int, int],
        device: torch.device | str = "cpu",
        eval_set: LabelledSet | None = None,
        preprocess: Preprocess | None = None,
        samples_per_class: int = 4,
        calib_set: LabelledSet | None = None,
        round_set: LabelledSet | None = None,
    ) -> None:
        self.spec, self.device = spec, torch.device(device)
        self.num_classes, self.input_shape = num_classes, tuple(input_shape)
        self.eval_set, self.preprocess = eval_set, preprocess
        self.round_set = round_set  # real images for quant.round_data; None: the generator's
        seed_everything(spec.seed)
        self.teacher = teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if not bn_layers(self.teacher):
            raise ValueError("the teacher has no BatchNorm layers: nothing for the generator to match")
        self.student = quantize(self.teacher, spec.quant).to(self.device).eval()
        if spec.quant.act_clip == "bn-mse":
            q = spec.quant
            set_ranges_from_bn(
                self.student, self.input_shape, q.act_mse_weight, q.act_equalize == "depthwise"
            )
        for p in self.student.parameters():
            p.requires_grad_(True)
        m, b = spec.method, spec.budget
        self.generator = build_generator(
            m.generator,
            num_classes,
            self.input_shape,
            m.latent_dim,
            lka=bool(m.lrq and m.lrq.lka),
            center_condition=m.acq is not None,
            fused_upsample=spec.speed.fused_upsample,
            polyphase_dilated=spec.speed.polyphase_dilated,
        ).to(self.device)
        self.objective = GeneratorObjective(
            spec, self.teacher, num_classes, self.input_shape, self.device, calib_set, preprocess
        )
        self.generator.train()
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=b.lr_g, betas=tuple(b.g_betas))
        self.opt_s = torch.optim.SGD(
            self.student.parameters(),
            lr=b.student_lr(spec.quant) * m.lr_s_scale,
            momentum=b.momentum,
            nesterov=b.nesterov,
            weight_decay=b.weight_decay,
        )
        self.sched_g = torch.optim.lr_scheduler.MultiStepLR(self.opt_g, b.lr_milestones, b.lr_gamma)
        self.sched_s = torch.optim.lr_scheduler.MultiStepLR(self.opt_s, b.lr_milestones, b.lr_gamma)
        self.step = 0  # iterations completed
        self.history: dict[str, Any] = {"evals": [], "best": None, "train_s": 0.0}
        # Fixed noise for sample grids: the same z at every snapshot, so grids show how G evolves.
        shown = min(num_classes, 10)
        g = torch.Generator().manual_seed(spec.seed + 7919)
        self.sample_z = torch.randn(shown * samples_per_class, m.latent_dim, generator=g).to(self.device)
        self.sample_y = torch.arange(shown).repeat_interleave(samples_per_class).to(self.device)
        # ACQ generators also take an attention center: snapshots use a fixed spread of centers
        self.sample_c = torch.rand(len(self.sample_y), 2, generator=g).to(self.device) if m.acq else None
        set_memory_format(self._networks(), spec.speed.channels_last)
        if spec.speed.compile:
            compile_networks([self.student, self.generator], True)

    def _networks(self) -> list[nn.Module]:
        twin = self.objective.twin
        return [self.teacher, self.student, self.generator, *([twin] if twin is not None else [])]

    # ------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "spec": json.dumps(self.spec.canonical(), sort_keys=True),
            "step": self.step,
            "generator": self.generator.state_dict(),
            "student": self.student.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_s": self.opt_s.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "sched_s": self.sched_s.state_dict(),
            "rng": _rng_state(),
            "history": json.dumps(self.history),
            "objective": self.objective.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"checkpoint state version {state.get('version')} is not {STATE_VERSION}")
        if not same_spec(json.loads(state["spec"]), self.spec):
            raise ValueError(
                "the checkpoint was written by a run with a different JobSpec; use another --out"
            )
        self.step = int(state["step"])
        self.generator.load_state_dict(state["generator"])
        self.student.load_state_dict(state["student"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_s.load_state_dict(state["opt_s"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_s.load_state_dict(state["sched_s"])
        self.history = json.loads(state["history"])
        self.objective.load_state_dict(state.get("objective", {}))
        _set_rng_state(state["rng"])

    def save(self, path: str | Path) -> None:
        """Atomic write, so a kill during the save leaves the previous checkpoint intact."""
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path: str | Path) -> None:
        # onto the host: load_state_dict copies weights and optimizer state to the modules' device, and
        # the RNG states must stay host ByteTensors (mapped to a GPU, a resume there would fail: found by
        # tests/dfq/test_device_placement.py on the meta device)
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # ------------------------------------------------------------------------------------ loop

    @property
    def total(self) -> int:
        return self.spec.budget.total_iters

    @property
    def steps_run(self) -> int:
        """Iterations this run's loop took: ``step`` less those ``budget.idle_generator`` left out."""
        return self.step - self.history.get("generator_skipped", {}).get("steps", 0)

    def phase(self, epoch: int) -> str:
        b, q = self.spec.budget, self.spec.quant
        if epoch < b.warmup_epochs:
            return "warmup"
        return "calibrate+finetune" if epoch < q.calibration_epochs else "finetune"

    def train_step(self) -> dict[str, float]:
        """One iteration: G step on L_G, then S step on L_S with the same (detached) images."""
        b = self.spec.budget
        epoch = self.step // b.iters_per_epoch
        in_warmup = epoch < b.warmup_epochs
        extra: dict[str, float] = {}
        if not in_warmup and self.objective.needs_warmup_end():
            extra = self.objective.on_warmup_end(self.generator)

        with autocast(self.device, self.spec.speed.bf16):
            loss_g, images, y, t_logits, parts = self.objective.loss(self.generator, in_warmup)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        finite = _grads_finite(self.generator)
        if finite:
            self.opt_g.step()

        x, t, labels = images.detach(), t_logits.detach(), y
        obj = self.objective
        if not in_warmup and obj.calib_images is not None and self.spec.method.fdda.student_real:
            x = torch.cat([obj.calib_images, x])
            t = torch.cat([obj.calib_logits, t])
            labels = torch.cat([obj.calib_labels, y])
        with torch.set_grad_enabled(not in_warmup):
            with autocast(self.device, self.spec.speed.bf16):
                s_logits = as_float32(self.student(x))
            loss_s, s_parts = student_loss(
                self.spec.method, s_logits, t, labels, epoch, b.epochs, b.warmup_epochs
            )
        grad_norm = None
        if not in_warmup:
            self.opt_s.zero_grad(set_to_none=True)
            loss_s.backward()
            grad_norm = _student_grad_norm(self.student, b.clip_grad_s)
            if not math.isfinite(grad_norm):  # stop before the step: the last checkpoint stays usable
                raise DivergedError(
                    f"the student diverged: its gradient is non-finite at step {self.step + 1} "
                    f"(student loss {loss_s.item():.4g}); metrics.jsonl shows where its loss grew. "
                    "Lower budget.lr_s (or method.lr_s_scale) or set budget.clip_grad_s, and run again "
                    "into another --out (this one's checkpoint belongs to the old spec)"
                )
            self.opt_s.step()
        metrics = {
            "g_loss": loss_g.item(),
            "g_acc": top1(t_logits.argmax(1), y),
            "s_loss": loss_s.item(),
            "s_agree": top1(s_logits.argmax(1), t.argmax(1)),
            "lr_s": self.opt_s.param_groups[0]["lr"],
            "lr_g": self.opt_g.param_groups[0]["lr"],
            **{k: float(v) for k, v in parts.items()},
            **{k: float(v) for k, v in s_parts.items()},
            **extra,
        }
        if grad_norm is not None:
            metrics["s_grad_norm"] = grad_norm
        if not finite:
            metrics["g_skipped"] = 1.0
        return metrics

    @torch.no_grad()
    def synthesize(self, z: torch.Tensor, y: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """G's images as training sees them (train-mode BN), leaving G's BN running stats untouched."""
        saved = {k: v.clone() for k, v in self.generator.named_buffers()}
        c = self.sample_c if (c is None and self.sample_c is not None and len(z) == len(self.sample_c)) else c
        if c is None and self.objective.center_conditioned:
            c = torch.rand(len(z), 2, generator=torch.Generator().manual_seed(len(z))).to(self.device)
        images = self.generator(z.to(self.device), y.to(self.device), c)
        for k, v in self.generator.named_buffers():
            v.copy_(saved[k])
        return images

    def sample_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Images for the fixed sample noise (grouped by class)."""
        return self.synthesize(self.sample_z, self.sample_y).cpu(), self.sample_y.cpu()

    def evaluate(self, limit: int | None = None) -> dict[str, float] | None:
        """Top-1 of the student on the labelled set; activation ranges never see real data."""
        if self.eval_set is None:
            return None
        data = self.eval_set.subset(limit)
        set_calibration(self.student, False)
        pred = predict(self.student, data.images, self.preprocess, device=self.device)
        return {"q_top1": round(top1(pred, data.labels), 2), "n_eval": len(data)}

    def idle_generator(self) -> str | None:
        """Why the generator's steps cannot change the result (``budget.idle_generator``), or None.

        A step reaches the student in three ways only: a student step, an activation range calibrated on
        its images, and weight rounding learnt on its images. With none of them the steps are work a user
        waits for and gets nothing from (MobileNetV2 at ``calibrate`` with ``bn-mse``: 80 steps, minutes
        on a CPU, the same student for every seed)."""
        b, q = self.spec.budget, self.spec.quant
        if b.idle_generator != "skip" or b.student_steps:
            return None
        quants = [m for m in self.student.modules() if isinstance(m, ActQuant) and m.bits < FLOAT_BITS]
        if any(not m.fixed for m in quants):
            return None
        if q.uses_images and self.round_set is None:
            return None
        return (
            f"no student step, all {len(quants)} activation ranges from the teacher's BN, and nothing "
            "after training reads the generator's images"
        )

    def run(
        self,
        on_event: EventCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        checkpoint_path: str | Path | None = None,
    ) -> dict[str, Any]:
        """Train to the end of the budget (from ``self.step``), emitting events; returns the history."""
        b, q = self.spec.budget, self.spec.quant
        emit = on_event or (lambda e: None)
        why = self.idle_generator() if self.step < self.total else None
        if why is not None:  # the loop below then has nothing to do
            emit(Event("phase", "ranges", self.step, self.total, 0))
            self.history["generator_skipped"] = {"reason": why, "steps": self.total - self.step}
            self.step = self.total
            if b.eval_every:
                self._record_eval(emit, "ranges", b.epochs, {"epoch": b.epochs})
            if checkpoint_path:
                self.save(checkpoint_path)
        current_phase = None
        t0, first = time.perf_counter(), self.step
        while self.step < self.total:
            epoch = self.step // b.iters_per_epoch
            if self.step % b.iters_per_epoch == 0 or self.step == first:
                set_calibration(self.student, epoch < q.calibration_epochs)
            phase = self.phase(epoch)
            if phase != current_phase:
                current_phase = phase
                emit(Event("phase", phase, self.step, self.total, epoch))
            if should_cancel is not None and should_cancel():
                if checkpoint_path:
                    self.save(checkpoint_path)
                raise Cancelled(f"cancelled at step {self.step}/{self.total}")
            t_step = time.perf_counter()
            metrics = oom.train_step(self)  # halves the batch on device OOM (dfq/oom.py)
            self.step += 1
            self.history["train_s"] += time.perf_counter() - t_step
            metrics["it_per_s"] = (self.step - first) / max(time.perf_counter() - t0, 1e-9)
            emit(Event("step", phase, self.step, self.total, epoch, metrics))
            if self.step % b.sample_every == 0 or self.step == self.total:
                images, labels = self.sample_grid()
                emit(Event("samples", phase, self.step, self.total, epoch, images=images, labels=labels))
            if self.step % b.iters_per_epoch == 0:
                with warnings.catch_warnings():  # the student is not stepped during warm-up
                    warnings.simplefilter("ignore", UserWarning)
                    self.sched_g.step()
                    self.sched_s.step()
                done_epochs = self.step // b.iters_per_epoch
                if b.eval_every and (done_epochs % b.eval_every == 0 or self.step == self.total):
                    self._record_eval(emit, phase, epoch, {"epoch": done_epochs})
            if checkpoint_path and (self.step % b.checkpoint_every == 0 or self.step == self.total):
                self.save(checkpoint_path)
                emit(Event("checkpoint", phase, self.step, self.total, epoch))
        set_calibration(self.student, False)
        set_memory_format(self._networks(), False)  # exports (safetensors) need contiguous NCHW tensors
        compile_networks([self.student, self.generator], False)  # export traces them again, eager
        if q.weight_round != "nearest" and "rounded" not in self.history:
            self.round_weights(emit, should_cancel)
            if checkpoint_path:  # the rounded weights are the result: a resume must not round them again
                self.save(checkpoint_path)
                emit(Event("checkpoint", "round", self.step, self.total, self.step // b.iters_per_epoch))
        if q.bias_correct and "bias_corrected" not in self.history:
            self.correct_bias(emit)
            if checkpoint_path:  # as for the rounding: a resume must not shift the means twice
                self.save(checkpoint_path)
                emit(Event("checkpoint", "bias", self.step, self.total, self.step // b.iters_per_epoch))
        return self.history

    def correct_bias(self, emit: EventCallback) -> dict[str, dict[str, float]]:
        """``quant.bias_correct``, last (after any rounding, whose codes it corrects for): every quantized
        layer's mean output shift against the teacher, on the generator's images or ``round_data``'s,
        taken off (dfq/quant/bias_correct.py)."""
        b = self.spec.budget
        epoch = self.step // b.iters_per_epoch
        emit(Event("phase", "bias", self.step, self.total, epoch))
        report = bias_correct(self.student, self.teacher, self._round_images(self.spec.quant.bias_images))
        self.history["bias_corrected"] = report
        if b.eval_every:
            self._record_eval(emit, "bias", epoch, {"epoch": b.epochs, "bias_corrected": 1})
        return report

    def round_weights(
        self, emit: EventCallback, should_cancel: Callable[[], bool] | None = None
    ) -> dict[str, dict[str, float]]:
        """``quant.weight_round``, once training is over: ``adaround`` learns every layer's rounding on the
        generator's images, or ``quant.round_data``'s real ones (dfq/quant/adaround.py); ``squant`` flips
        roundings so kernel and channel error sums stay within half a step, without images
        (dfq/quant/squant.py). A cancel between adaround's layers leaves the checkpoint of the finished
        training, so a resume rounds from the start again."""
        q, b = self.spec.quant, self.spec.budget
        epoch = self.step // b.iters_per_epoch
        emit(Event("phase", "round", self.step, self.total, epoch))

        def layer_done(i: int, n: int, figures: dict[str, float]) -> None:
            emit(Event("round", "round", self.step, self.total, epoch, {"layer": i, "layers": n, **figures}))

        def on_layer(i: int, n: int, name: str, figures: dict[str, float]) -> None:
            layer_done(i, n, figures)
            if should_cancel is not None and i < n and should_cancel():
                raise Cancelled(f"cancelled while rounding weights ({q.round_unit} {i}/{n})")

        if q.weight_round == "squant":
            report = squant(self.student)
            for i, figures in enumerate(report.values(), 1):
                layer_done(i, len(report), figures)
        else:
            report = adaround(
                self.student,
                self.teacher,
                self._round_images(),
                q.round_iters,
                seed=self.spec.seed,
                on_layer=on_layer,
                drop=q.round_drop,
                by=q.round_unit,
                act_lr=q.round_act_lr if q.round_act == "lsq" else 0.0,
                float_model=float_twin(self.student) if q.round_drop and q.act_equalize != "none" else None,
            )
        self.history["rounded"] = report
        if b.eval_every:
            self._record_eval(emit, "round", epoch, {"epoch": b.epochs, "rounded": 1})
        return report

    def _record_eval(self, emit: EventCallback, phase: str, epoch: int, tags: dict[str, int]) -> None:
        """Evaluate on the labelled slice (if any), keep the result (and the best so far) in the history
        with ``tags``, and emit it."""
        result = self.evaluate(self.spec.budget.eval_limit)
        if result is None:
            return
        result.update(tags)
        self.history["evals"].append(result)
        best = self.history["best"]
        if best is None or result["q_top1"] > best["q_top1"]:
            self.history["best"] = result
        emit(Event("eval", phase, self.step, self.total, epoch, dict(result)))

    def _round_images(self, count: int | None = None) -> torch.Tensor:
        """``count`` (default ``quant.round_images``) images to learn the rounding or measure the bias
        shifts on: the generator's (as training sees them), or a random draw from ``round_set`` in the
        teacher's input space."""
        b = self.spec.budget
        count = count or self.spec.quant.round_images
        g = torch.Generator().manual_seed(self.spec.seed + 104729)
        if self.round_set is not None:
            pick = torch.randperm(len(self.round_set), generator=g)[:count]
            x = self.round_set.images[pick]
            return (self.preprocess(x) if self.preprocess is not None else x).to(self.device)
        images = []
        for n in range(0, count, b.batch_size):
            z, y = self.generator.sample_inputs(min(b.batch_size, count - n), g)
            c = torch.rand(len(z), 2, generator=g) if self.objective.center_conditioned else None
            images.append(self.synthesize(z, y, None if c is None else c.to(self.device)))
        return torch.cat(images)
