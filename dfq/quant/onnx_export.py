"""Writing a deployment view to ONNX and checking the file with ``onnx.checker``.

Uses torch's TorchScript-based exporter (``dynamo=False``): it is the one that lets an
``autograd.Function`` emit exactly the QuantizeLinear/DequantizeLinear nodes of
:mod:`dfq.quant.qdq`. It is deprecated upstream but present in the pinned torch; everything
specific to it is confined to this module.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch
from torch import nn

OPSET = 13  # per-channel DequantizeLinear (axis) needs 13; TensorRT and onnxruntime both read it
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(
    model: nn.Module, input_shape: tuple[int, ...], path: str | Path | None = None
) -> onnx.ModelProto:
    """Export ``model`` (batch dimension dynamic), check it, and write it to ``path`` if given."""
    buf = io.BytesIO()
    example = torch.zeros(2, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            model.eval(),
            (example,),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    proto = _drop_initializer_identities(onnx.load_from_string(buf.getvalue()))
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        onnx.save(proto, str(path))
    return proto


def _drop_initializer_identities(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Remove the Identity nodes the exporter puts on deduplicated constants.

    Equal scales or zero points (every post-ReLU activation has zero point -128) are stored once
    and re-exposed through Identity nodes; onnxruntime's QDQ fusion then no longer sees a constant
    zero point and falls back to float kernels. Consumers are pointed at the initializer instead.
    """
    graph = proto.graph
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs
    }
    if not alias:
        return proto
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)
    return proto


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type, e.g. how many QuantizeLinear/DequantizeLinear the export holds."""
    return dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))
