"""A deployment view of a fake-quant student: constant quantization parameters, BN optionally folded.

The fake-quant student recomputes weight ranges at every forward and reads activation ranges from
EMA buffers with Python branching on the update count and the calibration flag, which neither
ONNX nor ``torch.export`` can capture as constants. :func:`build_deploy_module` freezes all of it into buffers: each weight layer holds its
integer codes and ONNX scales/zero points, each activation quantizer its range. In PyTorch the view
computes the reference arithmetic (bit-exact with the student when BN is not folded); exported to
ONNX it becomes QuantizeLinear/DequantizeLinear (see :mod:`dfq.quant.qdq`).

BN is kept as its own node by default (``fold_bn=False``): the exported graph then computes what the
fake-quant model computes, op for op. ``fold_bn=True`` folds it into the conv, which is exact in the
integer domain (``BN(conv(x, (q-z)s)) = conv(x, (q-z)(s*a)) + b`` with ``a = gamma/sqrt(var+eps)``
per output channel: same codes, new per-channel scale and float bias; a channel with ``a <= 0``
keeps its BN). It is not the default because onnxruntime (1.32, default optimizations) then
quantizes the float bias to int32 at ``input_scale * weight_scale`` by itself
(``WeightBiasQuantization``), and at 2-4 bits that rounding shifts whole channels across
activation-code boundaries: on the bundled ResNet-20 at W4A4 top-1 agreement with the fake-quant
model fell to about 72% (unfolded: identical logits). onnxruntime folds BN itself where it can.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.quant.modules import FLOAT_BITS, ActQuant, QuantLayer
from dfq.quant.qdq import DequantizedWeight, QDQActivation, QDQParams, qdq_params, stored_codes
from dfq.quant.quantizer import int_range, per_channel_range, per_tensor_range, quantize_to_int

log = logging.getLogger(__name__)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with BN(y) = a*y + b per channel, in eval mode."""
    a = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight
    b = -bn.running_mean * a
    if bn.bias is not None:
        b = b + bn.bias
    return a.detach(), b.detach()


class QDQWeightLayer(nn.Module):
    """A Conv2d or Linear whose weight is DequantizeLinear(int codes) in ONNX."""

    def __init__(self, layer: QuantLayer, bn: nn.BatchNorm2d | None = None, quantized: bool = True) -> None:
        super().__init__()
        self.is_conv = isinstance(layer, nn.Conv2d)
        self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups) if self.is_conv else None
        if self.is_conv and layer.padding_mode != "zeros":
            raise ValueError("only zero-padded convolutions can be exported")
        self.bits = layer.w_bits if quantized else FLOAT_BITS
        w = layer.weight.detach()
        w_hat = layer.quantized_weight().detach() if quantized else w
        bias = layer.bias.detach() if layer.bias is not None else None
        a = None
        if bn is not None:
            a, b = _bn_affine(bn)
            bias = b if bias is None else bias * a + b
        self.register_buffer("bias", bias)
        self.params: QDQParams | None = None
        if self.bits < FLOAT_BITS:
            lo, hi = per_channel_range(w) if layer.per_channel else per_tensor_range(w)
            p = qdq_params(self.bits, lo, hi, "zero")
        if self.bits < FLOAT_BITS and p.int8:
            codes = stored_codes(quantize_to_int(w, self.bits, lo, hi), p)
            scale = p.onnx_scale * a if a is not None else p.onnx_scale
            if a is not None and scale.dim() == 0:
                raise ValueError("a per-tensor weight scale cannot absorb a per-channel BN")
            self.params = p
            self.register_buffer("codes", codes)
            self.register_buffer("onnx_scale", scale.float())
            self.register_buffer("onnx_zero_point", p.onnx_zero_point)
        if a is not None:
            w_hat = w_hat * a.reshape(-1, *([1] * (w_hat.dim() - 1)))
        self.register_buffer("w_hat", w_hat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.w_hat, self.bias
        if self.params is not None:
            w = DequantizedWeight.apply(self.w_hat, self.codes, self.onnx_scale, self.onnx_zero_point)
        if self.is_conv:
            stride, padding, dilation, groups = self.conv_args
            return F.conv2d(x, w, b, stride, padding, dilation, groups)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        kind = "int8" if self.params is not None else "float"
        return f"{'conv' if self.is_conv else 'linear'}, bits={self.bits}, storage={kind}"


class QDQAct(nn.Module):
    """A frozen activation quantizer: reference fake quantization with a constant range."""

    def __init__(self, aq: ActQuant) -> None:
        super().__init__()
        self.bits = aq.bits
        lo, hi = (t.detach().float().clone() for t in aq.range())
        p = qdq_params(self.bits, lo, hi, "bottom")
        self.params = p
        self.mode = "float" if not p.int8 else ("qdq-clip" if p.narrow else "qdq")
        qmin, qmax = int_range(self.bits)
        for name, t in {
            "lo": lo,
            "hi": hi,
            "scale": p.scale,
            "zp": p.zero_point,
            "onnx_scale": p.onnx_scale,
            "onnx_zero_point": p.onnx_zero_point,
            "grid_min": p.grid_min.to(torch.int8) if p.int8 else p.grid_min,
            "grid_max": p.grid_max.to(torch.int8) if p.int8 else p.grid_max,
            "qmin": torch.tensor(float(qmin)),
            "qmax": torch.tensor(float(qmax)),
        }.items():
            self.register_buffer(name, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QDQActivation.apply(
            x,
            self.lo,
            self.hi,
            self.scale,
            self.zp,
            self.onnx_scale,
            self.onnx_zero_point,
            self.grid_min,
            self.grid_max,
            self.qmin,
            self.qmax,
            self.bits,
            self.mode,
        )

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}"


class _Leaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantLayer | ActQuant | nn.BatchNorm2d) or super().is_leaf_module(m, qualname)


@dataclass
class DeployInfo:
    """What :func:`build_deploy_module` did, for the export report."""

    bn_folded: int = 0
    bn_total: int = 0
    bn_not_folded: list[str] = field(default_factory=list)
    weight_layers: dict[str, str] = field(default_factory=dict)  # name -> int8 / float / float-fallback
    activations: dict[str, str] = field(default_factory=dict)  # name -> qdq / qdq-clip / float
    traced: bool = True


def _set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, new)


def _fold_pairs(gm: fx.GraphModule, info: DeployInfo) -> dict[str, nn.BatchNorm2d]:
    """Find conv -> BN pairs where the conv's only use is the BN; rewire the graph to skip the BN."""
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    pairs: dict[str, nn.BatchNorm2d] = {}
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or not isinstance(gm.get_submodule(n.target), nn.BatchNorm2d):
            continue
        info.bn_total += 1
        src = n.args[0]
        ok = (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and isinstance(gm.get_submodule(src.target), QuantLayer)
            and isinstance(gm.get_submodule(src.target), nn.Conv2d)
            and gm.get_submodule(src.target).per_channel  # a per-tensor scale cannot absorb per-channel BN
            and len(src.users) == 1
            and calls[src.target] == 1
            and calls[n.target] == 1
        )
        bn = gm.get_submodule(n.target)
        if ok:
            a, _ = _bn_affine(bn)
            ok = bool((a > 0).all())
        if not ok:
            info.bn_not_folded.append(n.target)
            continue
        pairs[src.target] = bn
        n.replace_all_uses_with(src)
        gm.graph.erase_node(n)
        info.bn_folded += 1
    gm.graph.lint()
    gm.recompile()
    return pairs


def build_deploy_module(
    student: nn.Module, fold_bn: bool = False, quantized: bool = True
) -> tuple[nn.Module, DeployInfo]:
    """A frozen copy of ``student`` for export (the student itself is not modified).

    ``quantized=False`` gives the matching FP32 model (same weights unquantized, no activation
    quantizers): the baseline for size and latency. ``fold_bn`` folds conv -> BN pairs (ONNX).
    """
    info = DeployInfo()
    model = copy.deepcopy(student).eval()
    pairs: dict[str, nn.BatchNorm2d] = {}
    if fold_bn:
        try:
            graph = _Leaves().trace(model)
            model = fx.GraphModule(model, graph, class_name=type(student).__name__ + "Deploy")
            pairs = _fold_pairs(model, info)
        except Exception as exc:  # untraceable model: export without folding
            log.warning("BN folding skipped: %s is not fx-traceable (%s)", type(student).__name__, exc)
            info.traced = False
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLayer):
            new = QDQWeightLayer(m, pairs.get(name), quantized)
            _set_child(model, name, new)
            p = new.params
            info.weight_layers[name] = (
                "int8"
                if p is not None
                else ("float" if m.w_bits >= FLOAT_BITS or not quantized else "float-fallback")
            )
        elif isinstance(m, ActQuant):
            if not quantized or m.bits >= FLOAT_BITS:
                _set_child(model, name, nn.Identity())
                info.activations[name] = "none"
            else:
                new = QDQAct(m)
                _set_child(model, name, new)
                info.activations[name] = new.mode
    for bn in pairs.values():  # folded BNs are no longer called; drop them from the module tree
        for name, m in list(model.named_modules()):
            if m is bn:
                _set_child(model, name, nn.Identity())
    return model.eval(), info
