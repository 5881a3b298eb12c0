"""`brecq info`: the reconstruction units, layers and bit widths of a model, without data."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import Any

import torch

from ..demo import DemoResNet
from ..graph.model import QuantizedModel
from ..graph.prepare import prepare
from ..progress import logger as progress_log
from ..quant.quantizers import Log2Quantizer
from . import common
from .flags import add_config_arguments, config_from_args, help_group, parse_floats, parse_int, parse_ints


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    parser = common.add_command(
        subparsers, "info", run, model="optional",
        summary="list the reconstruction units and bit widths of a model",
        description="Prepare the model for quantization (no data needed) and list its "
        "reconstruction units, layers and quantizer bit widths. No --model: the demo model.",
    )
    pre = help_group(parser, "data")
    pre.add_argument("--input-size", type=parse_ints, metavar="C,H,W",
                     help="example input shape (default: from the model's preprocessing)")
    pre.add_argument("--resize", type=parse_int, help=argparse.SUPPRESS)
    pre.add_argument("--crop", type=parse_int, metavar="N", help="input crop size")
    pre.add_argument("--mean", type=parse_floats, metavar="M,M,M", help="normalization mean")
    pre.add_argument("--std", type=parse_floats, metavar="S,S,S", help="normalization std")
    pre.add_argument("--interpolation", help=argparse.SUPPRESS)
    help_group(parser, "output").add_argument(
        "--layers", action="store_true",
        help="also list every layer, and every quantized activation tensor with its kind, with"
        " their bits")
    add_config_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    # What it is doing while slow, on a terminal (with -v also elsewhere): in a pipe or a log
    # the output stays the table, or one error line.
    status = progress_log.info if sys.stderr.isatty() else common.logger.info
    config = config_from_args(args)
    if args.model is None:
        model, name = DemoResNet().eval(), "demo:DemoResNet"
        size = args.input_size or (1, 28, 28)
    else:
        status("Building %s ...", args.model)
        model, base_prep = common.build_model_from_args(args)
        name = args.model
        size = args.input_size
        if size is None:
            if base_prep is None and args.crop is None:
                raise common.UsageError(f"{name} has no known input size: pass --input-size C,H,W "
                                        "(e.g. 3,224,224) or --crop/--mean/--std")
            prep = common.preprocessing_from_args(args, base_prep)
            size = (prep.channels, prep.crop, prep.crop)
    example = torch.zeros(1, *size)
    status("Preparing %s for quantization: tracing with torch.fx, folding BatchNorm, searching "
           "the initial weight scales ...", name)
    started = time.perf_counter()
    qmodel = prepare(model, config, (example,))
    status("Prepared in %.1fs", time.perf_counter() - started)
    rows = qmodel.describe_rows()

    total = sum(layer.num_weight_params for layer in qmodel.layers.values())
    print(f"Model {name}: input {'x'.join(map(str, size))}, {len(qmodel.layers)} quantized layers, "
          f"{total:,} weight parameters, {len(qmodel.act_quantizers)} activation quantizers")
    print(f"Config: {config.label}, granularity {config.granularity}, first/last bits "
          f"{config.first_last_bits if config.first_last_bits is not None else 'as others'}"
          + ("" if qmodel.traced else "  (forward not traceable by torch.fx: see the warning above)"))
    print(f"Method: {config.method_summary()}")
    print(f"First layers: {', '.join(qmodel.first_layers) or '-'}")
    print(f"Last layers:  {', '.join(qmodel.last_layers) or '-'}")
    if qmodel.act_quantizers:
        print("Quantized activations by kind: " + ", ".join(
            f"{kind} {count}" for kind, count in act_kind_counts(qmodel).items()))
    print(f"{len(rows)} reconstruction units:")
    print(qmodel.describe())
    if args.layers:
        print("Layers:")
        for unit in qmodel.units:
            for layer in unit.layers:
                print(f"  {layer:40s} {qmodel.layer_bits(layer)} bits  unit {unit.name}")
        if qmodel.act_quantizers:
            print("Quantized activations:")
            for name, quantizer in qmodel.act_quantizers.items():
                grid = "log2" if isinstance(quantizer, Log2Quantizer) else "uniform"
                print(f"  {name:40s} {quantizer.bits} bits {grid:7s}  {quantizer.kind}")
    return 0


def act_kind_counts(qmodel: QuantizedModel) -> dict[str, int]:
    """How many activation quantizers `qmodel` has of each kind, most frequent first."""
    counts = Counter(q.kind for q in qmodel.act_quantizers.values())
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
