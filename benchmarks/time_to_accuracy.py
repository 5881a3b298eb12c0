"""Time to accuracy: top-1 against reconstruction seconds over a ladder of budgets.

For one cell (model, bit setting, method and settings) runs every budget of the ladder
(iterations per unit, or with ``--budgets`` the library's ``--time-budget`` in seconds) with
every seed, and appends each finished run as one JSON line to
``benchmarks/results/time_to_accuracy.jsonl`` (a re-run skips runs already there). The report,
``time_to_accuracy.md`` and ``time_to_accuracy.png``, sets top-1 against reconstruction seconds
(``report.recon_seconds``), with the original codes' measured points on the same axes.

Example (ResNet-20 W2A4 with ``--method auto``, four budgets, three seeds)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/time_to_accuracy.py --model resnet20 \\
        --bits W2A4 --method auto --ladder 250,500,1000,2000 --seeds 0,1,2
    PYTHONPATH=src python benchmarks/time_to_accuracy.py --model resnet20 --bits W2A4 \\
        --method qdrop --import-jsonl benchmarks/results/accuracy_cpu_v2.jsonl
    PYTHONPATH=src python benchmarks/time_to_accuracy.py --report-only

Time budgets instead (each run gets ``time_budget`` seconds, its iterations per unit scaled down
from ``--time-iters`` to what fits on this machine; a cell of its own)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/time_to_accuracy.py --model resnet20 \
        --bits W2A4 --method auto --budgets 120s,200s,300s --seeds 0,1,2

See benchmarks/README.md for the results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

import common
from brecq import BrecqConfig, ConfigError, quantize
from brecq.durations import duration_seconds
from brecq.evaluate import evaluate
from brecq.runtime import resolve_device

# --method of this script -> BrecqConfig fields; `auto` is resolved by the library
# (`BrecqConfig.resolved()`: QDrop with the held-out learning rates at low-bit activations).
METHOD_SPECS: dict[str, dict[str, Any]] = {
    "qdrop": common.METHODS["qdrop"],
    "brecq": common.METHODS["brecq-block"],
    "auto": {"method": "auto", "granularity": "block"},
}
# A budget is the iterations per unit of the passes that learn weights (BRECQ's rounding pass,
# QDrop's joint pass); BRECQ's activation pass gets a quarter of it, as in accuracy.py's CPU
# budget (2,000 / 500), so that a 2,000-iteration run here is the same run as one there.
ACT_ITERS_DIVISOR = 4
# Fields that the flags of this script set: `--set` may not change them.
FLAG_FIELDS = frozenset({"weight_bits", "act_bits", "method", "granularity", "backend", "device",
                         "calib_size", "iters_w", "iters_a", "seed", "time_budget"})
MEASURED = "measured"
# The original codes' rows in common.REFERENCE, and the reconstruction seconds measured for them
# on the 2-core development CPU (issue 20: the original QDrop code, 2,000 iterations per unit, W2A4).
# The other reference figures were not timed: the plot draws them as horizontal lines.
ORIGINAL_CODES = {"QDrop code": "ref: QDrop code", "BRECQ code": "ref: BRECQ code"}
REFERENCE_SECONDS = {("QDrop code", "W2A4"): 1150.0}
# Issue 20's targets for ResNet-20 (mean of 3 seeds): top-1 at least, reconstruction seconds at most.
TARGETS = {"W2A4": (78.3, 300.0), "W4A4": (80.2, 200.0), "W2A2": (67.8, 400.0)}
IMPORTED_MARKERS = ("s", "D", "^", "v")
REFERENCE_MARGIN = 8.0  # top-1 points below the lowest run beyond which a reference leaves the axes
CPU_FEATURES = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"}

log = logging.getLogger("time_to_accuracy")


# ----------------------------------------------------------------------------- cells and configs


def cell_of(args: argparse.Namespace) -> dict[str, Any]:
    """What one curve is: everything but the budget and the seed. A ladder of time budgets is a
    cell of its own, with the iterations per unit that its budgets scale down."""
    cell = {"model": args.model, "bits": args.bits, "method": args.method, "backend": args.backend,
            "settings": args.overrides, "calib_size": args.calib_size, "device": args.device,
            "eval_count_requested": args.eval_size}
    if args.budgets:
        cell["time_budget_iters"] = args.time_iters
    return cell


def budget_text(cell: dict[str, Any], budget: int) -> str:
    """'1,000' (iterations per unit) or '120s' (a time budget)."""
    return f"{budget:,}s" if "time_budget_iters" in cell else f"{budget:,}"


def cell_label(cell: dict[str, Any]) -> str:
    """'resnet20 W2A4 auto autocast=bf16': the defaults are left out."""
    parts = [cell["model"], cell["bits"], cell["method"]]
    parts += [f"backend={cell['backend']}"] if cell["backend"] != "none" else []
    parts += [f"{k}={v}" for k, v in sorted(cell["settings"].items())]
    parts += [f"calib={cell['calib_size']}"] if cell["calib_size"] != 1024 else []
    parts += [f"device={cell['device']}"] if cell["device"] != "cpu" else []
    parts += [f"eval={cell['eval_count_requested']}"] if cell["eval_count_requested"] else []
    if "time_budget_iters" in cell:
        parts.append(f"time budget (iters={cell['time_budget_iters']:,})")
    return " ".join(parts)


def run_key(rec: dict[str, Any]) -> tuple:
    return json.dumps(rec["cell"], sort_keys=True), rec["budget"], rec["seed"], rec["source"]


def make_config(cell: dict[str, Any], budget: int, seed: int) -> BrecqConfig:
    """The run of `cell` at `budget`: iterations per unit, or seconds for a time-budget cell."""
    wb, ab = common.parse_bits(cell["bits"])
    timed = "time_budget_iters" in cell
    iters = cell["time_budget_iters"] if timed else budget
    return BrecqConfig(
        weight_bits=wb, act_bits=ab, seed=seed, device=cell["device"],
        calib_size=cell["calib_size"], iters_w=iters, iters_a=iters // ACT_ITERS_DIVISOR,
        time_budget=float(budget) if timed else None,
        backend=cell["backend"], **METHOD_SPECS[cell["method"]], **cell["settings"],
    )


def comparable(config: BrecqConfig) -> dict[str, Any]:
    """The resolved settings two runs must share to be points of one curve (not the seed, and
    the device only by its type)."""
    out = config.resolved().to_dict()
    out.pop("seed")
    # "auto" is this machine's device; a record's "cuda:0" stays cuda on a machine without one.
    device = config.device
    out["device"] = (resolve_device(device) if device == "auto" else torch.device(device)).type
    return out


# ----------------------------------------------------------------------------- runs


def machine_info() -> dict[str, Any]:
    flags = set((common.cpuinfo_field("flags") or "").split())
    return {"host": platform.node(), "cpu": common.cpu_name(), "cores": os.cpu_count(),
            "cpu_features": sorted(flags & CPU_FEATURES),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def run_one(model: torch.nn.Module, calib: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor],
            cell: dict[str, Any], budget: int, seed: int) -> dict[str, Any]:
    config = make_config(cell, budget, seed)
    run = config.resolved()
    log.info("=== %s, budget %s, seed %d: %s", cell_label(cell), budget_text(cell, budget), seed,
             config.method_summary())
    load_start = list(os.getloadavg())
    started = time.perf_counter()
    # CPU seconds of this process: on a shared machine they show the work a run did, where its
    # wall seconds also count the time other processes held the cores.
    cpu_started = time.process_time()
    qmodel, report = quantize(model, calib, config)
    quantize_cpu_seconds = time.process_time() - cpu_started
    res = evaluate(qmodel, val, torch.device(report.device), batch_size=500, progress=False,
                   desc=f"{cell['bits']} {budget}")
    return {
        "cell": cell, "label": cell_label(cell), "source": MEASURED, "budget": budget,
        "iters_w": config.iters_w, "iters_a": config.iters_a, "seed": seed,
        "resolved": {k: getattr(run, k) for k in ("method", "weight_lr", "act_lr", "round_lambda")},
        "top1": res["top1"], "top5": res["top5"], "eval_count": res["count"],
        "recon_seconds": report.recon_seconds, "seconds": time.perf_counter() - started,
        "quantize_cpu_seconds": quantize_cpu_seconds,
        "device": report.device, "peak_rss_mb": common.peak_rss_mb(), "machine": machine_info(),
        "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
        "units": [{"name": u.name, "phase": u.phase, "iterations": u.iterations,
                   "loss_after": u.loss_after, "seconds": round(u.seconds, 2)}
                  for u in report.units],
        "time_budget": report.time_budget,
    }


def run_ladder(args: argparse.Namespace, cifar: common.Cifar10, cell: dict[str, Any], out: Path) -> None:
    done = {run_key(r) for r in common.load_records(out)}
    todo = [(b, s) for b in args.ladder for s in args.seeds
            if run_key({"cell": cell, "budget": b, "seed": s, "source": MEASURED}) not in done]
    if not todo:
        log.info("every run of the ladder is in %s already", out)
        return
    model, prep = cifar.build(cell["model"])
    transform = prep.to_transform()
    val = common.EvalData(cifar, transform, "val", args.eval_size, args.calib_size, 0).get()
    calibration: dict[int, torch.Tensor] = {}
    for budget, seed in todo:
        key = run_key({"cell": cell, "budget": budget, "seed": seed, "source": MEASURED})
        # Another process appending to the same file may have finished it meanwhile.
        if key in {run_key(r) for r in common.load_records(out)}:
            continue
        if seed not in calibration:
            calibration[seed] = cifar.calibration(transform, args.calib_size, seed)
        rec = run_one(model, calibration[seed], val, cell, budget, seed)
        rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        common.append_record(out, rec)
        log.info("RESULT %s, budget %s, seed %d: top-1 %.2f%%, reconstruction %.1fs (load %.2f)",
                 rec["label"], budget_text(cell, budget), seed, rec["top1"], rec["recon_seconds"],
                 rec["load_average_start"][0])


# ----------------------------------------------------------------------------- import


def accuracy_record_config(rec: dict[str, Any]) -> BrecqConfig | None:
    """The config an accuracy.py run used, rebuilt from its record (None: not a val run of a
    reconstruction method, or a record too old to say its iterations)."""
    saved = rec.get("config", {})
    if (rec.get("method") not in common.METHODS or rec.get("eval_split") != "val"
            or "iters_w" not in saved or "iters_a" not in saved):
        return None
    wb, ab = common.parse_bits(rec["bits"])
    fields = {"weight_bits": wb, "act_bits": ab, "seed": rec["seed"], "device": rec["device"],
              "calib_size": saved.get("calib_size", 1024), "iters_w": saved["iters_w"],
              "iters_a": saved["iters_a"], "act_lr": saved.get("act_lr"), "backend": "none",
              **common.METHODS[rec["method"]]}
    try:
        return BrecqConfig(**{**fields, **rec.get("overrides", {})})
    except ConfigError:
        return None


def imported_record(rec: dict[str, Any], cell: dict[str, Any], source: str) -> dict[str, Any] | None:
    """An accuracy.py record as a point of `cell`'s curve, or None where it ran something else."""
    theirs = accuracy_record_config(rec)
    if (theirs is None or rec["model"] != cell["model"]
            or rec.get("eval_count_requested") != cell["eval_count_requested"]):
        return None
    if comparable(theirs) != comparable(make_config(cell, theirs.iters_w, theirs.seed)):
        return None
    return {
        "cell": cell, "label": cell_label(cell), "source": source, "budget": theirs.iters_w,
        "iters_w": theirs.iters_w, "iters_a": theirs.iters_a, "seed": rec["seed"],
        "accuracy_method": rec["method"], "top1": rec["top1"], "top5": rec.get("top5"),
        "eval_count": rec.get("eval_count"), "recon_seconds": rec["recon_seconds"],
        "seconds": rec.get("seconds"), "device": rec["device"],
        "machine": {"host": rec.get("host"), "torch_threads": rec.get("torch_threads")},
        "finished": rec.get("finished"),
    }


def import_records(paths: list[Path], cell: dict[str, Any], out: Path) -> int:
    """Copy the records of `paths` that ran `cell`'s recipe into `out`; the number copied."""
    done = {run_key(r) for r in common.load_records(out)}
    copied = 0
    for path in paths:
        source = path.name
        for rec in common.load_records(path):
            point = imported_record(rec, cell, source)
            if point is None or run_key(point) in done:
                continue
            common.append_record(out, point)
            done.add(run_key(point))
            copied += 1
    return copied


# ----------------------------------------------------------------------------- report


def _groups(records: list[dict[str, Any]]) -> dict[tuple[str, str, int], list[dict[str, Any]]]:
    """(label, source, budget) -> runs, in the order the files list them; duplicates dropped."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    seen: set[tuple] = set()
    for r in records:
        if run_key(r) in seen:
            continue
        seen.add(run_key(r))
        groups[(r["label"], r["source"], r["budget"])].append(r)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != MEASURED, kv[0][1:])))


def _references(model: str, bits: str) -> list[tuple[str, float, float | None]]:
    """(name, top-1, seconds or None) of the original codes for a cell."""
    rows = common.REFERENCE.get(model, {})
    return [(name, rows[row][bits], REFERENCE_SECONDS.get((name, bits)))
            for name, row in ORIGINAL_CODES.items() if bits in rows.get(row, {})]


def write_markdown(records: list[dict[str, Any]], path: Path) -> None:
    groups = _groups(records)
    lines = ["# Time to accuracy", "",
             "Top-1 (%) on the val images against reconstruction seconds (`report.recon_seconds`)"
             " per budget (iterations per unit of the weight or joint pass; BRECQ's activation"
             f" pass gets 1/{ACT_ITERS_DIVISOR} of it; a budget in seconds is a `--time-budget`"
             " run, whose iterations per unit the library scales down from the cell's"
             f" `iters` to what fits on the machine). Source `{MEASURED}`: runs of"
             " time_to_accuracy.py; a file name: accuracy.py runs of the same recipe copied with"
             " `--import-jsonl`. Load average: the 1-minute figure at the start of each run; above"
             " about 2 other processes shared the 2 cores and stretched the wall seconds. CPU s:"
             " the run's own CPU seconds for the whole `quantize` call (1 thread), where recorded.",
             "",
             "| cell | source | budget | seeds | top-1 mean | min | max | recon s mean"
             " | CPU s | load avg |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (label, source, budget), runs in groups.items():
        tops = [r["top1"] for r in runs]
        loads = [r["load_average_start"][0] for r in runs if "load_average_start" in r]
        load = f"{statistics.fmean(loads):.2f}" if loads else ""
        seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        recon = statistics.fmean(r["recon_seconds"] for r in runs)
        cpus = [r["quantize_cpu_seconds"] for r in runs if "quantize_cpu_seconds" in r]
        cpu = f"{statistics.fmean(cpus):,.0f}" if len(cpus) == len(runs) else ""
        shown = budget_text(runs[0]["cell"], budget)
        lines.append(f"| {label} | {source} | {shown} | {seeds} | {statistics.fmean(tops):.2f}"
                     f" | {min(tops):.2f} | {max(tops):.2f} | {recon:,.0f} | {cpu} | {load} |")
    cells = sorted({(r["cell"]["model"], r["cell"]["bits"]) for r in records})
    refs = [(model, bits, *ref) for model, bits in cells for ref in _references(model, bits)]
    if refs:
        lines += ["", "The original codes on the same model and data (issue 20):", "",
                  "| model | bits | code | top-1 | recon s |", "|---|---|---|---|---|"]
        lines += [f"| {model} | {bits} | {name} | {top1:.2f} | "
                  + (f"about {secs:,.0f}" if secs else "not measured") + " |"
                  for model, bits, name, top1, secs in refs]
    path.write_text("\n".join(lines) + "\n")


def _draw_panel(ax: Any, model: str, bits: str, groups: dict[tuple[str, str, int], list],
                colors: dict[str, Any], markers: dict[str, str]) -> None:
    series: dict[tuple[str, str], list[tuple[float, float, float, float, str]]] = defaultdict(list)
    for (label, source, budget), runs in groups.items():
        cell = runs[0]["cell"]
        if (cell["model"], cell["bits"]) != (model, bits):
            continue
        tops = [r["top1"] for r in runs]
        secs = statistics.fmean(r["recon_seconds"] for r in runs)
        series[(label, source)].append((secs, statistics.fmean(tops), min(tops), max(tops),
                                        budget_text(cell, budget)))
    ys: list[float] = []
    for (label, source), pts in series.items():
        pts.sort()
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        yerr = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
        if source == MEASURED:
            ax.errorbar(x, y, yerr=yerr, marker="o", capsize=3, color=colors[label], label=label)
        else:  # imported: open markers, one shape per file, not joined to the measured line
            ax.errorbar(x, y, yerr=yerr, marker=markers[source], mfc="none", ls="none",
                        capsize=3, ms=8, color=colors[label], label=f"{label} (from {source})")
        for p in pts:
            ax.annotate(p[4], (p[0], p[1]), textcoords="offset points", xytext=(4, 4),
                        fontsize=6, color=colors[label])
        ys += [p[2] for p in pts] + [p[3] for p in pts]
    if model == "resnet20" and bits in TARGETS:
        top1, secs = TARGETS[bits]
        ax.fill_between([0, secs], top1, max([*ys, top1]) + 1, color="green", alpha=0.1,
                        label=f"issue 20 target: >= {top1} in <= {secs:,.0f} s (3-seed mean)")
        ys.append(top1)
    # A reference far below everything else (BRECQ's code at W2A2) would squash the panel.
    floor = min(ys) - REFERENCE_MARGIN
    for name, top1, secs in _references(model, bits):
        style = {"color": "black" if name.startswith("QDrop") else "dimgray"}
        where = "" if top1 >= floor else ", below the axes"
        if secs is not None:
            ax.plot([secs], [top1], marker="*", ms=14, ls="none", **style,
                    label=f"original {name}: {top1:.2f} at about {secs:,.0f} s{where}")
        else:
            ax.axhline(top1, ls="--" if name.startswith("QDrop") else ":", lw=1, **style,
                       label=f"original {name}: {top1:.2f} (seconds not measured{where})")
        ys += [top1] if top1 >= floor else []
    ax.set_ylim(min(ys) - 1, max(ys) + 1)
    ax.set_xlim(left=0)
    ax.set_title(f"{model} {bits}")
    ax.set_xlabel("reconstruction seconds")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.15))


def write_plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(records)
    panels = sorted({(r["cell"]["model"], r["cell"]["bits"]) for r in records})
    cmap = plt.get_cmap("tab10")
    colors = {label: cmap(i % 10) for i, label in enumerate(dict.fromkeys(k[0] for k in groups))}
    sources = dict.fromkeys(k[1] for k in groups if k[1] != MEASURED)
    markers = {s: IMPORTED_MARKERS[i % len(IMPORTED_MARKERS)] for i, s in enumerate(sources)}
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 6.0 * rows), squeeze=False)
    for ax, (model, bits) in zip(axes.flat, panels):
        _draw_panel(ax, model, bits, groups, colors, markers)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Time to accuracy: top-1 against reconstruction seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path) -> None:
    records = common.load_records(out)
    if not records:
        print(f"no results in {out} yet: nothing to report")
        return
    md, png = out.with_suffix(".md"), out.with_suffix(".png")
    write_markdown(records, md)
    write_plot(records, png)
    print(f"wrote {md} and {png}")


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_data_root_argument(p)
    p.add_argument("--model", choices=sorted(common.MODELS), default="resnet20")
    p.add_argument("--bits", default="W2A4", help="bit setting, e.g. W4A4, W2A2, W2A32")
    p.add_argument("--method", choices=sorted(METHOD_SPECS), default="auto",
                   help="block reconstruction method; auto: the library's --method auto")
    p.add_argument("--backend", choices=("none", "onnxruntime"), default="none",
                   help="activation placement; none is the papers' (comparable with their figures)")
    p.add_argument("--ladder", type=lambda t: [int(b) for b in common.csv_list(t)],
                   default="250,500,1000,2000",
                   help="comma list of budgets, iterations per unit (activation passes: "
                        f"1/{ACT_ITERS_DIVISOR})")
    p.add_argument("--budgets", type=_durations, default=None, metavar="SECONDS,...",
                   help="a ladder of time budgets instead of --ladder, e.g. 120s,200s,5m: each"
                        " run gets --time-budget of that many seconds")
    p.add_argument("--time-iters", type=int, default=2000,
                   help="with --budgets: iterations per unit that the time budget scales down "
                        f"(activation passes: 1/{ACT_ITERS_DIVISOR})")
    p.add_argument("--seeds", type=common.parse_seeds, default="0,1,2", help="comma list of seeds")
    p.add_argument("--set", dest="overrides", type=common.parse_override, action="append", default=[],
                   metavar="FIELD=VALUE",
                   help="override a BrecqConfig field (repeatable), e.g. --set autocast=bf16 "
                        "--set channels_last=true; part of the cell")
    p.add_argument("--calib-size", type=int, default=1024, help="calibration images from train")
    p.add_argument("--eval-size", type=int, default=None,
                   help="evaluate on a fixed random subset of N val images (quick checks; "
                        "default: all 10,000)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=common.RESULTS / "time_to_accuracy.jsonl",
                   help="the JSON lines file; the .md and .png are written beside it")
    p.add_argument("--import-jsonl", type=Path, action="append", default=[], metavar="FILE",
                   help="copy this cell's runs from an accuracy.py results file (repeatable), "
                        "write the report and run nothing")
    p.add_argument("--report-only", action="store_true",
                   help="only (re)write the .md and .png from the .jsonl")
    p.add_argument("--no-report", action="store_true",
                   help="do not write the .md and .png at the end (other processes share the file)")
    return p


def _durations(text: str) -> list[int]:
    """'120s,200s,5m' -> [120, 200, 300] (whole seconds)."""
    try:
        seconds = [round(duration_seconds(t)) for t in common.csv_list(text)]
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not seconds or min(seconds) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give budgets of at least one second")
    return seconds


def check_cell(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The cell of the flags; a bad flag stops here, not after an hour of runs."""
    try:
        common.parse_bits(args.bits)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    args.bits = args.bits.upper()
    common.check_overrides(parser, args, FLAG_FIELDS)
    if args.budgets:
        args.ladder = args.budgets
        if args.time_iters < ACT_ITERS_DIVISOR:
            parser.error(f"--time-iters needs at least {ACT_ITERS_DIVISOR} iterations")
    elif not args.ladder or min(args.ladder) < ACT_ITERS_DIVISOR:
        parser.error(f"--ladder needs budgets of at least {ACT_ITERS_DIVISOR} iterations")
    cell = cell_of(args)
    for budget in args.ladder:
        try:
            make_config(cell, budget, 0).resolved()
        except ConfigError as exc:
            parser.error(f"{cell_label(cell)}, budget {budget}: {exc}")
    return cell


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    if args.report_only:
        write_report(args.out)
        return 0
    cell = check_cell(parser, args)
    if args.import_jsonl:
        missing = [str(p) for p in args.import_jsonl if not p.is_file()]
        if missing:
            parser.error(f"--import-jsonl: no such file: {', '.join(missing)}")
        copied = import_records(args.import_jsonl, cell, args.out)
        print(f"copied {copied} run(s) of {cell_label(cell)} into {args.out}")
        write_report(args.out)
        return 0

    cifar = common.Cifar10.under(args.data_root)
    missing = cifar.missing([args.model])
    if missing:
        return common.skip(missing)
    torch.set_num_threads(max(1, args.threads))
    log.info("results -> %s (%d threads)", args.out, torch.get_num_threads())
    run_ladder(args, cifar, cell, args.out)
    if not args.no_report:
        write_report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
