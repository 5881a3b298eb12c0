"""`brecq eval`: top-1/top-5 accuracy of a float model or of a saved quantized model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torch import nn

from ..evaluate import evaluate
from ..export.artifact import load_quantized, read_model_info
from ..models import Preprocessing, build_model
from ..runtime import resolve_device
from . import common
from .flags import help_group


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    parser = common.add_command(
        subparsers, "eval", run, model="optional",
        summary="top-1/top-5 accuracy of a float model or a saved quantized model",
        description="Evaluate --model (full precision) or --quantized DIR on DATA/val.",
    )
    help_group(parser, "model").add_argument(
        "--quantized", metavar="DIR",
        help="folder written by `brecq quantize --out` or brecq.save_quantized (with --model"
        " NAME when the folder does not record its model)")
    help_group(parser, "runtime").add_argument("--device", default="auto",
                                               help="cpu, cuda, cuda:1, mps or auto (default: auto)")
    common.add_data_arguments(parser)
    return parser


def _quantized_model(args: argparse.Namespace, qdir: Path) -> tuple[nn.Module, Any, str]:
    """The float model a --quantized folder was made from: --model (and --weights) when given,
    else the name recorded by `brecq quantize`. Returns (model, base preprocessing, name)."""
    info = read_model_info(qdir)
    saved = info.get("preprocessing")
    saved_prep = Preprocessing.from_dict(saved) if saved else None
    if args.model is not None:
        model, base_prep = common.build_model_from_args(args)
        return model, saved_prep or base_prep, args.model
    name = info.get("name")
    if not name:
        raise common.UsageError(f"{qdir} does not record which model it holds (saved with "
                                "brecq.save_quantized without model_info={'name': ...}): pass --model NAME "
                                "(and --weights PATH if it needs a checkpoint)")
    weights = info.get("weights")
    if weights and not Path(weights).expanduser().is_file():
        weights = None  # the folder holds every quantized tensor; float leftovers are rebuilt
    model, base_prep = build_model(name, weights=weights, num_classes=info.get("num_classes"))
    return model, saved_prep or base_prep, name


def run(args: argparse.Namespace) -> int:
    if args.data is None:
        raise common.UsageError("eval needs --data DIR (a folder with val/<class>/ images)")
    if args.model is None and args.quantized is None:
        raise common.UsageError("eval needs --model NAME (full precision) or --quantized DIR "
                                "(a model saved by `brecq quantize` or brecq.save_quantized)")
    device = resolve_device(args.device)
    if args.quantized is not None:
        qdir = Path(args.quantized).expanduser()
        if not qdir.is_dir():
            raise common.UsageError(f"--quantized {qdir} is not a folder: pass the --out folder of "
                                    "`brecq quantize`")
        model, base_prep, name = _quantized_model(args, qdir)
        prep = common.preprocessing_from_args(args, base_prep)
        net = load_quantized(model, qdir)
        what = f"{name} (quantized, {qdir})"
    else:
        model, base_prep = common.build_model_from_args(args)
        prep = common.preprocessing_from_args(args, base_prep)
        net = model
        what = f"{args.model} (full precision)"
    common.check_data(args, model, prep)
    loader = common.val_loader(args, prep)
    result = evaluate(net, loader, device, desc="eval")
    print(f"Model: {what}")
    print(f"Top-1 accuracy: {result['top1']:.2f}")
    print(f"Top-5 accuracy: {result['top5']:.2f}")
    print(f"Images: {result['count']}")
    return 0
