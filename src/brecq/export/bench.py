"""How fast and how accurate a saved quantized model is in onnxruntime (`brecq bench DIR`).

Exports the float model and the quantized model (QDQ) as ONNX next to the artifact, then
measures onnxruntime CPU latency of both (batch 1 and a larger batch, min and median of N runs
after warm-up, the models taking turns), their file sizes and which Conv/Gemm/MatMul are left
in float after onnxruntime's default optimizations; with validation images, also both models'
onnxruntime top-1, the top-1 agreement of the quantized ONNX model with the PyTorch
fake-quantized model, and which of the float model's decisions the quantized one changed (with a
sign test, `evaluate.decision_changes`). `brecq quantize --export onnx` runs the same and puts
it in report.json.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..evaluate import decision_changes

logger = logging.getLogger(__name__)

FLOAT_FILE = "model_float.onnx"
QUANT_FILE = "model.onnx"


def export_float_onnx(model: nn.Module, path: str | os.PathLike[str], example: torch.Tensor,
                      opset: int = 17) -> Path:
    """The float model as ONNX (dynamic batch), for comparisons with the quantized export."""
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(copy.deepcopy(model).cpu().eval(), (example.detach().cpu(),),
                              str(out), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        except Exception as exc:  # noqa: BLE001 - exporter failures come in many types
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"ONNX export of the float {type(model).__name__} failed "
                             f"({reason[:200]})") from exc
    return out


def _accuracy(qmodel: Any, float_path: Path, quant_path: Path, loader: Any,
              threads: int) -> dict[str, Any]:
    """onnxruntime top-1 of both models and agreement with the PyTorch fake-quantized model."""
    from .ort_bench import session

    sessions = {"float": session(float_path, threads), "quantized": session(quant_path, threads)}
    predictions: dict[str, list[torch.Tensor]] = {"float": [], "quantized": [], "pytorch": []}
    targets = []
    qmodel = qmodel.cpu().eval()
    for images, labels, *_ in loader:
        x = images.numpy()
        for name, s in sessions.items():
            logits = s.run(None, {s.get_inputs()[0].name: x})[0]
            predictions[name].append(torch.from_numpy(logits.argmax(1)))
        with torch.no_grad(), qmodel.quantization(weights=True, acts=True):
            predictions["pytorch"].append(qmodel(images).argmax(1))
        targets.append(labels.reshape(-1))
    if not targets:
        raise ModelError("no validation images were evaluated: check --data DIR/val")
    pred = {name: torch.cat(p) for name, p in predictions.items()}
    labels = torch.cat(targets)
    count = len(labels)
    return {"images": count,
            "onnx_top1": {name: round(100.0 * int(pred[name].eq(labels).sum()) / count, 2)
                          for name in sessions},
            "agreement_with_pytorch": round(
                100.0 * int(pred["quantized"].eq(pred["pytorch"]).sum()) / count, 2),
            "vs_float": decision_changes(pred["float"], pred["quantized"], labels)}


def benchmark_quantized(qmodel: Any, float_model: nn.Module, input_shape: list[int],
                        out_dir: str | os.PathLike[str], *, loader: Any = None, threads: int = 1,
                        runs: int = 30, batch: int = 64, warmup: int = 3) -> dict[str, Any]:
    """Export both models to `out_dir` and measure them in onnxruntime (see module doc)."""
    from .onnx_qdq import example_input, export_onnx
    from .ort_bench import run_benchmark

    if runs < 1 or batch < 1 or threads < 1 or warmup < 0:
        raise ModelError(f"runs={runs}, batch={batch}, threads={threads}, warmup={warmup}: runs, "
                         "batch and threads must be positive, warmup >= 0")
    out = Path(out_dir).expanduser()
    example = example_input(input_shape)
    float_path = export_float_onnx(float_model, out / FLOAT_FILE, example)
    quant_path = export_onnx(qmodel, out / QUANT_FILE, example)
    result = {"float_onnx": str(float_path), "quantized_onnx": str(quant_path),
              **run_benchmark(float_path, quant_path, list(example.shape), threads=threads,
                              runs=runs, batch=batch, warmup=warmup)}
    if loader is not None:
        result["accuracy"] = _accuracy(qmodel, float_path, quant_path, loader, threads)
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Human-readable lines of a `benchmark_quantized` result."""
    sizes = result["size_bytes"]
    lines = [f"onnxruntime CPU, {result['threads']} thread(s), min (median) of {result['runs']} "
             f"runs after {result['warmup']} warm-up runs:"]
    for key, timing in result["latency_ms"].items():
        f, q = timing["float"], timing["quantized"]
        lines.append(f"  {key.replace('_', ' ')}: float {f['min_ms']:.3f} ({f['median_ms']:.3f}) ms, "
                     f"quantized {q['min_ms']:.3f} ({q['median_ms']:.3f}) ms, "
                     f"{timing['speedup_min']:.2f}x")
    lines.append(f"  size: float {sizes['float'] / 1024:.1f} KiB, quantized "
                 f"{sizes['quantized'] / 1024:.1f} KiB")
    left = result["float_compute_ops_left"]
    lines.append("  float Conv/Gemm/MatMul left after onnxruntime's optimizations: "
                 + (", ".join(f"{n} {op}" for op, n in left.items()) if left else "none"))
    if "accuracy" in result:
        acc = result["accuracy"]
        lines.append(f"  onnxruntime top-1 on {acc['images']} images: float "
                     f"{acc['onnx_top1']['float']:.2f}, quantized {acc['onnx_top1']['quantized']:.2f}; "
                     f"agreement with PyTorch fake-quantized {acc['agreement_with_pytorch']:.2f}%")
        change = acc["vs_float"]
        lines.append(f"  top-1 decisions changed from float: {change['changed']} (right only when "
                     f"quantized {change['gained']}, only in float {change['lost']}; sign test "
                     f"p = {change['p_value']:.3g})")
    return lines


__all__ = ["benchmark_quantized", "export_float_onnx", "summary_lines"]
