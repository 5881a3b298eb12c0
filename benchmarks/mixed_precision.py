"""Mixed-precision weight bits found by `brecq search-bits` against uniform bits, same size.

On the pretrained CIFAR-10 ResNet-20: BRECQ (block reconstruction, activations 8-bit, first and
last layer 8-bit) with uniform 3-bit and 2-bit weights, and with the per-layer bits that
`brecq search-bits` chooses under the weight size of uniform 3-bit and 2-bit (`--size-budget 3bit`
and `2bit`). Every run uses the same calibration images (1,024 from train, seed 0), the same
reconstruction budget and is evaluated on all 10,000 val images.

Each finished run is appended to ``benchmarks/results/mixed_precision.jsonl`` (a re-run skips runs
already there); ``mixed_precision.md`` and the search's Pareto plot ``mixed_precision.png`` are
written at the end (or with ``--report-only``). The search output (bits.json, sensitivity cache,
Pareto front) goes to ``benchmarks/results/mixed_precision_search/<budget>/``.

Example (the committed results)::

    OMP_NUM_THREADS=1 python benchmarks/mixed_precision.py --iters-w 1000 --iters-a 200

See benchmarks/README.md for the results.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from accuracy import (
    DEFAULT_DATA,
    DEFAULT_WEIGHTS,
    RESULTS,
    EvalData,
    append_record,
    csv_list,
    load_records,
    peak_rss_mb,
)
from brecq.config import BrecqConfig
from brecq.data import load_calibration
from brecq.evaluate import evaluate
from brecq.models import build_model
from brecq.recon.pipeline import quantize, resolve_device

# Run name -> (uniform weight bits, size budget of the search or None for the uniform run).
RUNS: dict[str, tuple[int, str | None]] = {
    "uniform-W3": (3, None),
    "mixed-W3": (3, "3bit"),
    "uniform-W2": (2, None),
    "mixed-W2": (2, "2bit"),
}
MODEL = "cifar_resnet20"

log = logging.getLogger("mixed_precision")


def search_dir(args: argparse.Namespace, budget: str) -> Path:
    return args.results_dir / f"{args.name}_search" / budget


def search_command(args: argparse.Namespace, budget: str) -> list[str]:
    """The `brecq search-bits` arguments this benchmark runs (also printed in the report)."""
    return ["search-bits", "--model", MODEL, "--weights", str(args.weights_dir / "resnet20.pt"),
            "--data", str(args.data), "--size-budget", budget,
            "--calib-size", str(args.calib_size), "--seed", str(args.seed), "--device", args.device,
            "--workers", "0", "--sensitivity-cache", str(search_dir(args, "sensitivity.json")),
            "--out", str(search_dir(args, budget))]


def searched_bits(args: argparse.Namespace, budget: str) -> dict[str, int]:
    """Per-layer bits for `budget`, running the search when its bits.json is not there yet."""
    path = search_dir(args, budget) / "bits.json"
    if not path.is_file():
        from brecq.cli import main as cli_main

        log.info("searching bits: brecq %s", " ".join(search_command(args, budget)))
        code = cli_main(search_command(args, budget))
        if code != 0:
            raise SystemExit(f"brecq search-bits failed with exit code {code}")
    return json.loads(path.read_text())["bits"]


def run_key(rec: dict[str, Any]) -> tuple:
    return rec["run"], rec["seed"], rec["iters_w"], rec["iters_a"]


def weight_size(qmodel: Any) -> tuple[int, float]:
    """(weight bits in all, mean bits per weight) of a quantized model."""
    total = params = 0
    for layer in qmodel.layers.values():
        for _, weight, quantizer in layer.weight_quantizers():
            total += quantizer.bits * weight.numel()
            params += weight.numel()
    return total, total / params


def run_all(args: argparse.Namespace, out_jsonl: Path) -> None:
    model, prep = build_model(MODEL, weights=args.weights_dir / "resnet20.pt")
    model.eval()
    transform = prep.to_transform()
    device = resolve_device(args.device)
    data = EvalData(args.data, transform, "val", None, args.calib_size, 0)
    calib = None
    for name in args.runs:
        done = {run_key(r) for r in load_records(out_jsonl)}
        rec: dict[str, Any] = {"run": name, "seed": args.seed, "iters_w": args.iters_w,
                               "iters_a": args.iters_a}
        if run_key(rec) in done:
            continue
        uniform_bits, budget = RUNS[name]
        layer_bits = searched_bits(args, budget) if budget is not None else {}
        if calib is None:
            calib = load_calibration(args.data, transform, num_samples=args.calib_size,
                                     seed=args.seed)
        config = BrecqConfig(
            weight_bits=uniform_bits, act_bits=8, method="brecq", granularity="block",
            iters_w=args.iters_w, iters_a=args.iters_a, calib_size=args.calib_size,
            seed=args.seed, device=args.device, layer_bits=layer_bits,
        )
        log.info("=== %s (iters %d/%d, seed %d)", name, args.iters_w, args.iters_a, args.seed)
        started = time.perf_counter()
        qmodel, report = quantize(model, calib, config)
        res = evaluate(qmodel, data.get(), device, batch_size=500, progress=False, desc=name)
        size_bits, mean_bits = weight_size(qmodel)
        rec.update(
            budget=budget, uniform_bits=uniform_bits, top1=res["top1"], top5=res["top5"],
            eval_count=res["count"], weight_size_bits=size_bits, mean_weight_bits=mean_bits,
            layer_bits={n: qmodel._layer_bits(n) for n in qmodel.layers},
            seconds=time.perf_counter() - started, recon_seconds=report.recon_seconds,
            peak_rss_mb=peak_rss_mb(), device=report.device, host=platform.node(),
            torch_threads=torch.get_num_threads(), finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            units=[{"name": u.name, "phase": u.phase, "loss_before": u.loss_before,
                    "loss_after": u.loss_after} for u in report.units],
        )
        append_record(out_jsonl, rec)
        log.info("RESULT %s: top-1 %.2f%% at %d weight bits (mean %.3f) in %.0fs", name,
                 rec["top1"], size_bits, mean_bits, rec["seconds"])
        del qmodel


# ----------------------------------------------------------------------------- report


def write_report(args: argparse.Namespace, out_jsonl: Path) -> None:
    records = load_records(out_jsonl)
    if not records:
        print(f"no results in {out_jsonl} yet: nothing to report")
        return
    lines = ["# Mixed-precision weight bits vs uniform bits (CIFAR-10 ResNet-20, BRECQ)", "",
             "Top-1 (%) on all 10,000 val images; BRECQ block reconstruction, activations 8-bit, "
             "1,024 calibration images from train.", "",
             "| run | seed | iters w/a | weight size (bits) | mean bits/weight | top-1 | top-5 | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(RUNS)}
    for r in sorted(records, key=lambda r: (r["iters_w"], r["seed"], order.get(r["run"], 99))):
        lines.append(f"| {r['run']} | {r['seed']} | {r['iters_w']}/{r['iters_a']} | "
                     f"{r['weight_size_bits']:,} | {r['mean_weight_bits']:.3f} | {r['top1']:.2f} | "
                     f"{r['top5']:.2f} | {r['seconds']:.0f} |")
    lines += ["", "Per-layer weight bits of the runs:", ""]
    layers = list(records[0]["layer_bits"])
    runs = [r for r in records if r["seed"] == records[0]["seed"]]
    lines.append("| layer | " + " | ".join(r["run"] for r in runs) + " |")
    lines.append("|---" * (len(runs) + 1) + "|")
    for layer in layers:
        lines.append(f"| {layer} | " + " | ".join(str(r["layer_bits"][layer]) for r in runs) + " |")
    lines.append("")
    md = out_jsonl.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    plot = search_dir(args, "2bit") / "pareto.png"
    if plot.is_file():
        shutil.copyfile(plot, out_jsonl.with_suffix(".png"))
    print(f"wrote {md}")


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="CIFAR-10 in ImageNet layout (train/<class>/, val/<class>/)")
    p.add_argument("--weights-dir", type=Path, default=DEFAULT_WEIGHTS,
                   help="folder with resnet20.pt")
    p.add_argument("--runs", type=csv_list, default=list(RUNS),
                   help=f"comma list of {', '.join(RUNS)}")
    p.add_argument("--iters-w", type=int, default=1000, help="AdaRound iterations per unit")
    p.add_argument("--iters-a", type=int, default=200, help="activation step-size iterations")
    p.add_argument("--seed", type=int, default=0, help="seed (calibration draw and optimization)")
    p.add_argument("--calib-size", type=int, default=1024, help="calibration images from train")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--name", default="mixed_precision", help="results name")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--report-only", action="store_true",
                   help="only (re)write the .md and .png from the .jsonl")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run {unknown[0]!r}: choose from {', '.join(RUNS)}")
    out_jsonl = args.results_dir / f"{args.name}.jsonl"
    if args.report_only:
        write_report(args, out_jsonl)
        return 0
    missing = [str(p) for p in [args.data / "train", args.data / "val"] if not p.is_dir()]
    if not (args.weights_dir / "resnet20.pt").is_file():
        missing.append(str(args.weights_dir / "resnet20.pt"))
    if missing:
        print("SKIP: benchmark data or weights not found: " + ", ".join(missing)
              + " (pass --data / --weights-dir)")
        return 0
    torch.set_num_threads(max(1, args.threads))
    run_all(args, out_jsonl)
    write_report(args, out_jsonl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
