"""onnxruntime checks of an exported model: which kernels it runs, how fast, how accurately.

- `optimized_op_counts`: the operators of the graph onnxruntime actually runs at its default
  optimization level (written with `SessionOptions.optimized_model_filepath`), and
  `float_compute_ops`, the Conv/Gemm/MatMul among them left in float (not fused into
  QLinearConv / QGemm / MatMulInteger).
- `latency_ms`: min and median milliseconds per `session.run` after warm-up, the sessions
  taking turns so that load changes on a shared machine hit all of them alike.
- `onnx_predictions` / `run_benchmark`: top-1 of float vs quantized ONNX models and agreement
  with the PyTorch fake-quantized model, latency at two batch sizes and sizes on disk.

Math-free orchestration around onnxruntime; it needs the onnxruntime package.
"""

from __future__ import annotations

import collections
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

# Float compute operators; their integer forms are QLinearConv, QGemm, MatMulInteger(ToFloat).
FLOAT_COMPUTE_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def session(path: str | Path, threads: int = 1, optimized_path: str | Path | None = None):  # noqa: ANN201
    """A CPU onnxruntime session at the default optimization level with `threads` threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the "hardware specific optimized model" notice is expected
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def optimized_op_counts(path: str | Path) -> collections.Counter:
    """Operator type -> count in the graph onnxruntime runs for `path` (default optimizations)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(path, optimized_path=optimized)
        graph = onnx.load(str(optimized)).graph
    return collections.Counter(node.op_type for node in graph.node)


def float_compute_ops(counts: collections.Counter) -> dict[str, int]:
    """The float Conv/Gemm/MatMul operators left in an optimized graph (NCHWc convs included)."""
    return {op: n for op, n in counts.items() if op in FLOAT_COMPUTE_OPS and n}


def latency_ms(sessions: dict, x: np.ndarray, runs: int, warmup: int = 3) -> dict[str, dict]:
    """{name: {"min_ms", "median_ms"}} of `runs` timed runs each, after `warmup` untimed ones."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
    for name, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[name])
    for _ in range(runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: {"min_ms": round(min(t), 4), "median_ms": round(statistics.median(t), 4)}
            for name, t in times.items()}


def onnx_predictions(sess, batches: Iterable[np.ndarray]) -> np.ndarray:  # noqa: ANN001
    """Top-1 class of every image, batch by batch."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x})[0].argmax(1) for x in batches])


def run_benchmark(float_path: str | Path, quant_path: str | Path, input_shape: list[int], *,
                  threads: int = 1, runs: int = 30, batch: int = 64, warmup: int = 3,
                  seed: int = 0) -> dict:
    """Latency (batch 1 and `batch`) and file sizes of a float and a quantized ONNX model."""
    sessions = {"float": session(float_path, threads), "quantized": session(quant_path, threads)}
    rng = np.random.default_rng(seed)
    result: dict = {
        "threads": threads, "runs": runs, "warmup": warmup,
        "size_bytes": {"float": Path(float_path).stat().st_size,
                       "quantized": Path(quant_path).stat().st_size},
        "latency_ms": {},
    }
    for size in dict.fromkeys((1, batch)):
        x = rng.standard_normal((size, *input_shape[1:]), dtype=np.float32)
        result["latency_ms"][f"batch_{size}"] = latency_ms(sessions, x, runs, warmup)
    for timing in result["latency_ms"].values():
        timing["speedup_min"] = round(timing["float"]["min_ms"] / timing["quantized"]["min_ms"], 3)
    counts = optimized_op_counts(quant_path)
    result["quantized_ops"] = dict(sorted(counts.items()))
    result["float_compute_ops_left"] = float_compute_ops(counts)
    return result
