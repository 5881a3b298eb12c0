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
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import common
from brecq import BrecqConfig, prepare, quantize
from brecq.evaluate import evaluate
from brecq.runtime import resolve_device
from brecq.search import Problem, SearchConfig, Solution, measure_sensitivity

# Run name -> (uniform weight bits, size budget of the search or None for the uniform run).
RUNS: dict[str, tuple[int, str | None]] = {
    "uniform-W3": (3, None),
    "mixed-W3": (3, "3bit"),
    "uniform-W2": (2, None),
    "mixed-W2": (2, "2bit"),
    "uniform-W4": (4, None),  # the headroom above W3: what a third more weight bits buys
}
MODEL = "resnet20"

log = logging.getLogger("mixed_precision")


def search_dir(args: argparse.Namespace, entry: str) -> Path:
    """`entry` (a budget's output folder or a sensitivity table) in the search results folder."""
    return args.results_dir / f"{args.name}_search" / entry


def search_command(args: argparse.Namespace, budget: str) -> list[str]:
    """The `brecq search-bits` arguments this benchmark runs (also printed in the report)."""
    return ["search-bits", "--model", common.MODELS[MODEL], "--weights", str(args.cifar.weights(MODEL)),
            "--data", str(args.cifar.data_dir), "--size-budget", budget,
            "--calib-size", str(args.calib_size), "--seed", str(args.search_seed),
            "--device", args.device,
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
    model, prep = args.cifar.build(MODEL)
    transform = prep.to_transform()
    device = resolve_device(args.device)
    data = common.EvalData(args.cifar, transform, "val", None, args.calib_size, 0)
    for seed in args.seeds:
        calib = None
        for name in args.runs:
            done = {run_key(r) for r in common.load_records(out_jsonl)}
            rec: dict[str, Any] = {"run": name, "seed": seed, "iters_w": args.iters_w,
                                   "iters_a": args.iters_a}
            if run_key(rec) not in done:
                if calib is None:
                    calib = args.cifar.calibration(transform, args.calib_size, seed)
                _run_one(args, model, calib, data, device, rec, out_jsonl)


def _run_one(args: argparse.Namespace, model: torch.nn.Module, calib: torch.Tensor,
             data: common.EvalData, device: torch.device, rec: dict[str, Any], out_jsonl: Path) -> None:
    """One BRECQ run (uniform or searched bits), evaluated and appended to the results."""
    name, seed = rec["run"], rec["seed"]
    uniform_bits, budget = RUNS[name]
    layer_bits = searched_bits(args, budget) if budget is not None else {}
    config = BrecqConfig(
        weight_bits=uniform_bits, act_bits=8, method="brecq", granularity="block",
        iters_w=args.iters_w, iters_a=args.iters_a, calib_size=args.calib_size,
        seed=seed, device=args.device, layer_bits=layer_bits, backend="none",
    )
    log.info("=== %s (iters %d/%d, seed %d)", name, args.iters_w, args.iters_a, seed)
    started = time.perf_counter()
    qmodel, report = quantize(model, calib, config)
    res = evaluate(qmodel, data.get(), device, batch_size=500, progress=False, desc=name)
    size_bits, mean_bits = weight_size(qmodel)
    rec.update(
        budget=budget, uniform_bits=uniform_bits, top1=res["top1"], top5=res["top5"],
        eval_count=res["count"], weight_size_bits=size_bits, mean_weight_bits=mean_bits,
        layer_bits={n: qmodel.layer_bits(n) for n in qmodel.layers},
        seconds=time.perf_counter() - started, recon_seconds=report.recon_seconds,
        peak_rss_mb=common.peak_rss_mb(), device=report.device, host=platform.node(),
        torch_threads=torch.get_num_threads(), finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        units=[{"name": u.name, "phase": u.phase, "loss_before": u.loss_before,
                "loss_after": u.loss_after} for u in report.units],
    )
    common.append_record(out_jsonl, rec)
    log.info("RESULT %s: top-1 %.2f%% at %d weight bits (mean %.3f) in %.0fs", name,
             rec["top1"], size_bits, mean_bits, rec["seconds"])
    del qmodel


# ----------------------------------------------------------------------------- ranking check


def _ranks(values: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(np.asarray(values)))


def spearman(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, bits: dict[str, int], x: torch.Tensor,
                 y: torch.Tensor) -> tuple[float, float]:
    """Cross-entropy and top-1 of `bits` with nearest rounding (weights only), no reconstruction."""
    qmodel = prepare(model, BrecqConfig(act_bits=None, layer_bits=bits, device="cpu"), (x[:2],))
    with qmodel.quantization(weights=True, acts=False):
        logits = torch.cat([qmodel(x[i : i + 500]) for i in range(0, x.shape[0], 500)])
    return (float(torch.nn.functional.cross_entropy(logits, y)),
            100.0 * float((logits.argmax(1) == y).float().mean()))


def check_ranking(args: argparse.Namespace) -> dict[str, Any]:
    """How well each sensitivity metric's summed prediction ranks random bit configurations.

    The truth is the held-out cross-entropy of each configuration with nearest rounding (cheap: no
    reconstruction), on train images that no calibration draw uses. Random configurations draw
    each block layer's bits from {2, 3, 4} and the first/last layers' from {4, 8}.
    """
    model, prep = args.cifar.build(MODEL)
    transform = prep.to_transform()
    samples = args.cifar.calibration(transform, 512, args.search_seed)
    x, y = common.EvalData(args.cifar, transform, "holdout", args.ranking_images, args.calib_size,
                    args.ranking_images).get()
    config = BrecqConfig(device=args.device, seed=args.search_seed)
    problems = {}
    for metric in ("fisher", "mse"):
        cache = search_dir(args, "sensitivity.json" if metric == "fisher"
                           else f"sensitivity_{metric}.json")
        table = measure_sensitivity(model, samples, config, SearchConfig(metric=metric), cache)
        problems[metric] = Problem.from_table(table)
    rng = np.random.default_rng(args.search_seed)
    layers = problems["fisher"].table.layers
    rows = []
    for k in range(args.ranking_configs):
        bits = {n: int(rng.choice([4, 8] if info.rule_bits is not None else [2, 3, 4]))
                for n, info in layers.items()}
        loss, top1 = heldout_loss(model, bits, x, y)
        row = {"bits": bits, "heldout_ce": loss, "heldout_top1": top1}
        for metric, problem in problems.items():
            row[f"predicted_{metric}"] = Solution.of(problem.groups, problem.choice_of(bits)).cost
        row["size_bits"] = problem.size_of(bits)
        rows.append(row)
        log.info("ranking config %d/%d: held-out CE %.4f, top-1 %.2f", k + 1,
                 args.ranking_configs, loss, top1)
    truth = [r["heldout_ce"] for r in rows]
    result = {
        "images": int(x.shape[0]), "configs": rows,
        "spearman": {m: spearman([r[f"predicted_{m}"] for r in rows], truth) for m in problems},
    }
    log.info("Spearman rank correlation with held-out CE: %s", result["spearman"])
    return result


# ----------------------------------------------------------------------------- report


def _by_run(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records of the current iteration budget grouped by run name, in RUNS order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for name in RUNS:
        runs = [r for r in records if r["run"] == name]
        if runs:
            groups[name] = sorted(runs, key=lambda r: r["seed"])
    return groups


def write_report(args: argparse.Namespace, out_jsonl: Path) -> None:
    records = [r for r in common.load_records(out_jsonl)
               if (r["iters_w"], r["iters_a"]) == (args.iters_w, args.iters_a)]
    if not records:
        print(f"no results in {out_jsonl} for iters {args.iters_w}/{args.iters_a}: nothing to report")
        return
    groups = _by_run(records)
    lines = ["# Mixed-precision weight bits vs uniform bits (CIFAR-10 ResNet-20, BRECQ)", "",
             f"Top-1 (%) on all 10,000 val images; BRECQ block reconstruction ({args.iters_w} "
             f"weight / {args.iters_a} activation iterations per unit), activations 8-bit, "
             "1,024 calibration images from train (drawn with the run's seed). Mixed bits come "
             f"from one search (seed {args.search_seed}, 512 calibration images).", "",
             "| run | weight size (bits) | mean bits/weight | top-1 per seed | mean top-1 |",
             "|---|---|---|---|---|"]
    for name, runs in groups.items():
        per_seed = ", ".join(f"{r['top1']:.2f} (s{r['seed']})" for r in runs)
        mean = sum(r["top1"] for r in runs) / len(runs)
        lines.append(f"| {name} | {runs[0]['weight_size_bits']:,} | "
                     f"{runs[0]['mean_weight_bits']:.3f} | {per_seed} | {mean:.2f} |")
    lines += ["", "Wall seconds per run (quantization + evaluation, shared 2-core machine): "
              + ", ".join(f"{n} s{r['seed']} {r['seconds']:.0f}" for n, rs in groups.items()
                          for r in rs), "", "Per-layer weight bits:", ""]
    names = list(groups)
    lines.append("| layer | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    for layer in groups[names[0]][0]["layer_bits"]:
        lines.append(f"| {layer} | "
                     + " | ".join(str(groups[n][0]["layer_bits"][layer]) for n in names) + " |")
    lines.append("")
    md = out_jsonl.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    png = out_jsonl.with_suffix(".png")
    write_plot(args, groups, png)
    print(f"wrote {md} and {png}")


def write_plot(args: argparse.Namespace, groups: dict[str, list[dict[str, Any]]],
               path: Path) -> None:
    """Left: the search's Pareto front with both budgets' choices; right: BRECQ top-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, budget in enumerate(("3bit", "2bit")):
        file = search_dir(args, budget) / "pareto.json"
        if not file.is_file():
            continue
        pareto = json.loads(file.read_text())
        if k == 0:
            left.step([p["mean_bits"] for p in pareto["front"]],
                      [p["sensitivity"] for p in pareto["front"]], where="post", lw=1.2,
                      label="Pareto front (exact DP)")
            for point in pareto["uniform"]:
                left.scatter(point["mean_bits"], point["sensitivity"], marker="s", color="tab:red",
                             zorder=3)
                left.annotate(f"uniform W{point['bits']}", (point["mean_bits"], point["sensitivity"]),
                              textcoords="offset points", xytext=(5, 5), fontsize=8)
        chosen = pareto["chosen"]
        left.scatter(chosen["mean_bits"], chosen["sensitivity"], marker="*", s=160, zorder=4,
                     color=("tab:green", "tab:purple")[k], label=f"GA choice, budget {budget}")
    left.set_yscale("log")
    left.set_xlabel("weight size (mean bits per weight)")
    left.set_ylabel("summed Fisher sensitivity (nearest rounding)")
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=8)
    for kind, color in (("uniform", "tab:red"), ("mixed", "tab:green")):
        pts = sorted((rs[0]["mean_weight_bits"], sum(r["top1"] for r in rs) / len(rs))
                     for n, rs in groups.items() if n.startswith(kind))
        if pts:
            right.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color,
                       label=f"{kind} bits (mean over seeds)")
    right.set_xlabel("weight size (mean bits per weight)")
    right.set_ylabel("BRECQ top-1 (%), A8")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle("CIFAR-10 ResNet-20: mixed-precision search vs uniform bits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_data_root_argument(p)
    p.add_argument("--data", type=Path, default=None,
                   help="CIFAR-10 in ImageNet layout (train/<class>/, val/<class>/); default "
                        "<data root>/data/cifar10")
    p.add_argument("--weights-dir", type=Path, default=None,
                   help="folder with resnet20.pt; default <data root>/weights/cifar10")
    p.add_argument("--runs", type=common.csv_list, default=list(RUNS),
                   help=f"comma list of {', '.join(RUNS)}")
    p.add_argument("--iters-w", type=int, default=1000, help="AdaRound iterations per unit")
    p.add_argument("--iters-a", type=int, default=200, help="activation step-size iterations")
    p.add_argument("--seeds", type=common.parse_seeds, default=[0],
                   help="comma list of run seeds (calibration draw and optimization)")
    p.add_argument("--search-seed", type=int, default=0,
                   help="seed of the search (its calibration draw and GA); one search for all runs")
    p.add_argument("--calib-size", type=int, default=1024, help="calibration images from train")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--name", default="mixed_precision", help="results name")
    p.add_argument("--results-dir", type=Path, default=common.RESULTS)
    p.add_argument("--check-ranking", action="store_true",
                   help="only check how well the sensitivity metrics rank random configurations"
                   " (held-out cross-entropy, nearest rounding); writes <name>_ranking.json")
    p.add_argument("--ranking-configs", type=int, default=30, help="random configurations")
    p.add_argument("--ranking-images", type=int, default=2000, help="held-out train images")
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
    args.cifar = common.Cifar10.under(args.data_root, args.data, args.weights_dir)
    missing = args.cifar.missing([MODEL])
    if missing:
        return common.skip(missing)
    torch.set_num_threads(max(1, args.threads))
    if args.check_ranking:
        result = check_ranking(args)
        path = args.results_dir / f"{args.name}_ranking.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}: Spearman {result['spearman']}")
        return 0
    run_all(args, out_jsonl)
    write_report(args, out_jsonl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
