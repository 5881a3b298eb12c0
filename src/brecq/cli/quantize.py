"""`brecq quantize`: quantize a model on calibration images, evaluate it, save it and report.

Without --model and --data it runs the offline MNIST demo (`cli/demo.py`). Under torchrun every
rank runs the command: each calibrates on its shard and evaluates its part of the validation
set; rank 0 prints, writes the report and saves the model.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..config import BrecqConfig
from ..data import load_calibration
from ..distributed import DistContext
from ..errors import DataError
from ..evaluate import evaluate
from ..export.artifact import save_quantized
from ..export.bench import benchmark_quantized, summary_lines
from ..methods import METHOD_REGISTRY, RTN
from ..recon import pipeline
from ..recon.checkpoint import CHECKPOINT_FILE, read_checkpoint
from ..runtime import resolve_device
from . import bench, common, demo
from .flags import add_config_arguments, config_from_args, help_group


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    parser = common.add_command(
        subparsers, "quantize", run, model="optional", data="evaluation",
        summary="quantize a model and report its accuracy (no --model/--data: demo)",
        description="Quantize a model on calibration images from DATA/train and evaluate it on "
        "DATA/val. Without --model and --data, run the offline MNIST demo.",
    )
    output = help_group(parser, "output")
    output.add_argument("--out", metavar="DIR",
                        help="output folder for report.json and the quantized model "
                        "(default: runs/<timestamp>)")
    output.add_argument("--resume", metavar="DIR",
                        help="continue an interrupted run in DIR (its --out folder) from its last "
                        "finished unit; pass the same model, data and quantization flags")
    output.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in --out (refused otherwise)")
    output.add_argument("--skip-fp-eval", action="store_true",
                        help="do not evaluate the full-precision model")
    output.add_argument("--export", dest="export_format", choices=("onnx",),
                        help="also export OUT/model.onnx (QDQ) and OUT/model_float.onnx and put "
                        "their onnxruntime latency, size and top-1 (as `brecq bench`) in report.json")
    add_config_arguments(parser)
    bench.add_bench_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.model is None and args.data is None:
        return demo.run_demo(args)
    if args.model is None or args.data is None:
        missing = "--model" if args.model is None else "--data"
        raise common.UsageError(f"quantize needs both --model and --data ({missing} is missing); "
                                "give neither to run the offline MNIST demo")
    requested = config_from_args(args)
    # `--method auto` and the method-dependent defaults become concrete here, so that the first
    # printed line, the report and a resumed run all name what actually runs.
    config = requested.resolved()
    if args.resume is not None:
        _take_over_resumed_run(args, config)
    elif args.out is not None:
        common.check_out_is_free(Path(args.out).expanduser(), args.overwrite)
    with distributed.session(resolve_device(config.device), config.dist_timeout) as dist:
        if not dist.is_main:
            logging.getLogger("brecq").setLevel(logging.WARNING)
        summary = requested.method_summary()
        if args.out is None:
            args.out = str(common.timestamp_dir())
        try:
            return _quantize_and_report(args, config, dist, summary)
        except KeyboardInterrupt:
            out = Path(args.out).expanduser()
            saved = (out / "checkpoint" / CHECKPOINT_FILE).is_file()
            raise RunInterrupted(resume_command(args.argv, out) if saved else None) from None


def _take_over_resumed_run(args: argparse.Namespace, config: BrecqConfig) -> None:
    """--resume DIR becomes --out DIR once, before any model or data is loaded, DIR holds an
    intact checkpoint made with `config`."""
    if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
        raise common.UsageError("--resume DIR continues the run in DIR: drop --out (or make it DIR)")
    run_dir = Path(args.resume).expanduser()
    if not run_dir.is_dir():
        raise common.UsageError(f"--resume {args.resume} is not a folder: pass the --out folder of "
                                "the interrupted run")
    args.out = args.resume
    path = run_dir / "checkpoint" / CHECKPOINT_FILE
    if not path.is_file():
        raise common.UsageError(f"--resume {run_dir} has no checkpoint ({path}): start the run without "
                                "--resume (no unit had finished)")
    read_checkpoint(path, config)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run that saved progress: carries the command that continues it."""

    def __init__(self, resume_command: str | None) -> None:
        super().__init__()
        self.resume_command = resume_command


def resume_command(argv: Sequence[str], out: Path) -> str:
    """`brecq <argv>` with --out/--overwrite/--resume replaced by `--resume OUT`, shell-quoted."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out", "--resume"):
            skip = True
        elif arg == "--overwrite" or arg.startswith(("--out=", "--resume=")):
            pass
        else:
            kept.append(arg)
    return shlex.join([common.PROG, *kept, "--resume", str(out)])


def _quiet(*args: Any, **kwargs: Any) -> None:
    """`print` on ranks other than 0."""


class _Accuracy:
    """Top-1 and top-5 of each evaluated model (by key), summed over the ranks' parts of the
    validation set."""

    KEYS = ("fp", "before", "weight_only", "full")

    def __init__(self, val: Any, device: torch.device, dist: DistContext) -> None:
        self.val, self.device, self.dist = val, device, dist
        self.top1: dict[str, float | None] = dict.fromkeys(self.KEYS)
        self.top5: dict[str, float | None] = dict.fromkeys(self.KEYS)
        self.count: int | None = None

    def __call__(self, net: nn.Module, key: str) -> float:
        hits = [0.0, 0.0, 0]
        if len(self.val.dataset):
            result = evaluate(net, self.val, self.device, desc=key,
                              progress=None if self.dist.is_main else False)
            hits = [result["top1"] * result["count"] / 100, result["top5"] * result["count"] / 100,
                    result["count"]]
        top1_hits, top5_hits, count = (round(v) for v in self.dist.sum_values(hits))
        if count == 0:
            raise DataError("no images were evaluated: the evaluation data is empty")
        self.top1[key], self.top5[key] = 100.0 * top1_hits / count, 100.0 * top5_hits / count
        self.count = count
        return self.top1[key]


def _quantize_and_report(args: argparse.Namespace, config: BrecqConfig, dist: DistContext,
                         method_summary: str) -> int:
    started = time.perf_counter()
    say = print if dist.is_main else _quiet
    # Layers the weights do not cover start from the same random values on every rank.
    torch.manual_seed(config.seed)
    model, base_prep = common.build_model_from_args(args)
    prep = common.preprocessing_from_args(args, base_prep)
    device = resolve_device(config.device)
    common.logger.info("preprocessing: %s", prep)
    common.check_data(args, model, prep, calib_size=config.calib_size,
                      act_init_samples=config.act_init_samples if config.act_bits is not None else None)
    out = common.make_out_dir(args.out) if dist.is_main else Path(args.out).expanduser()
    say(f"Method: {method_summary}", flush=True)
    # Every rank draws the same seeded calibration set and keeps its contiguous slice.
    calib = dist.shard(load_calibration(args.data, prep, num_samples=config.calib_size,
                                        seed=config.seed, strict=args.strict))
    calib_images = sum(dist.sizes(calib.shape[0]))
    val = common.val_loader(args, prep, seed=config.seed)
    part = slice(*dist.shard_range(len(val.dataset)))
    val.dataset.samples, val.dataset.targets = val.dataset.samples[part], val.dataset.targets[part]
    accuracy = _Accuracy(val, device, dist)
    qmodel, report = _quantize_and_evaluate(args, config, model, calib, out, accuracy, say)
    if not dist.is_main:
        return 0

    model_info = {
        "name": args.model,
        "weights": str(Path(args.weights).expanduser().resolve()) if args.weights else None,
        "pretrained": bool(args.pretrained),
        "num_classes": args.num_classes,
        "preprocessing": prep.to_dict(),
    }
    save_quantized(qmodel, out, config=config, model_info=model_info)
    onnx = None
    if args.export_format == "onnx":
        shape = [1, prep.channels, prep.crop, prep.crop]
        onnx = benchmark_quantized(qmodel, model.eval(), shape, out, loader=val,
                                   **bench.bench_kwargs(args))
        for line in summary_lines(onnx):
            print(line, flush=True)
    result = {
        "method": method_summary,
        "config": config.to_dict(),
        "model": model_info,
        "data": {"dir": str(Path(args.data).expanduser().resolve()),
                 "calib_images": calib_images, "eval_images": accuracy.count},
        "accuracy": accuracy.top1,
        "accuracy_top5": accuracy.top5,
        "units": report.to_dict()["units"],
        "timing": {"recon_seconds": round(report.recon_seconds, 3),
                   "total_seconds": round(time.perf_counter() - started, 3),
                   "time_budget": report.time_budget},
        "peak_memory": common.peak_memory(device),
        "device": str(device),
        "world_size": dist.world_size,
        "saved_model": str(out),
        "onnx": onnx,
    }
    common.write_json(out / "report.json", result)
    print(f"Report written to {out / 'report.json'}; quantized model saved in {out}", flush=True)
    return 0


def _quantize_and_evaluate(args: argparse.Namespace, config: BrecqConfig, model: nn.Module,
                           calib: torch.Tensor, out: Path, accuracy: _Accuracy,
                           say: Any) -> tuple[Any, Any]:
    """Full precision (unless --skip-fp-eval), round-to-nearest, then the configured method:
    each evaluated and its accuracy printed. Returns the quantized model and its report."""
    label = config.label
    if not args.skip_fp_eval:
        say(f"Full-precision accuracy: {accuracy(model, 'fp'):.2f}", flush=True)

    rtn_model, rtn_report = pipeline.quantize(model, calib, config.replace(method=RTN.name))
    with rtn_model.quantization(weights=True, acts=config.act_bits is not None):
        before = accuracy(rtn_model, "before")
    say(f"Quantized accuracy before reconstruction (round-to-nearest, {label}): {before:.2f}",
        flush=True)

    if not METHOD_REGISTRY[config.method].optimizes:  # round-to-nearest: the run above
        qmodel, report = rtn_model, rtn_report
    else:
        del rtn_model
        # Progress is saved after every unit: `--resume OUT` continues a killed run.
        qmodel, report = pipeline.quantize(model, calib, config, checkpoint_dir=out / "checkpoint",
                                           resume=args.resume is not None)
    with qmodel.quantization(weights=True, acts=False):
        weight_only = accuracy(qmodel, "weight_only")
    say(f"Weight quantization accuracy: {weight_only:.2f}", flush=True)
    if config.act_bits is not None:
        with qmodel.quantization(weights=True, acts=True):
            full = accuracy(qmodel, "full")
        say(f"Full quantization ({label}) accuracy: {full:.2f}", flush=True)
    return qmodel, report
