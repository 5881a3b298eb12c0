"""Deployed speed and accuracy in onnxruntime: float ONNX vs quantize_static vs brecq.

CIFAR ResNet-20 (weights and data under `--data-root`, see common.py): exports the float model,
quantizes it with onnxruntime's own `quantize_static` (QDQ, int8 weights per channel, uint8
activations, MinMax, 512 calibration images) and with brecq (BRECQ, `--backend onnxruntime`) at
W8A8 and W4A8 (4-bit weight grid stored as int8), then, in one process with 1 onnxruntime thread,
measures each model's onnxruntime top-1 on all validation images, the top-1 agreement of brecq's
ONNX models with their PyTorch fake-quantized models, and latency at batch 1 and 64 (minimum and
median of `--runs` runs after warm-up, the models taking turns). `--torchvision
resnet18,mobilenet_v2` adds float vs brecq W8A8 latency at batch 1 for those models (random
weights, 224x224, round-to-nearest: reconstruction does not change speed). `--placement-cost` also
reports the PyTorch fake-quantized top-1 of `--backend none` vs `onnxruntime` at W4A4 and W8A8.

Top-1 figures of 8-bit models differ by a few tenths from a few dozen images, so each seed also
gets paired comparisons on the same images (decisions changed, which way, exact sign test) of
every model against the float model and of brecq against `quantize_static`; `--redraws N`
re-evaluates `quantize_static`'s model N times with its weight rounding re-drawn, to show how far
one rounding's luck moves top-1.

Writes one JSON and a Markdown table (default benchmarks/results/onnx_latency.{json,md}).
Skips (exit 0) when the data or the weights are absent.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/onnx_latency.py [--iters-w 500]
        [--iters-a 100] [--runs 50] [--torchvision resnet18,mobilenet_v2] [--placement-cost]
        [--seeds 0,1,2] [--redraws 12]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import RESULTS, Cifar10, add_data_root_argument, parse_seeds, skip

EVAL_BATCH = 500
STATIC = "onnxruntime quantize_static W8A8"


def _export_float(model, path: Path, shape: tuple[int, ...]) -> Path:  # noqa: ANN001
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(1, *shape),), str(path), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


def _quantize_static(float_path: Path, out: Path, calib) -> Path:  # noqa: ANN001
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calib[i:i + 32].numpy()} for i in range(0, len(calib), 32)])

        def get_next(self):  # noqa: ANN202
            return next(self.batches, None)

    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax)
    return out


def _redraw_weight_rounding(static_path: Path, float_path: Path, out: Path, rng,  # noqa: ANN001
                            spread: float = 0.01) -> Path:
    """`quantize_static`'s model with another, equally good rounding of every weight.

    Each output channel's weight scale is enlarged by a random factor in [1, 1 + spread) and the
    float weights re-rounded to the nearest int8 code (the int32 biases follow their scale): the
    same quantizer up to a <1% larger range, so the same expected error, but every weight that
    lay near a rounding boundary may now round the other way. The spread of top-1 over such
    redraws is how much of a model's top-1 is the luck of one rounding.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(static_path))
    floats = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(float_path)).graph.initializer}
    initializers = {t.name: t for t in model.graph.initializer}

    def array(name: str):  # noqa: ANN202
        return numpy_helper.to_array(initializers[name])

    def store(name: str, values) -> None:  # noqa: ANN001
        initializers[name].CopyFrom(numpy_helper.from_array(values.astype(array(name).dtype), name))

    # quantize_static names a layer's weight W as W_quantized / W_scale behind a DequantizeLinear
    # whose output is W_DequantizeLinear_Output, and its bias B as B_quantized / B_quantized_scale.
    suffix = "_DequantizeLinear_Output"
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or not node.input[1].endswith(suffix):
            continue
        weight = node.input[1][:-len(suffix)]
        factor = 1 + spread * rng.random(array(weight + "_scale").shape, dtype=np.float32)
        scale = array(weight + "_scale") * factor
        store(weight + "_scale", scale)
        per_channel = scale.reshape((-1,) + (1,) * (floats[weight].ndim - 1))
        store(weight + "_quantized", np.clip(np.round(floats[weight] / per_channel), -127, 127))
        if len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
            bias_scale = array(bias + "_quantized_scale") * factor
            store(bias + "_quantized_scale", bias_scale)
            store(bias + "_quantized", np.round(floats[bias] / bias_scale))
    onnx.save(model, str(out))
    return out


def _top1(predictions, labels) -> float:  # noqa: ANN001
    return round(100.0 * float((predictions == labels).mean()), 2)


def _torch_predictions(net, images, quantized: bool):  # noqa: ANN001, ANN202
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(images), EVAL_BATCH):
            if quantized:
                with net.quantization(weights=True, acts=True):
                    outs.append(net(images[i:i + EVAL_BATCH]).argmax(1))
            else:
                outs.append(net(images[i:i + EVAL_BATCH]).argmax(1))
    return torch.cat(outs).numpy()


def _load_val(cifar: Cifar10, prep):  # noqa: ANN001, ANN202
    images, labels = cifar.val(prep)
    return images, labels.numpy()


def _brecq(model, calib, bits: tuple[int, int], args, backend: str = "onnxruntime",  # noqa: ANN001, ANN202
           seed: int = 0):
    from brecq import BrecqConfig, quantize

    config = BrecqConfig(weight_bits=bits[0], act_bits=bits[1], iters_w=args.iters_w,
                         iters_a=args.iters_a, calib_size=len(calib), backend=backend,
                         device="cpu", seed=seed)
    started = time.perf_counter()
    qmodel, _ = quantize(model, calib, config)
    return qmodel.eval(), round(time.perf_counter() - started, 1)


def _resnet20_models(model, calib, seed: int, images, args, work: Path):  # noqa: ANN001, ANN202
    """The float, `quantize_static` and brecq ONNX models of one calibration draw (seed)."""
    from brecq.export import export_onnx

    shape = tuple(images.shape[1:])
    paths = {"float ONNX": _export_float(model, work / "float.onnx", shape)}
    paths[STATIC] = _quantize_static(
        paths["float ONNX"], work / f"static_seed{seed}.onnx", calib[:args.static_calib])
    torch_preds = {"float ONNX": _torch_predictions(model, images, quantized=False)}
    recon_seconds = {}
    for bits in ((8, 8), (4, 8)):
        name = f"brecq W{bits[0]}A{bits[1]} (backend onnxruntime)"
        qmodel, recon_seconds[name] = _brecq(model, calib, bits, args, seed=seed)
        torch_preds[name] = _torch_predictions(qmodel, images, quantized=True)
        paths[name] = export_onnx(qmodel, work / f"brecq_w{bits[0]}a{bits[1]}_seed{seed}.onnx",
                                  images[:1])
        logging.info("seed %d: %s reconstructed in %.0fs", seed, name, recon_seconds[name])
    return paths, torch_preds, recon_seconds


def _resnet20_rows(args, cifar: Cifar10, work: Path) -> dict:  # noqa: ANN001
    import numpy as np

    from brecq.export.ort_bench import (
        float_compute_ops,
        latency_ms,
        onnx_predictions,
        optimized_op_counts,
        session,
    )

    model, prep = cifar.build("resnet20")
    images, labels = _load_val(cifar, prep)
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    shape = tuple(images.shape[1:])
    batches = [images[i:i + EVAL_BATCH].numpy() for i in range(0, len(images), EVAL_BATCH)]
    # Every seed redraws the calibration images for quantize_static and brecq alike; the latency
    # and the per-model details come from the first seed.
    top1_by_seed: dict[int, dict[str, float]] = {}
    decisions_by_seed: dict[int, dict[str, dict]] = {}
    redraws_by_seed: dict[int, list[float]] = {}
    for seed in args.seeds:
        calib = cifar.calibration(prep, args.calib_size, seed)
        paths, torch_preds, recon_seconds = _resnet20_models(model, calib, seed, images, args, work)
        sessions = {name: session(path, args.threads) for name, path in paths.items()}
        predictions = {name: onnx_predictions(sess, batches) for name, sess in sessions.items()}
        top1_by_seed[seed] = {name: _top1(pred, labels) for name, pred in predictions.items()}
        logging.info("seed %d onnxruntime top-1: %s", seed, top1_by_seed[seed])
        decisions_by_seed[seed] = _decisions(predictions, labels)
        if args.redraws:
            rng = np.random.default_rng(seed)
            redraw_path = work / "static_redrawn.onnx"
            redraws_by_seed[seed] = [_top1(onnx_predictions(session(_redraw_weight_rounding(
                paths[STATIC], paths["float ONNX"], redraw_path, rng), args.threads), batches),
                labels) for _ in range(args.redraws)]
            logging.info("seed %d quantize_static with re-drawn weight rounding: %s", seed,
                         redraws_by_seed[seed])
        if seed != args.seeds[0]:
            continue
        rows = {}
        for name, pred in predictions.items():
            counts = optimized_op_counts(paths[name])
            row = {"onnx_top1": top1_by_seed[seed][name], "size_bytes": paths[name].stat().st_size,
                   "float_compute_ops_left": float_compute_ops(counts),
                   "integer_ops": {k: v for k, v in counts.items() if k.startswith("QLinear")
                                   or k in ("QGemm", "MatMulInteger")}}
            if name in torch_preds:
                row["pytorch_top1"] = _top1(torch_preds[name], labels)
                row["agreement_with_pytorch"] = round(100.0 * float(
                    (torch_preds[name] == pred).mean()), 2)
            if name in recon_seconds:
                row["recon_seconds"] = recon_seconds[name]
            rows[name] = row
        rng = np.random.default_rng(0)
        for batch in (1, 64):
            x = rng.standard_normal((batch, *shape), dtype=np.float32)
            for name, timing in latency_ms(sessions, x, args.runs).items():
                rows[name][f"batch_{batch}"] = timing
    mean_top1 = {name: round(sum(top1[name] for top1 in top1_by_seed.values()) / len(top1_by_seed), 3)
                 for name in rows}
    return {"rows": rows, "eval_images": len(labels), "calib_images": args.calib_size,
            "static_calib_images": args.static_calib, "seeds": args.seeds,
            "onnx_top1_by_seed": top1_by_seed, "onnx_top1_mean": mean_top1,
            "decisions_by_seed": decisions_by_seed,
            "static_redrawn_top1_by_seed": redraws_by_seed}


def _decisions(predictions: dict, labels) -> dict[str, dict]:  # noqa: ANN001
    """Paired comparisons on the same images: every model against the float model, and every
    brecq model against `quantize_static` (see `brecq.evaluate.decision_changes`)."""
    from brecq.evaluate import decision_changes

    out = {f"{name} vs float ONNX": decision_changes(predictions["float ONNX"], pred, labels)
           for name, pred in predictions.items() if name != "float ONNX"}
    out.update({f"{name} vs quantize_static": decision_changes(predictions[STATIC], pred, labels)
                for name, pred in predictions.items() if name.startswith("brecq")})
    return out


def _torchvision_rows(names: list[str], args, work: Path) -> dict:  # noqa: ANN001
    import numpy as np
    import torch
    import torchvision

    from brecq import BrecqConfig, quantize
    from brecq.export import export_onnx
    from brecq.export.ort_bench import float_compute_ops, latency_ms, optimized_op_counts, session

    out = {}
    for name in names:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        float_path = _export_float(model, work / f"{name}_float.onnx", (3, 224, 224))
        config = BrecqConfig(weight_bits=8, act_bits=8, method="rtn", calib_size=16,
                             act_init_samples=16, device="cpu")
        qmodel, _ = quantize(model, torch.randn(16, 3, 224, 224), config)
        quant_path = export_onnx(qmodel, work / f"{name}_w8a8.onnx", torch.randn(1, 3, 224, 224))
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
        timing = latency_ms({"float": session(float_path, args.threads),
                             "brecq W8A8": session(quant_path, args.threads)}, x, args.runs)
        out[name] = {"batch_1": timing,
                     "speedup_min": round(timing["float"]["min_ms"] / timing["brecq W8A8"]["min_ms"], 2),
                     "float_compute_ops_left": float_compute_ops(optimized_op_counts(quant_path))}
        logging.info("%s: %s", name, out[name])
    return out


def _placement_cost(args, cifar: Cifar10) -> dict:  # noqa: ANN001
    model, prep = cifar.build("resnet20")
    calib = cifar.calibration(prep, args.calib_size, 0)
    images, labels = _load_val(cifar, prep)
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    out = {}
    for label in args.placement_bits.split(","):
        bits = tuple(int(v) for v in label.strip().upper().lstrip("W").split("A"))
        for backend in args.placement_backends.split(","):
            qmodel, seconds = _brecq(model.eval(), calib, bits, args, backend)
            top1 = _top1(_torch_predictions(qmodel, images, quantized=True), labels)
            out[f"W{bits[0]}A{bits[1]} {backend}"] = {"pytorch_top1": top1, "recon_seconds": seconds}
            logging.info("W%dA%d %s: %.2f (%ss)", *bits, backend, top1, seconds)
    return out


def _markdown(result: dict) -> str:
    lines = ["| model | onnxruntime top-1 | agreement with PyTorch % | batch 1 ms min (median) | "
             "batch 64 ms min (median) | size KiB | float Conv/Gemm left |", "|---|---|---|---|---|---|---|"]
    for name, row in result.get("resnet20", {}).get("rows", {}).items():
        cells = [name, f"{row['onnx_top1']:.2f}", f"{row.get('agreement_with_pytorch', '-')}"]
        for batch in ("batch_1", "batch_64"):
            cells.append(f"{row[batch]['min_ms']:.2f} ({row[batch]['median_ms']:.2f})")
        cells += [f"{row['size_bytes'] / 1024:.1f}", str(sum(row["float_compute_ops_left"].values()))]
        lines.append("| " + " | ".join(cells) + " |")
    by_seed = result.get("resnet20", {}).get("onnx_top1_by_seed", {})
    if len(by_seed) > 1:
        names = list(result["resnet20"]["onnx_top1_mean"])
        lines += ["", "| ResNet-20 onnxruntime top-1, seed | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for seed, top1 in by_seed.items():
            lines.append(f"| {seed} | " + " | ".join(f"{top1[n]:.2f}" for n in names) + " |")
        mean = result["resnet20"]["onnx_top1_mean"]
        lines.append("| mean | " + " | ".join(f"{mean[n]:.2f}" for n in names) + " |")
    decisions = result.get("resnet20", {}).get("decisions_by_seed", {})
    if decisions:
        lines += ["", "| seed | comparison (same images) | decisions changed | right only in the "
                  "second | right only in the first | sign test p |", "|---|---|---|---|---|---|"]
        for seed, pairs in decisions.items():
            for pair, change in pairs.items():
                lines.append(f"| {seed} | {pair} | {change['changed']} | {change['gained']} | "
                             f"{change['lost']} | {change['p_value']:.2g} |")
    redraws = result.get("resnet20", {}).get("static_redrawn_top1_by_seed", {})
    if redraws:
        lines += ["", "| seed | quantize_static top-1 | same model, weight rounding re-drawn: mean "
                  "(std) | min - max | re-draws |", "|---|---|---|---|---|"]
        for seed, tops in redraws.items():
            std = statistics.stdev(tops) if len(tops) > 1 else 0.0
            lines.append(f"| {seed} | {by_seed[seed][STATIC]:.2f} | {statistics.mean(tops):.2f} "
                         f"({std:.2f}) | {min(tops):.2f} - {max(tops):.2f} | {len(tops)} |")
    if result.get("torchvision"):
        lines += ["", "| model (224x224, batch 1) | float ms min (median) | brecq W8A8 ms min (median) | "
                  "speedup (min) |", "|---|---|---|---|"]
        for name, row in result["torchvision"].items():
            f, q = row["batch_1"]["float"], row["batch_1"]["brecq W8A8"]
            lines.append(f"| {name} | {f['min_ms']:.2f} ({f['median_ms']:.2f}) | "
                         f"{q['min_ms']:.2f} ({q['median_ms']:.2f}) | {row['speedup_min']:.2f}x |")
    if result.get("placement_cost"):
        lines += ["", "| ResNet-20, PyTorch fake-quantized | backend none | backend onnxruntime |",
                  "|---|---|---|"]
        cost = result["placement_cost"]
        for bits in dict.fromkeys(key.split()[0] for key in cost):
            cells = [f"{cost[key]['pytorch_top1']:.2f}" if key in cost else "-"
                     for key in (f"{bits} none", f"{bits} onnxruntime")]
            lines.append(f"| {bits} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters-w", type=int, default=500)
    parser.add_argument("--iters-a", type=int, default=100)
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--static-calib", type=int, default=512)
    parser.add_argument("--seeds", type=parse_seeds, default=[0],
                        help="comma-separated calibration draws for the ResNet-20 top-1 rows "
                             "(quantize_static and brecq alike); latency from the first")
    parser.add_argument("--redraws", type=int, default=0,
                        help="per seed, evaluate N copies of quantize_static's model whose weight "
                             "rounding is re-drawn (each channel's scale enlarged by < 1%%): how "
                             "much of its top-1 is the luck of one rounding")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=0, help="evaluate on the first N images only")
    parser.add_argument("--torchvision", default="", help="comma-separated torchvision models")
    parser.add_argument("--placement-cost", action="store_true")
    parser.add_argument("--placement-bits", default="W4A4,W8A8")
    parser.add_argument("--placement-backends", default="none,onnxruntime")
    parser.add_argument("--skip-resnet20", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "onnx_latency")
    add_data_root_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("brecq").setLevel(logging.WARNING)
    cifar = Cifar10.under(args.data_root)
    if cifar.missing(["resnet20"]):
        return skip(cifar.missing(["resnet20"]))
    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    result: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average_start": os.getloadavg(), "note": "2 cores shared with other jobs"},
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_resnet20:
            result["resnet20"] = _resnet20_rows(args, cifar, work)
        if args.torchvision:
            result["torchvision"] = _torchvision_rows(args.torchvision.split(","), args, work)
    if args.placement_cost:
        result["placement_cost"] = _placement_cost(args, cifar)
    result["machine"]["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = _markdown(result)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
