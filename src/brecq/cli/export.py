"""`brecq export DIR --format onnx --out model.onnx [--opset N] [--model NAME]`: a saved quantized
model as ONNX QDQ."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..export import export_command, read_model_info
from ..models import build_model
from . import common


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export", help="export a saved quantized model (e.g. to ONNX QDQ)",
        description="Rebuild the quantized model saved in DIR (by `brecq quantize --out DIR`) "
        "and export it. ONNX: a QDQ graph (QuantizeLinear/DequantizeLinear around weights and "
        "activations) that onnxruntime runs on the CPU.",
    )
    parser.add_argument("artifact_dir", metavar="DIR", help="folder written by `brecq quantize --out`")
    parser.add_argument("--format", dest="export_format", default="onnx", choices=("onnx",),
                        help="output format (default: onnx)")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="output file (default: DIR/model.onnx)")
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset (default 17; 21 stores <= 4-bit weights as int4)")
    parser.add_argument("--model", dest="export_model", default=None, metavar="NAME",
                        help="model to rebuild instead of the one recorded in DIR/model.json (needed"
                        " for a folder written by brecq.save_quantized without a model name)")
    parser.add_argument("--weights", dest="export_weights", default=None, metavar="PATH",
                        help="with --model: local checkpoint of the float model")
    parser.add_argument("--num-classes", dest="export_num_classes", type=int, default=None,
                        metavar="N", help="with --model: classes of the model's head")
    common.add_runtime_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    artifact = Path(args.artifact_dir).expanduser()
    out = Path(args.out).expanduser() if args.out else artifact / "model.onnx"
    info = read_model_info(artifact)
    model = None
    if args.export_model:
        model, _ = build_model(args.export_model, weights=args.export_weights,
                               num_classes=args.export_num_classes or info.get("num_classes"))
    elif args.export_weights:
        raise ModelError("--weights needs --model NAME (the model the checkpoint belongs to)")
    elif not info.get("name"):
        raise ModelError(f"{artifact} does not record which model it holds (saved with "
                         "brecq.save_quantized without model_info={'name': ...}): pass --model "
                         "NAME (and --weights PATH if it needs a checkpoint)")
    if args.opset is not None and args.opset < 13:
        raise ModelError(f"--opset {args.opset} is too old for per-channel QDQ: use 13 or newer")
    path = export_command(artifact, out, fmt=args.export_format, model=model, opset=args.opset)
    print(f"Exported {artifact} as {args.export_format.upper()} to {path}", flush=True)
    return 0
