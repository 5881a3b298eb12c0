"""A small ViT trained on CIFAR-10, then quantized: float / RTN / BRECQ / QDrop top-1 on val.

Trains a timm `VisionTransformer` (32x32 input, 4x4 patches, 6 blocks) on the shared CIFAR-10
train images once and caches the weights outside the repository
(``~/.cache/brecq/cifar_vit_<config hash>.pt``, or ``--cache-dir``); later runs reuse them. Then
quantizes it with every method at every bit setting asked, evaluates on val and appends one JSON
line per run to ``benchmarks/results/cifar_vit.jsonl`` (a re-run skips runs already there);
``cifar_vit.md`` is the table of all runs. ``--set FIELD=VALUE`` passes any `BrecqConfig` field
(e.g. ``--set softmax_quantizer=uniform``) and is part of a run's identity, so ablation rows sit
beside the defaults.

Example (the CPU budget used in benchmarks/README.md)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/cifar_vit.py --train-only   # ~12 min once
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/cifar_vit.py \\
        --methods fp,rtn,brecq,qdrop --bits W8A8,W4A8,W4A4 --iters 500
    PYTHONPATH=src python benchmarks/cifar_vit.py --report-only

Without the data (``<root>/data/cifar10/{train,val}``) it prints ``SKIP: ...`` and exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import common
from brecq import BrecqConfig, quantize
from brecq.evaluate import evaluate

# The model and its training recipe; the cache file name is a hash of both, so a change retrains.
VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3,
       "mlp_ratio": 2.0, "class_token": False, "global_pool": "avg", "num_classes": 10}
TRAIN = {"epochs": 10, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.05, "warmup_epochs": 1,
         "label_smoothing": 0.1, "crop_padding": 4, "seed": 0}
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
METHODS = {"rtn": common.METHODS["rtn"], "brecq": common.METHODS["brecq-block"],
           "qdrop": common.METHODS["qdrop"]}
# BRECQ's step-size pass gets a quarter of the rounding pass's iterations (accuracy.py's CPU budget).
ACT_ITERS_DIVISOR = 4
FLAG_FIELDS = frozenset({"weight_bits", "act_bits", "method", "granularity", "backend", "device",
                         "calib_size", "iters_w", "iters_a", "seed"})
DEFAULT_CACHE = Path.home() / ".cache" / "brecq"

log = logging.getLogger("cifar_vit")


# ----------------------------------------------------------------------------- model and data


def build_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**VIT)


def config_hash(train: dict[str, Any]) -> str:
    text = json.dumps({"vit": VIT, "train": train}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a split as uint8 [N, 3, 32, 32] and its labels, classes in sorted order."""
    root = data_dir / split
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            with Image.open(path) as img:
                images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def augment(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Random crops of the zero-padded images and random horizontal flips."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, 3, h, w + 2 * padding)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, 3, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def train(data_dir: Path, train_cfg: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """Train the ViT from scratch on the train split; the model and a summary of the run."""
    torch.manual_seed(train_cfg["seed"])  # the model's initialization
    gen = torch.Generator().manual_seed(train_cfg["seed"])
    model = build_vit()
    x_all, y_all = load_split(data_dir, "train")
    x_all = normalize(x_all)
    n, bs = x_all.shape[0], train_cfg["batch_size"]
    steps_per_epoch = max(1, n // bs)
    total = steps_per_epoch * train_cfg["epochs"]
    warmup = steps_per_epoch * train_cfg["warmup_epochs"]
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"],
                            weight_decay=train_cfg["weight_decay"])

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    started = time.perf_counter()
    model.train()
    step = 0
    for epoch in range(train_cfg["epochs"]):
        order = torch.randperm(n, generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * bs:(i + 1) * bs]
            xb = augment(x_all[idx], train_cfg["crop_padding"], gen)
            loss = F.cross_entropy(model(xb), y_all[idx], label_smoothing=train_cfg["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
            step += 1
        log.info("epoch %d/%d: train loss %.3f (%.0fs)", epoch + 1, train_cfg["epochs"],
                 running / steps_per_epoch, time.perf_counter() - started)
    model.eval()
    return model, {"train_seconds": time.perf_counter() - started, "steps": step,
                   "train_images": n, "threads": torch.get_num_threads()}


def trained_vit(data_dir: Path, cache_dir: Path, train_cfg: dict[str, Any]) -> tuple[nn.Module, Path]:
    """The cached trained ViT, training (and caching) it first if there is none."""
    path = cache_dir / f"cifar_vit_{config_hash(train_cfg)}.pt"
    model = build_vit()
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        log.info("loaded the trained ViT from %s", path)
        return model.eval(), path
    log.info("training the ViT (%s; cached as %s)", json.dumps(train_cfg), path)
    model, info = train(data_dir, train_cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "vit": VIT, "train": train_cfg, "info": info}, tmp)
    os.replace(tmp, path)
    log.info("trained in %.0fs; saved %s", info["train_seconds"], path)
    return model, path


# ----------------------------------------------------------------------------- runs


def run_key(rec: dict[str, Any]) -> str:
    keys = ("model_hash", "method", "bits", "seed", "iters_w", "iters_a", "calib_size", "backend",
            "settings", "eval_count_requested")
    return json.dumps({k: rec.get(k) for k in keys}, sort_keys=True)


def row_label(rec: dict[str, Any]) -> str:
    parts = [rec["method"]] + [f"{k}={v}" for k, v in sorted(rec.get("settings", {}).items())]
    return " ".join(parts)


def make_config(method: str, bits: str, args: argparse.Namespace) -> BrecqConfig:
    wb, ab = common.parse_bits(bits)
    return BrecqConfig(weight_bits=wb, act_bits=ab, seed=args.seed, device=args.device,
                       calib_size=args.calib_size, iters_w=args.iters,
                       iters_a=max(1, args.iters // ACT_ITERS_DIVISOR), backend=args.backend,
                       batch_size=args.batch_size, **METHODS[method], **args.overrides)


def base_record(method: str, bits: str, args: argparse.Namespace, model_hash: str) -> dict[str, Any]:
    fp = method == "fp"
    return {"model": "cifar_vit", "model_hash": model_hash, "method": method,
            "bits": "FP32" if fp else bits, "seed": None if fp else args.seed,
            "iters_w": None if fp else args.iters,
            "iters_a": None if fp else max(1, args.iters // ACT_ITERS_DIVISOR),
            "calib_size": None if fp else args.calib_size, "backend": None if fp else args.backend,
            "settings": {} if fp else dict(args.overrides),
            "eval_count_requested": args.eval_size}


def run_one(model: nn.Module, calib: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor],
            method: str, bits: str, args: argparse.Namespace, rec: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    if method == "fp":
        res = evaluate(model, val, "cpu", batch_size=500, progress=False)
        return {**rec, "top1": res["top1"], "eval_count": res["count"], "recon_seconds": 0.0,
                "seconds": time.perf_counter() - started}
    config = make_config(method, bits, args)
    qmodel, report = quantize(model, calib, config)
    res = evaluate(qmodel, val, torch.device(report.device), batch_size=500, progress=False)
    return {**rec, "top1": res["top1"], "eval_count": res["count"],
            "recon_seconds": report.recon_seconds, "seconds": time.perf_counter() - started,
            "resolved": {k: getattr(config.resolved(), k)
                         for k in ("method", "weight_lr", "act_lr", "round_lambda")},
            "weight_quantizers": len(qmodel.weight_quantizers),
            "act_quantizers": len(qmodel.act_quantizers), "units": len(qmodel.units),
            "peak_rss_mb": common.peak_rss_mb(), "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg())}


# ----------------------------------------------------------------------------- report


def write_markdown(records: list[dict[str, Any]], path: Path) -> None:
    """One row per method and settings, one column per bit setting: top-1 (reconstruction s)."""
    latest: dict[str, dict[str, Any]] = {}
    for r in records:
        latest[run_key(r)] = r
    runs = list(latest.values())
    bits = sorted({r["bits"] for r in runs if r["method"] != "fp"}, key=lambda b: (-len(b), b),
                  reverse=True)
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in runs:
        key = (row_label(r), r.get("iters_w"), r.get("calib_size"), r.get("seed"),
               r.get("backend"), r.get("eval_count"))
        groups.setdefault(key, {})[r["bits"]] = r
    lines = ["# CIFAR-10 ViT: top-1 (%) on val, reconstruction seconds in brackets", "",
             "Written by `benchmarks/cifar_vit.py` from `cifar_vit.jsonl`; settings in "
             "benchmarks/README.md.", "",
             "| method | iters/unit | calib | seed | backend | eval images | act / weight quantizers | "
             + " | ".join(bits) + " | FP32 |",
             "|---" * (8 + len(bits)) + "|"]
    order = {name: k for k, name in enumerate(["fp", *METHODS])}
    for (label, iters, calib, seed, backend, count), cells in sorted(
            groups.items(), key=lambda kv: (order.get(kv[0][0].split()[0], len(order)), str(kv[0]))):
        any_run = next(iter(cells.values()))
        quantizers = (f"{any_run['act_quantizers']} / {any_run['weight_quantizers']}"
                      if "act_quantizers" in any_run else "")
        row = [label, f"{iters:,}" if iters else "", str(calib or ""),
               "" if seed is None else str(seed), backend or "", f"{count:,}", quantizers]
        for b in [*bits, "FP32"]:
            r = cells.get(b)
            row.append("" if r is None else f"{r['top1']:.2f}"
                       + (f" ({r['recon_seconds']:.0f}s)" if r["method"] != "fp" else ""))
        lines.append("| " + " | ".join(row) + " |")
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_data_root_argument(p)
    p.add_argument("--methods", type=common.csv_list, default="fp,rtn,brecq,qdrop",
                   help=f"comma list of fp,{','.join(METHODS)}")
    p.add_argument("--bits", type=common.csv_list, default="W8A8,W4A8,W4A4",
                   help="comma list of bit settings, e.g. W8A8,W4A8,W4A4")
    p.add_argument("--iters", type=int, default=500,
                   help="iterations per unit of BRECQ's rounding pass and QDrop's joint pass "
                        "(BRECQ's step-size pass gets a quarter)")
    p.add_argument("--calib-size", type=int, default=256, help="calibration images from train")
    p.add_argument("--batch-size", type=int, default=32, help="reconstruction batch size")
    p.add_argument("--backend", choices=("none", "onnxruntime"), default="none",
                   help="activation placement (none: layer inputs, the papers' placement)")
    p.add_argument("--set", dest="overrides", type=common.parse_override, action="append",
                   default=[], metavar="FIELD=VALUE",
                   help="override a BrecqConfig field (repeatable), e.g. --set "
                        "softmax_quantizer=uniform; part of the run's identity")
    p.add_argument("--eval-size", type=int, default=None,
                   help="evaluate on a fixed random subset of N val images (quick checks)")
    p.add_argument("--epochs", type=int, default=TRAIN["epochs"],
                   help="training epochs (a different value trains and caches another model)")
    p.add_argument("--train-only", action="store_true", help="train (or load) the model and stop")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help="where the trained weights are cached (never the repository)")
    p.add_argument("--seed", type=int, default=0, help="quantization seed (calibration draw too)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=common.RESULTS / "cifar_vit.jsonl",
                   help="JSON lines file of the runs; the .md report is written beside it")
    p.add_argument("--report-only", action="store_true", help="only rewrite the .md from the .jsonl")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    common.check_overrides(parser, args, FLAG_FIELDS)
    common.check_methods_and_bits(parser, args, ["fp"], METHODS, make_config)


def val_subset(val: tuple[torch.Tensor, torch.Tensor], size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = val
    if size is None or size >= x.shape[0]:
        return x, y
    keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:size]
    return x[keep], y[keep]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = common.parse_or_report(parser, argv, write_markdown)
    if args is None:
        return 0
    md = args.out.with_suffix(".md")
    check_args(parser, args)
    data_dir = args.data_root / "data" / "cifar10"
    missing = [str(data_dir / s) for s in ("train", "val") if not (data_dir / s).is_dir()]
    if missing:
        return common.skip(missing)
    try:
        import timm  # noqa: F401
    except ImportError:
        print("SKIP: timm is not installed (pip install 'brecq[timm]')")
        return 0
    torch.set_num_threads(max(1, args.threads))
    train_cfg = {**TRAIN, "epochs": args.epochs}
    model, weights = trained_vit(data_dir, args.cache_dir, train_cfg)
    if args.train_only:
        print(f"trained ViT: {weights}")
        return 0
    model_hash = config_hash(train_cfg)
    done = {run_key(r) for r in common.load_records(args.out)}
    todo = [(m, b) for m in args.methods for b in (args.bits if m != "fp" else ["FP32"])]
    todo = [(m, b) for m, b in todo if run_key(base_record(m, b, args, model_hash)) not in done]
    if todo:
        val = val_subset(load_split(data_dir, "val"), args.eval_size)
        x_train, _ = load_split(data_dir, "train")
        pick = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(args.seed))
        calib = normalize(x_train[pick[: args.calib_size]])
        val = (normalize(val[0]), val[1])
    for method, bits in todo:
        rec = run_one(model, calib, val, method, bits, args, base_record(method, bits, args, model_hash))
        rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        common.append_record(args.out, rec)
        log.info("RESULT %s %s: top-1 %.2f%% (reconstruction %.1fs)", row_label(rec), rec["bits"],
                 rec["top1"], rec["recon_seconds"])
    write_markdown(common.load_records(args.out), md)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
