"""Top-1 accuracy of post-training quantization on the pretrained CIFAR-10 ResNets.

Runs every (model, method, bit setting, seed) combination asked for, appends each finished run
as one JSON line to ``benchmarks/results/<name>.jsonl`` (a re-run skips runs already there) and
writes a Markdown table ``<name>.md`` and a plot ``<name>.png`` at the end (or with
``--report-only``).

Example (CPU budget, ResNet-20, one seed)::

    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --models resnet20 --seeds 0 \\
        --methods brecq-block,rtn --bits W4A4,W2A4,W2A32 --budget cpu

See benchmarks/README.md for all flags and the results.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from brecq import BrecqConfig, ConfigError, quantize
from brecq.evaluate import evaluate
from brecq.runtime import resolve_device
from common import (
    METHODS,
    MODELS,
    REFERENCE,
    RESULTS,
    Cifar10,
    EvalData,
    add_data_root_argument,
    append_record,
    csv_list,
    load_records,
    parse_bits,
    parse_override,
    parse_seeds,
    peak_rss_mb,
    skip,
)

BITS = ("W4A32", "W3A32", "W2A32", "W4A4", "W3A3", "W2A4", "W2A2")
BUDGETS = {"cpu": {"iters_w": 2000, "iters_a": 500}, "paper": {"iters_w": 20000, "iters_a": 5000}}

log = logging.getLogger("accuracy")


def run_key(rec: dict[str, Any]) -> tuple:
    return (rec["model"], rec["method"], rec["bits"], rec["seed"], rec["budget"], rec["eval_split"],
            rec["eval_count_requested"], tuple(sorted(rec.get("overrides", {}).items())))


def make_config(method: str, bits: str, seed: int, args: argparse.Namespace) -> BrecqConfig:
    wb, ab = parse_bits(bits)
    fields: dict[str, Any] = dict(
        weight_bits=wb, act_bits=ab, seed=seed, device=args.device, calib_size=args.calib_size,
        iters_w=args.iters_w, iters_a=args.iters_a, act_lr=args.act_lr,
        fisher_floor=args.fisher_floor, **METHODS[method],
        # The research placement of the papers keeps these figures comparable with theirs
        # (`--set backend=onnxruntime` measures the deployable placement).
        backend="none",
    )
    return BrecqConfig(**{**fields, **args.overrides})


def base_record(model: str, method: str, bits: str, seed: int | None,
                args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": model, "method": method, "bits": bits, "seed": seed, "budget": args.budget_label,
        "eval_split": "holdout" if args.holdout else "val",
        "eval_count_requested": args.eval_size,
        **({"overrides": args.overrides} if args.overrides else {}),
    }


def run_all(args: argparse.Namespace, cifar: Cifar10, out_jsonl: Path) -> None:
    done = {run_key(r) for r in load_records(out_jsonl)}
    for model_key in args.models:
        model, prep = cifar.build(model_key)
        transform = prep.to_transform()
        data = EvalData(cifar, transform, "holdout" if args.holdout else "val",
                        args.eval_size, args.calib_size, args.holdout_size, max(args.seeds))
        device = resolve_device(args.device)

        fp_rec = base_record(model_key, "fp", "FP32", None, args)
        if run_key(fp_rec) not in done:
            started = time.perf_counter()
            res = evaluate(model, data.get(), device, batch_size=500, progress=False, desc="fp")
            fp_rec.update(top1=res["top1"], top5=res["top5"], eval_count=res["count"],
                          seconds=time.perf_counter() - started, recon_seconds=0.0,
                          peak_rss_mb=peak_rss_mb(), device=str(device))
            _finish(out_jsonl, fp_rec, done)

        for seed in args.seeds:
            todo = [(m, b) for m in args.methods for b in args.bits
                    if run_key(base_record(model_key, m, b, seed, args)) not in done]
            if not todo:
                continue
            calib = cifar.calibration(transform, args.calib_size, seed)
            for method, bits in todo:
                rec = base_record(model_key, method, bits, seed, args)
                # Another process appending to the same file may have finished it meanwhile.
                done |= {run_key(r) for r in load_records(out_jsonl)}
                if run_key(rec) in done:
                    continue
                config = make_config(method, bits, seed, args)
                log.info("=== %s %s %s seed %d (%s, iters %d/%d)", model_key, method, bits, seed,
                         args.budget, config.iters_w, config.iters_a)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                started = time.perf_counter()
                qmodel, report = quantize(model, calib, config)
                run_device = torch.device(report.device)
                if run_device.type == "cuda":
                    rec["peak_device_mib"] = torch.cuda.max_memory_allocated(run_device) / 2**20
                    rec["device_name"] = torch.cuda.get_device_name(run_device)
                res = evaluate(qmodel, data.get(), run_device, batch_size=500, progress=False,
                               desc=f"{method} {bits}")
                rec.update(
                    top1=res["top1"], top5=res["top5"], eval_count=res["count"],
                    seconds=time.perf_counter() - started, recon_seconds=report.recon_seconds,
                    peak_rss_mb=peak_rss_mb(), device=report.device,
                    config={k: v for k, v in config.to_dict().items()
                            if k in ("method", "granularity", "loss", "iters_w", "iters_a",
                                     "weight_bits", "act_bits", "first_last_bits", "calib_size",
                                     "batch_size", "act_lr") or k in args.overrides},
                    units=[{"name": u.name, "phase": u.phase, "loss_before": u.loss_before,
                            "loss_after": u.loss_after, "seconds": round(u.seconds, 2)}
                           for u in report.units],
                    host=platform.node(), torch_threads=torch.get_num_threads(),
                )
                _finish(out_jsonl, rec, done)
                del qmodel


def _finish(out_jsonl: Path, rec: dict[str, Any], done: set) -> None:
    rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    append_record(out_jsonl, rec)
    done.add(run_key(rec))
    log.info("RESULT %s %s %s seed %s: top-1 %.2f%% (%d images) in %.1fs, peak RSS %.0f MB",
             rec["model"], rec["method"], rec["bits"], rec["seed"], rec["top1"], rec["eval_count"],
             rec["seconds"], rec["peak_rss_mb"])


# ----------------------------------------------------------------------------- report


def _group(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    seen: set[tuple] = set()
    for r in records:
        key = run_key(r)
        if key in seen:  # keep the first copy of a duplicated run
            continue
        seen.add(key)
        groups[(r["model"], r["method"], r["bits"])].append(r)
    return groups


def _stats(runs: list[dict[str, Any]]) -> tuple[float, float, int]:
    tops = [r["top1"] for r in runs]
    return statistics.fmean(tops), (statistics.stdev(tops) if len(tops) > 1 else 0.0), len(tops)


def _cell(runs: list[dict[str, Any]] | None) -> str:
    if not runs:
        return ""
    mean, std, n = _stats(runs)
    return f"{mean:.2f} ± {std:.2f} (n={n})"


def _bits_order(labels: set[str]) -> list[str]:
    known = [b for b in BITS if b in labels]
    return known + sorted(labels - set(known) - {"FP32"})


def write_markdown(records: list[dict[str, Any]], path: Path, title: str) -> None:
    groups = _group(records)
    lines = [f"# {title}", ""]
    for model in sorted({m for m, _, _ in groups}):
        recs = [r for r in records if r["model"] == model]
        bits = _bits_order({r["bits"] for r in recs})
        methods = [m for m in ("fp", *METHODS)
                   if any((model, m, b) in groups for b in [*bits, "FP32"])]
        split = {r["eval_split"] for r in recs}
        counts = {r.get("eval_count") for r in recs}
        budgets = {r["budget"] for r in recs if r["method"] != "fp"}
        lines += [f"## {model}", "",
                  f"Top-1 (%) on {', '.join(sorted(split))} ({', '.join(map(str, sorted(counts)))}"
                  f" images), mean ± std over seeds (n = seeds); budget {', '.join(sorted(budgets))}.",
                  ""]
        cols = ["FP32", *bits]
        lines.append("| method | " + " | ".join(cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for m in methods:
            label = "full precision" if m == "fp" else m
            cells = [_cell(groups.get((model, m, b))) for b in cols]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for name, vals in REFERENCE.get(model, {}).items():
            label = "ref: full precision" if name == "FP32" else name
            vals = {"FP32": vals["fp"]} if name == "FP32" else vals
            lines.append(f"| {label} | " + " | ".join(
                f"{vals[b]:.2f}" if b in vals else "" for b in cols) + " |")
        lines += ["", "Mean wall seconds per run (quantization + evaluation) and peak RSS:", "",
                  "| method | bits | runs | seconds | recon seconds | peak RSS MB | device |",
                  "|---|---|---|---|---|---|---|"]
        for (mm, m, b), runs in sorted(groups.items()):
            if mm != model:
                continue
            secs = statistics.fmean(r["seconds"] for r in runs)
            rsec = statistics.fmean(r.get("recon_seconds", 0.0) for r in runs)
            rss = max(r["peak_rss_mb"] for r in runs)
            dev = ",".join(sorted({r["device"] for r in runs}))
            lines.append(f"| {m} | {b} | {len(runs)} | {secs:.0f} | {rsec:.0f} | {rss:.0f} | {dev} |")
        lines.append("")
    lines.append("Reference rows: original research code on the same model and data (BRECQ with "
                 "2,000 weight / 1,000 activation iterations); first and last layer 8-bit.")
    path.write_text("\n".join(lines) + "\n")


def write_plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group(records)
    models = sorted({m for m, _, _ in groups})
    acts = sorted({parse_bits(b)[1] or 32 for _, _, b in groups if b != "FP32"}, reverse=True)
    if not models or not acts:
        return
    fig, axes = plt.subplots(len(models), len(acts), figsize=(4.2 * len(acts), 3.6 * len(models)),
                             squeeze=False, sharey="row")
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i % 10) for i, m in enumerate(METHODS)}
    for i, model in enumerate(models):
        fp = groups.get((model, "fp", "FP32"))
        for j, a in enumerate(acts):
            ax = axes[i][j]
            for method in METHODS:
                pts = []
                for (mm, m, b), runs in groups.items():
                    if mm != model or m != method or b == "FP32":
                        continue
                    wb, ab = parse_bits(b)
                    if (ab or 32) == a:
                        mean, std, _ = _stats(runs)
                        pts.append((wb, mean, std))
                if pts:
                    pts.sort()
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                                marker="o", capsize=3, label=method, color=colors[method])
            if fp:
                ax.axhline(_stats(fp)[0], color="k", ls="--", lw=1, label="FP32")
            ax.set_title(f"{model}, A{a if a != 32 else '32 (weight-only)'}")
            ax.set_xlabel("weight bits")
            ax.set_xticks([2, 3, 4])
            ax.set_xlim(1.7, 4.3)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("top-1 (%)")
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_jsonl: Path, name: str) -> None:
    records = load_records(out_jsonl)
    if not records:
        print(f"no results in {out_jsonl} yet: nothing to report")
        return
    title = f"Post-training quantization accuracy: {name}"
    md, png = out_jsonl.with_suffix(".md"), out_jsonl.with_suffix(".png")
    write_markdown(records, md, title)
    write_plot(records, png, title)
    print(f"wrote {md} and {png}")


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_root_argument(p)
    p.add_argument("--data", type=Path, default=None,
                   help="CIFAR-10 in ImageNet layout (train/<class>/, val/<class>/); default "
                        "<data root>/data/cifar10")
    p.add_argument("--weights-dir", type=Path, default=None,
                   help="folder with resnet20.pt / resnet56.pt; default <data root>/weights/cifar10")
    p.add_argument("--models", type=csv_list, default=["resnet20", "resnet56"],
                   help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--methods", type=csv_list, default=list(METHODS),
                   help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--bits", type=csv_list, default=list(BITS), help="comma list, e.g. W4A4,W2A32")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu",
                   help="cpu: 2000 weight / 500 activation iterations; paper: 20000 / 5000")
    p.add_argument("--seeds", type=parse_seeds, default=[0, 1, 2],
                   help="comma list of seeds (e.g. 0 or 0,1,2)")
    p.add_argument("--iters-w", type=int, default=None, help="override the budget's weight iterations")
    p.add_argument("--iters-a", type=int, default=None,
                   help="override the budget's activation iterations")
    p.add_argument("--act-lr", type=float, default=None,
                   help="activation step-size learning rate (default: the method's)")
    p.add_argument("--fisher-floor", type=float, default=0.0,
                   help="BrecqConfig.fisher_floor for the Fisher-loss method (0: pure squared"
                        " gradient)")
    p.add_argument("--set", dest="overrides", type=parse_override, action="append", default=[],
                   metavar="FIELD=VALUE",
                   help="override a BrecqConfig field for every run (repeatable), e.g. --set"
                        " weight_lr=3e-3; recorded with each result and part of its identity")
    p.add_argument("--calib-size", type=int, default=1024, help="calibration images from train")
    p.add_argument("--eval-size", type=int, default=None,
                   help="evaluate on only the first N images (quick checks; default: all)")
    p.add_argument("--holdout", action="store_true",
                   help="evaluate on held-out train images never used for calibration instead "
                        "of val (for choosing settings without tuning on val)")
    p.add_argument("--holdout-size", type=int, default=2000, help="size of the held-out split")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--name", default=None,
                   help="results name (default: accuracy_<budget>[_holdout][_evalN])")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--report-only", action="store_true",
                   help="only (re)write the .md and .png from the .jsonl")
    p.add_argument("--no-report", action="store_true",
                   help="do not write .md/.png at the end (when other processes share the file)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    for m in args.models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}: choose from {', '.join(MODELS)}")
    for m in args.methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}: choose from {', '.join(METHODS)}")
    args.bits = [b.upper() for b in args.bits]
    args.overrides = dict(args.overrides)
    budget = BUDGETS[args.budget]
    args.budget_label = args.budget
    if args.iters_w is not None or args.iters_a is not None:
        args.iters_w = budget["iters_w"] if args.iters_w is None else args.iters_w
        args.iters_a = budget["iters_a"] if args.iters_a is None else args.iters_a
        args.budget_label = f"w{args.iters_w}a{args.iters_a}"
    args.iters_w = budget["iters_w"] if args.iters_w is None else args.iters_w
    args.iters_a = budget["iters_a"] if args.iters_a is None else args.iters_a
    for b in args.bits:
        parse_bits(b)
    # Build every run's config now, so a bad --set value stops here, not after hours of runs.
    for method in args.methods:
        for bits in args.bits:
            try:
                make_config(method, bits, args.seeds[0] if args.seeds else 0, args)
            except ConfigError as exc:
                parser.error(f"{method} {bits}: {exc}")
    name = args.name or "accuracy_{}{}{}".format(
        args.budget_label, "_holdout" if args.holdout else "",
        f"_eval{args.eval_size}" if args.eval_size else "")
    out_jsonl = args.results_dir / f"{name}.jsonl"
    if args.report_only:
        write_report(out_jsonl, name)
        return 0

    cifar = Cifar10.under(args.data_root, args.data, args.weights_dir)
    missing = cifar.missing(args.models)
    if missing:
        return skip(missing)

    torch.set_num_threads(max(1, args.threads))
    log.info("results -> %s (%d threads)", out_jsonl, torch.get_num_threads())
    run_all(args, cifar, out_jsonl)
    if not args.no_report:
        write_report(out_jsonl, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
