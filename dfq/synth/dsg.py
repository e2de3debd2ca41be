"""DSG — Diverse Sample Generation (Zhang et al. CVPR 2021; Qin et al. TPAMI).

Three generator-side components:
- slack distribution alignment (SDA): BN statistics only need to land within a per-layer margin of the
  teacher's running statistics, ``(1/L) sum_l ||max(|mu_l - mu*_l| - delta_l, 0)||^2 + ||max(|s_l - s*_l| - gamma_l, 0)||^2``;
- layerwise sample enhancement (LSE): SDA on *per-sample* statistics, with sample i's term for layer
  ``i mod L`` weighted ``lse_factor`` (2);
- sample correlation inhibition (SCI): match the eigen-structure of the batch's Gram matrix to that of
  Gaussian noise, so samples decorrelate.

The reference margins (delta, gamma) were never published; dfq's rule is documented in
:class:`MarginEstimator`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfq.synth.moments import var_mean


def batch_stats(x: torch.Tensor, stat: str = "std") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (or biased var) over (N, H, W): shapes (C,), (C,)."""
    var, mean = var_mean(x, [0, 2, 3])
    return mean, (var + 1e-12).sqrt() if stat == "std" else var


def sample_stats(x: torch.Tensor, stat: str = "std") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std (or var) over (H, W): shapes (N, C), (N, C)."""
    var, mean = var_mean(x, [2, 3])
    return mean, (var + 1e-12).sqrt() if stat == "std" else var


def running_stat(running_var: torch.Tensor, stat: str = "std") -> torch.Tensor:
    return running_var.sqrt() if stat == "std" else running_var


def hinge(gap: torch.Tensor, margin: torch.Tensor | float, extra_abs: bool = False) -> torch.Tensor:
    """``max(gap - margin, 0)``; ``extra_abs`` reproduces the QAT reference's ``max(|gap - margin|, 0)``,
    which also penalises gaps *inside* the slack (a bug; parity switch only)."""
    d = gap - margin
    return d.abs() if extra_abs else torch.clamp(d, min=0.0)


def lse_weights(n: int, n_layers: int, layer: int, factor: float, device=None) -> torch.Tensor:
    """Per-sample weights for one layer: sample i is emphasised at layer ``i mod L``."""
    w = torch.ones(n, device=device)
    w[torch.arange(n, device=device) % n_layers == layer] = factor
    return w


def sda_loss(
    inputs: list[torch.Tensor],
    running_means: list[torch.Tensor],
    running_vars: list[torch.Tensor],
    mean_margins: torch.Tensor,
    std_margins: torch.Tensor,
    per_sample: bool,
    lse_factor: float = 2.0,
    stat: str = "std",
    extra_abs: bool = False,
) -> torch.Tensor:
    """Slack alignment over all BN layers, on batch statistics or (LSE) per-sample statistics.

    Batch form: ``(1/L) sum_l (||h(|mu_l - mu*_l| - delta_l)||^2 + ||h(|s_l - s*_l| - gamma_l)||^2)``
    (the QAT reference's normalisation). Per-sample form: the same with ``mu_l, s_l`` of each sample, the
    squared norm taken per sample, weighted by LSE and averaged over the batch (the PTQ reference divides
    by the batch size too).
    """
    n_layers = len(inputs)
    total = inputs[0].new_zeros(())
    for l, (x, rm, rv) in enumerate(zip(inputs, running_means, running_vars, strict=True)):
        target_s = running_stat(rv, stat)
        if per_sample:
            mean, s = sample_stats(x, stat)  # N x C
            per = hinge((mean - rm).abs(), mean_margins[l], extra_abs).pow(2).sum(1) + hinge(
                (s - target_s).abs(), std_margins[l], extra_abs
            ).pow(2).sum(1)
            w = lse_weights(x.shape[0], n_layers, l, lse_factor, x.device) if lse_factor != 1.0 else None
            total = total + ((per * w).mean() if w is not None else per.mean())
        else:
            mean, s = batch_stats(x, stat)
            total = total + hinge((mean - rm).abs(), mean_margins[l], extra_abs).pow(2).sum()
            total = total + hinge((s - target_s).abs(), std_margins[l], extra_abs).pow(2).sum()
    return total / n_layers


class MarginEstimator:
    """dfq's rule for the slack margins (the reference loads unpublished files).

    During warm-up the generator trains with the plain GDFQ BN loss; over the last ``window`` warm-up
    iterations we record, per BN layer, every |statistic - running statistic| (per channel, and per
    sample when LSE is on). At the end of warm-up, delta_l / gamma_l = the ``percentile``-th percentile
    of those gaps. Rationale: the slack then tolerates the deviations the generator already reaches
    under exact alignment, freeing it to spread out instead of collapsing onto the running statistics.
    """

    def __init__(self, n_layers: int, percentile: float, per_sample: bool, stat: str) -> None:
        self.percentile, self.per_sample, self.stat = percentile, per_sample, stat
        self.mean_gaps: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.std_gaps: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    @torch.no_grad()
    def observe(
        self, inputs: list[torch.Tensor], running_means: list[torch.Tensor], running_vars: list[torch.Tensor]
    ) -> None:
        for l, (x, rm, rv) in enumerate(zip(inputs, running_means, running_vars, strict=True)):
            mean, s = (sample_stats if self.per_sample else batch_stats)(x.detach(), self.stat)
            self.mean_gaps[l].append((mean - rm).abs().flatten().cpu())
            self.std_gaps[l].append((s - running_stat(rv, self.stat)).abs().flatten().cpu())

    def margins(self) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.percentile / 100.0
        if not self.mean_gaps[0]:
            raise RuntimeError(
                "no warm-up statistics observed: SDA's warmup-percentile margins need warm-up iterations"
            )
        mean_m = torch.stack([torch.quantile(torch.cat(g), q) for g in self.mean_gaps])
        std_m = torch.stack([torch.quantile(torch.cat(g), q) for g in self.std_gaps])
        return mean_m, std_m


def gram_eigen(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of S = Phi Phi^T, Phi = L2-normalised flattened images (ascending order)."""
    phi = F.normalize(images.flatten(1), p=2, dim=1)
    return torch.linalg.eigh(phi @ phi.t())


def sci_loss(fake: torch.Tensor, noise: torch.Tensor, magnitude_scale: float = 1e-4) -> torch.Tensor:
    """``1e-4 * MSE(eig_fake, eig_noise) + |sum(minmax(eig_noise) * (-sum(v_fake * v_noise, 0)))|``.

    ``torch.linalg.eigh`` replaces the reference's removed ``torch.eig``; both sides are sorted
    ascending, so eigenpairs are matched by rank. The noise side carries no gradient.
    """
    vals_f, vecs_f = gram_eigen(fake)
    with torch.no_grad():
        vals_n, vecs_n = gram_eigen(noise)
    magnitude = magnitude_scale * F.mse_loss(vals_f, vals_n)
    structure = -(vecs_f * vecs_n).sum(0)
    span = (vals_n.max() - vals_n.min()).clamp_min(1e-12)
    weights = (vals_n - vals_n.min()) / span
    return magnitude + (weights * structure).sum().abs()


@torch.no_grad()
def mean_abs_correlation(images: torch.Tensor) -> float:
    """Mean |cosine similarity| between distinct samples: the diagnostic SCI should push down."""
    phi = F.normalize(images.flatten(1), dim=1)
    s = phi @ phi.t()
    n = s.shape[0]
    return ((s.abs().sum() - s.diagonal().abs().sum()) / max(n * (n - 1), 1)).item()
