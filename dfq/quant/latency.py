"""CPU latency of an ONNX file in onnxruntime, and which integer kernels onnxruntime actually runs.

A QDQ file only runs faster than FP32 where onnxruntime fuses DequantizeLinear -> op -> QuantizeLinear
into an integer kernel (QLinearConv, QGemm, ...). Whether it does depends on the graph, not on the
file format, so the export report counts the fused nodes in onnxruntime's optimized graph instead of
assuming a speed-up.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from dfq.quant.onnx_export import INPUT_NAME

INTEGER_OPS = (
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "ConvInteger",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "QLinearAdd",
    "QLinearMul",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "QLinearConcat",
)
FLOAT_COMPUTE_OPS = ("Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm", "FusedMatMul")


def _session(path: str | Path, threads: int, optimized_to: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if optimized_to:
        so.optimized_model_filepath = optimized_to
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def kernel_counts(path: str | Path, threads: int = 1) -> dict[str, Any]:
    """Integer vs float compute nodes in onnxruntime's optimized graph of ``path``."""
    with tempfile.TemporaryDirectory() as tmp:
        opt = str(Path(tmp) / "optimized.onnx")
        _session(path, threads, opt)
        ops = Counter(n.op_type for n in onnx.load(opt).graph.node)
    integer = {op: ops[op] for op in INTEGER_OPS if ops[op]}
    floating = {op: ops[op] for op in FLOAT_COMPUTE_OPS if ops[op]}
    return {"integer_ops": integer, "float_ops": floating, "integer_kernels": sum(integer.values())}


def measure_latency(
    path: str | Path,
    input_shape: tuple[int, ...],
    batch: int,
    threads: int = 1,
    warmup: int = 3,
    min_runs: int = 5,
    max_runs: int = 50,
    budget_s: float = 3.0,
) -> dict[str, Any]:
    """Median and spread of wall-clock per inference (ms) on random inputs, after warm-up.

    Runs at least ``min_runs`` times and then until ``budget_s`` or ``max_runs``; on a shared
    machine the median is the figure to read, p90 shows the contention.
    """
    sess = _session(path, threads)
    x = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)
    for _ in range(warmup):
        sess.run(None, {INPUT_NAME: x})
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (len(times) < max_runs and time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        sess.run(None, {INPUT_NAME: x})
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {
        "batch": batch,
        "threads": threads,
        "runs": len(times),
        "median_ms": round(statistics.median(times), 3),
        "p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))], 3),
        "min_ms": round(times[0], 3),
    }
