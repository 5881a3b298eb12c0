"""What the benchmark scripts share: where the data is, CIFAR-10 loading, result files.

The data root holds the CIFAR-10 images in ImageNet layout and the pretrained CIFAR ResNets:

    <root>/data/cifar10/{train,val}/<class>/*.png
    <root>/weights/cifar10/resnet{20,56}.pt

It is `--data-root` where a script takes it, else $BRECQ_DATA_ROOT, else `shared/` beside the
repository. A script whose inputs are missing prints `SKIP: ...` and exits 0, so a checkout
without the data still runs every script's quick paths.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brecq import BrecqConfig
from brecq.data import ImageFolderDataset, eval_loader, load_calibration
from brecq.models import build_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA_ROOT_ENV = "BRECQ_DATA_ROOT"

# Benchmark model name -> brecq model registry name.
MODELS = {"resnet20": "cifar_resnet20", "resnet56": "cifar_resnet56"}
# Benchmark method name (accuracy.py --methods, tuning specs) -> BrecqConfig fields.
METHODS: dict[str, dict[str, Any]] = {
    "rtn": {"method": "rtn", "granularity": "block"},
    "adaround": {"method": "brecq", "granularity": "layer"},
    "brecq-layer": {"method": "brecq", "granularity": "layer"},
    "brecq-block": {"method": "brecq", "granularity": "block"},
    "brecq-stage": {"method": "brecq", "granularity": "stage"},
    "brecq-net": {"method": "brecq", "granularity": "net"},
    "brecq-fisher": {"method": "brecq", "granularity": "block", "loss": "fisher"},
    "qdrop": {"method": "qdrop", "granularity": "block"},
}
BRECQ_FIELDS = frozenset(f.name for f in dataclasses.fields(BrecqConfig))

# Reference top-1 (%) on CIFAR-10 ResNet-20 from the original research code, same model and data
# (BRECQ: 2,000 weight / 1,000 activation iterations; QDrop: its original code). Shown in the
# reports for comparison only.
REFERENCE = {
    "resnet20": {
        "FP32": {"fp": 81.03},
        "ref: BRECQ code": {"W4A32": 80.91, "W4A4": 78.86, "W3A32": 80.79, "W3A3": 76.21,
                            "W2A32": 78.65, "W2A4": 75.70, "W2A2": 53.77},
        "ref: round-to-nearest": {"W4A32": 80.10, "W3A32": 72.93, "W2A32": 23.61},
        "ref: QDrop code": {"W4A4": 79.87, "W2A4": 77.79, "W2A2": 66.84},
    }
}

log = logging.getLogger("benchmarks")


# ----------------------------------------------------------------------------- data root


def default_data_root() -> Path:
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else REPO.parent / "shared"


def add_data_root_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", type=Path, default=default_data_root(),
                        help="folder with data/cifar10/{train,val} and weights/cifar10/*.pt "
                             f"(default: ${DATA_ROOT_ENV}, else ../shared beside the repository)")


def skip(missing: list[str]) -> int:
    """Say which inputs are missing; the exit code of a benchmark that cannot run here (0)."""
    print("SKIP: benchmark data or weights not found: " + ", ".join(missing)
          + f" (pass --data-root or set {DATA_ROOT_ENV})")
    return 0


@dataclasses.dataclass(frozen=True)
class Cifar10:
    """The CIFAR-10 images and the pretrained CIFAR ResNets under one data root."""

    data_dir: Path
    weights_dir: Path

    @classmethod
    def under(cls, root: Path, data_dir: Path | None = None,
              weights_dir: Path | None = None) -> Cifar10:
        """The standard layout under `root`; `data_dir` / `weights_dir` override a part."""
        return cls(data_dir or root / "data" / "cifar10", weights_dir or root / "weights" / "cifar10")

    def weights(self, model: str) -> Path:
        """The checkpoint of a benchmark model name (`resnet20`, `resnet56`)."""
        return self.weights_dir / f"{model}.pt"

    def missing(self, models: Iterable[str]) -> list[str]:
        """The paths of the splits and checkpoints that are not there (empty: ready to run)."""
        out = [str(p) for p in (self.data_dir / "train", self.data_dir / "val") if not p.is_dir()]
        return out + [str(self.weights(m)) for m in models if not self.weights(m).is_file()]

    def build(self, model: str) -> tuple[nn.Module, Any]:
        """The pretrained float model in eval mode and its preprocessing."""
        net, prep = build_model(MODELS[model], weights=self.weights(model))
        return net.eval(), prep

    def calibration(self, transform: Any, size: int, seed: int) -> torch.Tensor:
        """`size` train images drawn with `seed` (the draw every benchmark uses)."""
        return load_calibration(self.data_dir, transform, num_samples=size, seed=seed)

    def val(self, transform: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """All validation images and labels as tensors, in file order."""
        xs, ys = zip(*eval_loader(self.data_dir, transform, split="val", batch_size=500,
                                  num_workers=0))
        return torch.cat(xs), torch.cat(ys)


class EvalData:
    """The evaluation images as tensors, loaded once per process (and per transform)."""

    def __init__(self, cifar: Cifar10, transform: Any, split: str, size: int | None,
                 calib_size: int, holdout_size: int, max_seed: int = 0) -> None:
        self.cifar, self.transform = cifar, transform
        self.split, self.size = split, size
        self.calib_size, self.holdout_size, self.max_seed = calib_size, holdout_size, max_seed
        self._pair: tuple[torch.Tensor, torch.Tensor] | None = None

    def holdout_indices(self, dataset: ImageFolderDataset) -> list[int]:
        """Train images that no calibration draw of the seeds in use takes: a fixed seeded subset.

        `load_calibration(seed=s)` takes the first `calib_size` entries of
        `randperm(len(train), seed=s)` (later ones only replace unreadable files); the first
        `calib_size + 64` entries are excluded for seeds 0..max(4, largest seed in use), so the
        held-out set is the same for every run with seeds below 5.
        """
        n = len(dataset)
        used: set[int] = set()
        for s in range(max(5, self.max_seed + 1)):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(s))
            used.update(perm[: self.calib_size + 64].tolist())
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1_000_003)).tolist()
        picked = [i for i in order if i not in used][: self.holdout_size]  # random class mix
        if len(picked) < self.holdout_size:
            log.warning("only %d train images are never used for calibration: the held-out "
                        "split has %d images, not %d", len(picked), len(picked),
                        self.holdout_size)
        return picked

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pair is not None:
            return self._pair
        started = time.perf_counter()
        if self.split == "holdout":
            dataset = ImageFolderDataset(self.cifar.data_dir, "train", self.transform)
            idx = self.holdout_indices(dataset)
            if self.size is not None:
                idx = idx[: self.size]
            images, labels = [], []
            for i in idx:
                img = dataset.load(i)
                if img is None:
                    continue
                images.append(img)
                labels.append(dataset.samples[i][1])
            x, y = torch.stack(images), torch.tensor(labels, dtype=torch.int64)
        else:
            x, y = self.cifar.val(self.transform)
            if self.size is not None and self.size < x.shape[0]:
                # A fixed random subset: the files are sorted by class, so a prefix is one class.
                keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
                keep = keep[: self.size]
                x, y = x[keep], y[keep]
        log.info("loaded %d %s images for evaluation in %.1fs", x.shape[0], self.split,
                 time.perf_counter() - started)
        self._pair = (x, y)
        return self._pair


# ----------------------------------------------------------------------------- command line


def parse_bits(label: str) -> tuple[int, int | None]:
    """'W4A32' -> (4, None); 'W2A4' -> (2, 4)."""
    text = label.strip().upper()
    if not text.startswith("W") or "A" not in text:
        raise argparse.ArgumentTypeError(f"bit setting {label!r} is not of the form W<bits>A<bits>")
    w, a = text[1:].split("A", 1)
    try:
        wb, ab = int(w), int(a)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bit setting {label!r} is not of the form W4A4") from exc
    return wb, (None if ab >= 32 else ab)


def parse_override(text: str) -> tuple[str, Any]:
    """'weight_lr=3e-3' -> ('weight_lr', 0.003): a BrecqConfig field and a JSON value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or key not in BRECQ_FIELDS:
        raise argparse.ArgumentTypeError(
            f"--set {text!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(BRECQ_FIELDS))}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw.strip()  # a bare string such as mse
    return key, value


def parse_or_report(parser: argparse.ArgumentParser, argv: list[str] | None,
                    write_markdown: Any) -> argparse.Namespace | None:
    """A table script's start: parse `argv`, log to stderr; with `--report-only` rewrite the .md
    beside `--out` from its records, print it and return None (nothing to run)."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if not args.report_only:
        return args
    md = args.out.with_suffix(".md")
    write_markdown(load_records(args.out), md)
    print(md.read_text())
    return None


def check_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    flag_fields: Iterable[str]) -> None:
    """`--set` pairs -> `args.overrides` (a dict); refuses fields the script's own flags set."""
    args.overrides = dict(args.overrides)
    fixed = sorted(set(flag_fields) & set(args.overrides))
    if fixed:
        parser.error(f"--set {', '.join(fixed)}: this script's flags set these (see --help)")


def check_methods_and_bits(parser: argparse.ArgumentParser, args: argparse.Namespace,
                           baselines: Iterable[str], methods: Iterable[str],
                           make_config: Any) -> None:
    """`--methods` and `--bits` of a table script: known names, bit settings of the form W4A4,
    and a config that `make_config(method, bits, args)` can build for each brecq method."""
    baselines, methods = list(baselines), list(methods)
    bad = [m for m in args.methods if m not in baselines and m not in methods]
    if bad:
        parser.error(f"--methods {','.join(bad)}: choose from {','.join(baselines + methods)}")
    try:
        for bits in args.bits:
            parse_bits(bits)
        for method in args.methods:
            if method not in baselines:
                make_config(method, args.bits[0], args)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        parser.error(str(exc))


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_seeds(text: str) -> list[int]:
    return [int(s) for s in csv_list(text)]


# ----------------------------------------------------------------------------- machine


def cpuinfo_field(field: str) -> str | None:
    """The first value of a /proc/cpuinfo field (None where there is no such file or field)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- result files


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20


def load_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a results file; a line cut short by an interrupted write is skipped."""
    if not path.exists():
        return []
    out = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d is not valid JSON (an interrupted write?): ignored", path, line_no)
    return out


def append_record(path: Path, rec: dict[str, Any]) -> None:
    """Append one finished run, on disk before returning (other processes may share the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(rec) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
