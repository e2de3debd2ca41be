"""``quantized.packed.safetensors``: the quantized model at its real size, and a bit-exact loader.

Per weight layer with k < 32 bits the file holds the integer codes packed k bits each
(:mod:`dfq.quant.packing`; stored as ``q + 2^(k-1)``, i.e. unsigned) and the reference quantizer's
per-channel ``scale`` and ``zero_point`` (float32, exactly as :func:`asymmetric_params` computed
them). Everything else the fake-quant model needs is stored as is: biases, BN affine parameters and
running statistics, activation-range buffers (EMA values and update counts). Metadata carries the
JobSpec and teacher info (so the architecture can be rebuilt) and a per-layer JSON table.

:func:`load_packed` rebuilds the fake-quant student with each weight layer *frozen*: its
``quantized_weight()`` is ``(q + zp) / scale`` from the stored codes, the same float32 operations
the original ran, so weights and outputs are bit-identical to the student's (checked at save time:
``bit_exact`` in the returned summary, and by tests for every bit-width).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dfq.models.checkpoint import CheckpointError
from dfq.models.registry import build_model
from dfq.models.teachers import TeacherInfo
from dfq.quant.convert import quantize
from dfq.quant.modules import FLOAT_BITS, QuantConv2d, QuantLayer, QuantLinear
from dfq.quant.packing import pack_codes, unpack_codes
from dfq.quant.quantizer import (
    asymmetric_params,
    int_range,
    per_channel_range,
    per_tensor_range,
    quantize_to_int,
)
from dfq.spec import JobSpec

PACKED_FILE = "quantized.packed.safetensors"
PACKED_FORMAT = "dfq-packed-v1"


def _weight_codes(layer: QuantLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero_point) of the layer's current weight, exactly as its forward computes them."""
    w = layer.weight.detach()
    lo, hi = per_channel_range(w) if layer.per_channel else per_tensor_range(w)
    scale, zp = asymmetric_params(layer.w_bits, lo, hi)
    return quantize_to_int(w, layer.w_bits, lo, hi), scale, zp


def _dequantize(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """``(q + zp) / scale`` broadcast over output channels: the ops of ``quantizer.dequantize``."""
    if scale.dim() == 1 and scale.numel() > 1:
        shape = (-1, *([1] * (q.dim() - 1)))
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (q + zp) / scale


class FrozenWeight:
    """Mixin for a loaded layer: the weight is fixed codes, not re-quantized from a float weight."""

    codes: torch.Tensor
    w_scale: torch.Tensor
    w_zero_point: torch.Tensor

    def quantized_weight(self) -> torch.Tensor:
        return _dequantize(self.codes.to(self.w_scale.dtype), self.w_scale, self.w_zero_point)


class FrozenQuantConv2d(FrozenWeight, QuantConv2d):
    pass


class FrozenQuantLinear(FrozenWeight, QuantLinear):
    pass


def save_packed(
    student: nn.Module, path: str | Path, metadata: dict[str, str] | None = None
) -> dict[str, Any]:
    """Write the packed file; returns sizes and whether the codes reproduce every weight bit-exactly."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    skip: set[str] = set()
    bit_exact = True
    weight_bytes = fp32_weight_bytes = 0
    for name, m in student.named_modules():
        if not isinstance(m, QuantLayer) or m.w_bits >= FLOAT_BITS:
            continue
        q, scale, zp = _weight_codes(m)
        bit_exact &= torch.equal(_dequantize(q, scale, zp), m.quantized_weight().detach())
        packed = pack_codes(q.to(torch.int64) - int_range(m.w_bits)[0], m.w_bits)
        tensors |= {
            f"{name}.weight.packed": packed,
            f"{name}.weight.scale": scale,
            f"{name}.weight.zero_point": zp,
        }
        layers[name] = {"bits": m.w_bits, "shape": list(m.weight.shape), "per_channel": m.per_channel}
        skip.add(f"{name}.weight")
        weight_bytes += packed.numel()
        fp32_weight_bytes += m.weight.numel() * 4
    for k, v in student.state_dict().items():
        if k not in skip:
            tensors[k] = v.detach().cpu().contiguous()
    meta = {**(metadata or {}), "format": PACKED_FORMAT, "layers": json.dumps(layers)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return {
        "bytes": Path(path).stat().st_size,
        "weight_bytes_packed": weight_bytes,
        "weight_bytes_fp32": fp32_weight_bytes,
        "bit_exact": bool(bit_exact),
    }


def _freeze(layer: QuantLayer, q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> None:
    layer.__class__ = FrozenQuantConv2d if isinstance(layer, nn.Conv2d) else FrozenQuantLinear
    layer.register_buffer("codes", q.to(torch.int16 if layer.w_bits <= 15 else torch.int32))
    layer.register_buffer("w_scale", scale)
    layer.register_buffer("w_zero_point", zp)
    with torch.no_grad():  # the float weight no longer exists; keep the dequantized one for inspection
        layer.weight.copy_(layer.quantized_weight())
    layer.weight.requires_grad_(False)


def read_packed_meta(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != PACKED_FORMAT:
        raise CheckpointError(f"{path} is not a dfq packed artifact (format {meta.get('format')!r})")
    return meta


def load_packed_into(student: nn.Module, path: str | Path) -> nn.Module:
    """Load a packed file into a freshly quantized student of the same architecture and spec."""
    meta = read_packed_meta(path)
    layers: dict[str, dict[str, Any]] = json.loads(meta["layers"])
    rest: dict[str, torch.Tensor] = {}
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for name, spec in layers.items():
            layer = student.get_submodule(name)
            if not isinstance(layer, QuantLayer) or layer.w_bits != spec["bits"]:
                raise CheckpointError(f"{path}: layer {name} does not match the rebuilt model")
            count = 1
            for d in spec["shape"]:
                count *= d
            codes = unpack_codes(f.get_tensor(f"{name}.weight.packed"), spec["bits"], count)
            q = (codes + int_range(spec["bits"])[0]).to(torch.float32).reshape(spec["shape"])
            _freeze(layer, q, f.get_tensor(f"{name}.weight.scale"), f.get_tensor(f"{name}.weight.zero_point"))
        for k in keys:
            if not k.startswith(tuple(f"{n}.weight." for n in layers)):
                rest[k] = f.get_tensor(k)
    missing, unexpected = student.load_state_dict(rest, strict=False)
    expected_missing = {f"{n}.{b}" for n in layers for b in ("weight", "codes", "w_scale", "w_zero_point")}
    if set(missing) - expected_missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model: missing {sorted(set(missing) - expected_missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return student.eval()


def load_packed(path: str | Path) -> tuple[nn.Module, JobSpec, TeacherInfo]:
    """Rebuild the fake-quant student from a packed file alone (architecture and spec from metadata)."""
    meta = read_packed_meta(path)
    spec = JobSpec.model_validate(json.loads(meta["spec"]))
    d: dict[str, Any] = json.loads(meta["teacher"])
    info = TeacherInfo(
        **{**d, "input_shape": tuple(d["input_shape"]), "mean": tuple(d["mean"]), "std": tuple(d["std"])}
    )
    student = quantize(build_model(info.arch, info.num_classes, info.input_shape[0]), spec.quant)
    return load_packed_into(student, path), spec, info
