"""The job specification: one pydantic model shared by the CLI, the API and the worker.

A run is fully determined by ``teacher + JobSpec``; the canonical JSON (``spec.canonical()``) is
stored with every run so it can be repeated exactly. Users write a shorthand::

    {"method": "gdfq", "bits": "W4A4", "budget": "cpu", "seed": 0, "eval": "fashion-mnist"}

where ``method`` and ``budget`` name presets and any field can be overridden, e.g.
``{"budget": {"preset": "cpu", "epochs": 30}, "quant": {"first_layer_bits": 8}}``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

_BITS_RE = re.compile(r"^W(\d+)A(\d+)(?:[-_ ]?F(\d+)L(\d+))?$", re.IGNORECASE)
FLOAT_BITS = 32


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_bits(v: int | None) -> int | None:
    if v is not None and not (2 <= v <= 16 or v == FLOAT_BITS):
        raise ValueError(f"bit-width must be between 2 and 16 (or 32 for floating point), got {v}")
    return v


# Named quantization recipes, set with ``"quant": "recon"`` or ``{"preset": "recon", ...}`` (fields given
# beside the name override it; the bits come from ``bits``). None (the default) is the reference's
# quantizer: min/max EMA ranges, nearest rounding. ``recon`` is the recipe behind dfq's best data-free
# results (docs/benchmarks.md "The `recon` quantization preset"): activation ranges from the teacher's
# BN (least-error Gaussian clipping, depthwise-equalised, consumer-weighted), the clipped STE, and after
# training each residual block's weight rounding and activation steps learnt against the teacher on the
# generator's images with QDrop's input drop. Bias correction is not in it: measured on the generator's
# images it gains resnet20 W3A3 0.37 but costs MobileNetV2 W3A3 2.33 and W4A4 up to 0.09 (which takes
# one seed out of 1 point of FP) and resnet20 W4A4 0.12-0.23. Meant for the `calibrate` budget: learnt rounding undoes a fine-tuning.
QUANT_PRESETS: dict[str, dict[str, Any]] = {
    "recon": {
        "act_clip": "bn-mse",
        "act_ste": "clipped",
        "act_equalize": "depthwise",
        "act_mse_weight": "consumer",
        "weight_round": "adaround",
        "round_drop": 0.5,
        "round_unit": "block",
        "round_act": "lsq",
        "round_act_lr": 2e-3,
    },
}

# What a preset's field serves: the preset fills it only where these hold in the spec it resolves to. So
# overriding the field it serves switches its dependants off with it: ``{"preset": "recon",
# "weight_round": "nearest"}`` is the recipe without its learnt rounding (round_drop, round_unit,
# round_act and round_act_lr fall back to their defaults) instead of a failed check below. A field the
# user gives is always kept, so a pair given in conflict is still an error.
QUANT_PRESET_NEEDS: dict[str, dict[str, Any]] = {
    "act_equalize": {"act_clip": "bn-mse", "per_channel": True},
    "act_mse_weight": {"act_clip": "bn-mse"},
    "round_drop": {"weight_round": "adaround"},
    "round_unit": {"weight_round": "adaround"},
    "round_act": {"round_unit": "block"},
    "round_act_lr": {"round_act": "lsq"},
}


class QuantSpec(_Strict):
    """How the student is quantized (methods.md section 0)."""

    preset: str | None = Field(
        None,
        description="a named recipe whose values fill the fields not given (recon: dfq's best data-free "
        "recipe; see QUANT_PRESETS). None: the reference quantizer",
    )
    w_bits: int = Field(4, description="weight bits for every Conv2d/Linear (2-16, 32 = float)")
    a_bits: int = Field(4, description="activation bits after every ReLU/ReLU6 (2-16, 32 = float)")
    first_layer_bits: int | None = Field(None, description="override for the first layer (8 for F8L8)")
    last_layer_bits: int | None = Field(None, description="override for the last layer (8 for F8L8)")
    per_channel: bool = Field(True, description="per-output-channel weight ranges (reference) or per-tensor")
    calibration_epochs: int = Field(4, ge=0, description="epochs during which activation ranges are updated")
    ema_beta: float = Field(0.9, gt=0.0, lt=1.0)
    act_range: Literal["debiased", "plain", "gdfq-compounding"] = Field(
        "debiased",
        description="activation-range EMA: debiased (correct bias-corrected EMA, default), plain (FDDA), "
        "gdfq-compounding (the reference's re-applied correction; parity only)",
    )
    act_clip: Literal["minmax", "bn-mse"] = Field(
        "minmax",
        description="activation ranges: minmax (the reference: EMA of synthetic batches' min/max) or bn-mse "
        "(at BN->ReLU sites, the least-squared-error range of the Gaussians the teacher's BN describes, "
        "fixed; other sites minmax)",
    )
    act_ste: Literal["identity", "clipped"] = Field(
        "identity",
        description="activation quantizers' backward: identity (the reference: clipped values pass their "
        "gradient) or clipped (zero gradient outside the range, as PyTorch's fake-quant kernels)",
    )

    act_equalize: Literal["none", "depthwise"] = Field(
        "none",
        description="none (the reference) or depthwise: with bn-mse, rescale each BN->ReLU site whose only "
        "consumer is a depthwise conv so every channel gets its own BN range, the filter taking the inverse "
        "scale (per-channel weight grids are scale-invariant, so the weights lose nothing; dfq/quant/"
        "equalize.py)",
    )

    act_mse_weight: Literal["uniform", "consumer"] = Field(
        "uniform",
        description="how bn-mse pools a site's channels into its one range: uniform (every channel's "
        "squared error alike) or consumer (channel c's error weighted by what it adds to the BN-normalised "
        "output of the single conv/linear that consumes the site, sum_o,k (gamma_o / sigma_o * W[o,c,k])^2; "
        "dfq/quant/consumers.py)",
    )

    weight_round: Literal["nearest", "adaround", "squant"] = Field(
        "nearest",
        description="how weights meet their grid: nearest (the reference, at every forward), adaround "
        "(after training, each layer's floor/ceil choice learnt so its output on the generator's images "
        "matches the teacher's, AdaRound; dfq/quant/adaround.py) or squant (after training, without "
        "images: roundings flipped so every kernel's and output channel's error sum stays within half a "
        "step, SQuant; dfq/quant/squant.py)",
    )
    round_iters: int = Field(
        1000, ge=1, le=100_000, description="adaround: optimisation steps per layer (AdaRound: 10k)"
    )
    round_images: int = Field(
        1024, ge=32, le=65_536, description="adaround: images the layers are reconstructed on"
    )
    round_drop: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="adaround: the share of a layer's input elements, drawn afresh at every step, that the "
        "reconstruction takes from the float network instead of the quantized one (QDrop, Wei et al. "
        "2022; its code's 1 - input_prob, 0.5 there). 0: AdaRound's quantized input only",
    )
    round_unit: Literal["layer", "block"] = Field(
        "layer",
        description="adaround: what is reconstructed at a time: layer (AdaRound: each Conv2d/Linear against "
        "its own output) or block (BRECQ, Li et al. 2021, as QDrop: the weight layers of a residual block "
        "learn their rounding together against the block's output, its activation quantizers on)",
    )
    round_act: Literal["fixed", "lsq"] = Field(
        "fixed",
        description="adaround with round_unit block: the activation quantizers inside a block keep the "
        "ranges training left them (fixed) or learn their step with the rounding, against the same "
        "block output loss (lsq: LSQ's straight-through gradient, the zero point fixed, as QDrop's "
        "reconstruction does; written back as their ranges)",
    )
    round_act_lr: float = Field(
        4e-5,
        gt=0.0,
        le=1.0,
        description="round_act lsq: Adam's learning rate for the activation steps, cosine-annealed to 0 "
        "over round_iters (QDrop's and BRECQ's default 4e-5, set for 20k steps)",
    )
    round_data: str = Field(
        "generator",
        min_length=1,
        description="adaround and bias_correct: where their images come from: generator (data-free, the "
        "default) or a set of real images as for eval ('fashion-mnist-train', a .npz or an ImageFolder; "
        "labels unused). Real images make the job no longer data-free, and its report says so "
        "(real_data_used)",
    )
    bias_correct: bool = Field(
        False,
        description="after training (and weight rounding), take each quantized layer's mean output shift "
        "against the teacher, measured on bias_images images, off its bias or onto the running mean of "
        "the BN it feeds (Nagel et al.'s empirical bias correction; dfq/quant/bias_correct.py)",
    )
    bias_images: int = Field(
        256, ge=16, le=4096, description="bias_correct: images the shifts are measured on, in one batch"
    )

    _bits = field_validator("w_bits", "a_bits", "first_layer_bits", "last_layer_bits")(
        classmethod(lambda cls, v: _check_bits(v))
    )

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        return _apply_preset(data, QUANT_PRESETS, "quant", cls, QUANT_PRESET_NEEDS)

    @model_validator(mode="after")
    def _bn_mse_options_need(self) -> QuantSpec:
        if self.act_mse_weight != "uniform" and self.act_clip != "bn-mse":
            raise ValueError(
                "quant.act_mse_weight needs quant.act_clip 'bn-mse': it weights the channels of the "
                "BN-described activations a bn-mse range is chosen on"
            )
        if self.round_data != "generator" and not self.uses_images:
            raise ValueError(
                "quant.round_data needs quant.weight_round 'adaround' or quant.bias_correct: only they "
                "use images after training"
            )
        if self.round_unit != "layer" and self.weight_round != "adaround":
            raise ValueError(
                "quant.round_unit needs quant.weight_round 'adaround': it says what adaround reconstructs"
            )
        if self.round_act != "fixed" and self.round_unit != "block":
            raise ValueError(
                "quant.round_act 'lsq' needs quant.round_unit 'block' (and so quant.weight_round "
                "'adaround'): dfq's activation quantizers follow the ReLUs, so only a block holds any of "
                "the quantizers its reconstruction could learn"
            )
        if self.round_drop and self.weight_round != "adaround":
            raise ValueError(
                "quant.round_drop needs quant.weight_round 'adaround': it mixes adaround's inputs"
            )
        if self.act_equalize != "none":
            if self.act_clip != "bn-mse":
                raise ValueError(
                    "quant.act_equalize needs quant.act_clip 'bn-mse': the channels' ranges come from the "
                    "teacher's BN, and a min/max range would be recalibrated over the rescaled channels"
                )
            if not self.per_channel:
                raise ValueError(
                    "quant.act_equalize needs per-channel weights (quant.per_channel): a per-tensor grid "
                    "is not scale-invariant per channel, so the rescaled filters would lose accuracy"
                )
        return self

    @property
    def uses_images(self) -> bool:
        """Whether a step after training reads images: learnt rounding or bias correction."""
        return self.weight_round == "adaround" or self.bias_correct

    @property
    def round_set(self) -> str | None:
        """The real set learnt rounding and bias correction read (``round_data``), or None: the
        generator's images, or no step that reads images."""
        return self.round_data if self.uses_images and self.round_data != "generator" else None

    @property
    def label(self) -> str:
        s = f"W{self.w_bits}A{self.a_bits}"
        if self.first_layer_bits is not None or self.last_layer_bits is not None:
            s += f"-F{self.first_layer_bits or self.w_bits}L{self.last_layer_bits or self.w_bits}"
        return s

    @property
    def layers_label(self) -> str:
        """F4L4 / F8L8: how the first and last layers were treated (printed with every result)."""
        return f"F{self.first_layer_bits or self.w_bits}L{self.last_layer_bits or self.w_bits}"


def parse_bits(text: str) -> dict[str, int]:
    m = _BITS_RE.match(text.strip())
    if not m:
        raise ValueError(f"bits must look like 'W4A4' or 'W4A4-F8L8', got {text!r}")
    out = {"w_bits": int(m[1]), "a_bits": int(m[2])}
    if m[3]:
        out |= {"first_layer_bits": int(m[3]), "last_layer_bits": int(m[4])}
    return out


def _unknown_preset(kind: str, name: Any, known: str) -> PydanticCustomError:
    """A typed error, so a form can show it on the preset's own select: a "before" validator's
    error is located at the section (``quant``), not at the ``preset`` field that caused it."""
    return PydanticCustomError(
        "unknown_preset",
        "unknown {kind} preset {name}; known: {known}",
        {"kind": kind, "name": repr(name), "known": known},
    )


def _apply_preset(
    data: Any,
    presets: dict[str, dict],
    kind: str,
    model: type[BaseModel] | None = None,
    needs: dict[str, dict[str, Any]] | None = None,
) -> Any:
    if isinstance(data, str):
        data = {"preset": data}
    if isinstance(data, dict) and data.get("preset") is not None:
        name = data["preset"]
        if not isinstance(name, str) or name not in presets:  # a list here must be a 422, not a TypeError
            raise _unknown_preset(kind, name, ", ".join(presets))
        filled = {**presets[name], **data}
        if model is not None and needs:
            filled = _drop_unserved(filled, set(data), model, needs)
        data = filled
    return data


def _drop_unserved(
    filled: dict[str, Any], given: set[str], model: type[BaseModel], needs: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Take out the preset's fields whose ``needs`` no longer hold, until none is left: dropping one
    (round_unit back to "layer") can take away what the next one needs (round_act "lsq")."""

    def value(field: str) -> Any:
        if field not in filled:
            return model.model_fields[field].default
        try:  # a form sends "false" for False; compare what the field will hold
            return TypeAdapter(model.model_fields[field].annotation).validate_python(filled[field])
        except ValidationError:
            return filled[field]  # the field's own check reports it

    dropped = True
    while dropped:
        dropped = False
        for field, conditions in needs.items():
            if field not in filled or field in given:  # only a preset's own fields can go
                continue
            if any(value(k) != v for k, v in conditions.items()):
                del filled[field]
                dropped = True
    return filled


# ---------------------------------------------------------------------------------------------- method


class DSGSpec(_Strict):
    """DSG components (methods.md section 2); each can be switched off on its own."""

    sda: bool = Field(
        True, description="slack distribution alignment replaces the exact BN loss (weight: bns_weight)"
    )
    sda_margin: Literal["warmup-percentile", "fixed"] = Field(
        "warmup-percentile",
        description="dfq's margin rule (reference margins are unpublished); see docs/methods.md",
    )
    sda_percentile: float = Field(
        50.0, ge=0, le=100, description="percentile of warm-up gaps used as the margin"
    )
    sda_window: int = Field(20, ge=1, description="last N warm-up iterations whose gaps set the margins")
    sda_fixed_mean: float = Field(0.0, ge=0, description="margin delta for every layer when sda_margin=fixed")
    sda_fixed_std: float = Field(0.0, ge=0, description="margin gamma for every layer when sda_margin=fixed")
    sda_stat: Literal["std", "var"] = Field(
        "std", description="align std (paper) or var (QAT reference code)"
    )
    sda_extra_abs: bool = Field(False, description="parity: the QAT reference's max(|gap - margin|, 0) bug")
    lse: bool = Field(True, description="layerwise sample enhancement on per-sample statistics")
    lse_factor: float = Field(2.0, ge=1.0, description="weight of sample i's term at layer i mod L")
    sci: bool = Field(True, description="sample correlation inhibition")
    sci_weight: float = Field(1.0, ge=0, description="L_G gets sci_weight * L_SCI / L")
    sci_magnitude_scale: float = Field(1e-4, ge=0)


class FDDASpec(_Strict):
    """FDDA components (methods.md section 3)."""

    centers: Literal["zero-shot", "few-shot"] = Field(
        "zero-shot",
        description="few-shot: class centers from real labelled calibration images (the paper); "
        "zero-shot: from the generator's own images at the end of warm-up (no real data)",
    )
    calib_set: str | None = Field(None, description="few-shot: labelled set to draw calibration images from")
    calib_per_class: int = Field(1, ge=1, le=100)
    zero_shot_samples: int = Field(64, ge=2, description="generated images per class for zero-shot centers")
    cbns_weight: float = Field(0.01, ge=0)
    dbns_weight: float = Field(0.9, ge=0)
    single_ce_weight: float = Field(0.5, ge=0, description="CE of the single-class FDDA batch")
    dbns_mean_std: float = Field(0.5, ge=0)
    dbns_var_std: float = Field(1.0, ge=0)
    correct_classes_only: bool = Field(
        True, description="draw FDDA classes among those whose center the teacher classifies correctly"
    )
    student_real: bool = Field(
        True, description="few-shot: the student also trains on the calibration images"
    )


class ACQSpec(_Strict):
    """ACQ components (methods.md section 4; no public code, choices in docs/methods.md)."""

    stage: str | None = Field(
        None,
        description="teacher module whose output gives the attention map (default: deepest stage >= 4x4)",
    )
    acm_weight: float = Field(1.0, ge=0, description="attention-center matching")
    pair_weight: float = Field(0.1, ge=0, description="adversarial pair (mode-seeking) loss")
    consistency_weight: float = Field(1.0, ge=0, description="eval/train attention consistency")


class LRQSpec(_Strict):
    """LRQ components (methods.md section 5; no usable public code, choices in docs/methods.md)."""

    lka: bool = Field(True, description="large-kernel-attention long-range generator")
    ama: bool = Field(True, description="adversarial margin add in the generator's CE")
    ama_margin: float = Field(0.3, ge=-1.5, le=1.5, description="m in s*cos(theta_y + m)")
    ama_scale: float = Field(16.0, gt=0, description="s in s*cos(theta_y + m)")
    dkd: bool = Field(True, description="decoupled KD for the student instead of plain KD")
    dkd_alpha: float = Field(1.0, ge=0)
    dkd_beta: float = Field(8.0, ge=0)
    dkd_temperature: float = Field(4.0, gt=0)
    dkd_warmup_epochs: int | None = Field(
        None,
        ge=0,
        description="DKD weight ramps as min((e+1) / warmup, 1), e counting the student's epochs; "
        "None: 5% of the budget's epochs (20 of 400)",
    )


# lr_s_scale is dfq's rule (docs/methods.md): a budget states lr_s for GDFQ's L_S, whose KD weighs each
# sample alpha*T^2/C = 400/10 = 40 (reduction "mean", 10 classes). FDDA's KD weighs it alpha*T^2 = 8000
# ("batchmean", alpha 20): 200x, so its presets scale lr_s by 1/200 (for C classes the ratio is 20*C). At
# 0.1, the value first set, its student collapsed at the cpu budget (resnet20_fmnist W3A3 seed 0: 11.07;
# 0.005: 69.11, GDFQ 69.28). LRQ's decoupled KD has a first-step gradient norm 5x GDFQ's and diverged at
# the cpu budget's lr_s; 0.1 (that ratio rounded to a power of ten) does not.
_FDDA_LOSSES: dict[str, Any] = {
    "g_ce_weight": 0.5,
    "bns_weight": 0.2,
    "kd_reduction": "batchmean",
    "kd_alpha": 20.0,
    "lr_s_scale": 0.005,
}
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "gdfq": {},
    "dsg": {"dsg": {}},
    "fdda": {"fdda": {}, **_FDDA_LOSSES},
    "fdda-fewshot": {"fdda": {"centers": "few-shot", "calib_set": "fashion-mnist-train"}, **_FDDA_LOSSES},
    "acq": {"acq": {}},
    "lrq": {"lrq": {}, "lr_s_scale": 0.1},
}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _method_preset(data: Any) -> Any:
    """Presets combine with '+': ``"dsg+lrq"`` switches on both methods' full sets."""
    if isinstance(data, str):
        data = {"preset": data}
    if not isinstance(data, dict) or data.get("preset") is None:
        return data
    merged: dict[str, Any] = {}
    for name in str(data["preset"]).split("+"):
        if name not in METHOD_PRESETS:
            raise _unknown_preset("method", name, f"{', '.join(METHOD_PRESETS)} (combine with '+')")
        merged = _merge(merged, METHOD_PRESETS[name])
    return _merge(merged, data)


class MethodSpec(_Strict):
    """The generator and every loss term with its weight; GDFQ baseline plus optional method blocks."""

    preset: str | None = "gdfq"
    generator: Literal["gdfq", "cbn"] = Field(
        "gdfq",
        description="gdfq: label embedding x noise (CIFAR variant); cbn: conditional BN (ImageNet variant)",
    )
    latent_dim: int = Field(100, ge=1, le=4096)
    g_ce_weight: float = Field(1.0, ge=0, description="weight of CE(T(G(z,y)), y) in L_G")
    bns_weight: float = Field(0.1, ge=0, description="weight of L_BNS (or DSG's L_SDA) in L_G")
    kd_alpha: float = Field(1.0, ge=0, description="weight of the KD term in L_S")
    kd_temperature: float = Field(20.0, gt=0)
    kd_reduction: Literal["mean", "batchmean"] = Field(
        "mean", description="KLDiv reduction: mean over N*C (GDFQ) or batchmean (IntraQ/HAST/FDDA)"
    )
    s_ce_weight: float = Field(1.0, ge=0, description="weight of CE(S(x), y) in L_S")
    lr_s_scale: float = Field(
        1.0,
        gt=0,
        le=100,
        description="the student's lr is budget.lr_s times this: budgets state lr_s for GDFQ's L_S, and "
        "a method whose L_S has larger gradients (FDDA's batchmean KD x20, LRQ's DKD) needs a smaller step "
        "at the same budget (docs/methods.md)",
    )
    dsg: DSGSpec | None = None
    fdda: FDDASpec | None = None
    acq: ACQSpec | None = None
    lrq: LRQSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        return _method_preset(data)

    @model_validator(mode="after")
    def _consistent(self) -> MethodSpec:
        if self.fdda and self.fdda.centers == "few-shot" and not self.fdda.calib_set:
            raise ValueError("FDDA few-shot needs a labelled calibration set: set method.fdda.calib_set")
        return self

    @property
    def components(self) -> list[str]:
        """Human-readable list of what is switched on, printed with every result."""
        out = ["gdfq"]
        if self.dsg:
            out += [
                n
                for n, on in (("dsg.sda", self.dsg.sda), ("dsg.lse", self.dsg.lse), ("dsg.sci", self.dsg.sci))
                if on
            ]
        if self.fdda:
            out.append(f"fdda.{self.fdda.centers}")
        if self.acq:
            out += [
                n
                for n, w in (
                    ("acq.acm", self.acq.acm_weight),
                    ("acq.pair", self.acq.pair_weight),
                    ("acq.consistency", self.acq.consistency_weight),
                )
                if w > 0
            ]
        if self.lrq:
            out += [
                n
                for n, on in (("lrq.lka", self.lrq.lka), ("lrq.ama", self.lrq.ama), ("lrq.dkd", self.lrq.dkd))
                if on
            ]
        return out


# ---------------------------------------------------------------------------------------------- budget

BUDGET_PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU; exercises every phase (warm-up, calibration, fine-tuning, sampling, checkpoints).
    "smoke": {
        "epochs": 2,
        "iters_per_epoch": 3,
        "batch_size": 16,
        "warmup_epochs": 1,
        "lr_milestones": [],
        "eval_every": 0,
        "eval_limit": 500,
        "sample_every": 3,
        "checkpoint_every": 2,
    },
    # About 400 iterations at batch 128: ~10 minutes for ResNet-20 on a 2-core machine. Four warm-up
    # epochs (80 generator-only iterations) also calibrate activation ranges before the student moves.
    # lr_s 1e-3, not the paper's 1e-4: with 320 student steps instead of 80k, 1e-4 barely moves the
    # student (ResNet-20 W4A4, seed 0: 84.54 at 1e-4, 86.26 at 1e-3, collapse to 10% at 1e-2). At 8 bits
    # the calibrated student already sits within a point of FP and 1e-3 only walks it away (MobileNetV2
    # W8A8 seed 0: 91.60 at 1e-4, 90.27 at 1e-3; docs/benchmarks.md "The student's lr at 8 bits"), so 8-bit
    # jobs keep the paper's 1e-4.
    "cpu": {
        "epochs": 20,
        "iters_per_epoch": 20,
        "batch_size": 128,
        "warmup_epochs": 4,
        "lr_s": 1e-3,
        "lr_s_8bit": 1e-4,
        "lr_milestones": [10, 15],
        "eval_every": 5,
        "eval_limit": 2000,
        "sample_every": 40,
        "checkpoint_every": 20,
    },
    # Calibration only: the `cpu` budget's 4 warm-up epochs (80 generator steps, the activation ranges
    # calibrated on their images) and no student step. Where the ranges are right before any fine-tuning
    # the synthetic fine-tuning only loses (MobileNetV2 with `quant.act_clip: bn-mse`: 89.55 W4A4 untrained,
    # 88.75 after 8 epochs of GDFQ; docs/benchmarks.md "Calibration only"), and this is a fifth of the work.
    "calibrate": {
        "epochs": 4,
        "iters_per_epoch": 20,
        "batch_size": 128,
        "warmup_epochs": 4,
        "lr_milestones": [],
        "eval_every": 1,
        "eval_limit": 2000,
        "sample_every": 40,
        "checkpoint_every": 20,
    },
    # The published CIFAR recipe (GDFQ): 400 epochs x 200 iterations, batch 200.
    "paper": {
        "epochs": 400,
        "iters_per_epoch": 200,
        "batch_size": 200,
        "warmup_epochs": 4,
        "lr_s": 1e-4,
        "lr_milestones": [100, 200, 300],
        "eval_every": 10,
        "eval_limit": None,
        "sample_every": 2000,
        "checkpoint_every": 1000,
    },
}


class BudgetSpec(_Strict):
    """How long and with what optimizers the run trains."""

    preset: str | None = None
    epochs: int = Field(20, ge=1, le=100_000)
    iters_per_epoch: int = Field(20, ge=1, le=1_000_000)
    batch_size: int = Field(128, ge=2, le=4096)
    warmup_epochs: int = Field(
        4,
        ge=0,
        description="epochs before the student is stepped (G only); equal to epochs: calibration only, "
        "the student is never stepped",
    )
    lr_s: float = Field(1e-4, gt=0, le=10)
    lr_s_8bit: float | None = Field(
        None,
        gt=0,
        le=10,
        description="the student's lr instead of lr_s when every layer has 8 or more weight and activation "
        "bits (None: lr_s at every bit-width). An lr_s given without it clears a preset's, so an explicit "
        "lr_s always applies",
    )
    lr_g: float = Field(1e-3, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(1e-4, ge=0)
    g_betas: tuple[float, float] = (0.5, 0.999)
    lr_milestones: list[int] = Field(
        default_factory=list, description="epochs at which both lrs are multiplied by lr_gamma"
    )
    lr_gamma: float = Field(0.1, gt=0, le=1)
    clip_grad_s: float | None = Field(
        None,
        gt=0,
        description="clip the student's gradient to this global L2 norm before each step (None: no "
        "clipping, as every reference; the norm is logged as s_grad_norm either way)",
    )
    eval_every: int = Field(
        0, ge=0, description="evaluate on the labelled set every N epochs (0: only at the end)"
    )
    eval_limit: int | None = Field(
        None, ge=1, description="images used for per-epoch evaluation (final uses all)"
    )
    sample_every: int = Field(40, ge=1, description="emit a sample-image grid every N iterations")
    checkpoint_every: int = Field(20, ge=1, description="save resumable state every N iterations")
    idle_generator: Literal["skip", "train"] = Field(
        "skip",
        description="a budget with no student step whose student no generator image can reach (every "
        "activation quantizer holds a range from the teacher's BN, and no rounding is learnt on the "
        "generator's images): 'skip' leaves the generator's steps out, since the student is the same "
        "with or without them (MobileNetV2 with quant.act_clip bn-mse at the calibrate budget); "
        "'train' runs them anyway, for their sample grids and loss curves",
    )

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and "lr_s" in data and "lr_s_8bit" not in data:
            data = {**data, "lr_s_8bit": None}  # the user's lr_s, not the preset's 8-bit one, rules
        return _apply_preset(data, BUDGET_PRESETS, "budget")

    @model_validator(mode="after")
    def _consistent(self) -> BudgetSpec:
        if self.warmup_epochs > self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must not exceed epochs ({self.epochs}); equal means "
                "calibration only (the student is never stepped)"
            )
        return self

    @property
    def total_iters(self) -> int:
        return self.epochs * self.iters_per_epoch

    @property
    def warmup_iters(self) -> int:
        return self.warmup_epochs * self.iters_per_epoch

    @property
    def student_steps(self) -> int:
        """Steps the student takes: none on a calibration-only budget (warm-up to the end)."""
        return self.total_iters - self.warmup_iters

    def student_lr(self, quant: QuantSpec) -> float:
        """The student's base lr for these bits: ``lr_s_8bit`` when set and no layer is below 8 bits."""
        bits = (quant.w_bits, quant.a_bits, quant.first_layer_bits, quant.last_layer_bits)
        if self.lr_s_8bit is not None and min(b for b in bits if b is not None) >= 8:
            return self.lr_s_8bit
        return self.lr_s


# ---------------------------------------------------------------------------------------------- job


class ExportSpec(_Strict):
    """What is exported after training (artifacts only; never changes the quantized model)."""

    latency: bool | None = Field(
        None, description="measure FP32 vs QDQ onnxruntime latency (None: yes, except on the smoke budget)"
    )


class SpeedSpec(_Strict):
    """How the loop runs (docs/methods.md "Speed"). ``channels_last`` only reorders float sums; ``bf16``
    changes results and is opt-in."""

    channels_last: bool = Field(
        True,
        description="NHWC tensors for teacher, student and generator (oneDNN/cuDNN's fast layout; same "
        "math, float sums reassociated)",
    )
    fused_upsample: bool = Field(
        True,
        description="the generator's nearest-upsample + 3x3 conv pairs as one stride-2 transposed conv "
        "(dfq/synth/upconv.py: the same linear map with 4/9 of the multiply-adds; float sums reassociated)",
    )
    polyphase_dilated: bool = Field(
        True,
        description="LRQ's dilated depthwise conv as a dense one on the image's polyphase components "
        "(dfq/synth/polyphase.py: the same products, 2x faster on CPU; float sums reassociated)",
    )
    compile: bool = Field(
        False,
        description="torch.compile the student and the generator (inductor; compiling takes a minute or "
        "more at the start). Measured on an H200: resnet20 W4A4 at batch 200 0.0547 -> 0.0311 s/it; on "
        "this project's 2-core CPU 13-15% slower. Float sums reassociated; opt-in until a whole GPU job "
        "has run with it",
    )
    bf16: bool = Field(
        False,
        description="bfloat16 autocast for the networks' convs/linears (AMX on CPU, tensor cores on GPU); "
        "BN statistics, quantizer ranges and losses stay float32. Changes results: opt-in",
    )


def _idle_when_calibrating_only(m: MethodSpec) -> list[str]:
    """Components that would silently do nothing when the student is never stepped: those that start at
    the end of warm-up, and those that only shape the student's loss. Refused rather than ignored."""
    idle = []
    if m.dsg and m.dsg.sda:
        idle.append("dsg.sda (its margins are set at the end of warm-up)")
    if m.fdda and m.fdda.centers == "zero-shot":
        idle.append("zero-shot fdda (its centers are set at the end of warm-up)")
    if m.fdda and m.fdda.student_real:
        idle.append("fdda.student_real (a student loss)")
    if m.lrq and m.lrq.dkd:
        idle.append("lrq.dkd (a student loss)")
    return idle


class JobSpec(_Strict):
    method: MethodSpec = Field(default_factory=MethodSpec)
    quant: QuantSpec = Field(default_factory=QuantSpec)
    budget: BudgetSpec = Field(default_factory=lambda: BudgetSpec(preset="cpu"))
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    eval: str | None = Field(
        None, description="labelled set for accuracy: 'fashion-mnist', a .npz or an ImageFolder"
    )
    eval_limit: int | None = Field(
        None, ge=1, description="evaluate on the first N labelled images (None: all)"
    )
    export: ExportSpec = Field(default_factory=ExportSpec)
    speed: SpeedSpec = Field(default_factory=SpeedSpec)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        bits = data.pop("bits", None)
        if bits is not None:
            if not isinstance(bits, str):
                raise ValueError("bits must be a string such as 'W4A4'")
            quant = data.get("quant") or {}
            if isinstance(quant, BaseModel):
                quant = quant.model_dump()
            elif isinstance(quant, str):  # a preset's name: {"bits": "W3A3", "quant": "recon"}
                quant = {"preset": quant}
            data["quant"] = {**parse_bits(bits), **quant}
        return data

    @model_validator(mode="after")
    def _method_fits_budget(self) -> JobSpec:
        m, b = self.method, self.budget
        if m.dsg and m.dsg.sda and m.dsg.sda_margin == "warmup-percentile" and b.warmup_epochs == 0:
            raise ValueError(
                "DSG's warmup-percentile slack margins need budget.warmup_epochs >= 1 (or dsg.sda_margin=fixed)"
            )
        if m.fdda and m.fdda.centers == "zero-shot" and b.warmup_epochs == 0:
            raise ValueError(
                "zero-shot FDDA computes class centers at the end of warm-up: budget.warmup_epochs must be >= 1"
            )
        if m.acq and m.acq.pair_weight > 0 and b.batch_size < 4:
            raise ValueError("ACQ's pair loss needs budget.batch_size >= 4")
        idle = _idle_when_calibrating_only(m) if b.student_steps == 0 else []
        if idle:
            raise ValueError(
                "a calibration-only budget (warmup_epochs == epochs) never reaches "
                + "; ".join(idle)
                + ": switch them off or give the student epochs"
            )
        return self

    def canonical(self) -> dict[str, Any]:
        """The complete JSON form: every field explicit, so re-validating it gives the same spec."""
        return self.model_dump(mode="json")

    @property
    def real_data_used(self) -> bool:
        """Whether real images shape the quantized model: FDDA's few-shot centers, or weight rounding
        learnt on a real set (``quant.round_data``). Printed with every result."""
        fdda = self.method.fdda
        return bool(fdda and fdda.centers == "few-shot") or self.quant.round_set is not None

    def summary(self) -> str:
        quant = f" quant={self.quant.preset}" if self.quant.preset else ""
        return f"{self.method.preset or 'custom'} {self.quant.label} ({self.quant.layers_label}) budget={self.budget.preset or 'custom'}{quant} seed={self.seed}"


def same_spec(stored: Any, spec: JobSpec) -> bool:
    """Whether ``stored``, a canonical spec an earlier run wrote (report, checkpoint), is ``spec``.

    Re-validated first, so a spec written before a field existed compares with that field's default:
    adding a field must not make every finished run and checkpoint look like another job's. Anything that
    does not validate (a missing or mangled spec) is not this spec."""
    try:
        return JobSpec.model_validate(stored).canonical() == spec.canonical()
    except ValidationError:
        return False


def parse_spec(data: dict[str, Any] | JobSpec) -> JobSpec:
    return data if isinstance(data, JobSpec) else JobSpec.model_validate(data)
