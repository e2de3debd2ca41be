"""``quantize(model, spec)``: a fake-quantized copy of a float model (the teacher is never touched).

Conv2d/Linear become :class:`QuantConv2d`/:class:`QuantLinear`; an :class:`ActQuant` follows every
ReLU/ReLU6 *call site*. Call sites matter: torchvision's ResNet blocks call one ``self.relu`` module
twice and some models call ``F.relu`` directly, so swapping modules alone would share one range
between two different activations or miss some. Modules with their own ``forward`` are therefore
traced with ``torch.fx`` (their children kept as opaque leaves, so the module tree and every
state_dict key are unchanged) and a quantizer is inserted after each ReLU site.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.quant.modules import FLOAT_BITS, ActQuant, QuantConv2d, QuantLayer, QuantLinear

log = logging.getLogger(__name__)

_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = {F.relu, F.relu6, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}


class _ChildrenAreLeaves(fx.Tracer):
    """Trace one module's own forward; every submodule call stays a single ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def _set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def _is_relu_site(node: fx.Node, module: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(module.get_submodule(node.target), _RELU_MODULES)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS or (node.target is F.hardtanh and node.args[1:3] == (0.0, 6.0))
    return node.op == "call_method" and node.target in _RELU_METHODS


def _requantize_sequential(seq: nn.Sequential, make: callable) -> int:
    count = 0
    for name, child in list(seq.named_children()):
        if isinstance(child, _RELU_MODULES):
            setattr(seq, name, nn.Sequential(child, make()))
            count += 1
    return count


def _requantize_traced(module: nn.Module, make: callable) -> tuple[nn.Module, int]:
    """Insert an ActQuant after every ReLU site of ``module``'s own forward; returns the new module."""
    try:
        graph = _ChildrenAreLeaves().trace(module)
    except Exception as exc:  # untraceable (data-dependent control flow): fall back to module swap
        n = sum(isinstance(c, _RELU_MODULES) for c in module.children())
        if n:
            log.warning(
                "%s is not fx-traceable (%s); ReLU children get one quantizer each",
                type(module).__name__,
                exc,
            )
            for name, child in list(module.named_children()):
                if isinstance(child, _RELU_MODULES):
                    setattr(module, name, nn.Sequential(child, make()))
        return module, n
    sites = [node for node in graph.nodes if _is_relu_site(node, module)]
    if not sites:
        return module, 0
    for i, node in enumerate(sites):
        base = node.target if node.op == "call_module" else "relu_fn"
        name = f"{str(base).replace('.', '_')}_aq{i}"
        module.add_module(name, make())
        with graph.inserting_after(node):
            q = graph.call_module(name, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
    graph.lint()
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    return gm, len(sites)


def insert_activation_quantizers(
    model: nn.Module, bits: int, beta: float, ema: str, ste: str = "identity"
) -> tuple[nn.Module, int]:
    """Returns the (possibly new) root module and the number of quantizers inserted."""

    def make() -> ActQuant:
        return ActQuant(bits, beta, ema, ste)

    def visit(module: nn.Module) -> tuple[nn.Module, int]:
        total = 0
        for name, child in list(module.named_children()):
            if isinstance(child, (*_RELU_MODULES, ActQuant, QuantLayer)):
                continue
            new, n = visit(child)
            total += n
            if new is not child:
                setattr(module, name, new)
        if isinstance(module, nn.Sequential):
            return module, total + _requantize_sequential(module, make)
        if isinstance(module, nn.ModuleList | nn.ModuleDict):
            return module, total
        new, n = _requantize_traced(module, make)
        return new, total + n

    return visit(model)


def quantize(model: nn.Module, spec) -> nn.Module:
    """A fake-quantized deep copy of ``model`` following ``spec`` (a :class:`dfq.spec.QuantSpec`).

    All weight layers get ``spec.w_bits`` unless ``first_layer_bits``/``last_layer_bits`` say
    otherwise (``F8L8``); "first" and "last" are the first and last Conv2d/Linear in definition order,
    which is execution order for torchvision's and dfq's models.
    """
    student = copy.deepcopy(model)
    layers = _weight_layers(student)
    if not layers:
        raise ValueError("the model has no Conv2d or Linear layers to quantize")
    for i, (path, layer) in enumerate(layers):
        bits = spec.w_bits
        if i == 0 and spec.first_layer_bits is not None:
            bits = spec.first_layer_bits
        if i == len(layers) - 1 and spec.last_layer_bits is not None:
            bits = spec.last_layer_bits
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        _set_child(student, path, cls.from_float(layer, bits, spec.per_channel))
    student, n_act = insert_activation_quantizers(
        student, spec.a_bits, spec.ema_beta, spec.act_range, spec.act_ste
    )
    if n_act == 0 and spec.a_bits < FLOAT_BITS:
        log.warning("no ReLU/ReLU6 found: activations will not be quantized")
    return student.train(model.training)


def quant_summary(student: nn.Module) -> dict[str, object]:
    layers = [(n, m) for n, m in student.named_modules() if isinstance(m, QuantLayer)]
    acts = [m for m in student.modules() if isinstance(m, ActQuant)]
    return {
        "weight_layers": len(layers),
        "weight_bits": {n: m.w_bits for n, m in layers},
        "activation_quantizers": len(acts),
    }
