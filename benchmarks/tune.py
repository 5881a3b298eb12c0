"""Choose reconstruction settings on a held-out split of train, then report val once.

Each study names a model, a method, a bit setting and a grid of BrecqConfig overrides. Every grid
point runs on the held-out train images (never used for calibration) for a few seeds; the point
with the highest mean held-out top-1 is chosen (ties go to the earlier point, so list the current
defaults first); only the chosen point then runs on val, for its own seeds. The choice is made
by this script from the held-out figures alone, before any val run of the study starts.

Runs are `benchmarks/accuracy.py` processes, several at a time (`--jobs`; on one GPU they share
it), each with its own results file under `<out>/jobs/`. A summary lands in `<out>/tune.md`
and `<out>/tune.json`, which also holds every run's full record (it alone carries the results).
Rerunning with the same `--out` reuses finished runs.

    python benchmarks/tune.py --spec benchmarks/tune_spec.json --device cuda --jobs 8 \
        --out benchmarks/results/tune_cpu_budget
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from common import BRECQ_FIELDS, METHODS, MODELS, add_data_root_argument, parse_bits

HERE = Path(__file__).resolve().parent
ACCURACY = HERE / "accuracy.py"

log = logging.getLogger("tune")


@dataclass
class Job:
    name: str  # file stem under <out>/jobs
    args: list[str]
    process: subprocess.Popen | None = None
    log: IO[str] | None = None
    started: float = 0.0

    def finish(self) -> None:
        """Wait for the process and close its log file."""
        self.process.wait()
        self.log.close()


@dataclass
class Study:
    model: str
    method: str
    bits: str
    grid: dict[str, list[Any]]
    points: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        keys = list(self.grid)
        self.points = [dict(zip(keys, values))
                       for values in itertools.product(*(self.grid[k] for k in keys))]

    @property
    def label(self) -> str:
        return f"{self.model}_{self.method}_{self.bits}"


class SpecError(ValueError):
    """A tuning spec that cannot run; the message names the problem and the fix."""


def load_spec(path: Path) -> tuple[dict[str, Any], list[Study]]:
    """Read and check a spec before any run starts (a typo must not cost a night of runs)."""
    try:
        spec = json.loads(path.read_text())
    except OSError as exc:
        raise SpecError(f"cannot read the spec {path}: {exc.strerror}; pass an existing file") from exc
    except json.JSONDecodeError as exc:
        raise SpecError(f"the spec {path} is not valid JSON ({exc}); fix the file") from exc
    if not isinstance(spec, dict) or not spec.get("studies"):
        raise SpecError(f"the spec {path} needs a non-empty \"studies\" list")
    studies = []
    for n, entry in enumerate(spec["studies"]):
        missing = [k for k in ("model", "method", "bits") if k not in entry]
        if missing:
            raise SpecError(f"study {n} lacks {', '.join(missing)}")
        if entry["model"] not in MODELS or entry["method"] not in METHODS:
            raise SpecError(f"study {n}: model must be one of {', '.join(MODELS)} and "
                            f"method one of {', '.join(METHODS)}")
        try:
            parse_bits(entry["bits"])
        except argparse.ArgumentTypeError as exc:
            raise SpecError(f"study {n}: {exc}") from exc
        grid = entry.get("grid", {})
        bad = sorted(k for k in grid if k not in BRECQ_FIELDS)
        if bad or not all(isinstance(v, list) and v for v in grid.values()):
            raise SpecError(f"study {n}: the grid maps BrecqConfig fields to non-empty lists of "
                            f"values; unknown or empty: {', '.join(bad) or 'an empty list'}")
        studies.append(Study(entry["model"], entry["method"], entry["bits"], grid))
    return spec, studies


def point_label(point: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items()) or "defaults"


def job_name(study: Study, index: int, split: str, seed: int) -> str:
    return f"{study.label}_p{index}_{split}_s{seed}"


def job_args(study: Study, point: dict[str, Any], seed: int, split: str, name: str,
             spec: dict[str, Any], args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, str(ACCURACY), "--models", study.model, "--methods", study.method,
           "--bits", study.bits, "--seeds", str(seed), "--budget", spec.get("budget", "cpu"),
           "--device", args.device, "--threads", str(args.threads), "--name", name,
           "--results-dir", str(args.out / "jobs"), "--no-report", "--data-root", str(args.data_root)]
    if args.data:
        cmd += ["--data", str(args.data)]
    if args.weights_dir:
        cmd += ["--weights-dir", str(args.weights_dir)]
    if args.iters_w:
        cmd += ["--iters-w", str(args.iters_w)]
    if args.iters_a:
        cmd += ["--iters-a", str(args.iters_a)]
    if args.eval_size:
        cmd += ["--eval-size", str(args.eval_size)]
    if split == "holdout":
        cmd += ["--holdout", "--holdout-size", str(spec.get("holdout_size", 2000))]
    for key, value in point.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    return cmd


def record_of(out: Path, name: str) -> dict[str, Any] | None:
    """The quantized run's record of a finished job (its file also holds the fp row)."""
    path = out / "jobs" / f"{name}.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("method") not in (None, "fp"):
            return rec
    return None


def result_of(out: Path, name: str) -> float | None:
    rec = record_of(out, name)
    return None if rec is None else float(rec["top1"])


def run_jobs(jobs: list[Job], out: Path, parallel: int, stop_starting_at: float,
             kill_at: float) -> None:
    """Run jobs `parallel` at a time; none starts after `stop_starting_at` and any still running
    at `kill_at` is stopped (both time.monotonic()), so the summary is written in time."""
    pending = [j for j in jobs if result_of(out, j.name) is None]
    running: list[Job] = []
    while pending or running:
        if time.monotonic() >= kill_at and running:
            log.warning("deadline: stopping %d unfinished run(s): %s", len(running),
                        ", ".join(j.name for j in running))
            for job in running:
                job.process.kill()
                job.finish()
            return
        while pending and len(running) < parallel and time.monotonic() < stop_starting_at:
            job = pending.pop(0)
            job.log = (out / "jobs" / f"{job.name}.log").open("w")
            job.process = subprocess.Popen(job.args, stdout=job.log, stderr=subprocess.STDOUT)
            job.started = time.monotonic()
            running.append(job)
        if pending and time.monotonic() >= stop_starting_at and not running:
            log.warning("deadline: %d job(s) not started", len(pending))
            return
        time.sleep(0.5)
        for job in list(running):
            code = job.process.poll()
            if code is None:
                continue
            running.remove(job)
            job.finish()
            top1 = result_of(out, job.name)
            log.info("%s: %s (%.0f s)", job.name,
                     f"top-1 {top1:.2f}" if top1 is not None else f"failed (exit {code})",
                     time.monotonic() - job.started)


def choose(holdout: list[list[float]], seeds: int) -> int | None:
    """Index of the grid point with the best mean held-out top-1; ties go to the earlier point.

    Only points with all `seeds` runs finished compete, so a partial mean cannot win by luck.
    """
    complete = [i for i, tops in enumerate(holdout) if len(tops) == seeds]
    if not complete:
        return None
    return max(complete, key=lambda i: (statistics.fmean(holdout[i]), -i))


def mean_or_none(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--spec", type=Path, required=True, help="JSON file with the studies")
    p.add_argument("--out", type=Path, required=True, help="folder for the runs and the summary")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="finish within this many seconds: held-out runs stop at the deadline "
                        "minus --val-reserve-s, val runs at the deadline, then the summary")
    p.add_argument("--val-reserve-s", type=float, default=90.0,
                   help="seconds kept for the val runs at the end")
    p.add_argument("--run-s", type=float, default=60.0,
                   help="rough seconds one run takes: no held-out run starts later than this "
                        "before the val reserve")
    add_data_root_argument(p)
    p.add_argument("--data", type=Path, default=None, help="accuracy.py --data")
    p.add_argument("--weights-dir", type=Path, default=None, help="accuracy.py --weights-dir")
    p.add_argument("--iters-w", type=int, default=None, help="quick checks only")
    p.add_argument("--iters-a", type=int, default=None, help="quick checks only")
    p.add_argument("--eval-size", type=int, default=None, help="quick checks only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        spec, studies = load_spec(args.spec)
    except SpecError as exc:
        p.error(str(exc))
    (args.out / "jobs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    end = started + args.deadline_s if args.deadline_s else float("inf")

    holdout_seeds = spec.get("holdout_seeds", [0, 1])
    # Grid point by grid point across the studies (defaults first), all seeds of a point
    # together: a deadline then cuts the last points of every study, never a seed of a point.
    holdout_jobs = [
        Job(name, job_args(st, st.points[i], seed, "holdout", name, spec, args))
        for i in range(max(len(st.points) for st in studies)) for st in studies
        if i < len(st.points) for seed in holdout_seeds
        for name in [job_name(st, i, "holdout", seed)]
    ]
    log.info("held-out phase: %d runs, %d at a time", len(holdout_jobs), args.jobs)
    run_jobs(holdout_jobs, args.out, args.jobs, end - args.val_reserve_s - args.run_s,
             end - args.val_reserve_s)

    summary: list[dict[str, Any]] = []
    val_jobs: list[Job] = []
    val_seeds = spec.get("val_seeds", [0, 1, 2])
    for st in studies:
        rows = []
        for i, point in enumerate(st.points):
            tops = [t for s in holdout_seeds
                    if (t := result_of(args.out, job_name(st, i, "holdout", s))) is not None]
            rows.append({"point": point, "holdout": tops, "holdout_mean": mean_or_none(tops),
                         "records": [r for s in holdout_seeds
                                     if (r := record_of(args.out, job_name(st, i, "holdout", s)))]})
        chosen = choose([r["holdout"] for r in rows], len(holdout_seeds))
        summary.append({"study": st.label, "model": st.model, "method": st.method,
                        "bits": st.bits, "rows": rows, "chosen": chosen})
        if chosen is None:
            log.warning("%s: no grid point finished on the held-out split; no val run", st.label)
            continue
        log.info("%s: chose %s (held-out mean %.2f)", st.label, point_label(st.points[chosen]),
                 rows[chosen]["holdout_mean"])
        val_jobs += [Job(name, job_args(st, st.points[chosen], seed, "val", name, spec, args))
                     for seed in val_seeds
                     for name in [job_name(st, chosen, "val", seed)]]
    run_jobs(val_jobs, args.out, args.jobs, end - args.run_s / 2, end)

    lines = ["# Settings chosen on held-out train images, then val", "",
             f"Held-out split: {spec.get('holdout_size', 2000)} train images never used for "
             f"calibration, seeds {holdout_seeds}; val: 10,000 images, seeds {val_seeds}; budget "
             f"{spec.get('budget', 'cpu')}; device {args.device}.", ""]
    for entry, st in zip(summary, studies):
        lines += [f"## {st.label}", "", "| setting | held-out top-1 per seed | mean | |",
                  "|---|---|---|---|"]
        for i, row in enumerate(entry["rows"]):
            mark = "**chosen**" if i == entry["chosen"] else ""
            tops = ", ".join(f"{t:.2f}" for t in row["holdout"])
            mean = f"{row['holdout_mean']:.2f}" if row["holdout_mean"] is not None else "-"
            lines.append(f"| {point_label(row['point'])} | {tops} | {mean} | {mark} |")
        if entry["chosen"] is not None:
            vals = [t for s in val_seeds
                    if (t := result_of(args.out, job_name(st, entry["chosen"], "val", s)))
                    is not None]
            entry["val"] = vals
            entry["val_records"] = [
                r for s in val_seeds
                if (r := record_of(args.out, job_name(st, entry["chosen"], "val", s)))]
            spread = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
            lines += ["", f"Val with the chosen setting: {', '.join(f'{v:.2f}' for v in vals)}"
                          + (f" -> mean {statistics.fmean(vals):.2f}{spread} (n={len(vals)})"
                             if vals else " (no run finished)")]
        lines.append("")
    (args.out / "tune.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "tune.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
