"""`brecq bench DIR`: onnxruntime latency, size and accuracy of a saved quantized model against
its float original (see `brecq.export.bench`), and the benchmark flags `brecq quantize --export
onnx` shares."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..data import eval_loader
from ..errors import ModelError
from ..export.artifact import load_quantized, read_model_info
from ..export.bench import benchmark_quantized, summary_lines
from ..models import Preprocessing, build_model
from . import common


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="onnxruntime latency, size and accuracy: float vs quantized ONNX",
        description="Export the model saved in DIR (by `brecq quantize --out DIR`) and its float "
        "original as ONNX, and compare them in onnxruntime on the CPU: latency at batch 1 and "
        "--batch, file size, float convs left unfused; with --data, onnxruntime top-1 of both "
        "and agreement with the PyTorch fake-quantized model. Writes DIR/bench.json.",
    )
    parser.add_argument("artifact_dir", metavar="DIR", help="folder written by `brecq quantize --out`")
    add_bench_options(parser)
    parser.add_argument("--data", metavar="DIR", help="folder with val/<class>/ images (optional)")
    parser.add_argument("--eval-size", type=int, metavar="N", help="use only the first N val images")
    parser.add_argument("--workers", type=int, default=0, metavar="N", help="data loading workers")
    parser.add_argument("--out", metavar="FILE", help="JSON output (default: DIR/bench.json)")
    common.add_runtime_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_bench_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("onnxruntime benchmark")
    group.add_argument("--bench-threads", type=int, default=1, metavar="N",
                       help="onnxruntime intra-op threads (default: 1)")
    group.add_argument("--bench-runs", type=int, default=30, metavar="N",
                       help="timed runs per model and batch size (default: 30)")
    group.add_argument("--bench-batch", type=int, default=64, metavar="N",
                       help="the larger batch size timed besides batch 1 (default: 64)")
    group.add_argument("--bench-warmup", type=int, default=3, metavar="N",
                       help="untimed runs before timing (default: 3)")


def bench_kwargs(args: argparse.Namespace) -> dict[str, int]:
    """The `benchmark_quantized` keyword arguments of the flags `add_bench_options` adds."""
    return {"threads": args.bench_threads, "runs": args.bench_runs, "batch": args.bench_batch,
            "warmup": args.bench_warmup}


def _val_subset(args: argparse.Namespace, saved_preprocessing: dict | None, artifact: Path) -> Any:
    """The loader of --data DIR/val (first --eval-size images spread over the classes)."""
    if not saved_preprocessing:
        raise ModelError(f"{artifact} records no preprocessing: --data cannot be read for it")
    loader = eval_loader(args.data, Preprocessing.from_dict(saved_preprocessing), batch_size=100,
                         num_workers=args.workers)
    if args.eval_size is not None:
        if args.eval_size < 1:
            raise ModelError(f"--eval-size {args.eval_size} is not positive: pass e.g. 1000")
        # Files are in class order: take evenly spaced ones so every class is represented.
        step = max(1, len(loader.dataset.samples) // args.eval_size)
        loader.dataset.samples = loader.dataset.samples[::step][:args.eval_size]
        loader.dataset.targets = loader.dataset.targets[::step][:args.eval_size]
    return loader


def run(args: argparse.Namespace) -> int:
    artifact = Path(args.artifact_dir).expanduser()
    info = read_model_info(artifact)
    name, shape = info.get("name"), info.get("input_shape")
    if not name or not shape:
        raise ModelError(f"{artifact}/model.json lacks the model name or input shape: save the "
                         "model with `brecq quantize --out DIR`")
    weights = info.get("weights")
    if weights and not Path(weights).is_file():
        raise ModelError(f"the float checkpoint {weights} recorded in {artifact} is gone: the "
                         "float model to compare with cannot be rebuilt")
    float_model, _ = build_model(name, weights=weights, num_classes=info.get("num_classes"))
    qmodel = load_quantized(build_model(name, num_classes=info.get("num_classes"))[0], artifact)
    loader = _val_subset(args, info.get("preprocessing"), artifact) if args.data else None
    result = benchmark_quantized(qmodel, float_model.eval(), shape, artifact, loader=loader,
                                 **bench_kwargs(args))
    out = Path(args.out).expanduser() if args.out else artifact / "bench.json"
    common.write_json(out, result)
    for line in summary_lines(result):
        print(line)
    print(f"Wrote {out}", flush=True)
    return 0
