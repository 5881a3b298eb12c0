"""Deployment check: BRECQ CIFAR ResNet-20 -> artifact -> ONNX QDQ -> onnxruntime on the CPU.

Quantizes ResNet-20 (../shared/weights/cifar10/resnet20.pt) at W4A8 and W8A8 with calibration
images from ../shared/data/cifar10/train, saves the artifact, exports a QDQ ONNX model and runs
onnxruntime on all validation images. Prints the top-1 agreement between onnxruntime and the
PyTorch fake-quantized model, their logit differences and accuracies, artifact size vs float
size, and onnxruntime CPU latency of the W8A8 QDQ model vs the float ONNX model. Writes
benchmarks/results/export_check.json. Skips (exit 0) when ../shared is absent.

    python benchmarks/export_check.py [--iters-w 200] [--iters-a 100] [--runs 50]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "cifar10" / "resnet20.pt"
DATA = SHARED / "data" / "cifar10"
RESULTS = ROOT / "benchmarks" / "results" / "export_check.json"


def _latency_ms(session, x, runs: int) -> float:  # noqa: ANN001
    name = session.get_inputs()[0].name
    for _ in range(3):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters-w", type=int, default=200)
    parser.add_argument("--iters-a", type=int, default=100)
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=50, help="latency runs (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime/torch CPU threads")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only this many images")
    args = parser.parse_args()

    if not WEIGHTS.is_file() or not (DATA / "val").is_dir() or not (DATA / "train").is_dir():
        print(f"SKIP: {SHARED} with weights/cifar10/resnet20.pt and data/cifar10/{{train,val}} is "
              "not present; nothing to check")
        return 0

    import numpy as np
    import onnxruntime as ort
    import torch

    from brecq import BrecqConfig, quantize
    from brecq.data import eval_loader, load_calibration
    from brecq.export import save_quantized
    from brecq.export.onnx_qdq import export_onnx
    from brecq.models import build_model

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model, prep = build_model("cifar_resnet20", weights=WEIGHTS)
    transform = prep.to_transform()
    calib = load_calibration(DATA, transform, num_samples=args.calib_size, seed=0)
    xs, ys = [], []
    for x, y, *_ in eval_loader(DATA, transform, batch_size=500, num_workers=0):
        xs.append(x)
        ys.append(y)
    val_x, val_y = torch.cat(xs), torch.cat(ys)
    if args.limit:
        val_x, val_y = val_x[: args.limit], val_y[: args.limit]
    print(f"ResNet-20: {len(calib)} calibration images, {len(val_x)} validation images; "
          f"iters_w={args.iters_w} iters_a={args.iters_a}; {args.threads} CPU thread(s)", flush=True)

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1

    plain = ort.SessionOptions()
    plain.intra_op_num_threads = args.threads
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def session(path: Path, opts=options):  # noqa: ANN001, ANN202
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run_ort(sess, x):  # noqa: ANN001, ANN202
        name = sess.get_inputs()[0].name
        return np.concatenate([
            sess.run(None, {name: x[i : i + 500].numpy()})[0] for i in range(0, len(x), 500)
        ])

    with torch.no_grad():
        fp_logits = torch.cat([model(val_x[i : i + 500]) for i in range(0, len(val_x), 500)])
    fp_top1 = float((fp_logits.argmax(1) == val_y).float().mean() * 100)
    print(f"float PyTorch top-1: {fp_top1:.2f}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="brecq_export_check_"))
    float_onnx = work / "float.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buffer = io.BytesIO()
        torch.onnx.export(model, (val_x[:1],), buffer, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    float_onnx.write_bytes(buffer.getvalue())

    results: dict = {"model": "cifar_resnet20", "images": len(val_x), "float_top1": fp_top1,
                     "iters_w": args.iters_w, "iters_a": args.iters_a, "threads": args.threads,
                     "configs": {}}
    qdq_paths = {}
    for wb in (4, 8):
        label = f"W{wb}A8"
        config = BrecqConfig(weight_bits=wb, act_bits=8, iters_w=args.iters_w,
                             iters_a=args.iters_a, calib_size=args.calib_size, device="cpu")
        started = time.perf_counter()
        qmodel, _ = quantize(model, calib, config)
        qmodel.eval()
        seconds = time.perf_counter() - started
        art = save_quantized(qmodel, work / label, config=config, pack=wb <= 4,
                             model_info={"name": "cifar_resnet20", "weights": str(WEIGHTS),
                                         "preprocessing": prep.to_dict()})
        size = json.loads((art / "model.json").read_text())["size"]
        onnx_path = export_onnx(qmodel, work / f"{label}.onnx", val_x[:1], opset=17)
        qdq_paths[label] = onnx_path
        with torch.no_grad():
            pt = torch.cat([qmodel(val_x[i : i + 500]) for i in range(0, len(val_x), 500)]).numpy()
        ox = run_ort(session(onnx_path), val_x)
        diff = np.abs(ox - pt)
        rel_l2 = np.linalg.norm(ox - pt, axis=1) / np.linalg.norm(pt, axis=1)
        ox_plain = run_ort(session(onnx_path, plain), val_x)
        rel_plain = np.linalg.norm(ox_plain - pt, axis=1) / np.linalg.norm(pt, axis=1)
        row = {
            "quantize_seconds": round(seconds, 1),
            "top1_agreement_pct": float((ox.argmax(1) == pt.argmax(1)).mean() * 100),
            "max_abs_logit_diff": float(diff.max()),
            "mean_abs_logit_diff": float(diff.mean()),
            "max_rel_logit_diff": float(diff.max() / np.abs(pt).max()),
            "rel_l2_logit_diff_median": float(np.median(rel_l2)),
            "rel_l2_logit_diff_p99": float(np.quantile(rel_l2, 0.99)),
            "no_ort_opt_top1_agreement_pct": float((ox_plain.argmax(1) == pt.argmax(1)).mean() * 100),
            "no_ort_opt_max_abs_logit_diff": float(np.abs(ox_plain - pt).max()),
            "no_ort_opt_rel_l2_median": float(np.median(rel_plain)),
            "top1_pytorch": float((pt.argmax(1) == val_y.numpy()).mean() * 100),
            "top1_onnxruntime": float((ox.argmax(1) == val_y.numpy()).mean() * 100),
            "artifact_bytes": size["artifact_bytes"],
            "float32_bytes": size["float32_bytes"],
            "onnx_bytes": onnx_path.stat().st_size,
        }
        if wb <= 4:
            int4 = export_onnx(qmodel, work / f"{label}_int4.onnx", val_x[:1], opset=21)
            ox4 = run_ort(session(int4), val_x)
            row["onnx_int4_bytes"] = int4.stat().st_size
            row["int4_vs_int8_onnx_max_abs_diff"] = float(np.abs(ox4 - ox).max())
        results["configs"][label] = row
        print(f"{label}: quantized in {seconds:.0f}s; top-1 PyTorch {row['top1_pytorch']:.2f} / "
              f"onnxruntime {row['top1_onnxruntime']:.2f}; top-1 agreement "
              f"{row['top1_agreement_pct']:.2f}%; logit |diff| max {row['max_abs_logit_diff']:.3g} "
              f"mean {row['mean_abs_logit_diff']:.3g}; per-image relative L2 median "
              f"{row['rel_l2_logit_diff_median']:.2e} p99 {row['rel_l2_logit_diff_p99']:.2e}",
              flush=True)
        print(f"{label}: with onnxruntime graph optimizations off (no integer-kernel fusion): "
              f"agreement {row['no_ort_opt_top1_agreement_pct']:.2f}%, logit |diff| max "
              f"{row['no_ort_opt_max_abs_logit_diff']:.3g}, relative L2 median "
              f"{row['no_ort_opt_rel_l2_median']:.2e}", flush=True)
        print(f"{label}: artifact {size['artifact_bytes'] / 1024:.1f} KiB vs float32 "
              f"{size['float32_bytes'] / 1024:.1f} KiB ({size['compression']:.2f}x); ONNX QDQ "
              f"{row['onnx_bytes'] / 1024:.1f} KiB"
              + (f", int4 ONNX (opset 21) {row['onnx_int4_bytes'] / 1024:.1f} KiB, max |diff| vs "
                 f"int8 ONNX {row['int4_vs_int8_onnx_max_abs_diff']:.3g}" if wb <= 4 else ""),
              flush=True)

    latency = {}
    for name, path in (("float", float_onnx), ("W8A8_qdq", qdq_paths["W8A8"])):
        sess = session(path)
        latency[name] = {
            "batch1_ms": _latency_ms(sess, val_x[:1].numpy(), args.runs),
            "batch64_ms": _latency_ms(sess, val_x[:64].numpy(), max(5, args.runs // 5)),
        }
    results["latency_ms"] = latency
    print(f"onnxruntime CPU latency ({args.threads} thread(s), median of {args.runs} runs at "
          f"batch 1, {max(5, args.runs // 5)} at batch 64):")
    for name, row in latency.items():
        print(f"  {name:9s} batch 1: {row['batch1_ms']:.3f} ms   batch 64: {row['batch64_ms']:.2f} ms")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
