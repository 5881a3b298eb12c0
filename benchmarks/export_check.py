"""Deployment check: BRECQ CIFAR ResNet-20 -> artifact -> ONNX QDQ -> onnxruntime on the CPU.

Quantizes the pretrained CIFAR ResNet-20 (under `--data-root`, see common.py) at W4A8 and W8A8
with calibration images from CIFAR-10 train, saves the artifact, exports a QDQ ONNX model and runs
onnxruntime on all validation images, with its default graph optimizations (which fuse QDQ
groups into integer kernels such as QLinearConv) and with graph optimizations disabled. Prints
the top-1 agreement between onnxruntime and the PyTorch fake-quantized model, their logit
differences and accuracies, artifact size vs the float checkpoint, and onnxruntime CPU latency
of the W8A8 QDQ model vs the float ONNX model. Writes benchmarks/results/export_check.json.
Skips (exit 0) when the data or the weights are absent.

By default the models are quantized with `integer_bias` on: PyTorch adds each bias on the int32
grid in_scale * weight_scale and the export holds it as int32 codes, as integer kernels use it.
With `--no-integer-bias` the biases stay float; onnxruntime's QDQ optimizer (already at its
basic level) then rounds the bias of every Conv whose input and output are quantized itself.
To separate that rounding from everything else, the PyTorch model is also run with the very
biases onnxruntime computed ("int32-bias reference"; equal to the model itself when no float
bias is left to round).

    python benchmarks/export_check.py [--iters-w 200] [--iters-a 100] [--runs 50]
        [--no-integer-bias] [--artifacts DIR] [--limit N] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import RESULTS, Cifar10, add_data_root_argument, cpu_name, cpuinfo_field, skip

EVAL_BATCH = 500


def _cpu_int8_features() -> list[str]:
    """The instruction set extensions that decide how fast integer (u8s8) kernels can be."""
    flags = set((cpuinfo_field("flags") or "").split())
    return sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})


def _interleaved_latency_ms(sessions: dict, x, runs: int) -> dict[str, dict[str, float]]:  # noqa: ANN001
    """Median and minimum ms per session.run; the sessions take turns so load drift hits all."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for sess in sessions.values():
        for _ in range(3):
            sess.run(None, {sess.get_inputs()[0].name: x})
    for _ in range(runs):
        for name, sess in sessions.items():
            feed = {sess.get_inputs()[0].name: x}
            start = time.perf_counter()
            sess.run(None, feed)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t)} for name, t in times.items()}


def _ort_rounded_biases(onnx_path: Path, optimized_path: Path, ort, onnx) -> dict:  # noqa: ANN001
    """{bias initializer name: float32 array} for the biases onnxruntime turns into int32 codes.

    Reads the model onnxruntime's basic-level optimizer writes: there a rewritten bias is a
    DequantizeLinear(int32 codes, in_scale * weight_scale) feeding the Conv.
    """
    from onnx import numpy_helper

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(optimized_path)
    ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    original = onnx.load(str(onnx_path)).graph
    optimized = onnx.load(str(optimized_path)).graph
    float_inits = {t.name for t in original.initializer if t.data_type == onnx.TensorProto.FLOAT}
    # Only float biases: with integer_bias the export already holds them as int32 codes.
    bias_of = {n.output[0]: n.input[2] for n in original.node
               if n.op_type == "Conv" and len(n.input) > 2 and n.input[2] in float_inits}
    dequantized = {n.output[0]: n for n in optimized.node if n.op_type == "DequantizeLinear"}
    inits = {t.name: numpy_helper.to_array(t) for t in optimized.initializer}
    biases = {}
    for node in optimized.node:
        if node.op_type != "Conv" or len(node.input) < 3 or node.output[0] not in bias_of:
            continue
        dq = dequantized.get(node.input[2])
        if dq is None or inits.get(dq.input[0]) is None or inits[dq.input[0]].dtype.name != "int32":
            continue
        codes, scale = inits[dq.input[0]], inits[dq.input[1]]
        biases[bias_of[node.output[0]]] = codes.astype("float32") * scale.astype("float32")
    return biases


def _logit_stats(out, ref, labels) -> dict:  # noqa: ANN001
    import numpy as np

    diff = np.abs(out - ref)
    return {
        "top1_agreement_pct": float((out.argmax(1) == ref.argmax(1)).mean() * 100),
        "disagreeing_images": int((out.argmax(1) != ref.argmax(1)).sum()),
        "max_abs_logit_diff": float(diff.max()),
        "median_abs_logit_diff": float(np.median(diff)),
        "p99_abs_logit_diff": float(np.quantile(diff, 0.99)),
        "max_abs_logit": float(np.abs(ref).max()),
        "images_bit_identical_pct": float((diff.max(1) == 0).mean() * 100),
        "top1_onnxruntime": float((out.argmax(1) == labels).mean() * 100),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters-w", type=int, default=200)
    parser.add_argument("--iters-a", type=int, default=100)
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=50, help="latency runs (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime/torch CPU threads")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only this many images")
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="folder for the artifacts and ONNX files (default: a new temporary "
                        "folder); an artifact already there with the same config is loaded "
                        "instead of quantizing again")
    parser.add_argument("--integer-bias", action=argparse.BooleanOptionalAction, default=True,
                        help="BrecqConfig.integer_bias of the quantized models (default: on)")
    parser.add_argument("--out", type=Path, default=RESULTS / "export_check.json",
                        help="results JSON")
    add_data_root_argument(parser)
    args = parser.parse_args()
    cifar = Cifar10.under(args.data_root)
    if cifar.missing(["resnet20"]):
        return skip(cifar.missing(["resnet20"]))
    weights = cifar.weights("resnet20")

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from brecq import BrecqConfig, load_quantized, quantize, save_quantized
    from brecq.export import export_onnx

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model, prep = cifar.build("resnet20")
    transform = prep.to_transform()
    val_x, val_y = cifar.val(transform)
    if args.limit:
        val_x, val_y = val_x[: args.limit], val_y[: args.limit]
    labels = val_y.numpy()
    print(f"ResNet-20: {len(val_x)} validation images; iters_w={args.iters_w} "
          f"iters_a={args.iters_a}; {args.threads} CPU thread(s); CPU {cpu_name()}", flush=True)

    levels = ort.GraphOptimizationLevel
    # Result key -> (graph optimization level, QDQ transformers on). "ort_basic" already rounds
    # Conv biases to int32 but fuses nothing into integer kernels; "ort_default" (ORT_ENABLE_ALL)
    # does both. "ort_no_qdq_fusion" keeps every other optimization but sets
    # session.disable_quant_qdq: weights are dequantized once at load and every Conv runs in
    # float32 on the Q/DQ-rounded activations, as the PyTorch model computes.
    ort_modes = {
        "ort_default": (levels.ORT_ENABLE_ALL, True),
        "ort_basic": (levels.ORT_ENABLE_BASIC, True),
        "ort_no_qdq_fusion": (levels.ORT_ENABLE_ALL, False),
        "ort_no_optimization": (levels.ORT_DISABLE_ALL, True),
    }

    def session(path: Path, mode: str = "ort_default"):  # noqa: ANN202
        level, qdq_transformers = ort_modes[mode]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = level
        if not qdq_transformers:
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run_ort(sess):  # noqa: ANN001, ANN202
        name = sess.get_inputs()[0].name
        return np.concatenate([sess.run(None, {name: val_x[i : i + EVAL_BATCH].numpy()})[0]
                               for i in range(0, len(val_x), EVAL_BATCH)])

    def run_torch(net):  # noqa: ANN001, ANN202
        with torch.no_grad():
            return torch.cat([net(val_x[i : i + EVAL_BATCH])
                              for i in range(0, len(val_x), EVAL_BATCH)]).numpy()

    fp_top1 = float((run_torch(model).argmax(1) == labels).mean() * 100)
    print(f"float PyTorch top-1: {fp_top1:.2f}", flush=True)

    work = args.artifacts or Path(tempfile.mkdtemp(prefix="brecq_export_check_"))
    work.mkdir(parents=True, exist_ok=True)
    float_onnx = work / "float.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buffer = io.BytesIO()
        torch.onnx.export(model, (val_x[:1],), buffer, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    float_onnx.write_bytes(buffer.getvalue())

    results: dict = {
        "model": "cifar_resnet20", "images": len(val_x), "float_top1": fp_top1,
        "iters_w": args.iters_w, "iters_a": args.iters_a, "calib_size": args.calib_size,
        "threads": args.threads, "integer_bias": args.integer_bias, "cpu": cpu_name(),
        "cpu_int8_features": _cpu_int8_features(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()), "onnxruntime": ort.__version__,
        "torch": torch.__version__, "onnx_opset": 17,
        "float_checkpoint_bytes": weights.stat().st_size, "float_onnx_bytes": float_onnx.stat().st_size,
        "configs": {},
    }
    calib = None
    qdq_paths = {}
    for wb in (4, 8):
        label = f"W{wb}A8"
        config = BrecqConfig(weight_bits=wb, act_bits=8, iters_w=args.iters_w,
                             iters_a=args.iters_a, calib_size=args.calib_size, device="cpu",
                             integer_bias=args.integer_bias)
        art = work / label
        reused = (art / "config.json").is_file() and BrecqConfig.from_json(art / "config.json") == config
        if reused:
            qmodel = load_quantized(model, art)
            print(f"{label}: loaded the artifact in {art} (same config)", flush=True)
        else:
            if calib is None:
                calib = cifar.calibration(transform, args.calib_size, 0)
            started = time.perf_counter()
            qmodel, _ = quantize(model, calib, config)
            seconds = round(time.perf_counter() - started, 1)
            save_quantized(qmodel, art, config=config, pack=wb <= 4,
                           model_info={"name": "cifar_resnet20", "weights": str(weights),
                                       "preprocessing": prep.to_dict(), "quantize_seconds": seconds})
        qmodel.eval()
        info = json.loads((art / "model.json").read_text())
        size, seconds = info["size"], info.get("quantize_seconds")
        onnx_path = export_onnx(qmodel, work / f"{label}.onnx", val_x[:1], opset=17)
        qdq_paths[label] = onnx_path

        pt = run_torch(qmodel)
        biases = _ort_rounded_biases(onnx_path, work / f"{label}_ort_basic.onnx", ort, onnx)
        int32_ref = copy.deepcopy(qmodel)
        state = int32_ref.network.state_dict()
        with torch.no_grad():
            for key, value in biases.items():
                state[key].copy_(torch.from_numpy(value))
        pt_int32 = run_torch(int32_ref)
        outputs = {mode: run_ort(session(onnx_path, mode)) for mode in ort_modes}
        row = {
            "quantize_seconds": seconds,
            "artifact_reused": reused,
            "top1_pytorch": float((pt.argmax(1) == labels).mean() * 100),
            "top1_pytorch_int32_bias": float((pt_int32.argmax(1) == labels).mean() * 100),
            "biases_rounded_by_ort": len(biases),
            "pytorch_int32_bias_vs_float_bias_agreement_pct":
                float((pt_int32.argmax(1) == pt.argmax(1)).mean() * 100),
            "artifact_dir_bytes": sum(f.stat().st_size for f in art.iterdir() if f.is_file()),
            "artifact_weights_bytes": size["artifact_bytes"],
            "float32_param_bytes": size["float32_bytes"],
            "onnx_bytes": onnx_path.stat().st_size,
        }
        for level, out in outputs.items():
            row[level] = {"vs_pytorch": _logit_stats(out, pt, labels),
                          "vs_pytorch_int32_bias": _logit_stats(out, pt_int32, labels)}
        if wb <= 4:
            int4 = export_onnx(qmodel, work / f"{label}_int4.onnx", val_x[:1], opset=21)
            row["onnx_int4_bytes"] = int4.stat().st_size
            row["onnx_int4_ort_default_vs_pytorch"] = _logit_stats(run_ort(session(int4)), pt, labels)
        results["configs"][label] = row

        took = ("artifact reused, " if reused else "") + f"quantization took {seconds} s"
        print(f"{label}: {took}; top-1 PyTorch {row['top1_pytorch']:.2f} (int32-bias reference "
              f"{row['top1_pytorch_int32_bias']:.2f}, {len(biases)} biases rounded by onnxruntime)",
              flush=True)
        for level in outputs:
            for ref in ("vs_pytorch", "vs_pytorch_int32_bias"):
                s = row[level][ref]
                print(f"  onnxruntime {level:19s} {ref:22s} agreement {s['top1_agreement_pct']:6.2f}% "
                      f"({s['disagreeing_images']} images); |logit diff| max {s['max_abs_logit_diff']:.3g} "
                      f"p99 {s['p99_abs_logit_diff']:.3g} median {s['median_abs_logit_diff']:.3g}; "
                      f"identical images {s['images_bit_identical_pct']:.1f}%; onnxruntime top-1 "
                      f"{s['top1_onnxruntime']:.2f}", flush=True)
        print(f"  artifact {row['artifact_dir_bytes'] / 1024:.1f} KiB on disk (weights file "
              f"{row['artifact_weights_bytes'] / 1024:.1f} KiB) vs float checkpoint "
              f"{results['float_checkpoint_bytes'] / 1024:.1f} KiB (float32 parameters "
              f"{row['float32_param_bytes'] / 1024:.1f} KiB); ONNX QDQ {row['onnx_bytes'] / 1024:.1f} KiB"
              + (f", int4 ONNX (opset 21) {row['onnx_int4_bytes'] / 1024:.1f} KiB" if wb <= 4 else ""),
              flush=True)

    sessions = {"float": session(float_onnx), "W8A8_qdq": session(qdq_paths["W8A8"]),
                "W8A8_qdq_no_qdq_fusion": session(qdq_paths["W8A8"], "ort_no_qdq_fusion"),
                "W4A8_qdq": session(qdq_paths["W4A8"])}
    latency = {}
    for batch in (1, 64):
        latency[f"batch{batch}"] = _interleaved_latency_ms(sessions, val_x[:batch].numpy(), args.runs)
    results["latency"] = {"runs": args.runs, "ort_optimization": "ORT_ENABLE_ALL; *_no_qdq_fusion "
                          "with session.disable_quant_qdq=1", **latency}
    results["load_average_at_end"] = list(os.getloadavg())
    print(f"onnxruntime CPU latency ({args.threads} thread(s), ORT_ENABLE_ALL, "
          f"median (min) of {args.runs} interleaved runs; CPU {cpu_name()}):")
    for batch, rows in latency.items():
        print(f"  {batch}: " + "; ".join(f"{name} {r['median_ms']:.2f} ({r['min_ms']:.2f}) ms"
                                         for name, r in rows.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
