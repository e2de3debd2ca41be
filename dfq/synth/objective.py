"""The generator's objective L_G, assembled from the GDFQ baseline and the method blocks of a spec.

Everything a method needs between steps (DSG slack margins, FDDA class centers, ACQ's batch-statistics
teacher copy, feature taps) lives here, and what must survive a resume is in ``state_dict``.
Method-agnostic diagnostics (sample correlation, intra-class angle, attention-center spread) are logged
for every run, so a method's effect can be compared against the baseline's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfq.attention import FeatureTap, default_stage
from dfq.data import LabelledSet, Preprocess
from dfq.spec import JobSpec
from dfq.speed import as_float32
from dfq.synth import acq as acq_losses
from dfq.synth import dsg as dsg_losses
from dfq.synth import fdda as fdda_losses
from dfq.synth.bn_stats import BNStatsRecorder, bn_layers, bns_loss
from dfq.synth.lrq import ama_loss, angular_stats


class PenultimateTap:
    """Captures the input of the model's last Linear layer: the penultimate feature LRQ's AMA uses."""

    def __init__(self, model: nn.Module) -> None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                "the teacher has no final Linear layer: LRQ's margin loss needs FC class centers"
            )
        self.fc = linears[-1]
        self.features: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module, args) -> None:
        self.features = args[0]

    def __enter__(self) -> PenultimateTap:
        self._handle = self.fc.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


class GeneratorObjective:
    def __init__(
        self,
        spec: JobSpec,
        teacher: nn.Module,
        num_classes: int,
        input_shape: tuple[int, int, int],
        device: torch.device,
        calib_set: LabelledSet | None = None,
        preprocess: Preprocess | None = None,
    ) -> None:
        self.spec, self.teacher, self.num_classes, self.device = spec, teacher, num_classes, device
        m = spec.method
        self.n_bn = len(bn_layers(teacher))
        self.stage = (m.acq.stage if m.acq and m.acq.stage else None) or default_stage(teacher, input_shape)
        self.twin = acq_losses.batch_stats_copy(teacher) if m.acq and m.acq.consistency_weight > 0 else None
        self.margins: tuple[torch.Tensor, torch.Tensor] | None = None
        if m.dsg and m.dsg.sda and m.dsg.sda_margin == "fixed":
            self.margins = (
                torch.full((self.n_bn,), m.dsg.sda_fixed_mean, device=device),
                torch.full((self.n_bn,), m.dsg.sda_fixed_std, device=device),
            )
        self.centers: fdda_losses.ClassCenters | None = None
        self.calib_images: torch.Tensor | None = None  # few-shot FDDA: preprocessed real images
        self.calib_labels: torch.Tensor | None = None
        self.calib_logits: torch.Tensor | None = None
        if m.fdda and m.fdda.centers == "few-shot":
            self._few_shot_centers(calib_set, preprocess)

    # ------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.margins is not None:
            out["dsg_margins"] = torch.stack(self.margins)
        if self.centers is not None:
            out["fdda_centers"] = self.centers.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "dsg_margins" in state:
            self.margins = (state["dsg_margins"][0].to(self.device), state["dsg_margins"][1].to(self.device))
        if "fdda_centers" in state:
            self.centers = fdda_losses.ClassCenters.from_state_dict(state["fdda_centers"]).to(self.device)

    # ------------------------------------------------------------------------------- sampling

    @property
    def center_conditioned(self) -> bool:
        return self.spec.method.acq is not None

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """z, y and (ACQ) centers. With ACQ's pair loss the second half repeats the first half's (y, c)."""
        m = self.spec.method
        z = torch.randn(n, m.latent_dim, device=self.device)
        y = torch.randint(0, self.num_classes, (n,), device=self.device)
        c = None
        if self.center_conditioned:
            c = torch.rand(n, 2, device=self.device)
            if m.acq.pair_weight > 0:
                half = n // 2
                y[half : 2 * half] = y[:half]
                c[half : 2 * half] = c[:half]
        return z, y, c

    # ------------------------------------------------------------------------------- phase changes

    def needs_warmup_end(self) -> bool:
        m = self.spec.method
        dsg_pending = m.dsg is not None and m.dsg.sda and self.margins is None
        fdda_pending = m.fdda is not None and self.centers is None
        return dsg_pending or fdda_pending

    @torch.no_grad()
    def on_warmup_end(self, generator: nn.Module) -> dict[str, float]:
        """Set DSG margins and zero-shot FDDA centers from the end-of-warm-up generator (once)."""
        m, out = self.spec.method, {}
        batch = self.spec.budget.batch_size
        if m.dsg and m.dsg.sda and self.margins is None:
            est = dsg_losses.MarginEstimator(self.n_bn, m.dsg.sda_percentile, m.dsg.lse, m.dsg.sda_stat)
            for _ in range(m.dsg.sda_window):
                z, y, c = self.sample(batch)
                with BNStatsRecorder(self.teacher, keep_inputs=True) as rec:
                    self.teacher(generator(z, y, c))
                est.observe(rec.inputs, rec.running_means, rec.running_vars)
            self.margins = tuple(t.to(self.device) for t in est.margins())
            out |= {
                "dsg_margin_mean": self.margins[0].mean().item(),
                "dsg_margin_std": self.margins[1].mean().item(),
            }
        if m.fdda and self.centers is None:
            per_class, correct = [], []
            for cls in range(self.num_classes):
                n = m.fdda.zero_shot_samples
                z, _, c = self.sample(n)
                y = torch.full((n,), cls, device=self.device)
                with BNStatsRecorder(self.teacher) as rec:
                    logits = self.teacher(generator(z, y, c))
                per_class.append(([t.detach() for t in rec.means], [t.detach() for t in rec.vars]))
                correct.append((logits.argmax(1) == cls).float().mean() > 0.5)
            self.centers = fdda_losses.centers_from_stats(per_class, torch.stack(correct))
            out["fdda_valid_classes"] = float(self.centers.valid.sum().item())
        return out

    @torch.no_grad()
    def _few_shot_centers(self, calib: LabelledSet | None, preprocess: Preprocess | None) -> None:
        if calib is None or preprocess is None:
            raise ValueError("FDDA few-shot needs its calibration set loaded")
        k = self.spec.method.fdda.calib_per_class
        gen = torch.Generator().manual_seed(self.spec.seed)
        per_class, correct, images, labels = [], [], [], []
        for cls in range(self.num_classes):
            idx = (calib.labels == cls).nonzero().flatten()
            if len(idx) < k:
                raise ValueError(
                    f"calibration set {calib.name} has {len(idx)} images of class {cls}, needs {k}"
                )
            pick = idx[torch.randperm(len(idx), generator=gen)[:k]]
            x = preprocess(calib.images[pick]).to(self.device)
            with BNStatsRecorder(self.teacher) as rec:
                logits = self.teacher(x)
            per_class.append((rec.means, rec.vars))
            correct.append((logits.argmax(1) == cls).float().mean() > 0.5)
            images.append(x)
            labels.append(torch.full((k,), cls, device=self.device))
        self.centers = fdda_losses.centers_from_stats(per_class, torch.stack(correct))
        self.calib_images, self.calib_labels = torch.cat(images), torch.cat(labels)
        self.calib_logits = self.teacher(self.calib_images)

    # ------------------------------------------------------------------------------- the loss

    def loss(
        self, generator: nn.Module, in_warmup: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One batch through G and T: returns (L_G, images, labels, teacher logits, metric tensors)."""
        m = self.spec.method
        z, y, c = self.sample(self.spec.budget.batch_size)
        images = as_float32(generator(z, y, c))
        sda_on = m.dsg is not None and m.dsg.sda and self.margins is not None
        tap = FeatureTap(self.teacher, self.stage) if self.stage else None
        with BNStatsRecorder(self.teacher, keep_inputs=sda_on) as rec, PenultimateTap(self.teacher) as pen:
            if tap:
                with tap:
                    t_logits = self.teacher(images)
            else:
                t_logits = self.teacher(images)
        t_logits = as_float32(t_logits)
        metrics: dict[str, torch.Tensor] = {}
        if m.lrq and m.lrq.ama:
            ce = ama_loss(pen.features, pen.fc.weight, y, m.lrq.ama_margin, m.lrq.ama_scale)
            metrics["g_ama"] = ce.detach()
            metrics["g_ce"] = F.cross_entropy(t_logits, y).detach()
        else:
            ce = F.cross_entropy(t_logits, y)
            metrics["g_ce"] = ce.detach()
        if sda_on:
            d = m.dsg
            bn = dsg_losses.sda_loss(
                rec.inputs, rec.running_means, rec.running_vars, self.margins[0], self.margins[1],
                per_sample=d.lse, lse_factor=d.lse_factor if d.lse else 1.0, stat=d.sda_stat, extra_abs=d.sda_extra_abs,
            )  # fmt: skip
            metrics["g_sda"] = bn.detach()
        else:
            bn = bns_loss(rec.means, rec.vars, rec.running_means, rec.running_vars)
        metrics["g_bns"] = bns_loss(
            [t.detach() for t in rec.means],
            [t.detach() for t in rec.vars],
            rec.running_means,
            rec.running_vars,
        )
        loss = m.g_ce_weight * ce + m.bns_weight * bn

        if m.dsg and m.dsg.sci:
            sci = dsg_losses.sci_loss(images, torch.randn_like(images), m.dsg.sci_magnitude_scale)
            loss = loss + m.dsg.sci_weight * sci / self.n_bn
            metrics["g_sci"] = sci.detach()

        if m.fdda and self.centers is not None and not (in_warmup and m.fdda.centers == "zero-shot"):
            loss = loss + self._fdda_terms(generator, metrics)

        if m.acq and tap is not None:
            feats = tap.output
            if m.acq.acm_weight > 0:
                acm = acq_losses.center_matching_loss(feats, c)
                loss = loss + m.acq.acm_weight * acm
                metrics["acq_acm"] = acm.detach()
            if m.acq.pair_weight > 0:
                pair = acq_losses.pair_loss(feats, z)
                loss = loss + m.acq.pair_weight * pair
                metrics["acq_pair"] = pair.detach()
            if self.twin is not None:
                with FeatureTap(self.twin, self.stage) as twin_tap:
                    self.twin(images)
                cons = acq_losses.consistency_loss(feats, twin_tap.output)
                loss = loss + m.acq.consistency_weight * cons
                metrics["acq_consistency"] = cons.detach()

        # method-agnostic diagnostics
        with torch.no_grad():
            metrics["diag_corr"] = torch.tensor(dsg_losses.mean_abs_correlation(images))
            metrics |= {k: torch.tensor(v) for k, v in angular_stats(pen.features, pen.fc.weight, y).items()}
            if tap is not None:
                metrics["diag_center_spread"] = torch.tensor(acq_losses.center_spread(tap.output))
        return loss, images, y, t_logits, metrics

    def _fdda_terms(self, generator: nn.Module, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        """A single-class batch pulled to its (distorted) class center in the deeper half of the net."""
        f = self.spec.method.fdda
        pool = (
            self.centers.valid.nonzero().flatten()
            if f.correct_classes_only and self.centers.valid.any()
            else None
        )
        if pool is None:
            cls = int(torch.randint(0, self.num_classes, ()).item())
        else:
            cls = int(pool[torch.randint(0, len(pool), ())].item())
        z, _, c = self.sample(self.spec.budget.batch_size)
        y = torch.full((z.shape[0],), cls, device=self.device)
        with BNStatsRecorder(self.teacher) as rec:
            logits = self.teacher(generator(z, y, c))
        start = fdda_losses.start_layer(self.n_bn)
        cbns = fdda_losses.centralized_loss(rec.means, rec.vars, self.centers, cls, start)
        dbns = fdda_losses.distorted_loss(
            rec.means, rec.vars, self.centers, cls, start, f.dbns_mean_std, f.dbns_var_std
        )
        ce = F.cross_entropy(logits, y)
        metrics |= {"fdda_cbns": cbns.detach(), "fdda_dbns": dbns.detach(), "fdda_ce": ce.detach()}
        return f.cbns_weight * cbns + f.dbns_weight * dbns + f.single_ce_weight * ce
