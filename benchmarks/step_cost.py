"""What one reconstruction step and the fixed work around the steps cost, on the real model.

Runs `brecq.quantize` on the CIFAR ResNet-20 (weights and data under `--data-root`, see
common.py) twice, at `--iters` a and b iterations per unit, and prints, from the difference,
the wall and CPU milliseconds of one step (averaged over the units) and the seconds of
everything else (activation-scale initialization, cache capture, unit errors). CPU seconds are
the process's own, so they hold on a shared machine where wall seconds stretch. Run it from two
checkouts to compare versions. Skips (exit 0) when the data or the weights are absent.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/step_cost.py --bits W4A4 --method auto \
        --iters 10,210 [--set weight_lr=0.01] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import common
from common import Cifar10, add_data_root_argument, skip

# BrecqConfig fields this script's own flags set (refused in --set).
FLAG_FIELDS = ("weight_bits", "act_bits", "method", "iters_w", "calib_size", "device", "seed")


def iteration_counts(text: str) -> list[int]:
    return [int(v) for v in common.csv_list(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="W4A4")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--iters", type=iteration_counts, default=[10, 210],
                        help="two iteration counts per unit")
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", type=common.parse_override, action="append",
                        default=[], metavar="FIELD=VALUE", help="any BrecqConfig field")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    add_data_root_argument(parser)
    args = parser.parse_args(argv)
    if len(args.iters) != 2 or not 0 <= args.iters[0] < args.iters[1]:
        parser.error("--iters takes two increasing counts, e.g. 10,210")
    common.check_overrides(parser, args, FLAG_FIELDS)
    cifar = Cifar10.under(args.data_root)
    if cifar.missing(["resnet20"]):
        return skip(cifar.missing(["resnet20"]))
    import torch

    from brecq import BrecqConfig, quantize

    torch.set_num_threads(args.threads)
    weight_bits, act_bits = common.parse_bits(args.bits)
    model, prep = cifar.build("resnet20")
    calib = cifar.calibration(prep, args.calib_size, args.seed)
    runs = {}
    for iters in args.iters:
        config = BrecqConfig(weight_bits=weight_bits, act_bits=act_bits, method=args.method,
                             iters_w=iters, calib_size=args.calib_size, device="cpu",
                             seed=args.seed, **args.overrides)
        wall, cpu = time.perf_counter(), time.process_time()
        _, report = quantize(model.eval(), calib, config)
        runs[iters] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                       "units": len(report.units)}
        print(f"{iters} iterations per unit: {runs[iters]['wall_s']:.1f} s wall, "
              f"{runs[iters]['cpu_s']:.1f} s CPU", flush=True)
    low, high = (runs[i] for i in args.iters)
    steps = (args.iters[1] - args.iters[0]) * high["units"]
    result = {
        "bits": args.bits, "method": args.method, "settings": args.overrides,
        "threads": args.threads, "runs": runs,
        "step_ms_wall": 1000 * (high["wall_s"] - low["wall_s"]) / steps,
        "step_ms_cpu": 1000 * (high["cpu_s"] - low["cpu_s"]) / steps,
        "fixed_s_cpu": low["cpu_s"] - args.iters[0] * (high["cpu_s"] - low["cpu_s"]) * low["units"] / steps,
        "load_average_end": os.getloadavg(),
    }
    print(f"one step: {result['step_ms_wall']:.1f} ms wall, {result['step_ms_cpu']:.1f} ms CPU; "
          f"outside the steps: {result['fixed_s_cpu']:.1f} s CPU (load {result['load_average_end'][0]:.2f})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
