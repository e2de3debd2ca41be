"""Which layer uses an activation quantizer's output, read off the autograd graph of one forward.

Why the graph and not the module tree: a model's call order and its functional uses (a residual add, a
concat, ``F.adaptive_avg_pool2d``) are invisible to module hooks, and a quantizer whose output has a
second use cannot be rescaled or weighted as if one layer alone consumed it. Both
``quant.act_equalize`` (dfq/quant/equalize.py) and ``quant.act_mse_weight`` (dfq/quant/bn_ranges.py)
need this answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dfq.quant.modules import ActQuant
from dfq.quant.probe import probe_forward

# Autograd nodes a consumer may be reached through: an average pool (every channel scaled alike) and the
# reshapes that flatten a pooled map for a classifier. Anything else (an add, a ReLU, a max pool) stops
# the walk, and the site has no single consumer.
PASS_THROUGH = ("MeanBackward", "AdaptiveAvgPool", "AvgPool", "ViewBackward", "ReshapeAlias", "UnsafeView")


@dataclass(frozen=True)
class Consumer:
    layer: nn.Module  # the Conv2d or Linear that takes the quantizer's output
    bn: nn.Module | None  # the BatchNorm that is the sole user of that layer's output, if any
    direct: bool  # the layer takes the quantizer's output itself (no pooling or reshape between)


def sole_consumers(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Consumer]:
    """``{quantizer name: Consumer}`` for every ActQuant whose output is used by exactly one operation,
    a Conv2d or Linear (directly or through :data:`PASS_THROUGH` nodes). Uses are counted on the autograd
    graph of one forward of a zero batch (``probe_forward``)."""
    q_node: dict[str, object] = {}
    q_calls: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}

    def on_quant(m, inputs, out):
        q_node[names[m]] = out.grad_fn
        q_calls[names[m]] = q_calls.get(names[m], 0) + 1

    quant_hooks = [m.register_forward_hook(on_quant) for m in model.modules() if isinstance(m, ActQuant)]
    layer_of_node, bn_of_node, users = _trace(model, input_shape, quant_hooks)
    found = {}
    for name, node in q_node.items():
        if q_calls[name] != 1:
            continue
        direct = True
        while True:
            used_by = users.get(node, [])
            if len(used_by) != 1:
                break
            user = used_by[0]
            if user in layer_of_node and layer_of_node[user][1] is node:
                found[name] = Consumer(layer_of_node[user][0], _bn_after(user, users, bn_of_node), direct)
                break
            if not type(user).__name__.startswith(PASS_THROUGH):
                break
            node, direct = user, False
    return found


def sole_bn_after(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, nn.Module]:
    """``{layer name: BatchNorm}`` for every Conv2d/Linear whose output is used by a BatchNorm alone (the
    BN a folded deployment would merge into it), read off one forward's autograd graph."""
    names = {m: n for n, m in model.named_modules()}
    layer_of_node, bn_of_node, users = _trace(model, input_shape)
    found = {names[m]: _bn_after(node, users, bn_of_node) for node, (m, _) in layer_of_node.items()}
    return {name: bn for name, bn in found.items() if bn is not None}


Nodes = dict[object, tuple[nn.Module, object]]  # output node -> (module, its input's node)


def _trace(
    model: nn.Module, input_shape: tuple[int, ...], hooks: list | None = None
) -> tuple[Nodes, Nodes, dict[object, list[object]]]:
    """One graph-recording forward (``probe_forward``, which also removes ``hooks``, the caller's own):
    the output nodes of every Conv2d/Linear and BatchNorm call, and each node's users."""
    layer_of_node: Nodes = {}
    bn_of_node: Nodes = {}

    def on_layer(m, inputs, out):
        layer_of_node[out.grad_fn] = (m, inputs[0].grad_fn)

    def on_bn(m, inputs, out):
        bn_of_node[out.grad_fn] = (m, inputs[0].grad_fn)

    hooks = list(hooks or [])
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            hooks.append(m.register_forward_hook(on_layer))
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            hooks.append(m.register_forward_hook(on_bn))
    out = probe_forward(model, input_shape, hooks, grad=True)
    return layer_of_node, bn_of_node, _users(out.grad_fn)


def bn_scale(bn: nn.Module) -> torch.Tensor:
    """``|gamma| / sqrt(var + eps)`` per channel (gamma taken as 1 where the BN has no affine): how much a
    unit of error before the BN weighs after it."""
    s = bn.weight.detach().float().abs() if bn.weight is not None else torch.ones(bn.num_features)
    return s.to(bn.running_var.device) / torch.sqrt(bn.running_var.detach().float() + bn.eps)


def _users(root: object) -> dict[object, list[object]]:
    users: dict[object, list[object]] = {}
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                users.setdefault(child, []).append(node)
                stack.append(child)
    return users


def _bn_after(node: object, users: dict, bn_of_node: dict) -> nn.Module | None:
    used_by = users.get(node, [])
    if len(used_by) == 1 and used_by[0] in bn_of_node and bn_of_node[used_by[0]][1] is node:
        return bn_of_node[used_by[0]][0]
    return None


def channel_weights(consumer: Consumer, channels: int) -> torch.Tensor | None:
    """Per input channel c of the consumer, ``sum over its outputs o and taps k of (s_o * W[o, c, k])^2``
    with ``s_o = |gamma_o| / sqrt(var_o + eps)`` of the BN after it (1 without one): the squared error a
    unit of independent, zero-mean error on channel c adds to the BN-normalised output the next layer
    sees. ``None`` where channels do not map one to one onto the layer's inputs (a grouped conv other than
    depthwise, a classifier over a flattened map)."""
    layer, bn = consumer.layer, consumer.bn
    w = layer.weight.detach().float()
    if bn is not None:
        w = w * bn_scale(bn).to(w.device).view(-1, *([1] * (w.dim() - 1)))
    groups = getattr(layer, "groups", 1)
    if groups == 1:
        per_in = w.pow(2).transpose(0, 1).reshape(w.shape[1], -1).sum(1)
    elif groups == channels and w.shape[1] == 1:  # depthwise (with any channel multiplier)
        per_in = w.pow(2).reshape(channels, -1).sum(1)
    else:
        return None
    return per_in.cpu() if per_in.numel() == channels else None
