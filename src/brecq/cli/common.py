"""What the commands share: the model, data and runtime flags, loading and checking the model and
the images, the output folder and the report files."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import ImageFolderDataset, eval_loader, image_modes
from ..errors import ConfigError, DataError
from ..models import build_model, resolve_preprocessing
from .flags import help_group, parse_floats, parse_int

logger = logging.getLogger("brecq.cli")

PROG = "brecq"


class UsageError(Exception):
    """A command-line mistake found by argparse or by the CLI itself (exit code 2)."""


# ------------------------------------------------------------------------- shared flags


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    group = help_group(parser, "model")
    group.add_argument(
        "--model", metavar="NAME", required=required,
        help="torchvision name (resnet18), timm:NAME, cifar_resnet20/32/44/56, or "
        "module:callable / path/to/file.py:callable",
    )
    group.add_argument("--weights", metavar="PATH", help="local checkpoint (state dict) to load")
    group.add_argument(
        "--pretrained", action="store_true", help="download the default torchvision/timm weights"
    )
    group.add_argument("--num-classes", type=parse_int, metavar="N", help="classes of the model's head")


def add_data_arguments(parser: argparse.ArgumentParser, *, evaluation: bool = True) -> None:
    group = help_group(parser, "data")
    group.add_argument(
        "--data", metavar="DIR",
        help="ImageNet-layout folder: DIR/train/<class>/* (calibration), DIR/val/<class>/* (eval)",
    )
    group.add_argument("--resize", type=parse_int, metavar="N",
                       help="resize the shorter image side to N before cropping (0: no resize)")
    group.add_argument("--crop", type=parse_int, metavar="N", help="center crop size")
    group.add_argument("--mean", type=parse_floats, metavar="M,M,M",
                       help="normalization mean per channel")
    group.add_argument("--std", type=parse_floats, metavar="S,S,S",
                       help="normalization std per channel")
    group.add_argument("--interpolation", choices=["nearest", "bilinear", "bicubic", "box",
                                                   "hamming", "lanczos"],
                       help="resize interpolation")
    if evaluation:
        group.add_argument("--eval-size", type=parse_int, metavar="N",
                           help="evaluate on N validation images (a fixed random subset; default all)")
        group.add_argument("--eval-batch-size", type=parse_int, default=100, metavar="N",
                           help="evaluation batch size (default: 100)")
    group.add_argument("--workers", type=parse_int, default=min(4, os.cpu_count() or 1), metavar="N",
                       help="data loading worker processes (default: %(default)s)")
    group.add_argument("--strict", action="store_true",
                       help="fail on unreadable image files instead of skipping them")
    if evaluation:
        group.add_argument("--allow-class-mismatch", action="store_true",
                           help="continue (with a warning) when the number of class folders "
                           "differs from the model's outputs")


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    group = help_group(parser, "runtime")
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="log details (-v) or debug details (-vv)")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bars or progress lines (warnings and results still print)")
    group.add_argument("--threads", type=parse_int, metavar="N",
                       help="CPU threads for torch (default: torch's choice; the demo uses 1). "
                       "On a busy machine fewer threads can be much faster")


def add_command(subparsers: Any, name: str, run: Callable[[argparse.Namespace], int], *,
                summary: str, description: str, model: str | None = None,
                data: str | None = None) -> argparse.ArgumentParser:
    """The subparser of a command that builds a model: `name`, which calls `run`, with the
    runtime flags first, then the model flags when `model` is "optional" or "required"
    (--model), then the data flags when `data` is "evaluation" (with the evaluation flags) or
    "calibration" (without). The commands that read a saved folder (export, bench) list their
    own flags before the runtime ones."""
    parser = subparsers.add_parser(name, help=summary, description=description)
    parser.set_defaults(func=run)
    add_runtime_arguments(parser)
    if model is not None:
        add_model_arguments(parser, required=model == "required")
    if data is not None:
        add_data_arguments(parser, evaluation=data == "evaluation")
    return parser


# ------------------------------------------------------------------------- model and data


def preprocessing_from_args(args: argparse.Namespace, base: Any) -> Any:
    return resolve_preprocessing(
        base, resize=args.resize, crop=args.crop, mean=args.mean, std=args.std,
        interpolation=args.interpolation,
    )


def build_model_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    return build_model(args.model, weights=args.weights, pretrained=args.pretrained,
                       num_classes=args.num_classes)


GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F", "P")


def _model_outputs(model: nn.Module, prep: Any) -> int | None:
    """Run `model` once on a zero image of the preprocessing's shape: the size of its [1, K]
    output (the classes), or None for any other output. UsageError naming the first layer when
    the preprocessing gives it the wrong number of channels."""
    first: list[tuple[str, int]] = []

    def record(name: str, module: nn.Module, inputs: tuple) -> None:
        if not first:
            first.append((name, getattr(module, "in_channels", getattr(module, "in_features", -1))))

    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=name: record(n, mod, inp))
             for name, m in model.named_modules()
             if hasattr(m, "in_channels") or isinstance(m, nn.Linear)]
    was_training = model.training
    try:
        with torch.no_grad():
            output = model.eval()(torch.zeros(1, prep.channels, prep.crop, prep.crop))
    except Exception as exc:  # noqa: BLE001 - any failure here is about the input shape
        if first and first[0][1] not in (-1, prep.channels):
            name, channels = first[0]
            raise UsageError(
                f"the model's first layer {name} reads {channels} channel(s) but the preprocessing "
                f"gives {prep.channels} (--mean/--std have {prep.channels} values): pass --mean and"
                f" --std with {channels} value(s) each") from None
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UsageError(f"the model fails on a {prep.channels}x{prep.crop}x{prep.crop} input "
                         f"({reason}): check --crop, --mean and --std") from None
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if isinstance(output, torch.Tensor) and output.dim() == 2:
        return int(output.shape[1])
    return None


def _warn_about_image_modes(splits: list[ImageFolderDataset], channels: int) -> None:
    """Grayscale images for a 3-channel model, or colour ones for a 1-channel model, are
    converted: say so once per split."""
    for split in splits:
        modes = image_modes(split)
        gray = sum(n for mode, n in modes.items() if mode in GRAYSCALE_MODES)
        colour = sum(modes.values()) - gray
        if channels == 3 and gray:
            logger.warning("%d of %d sampled images in %s are grayscale: each is converted to 3 "
                           "equal channels for this 3-channel model", gray, sum(modes.values()),
                           split.root)
        elif channels == 1 and colour:
            logger.warning("%d of %d sampled images in %s are in colour: each is converted to "
                           "grayscale for this 1-channel model", colour, sum(modes.values()),
                           split.root)


def check_data(args: argparse.Namespace, model: nn.Module, prep: Any, *,
               calib_size: int | None = None, act_init_samples: int | None = None) -> None:
    """Checks of the data against the model and the size flags, before any expensive work:
    class count (an error unless --allow-class-mismatch), channels (grayscale images are
    converted, with a warning), and fewer images than a size flag asks for (a warning)."""
    outputs = _model_outputs(model, prep)
    # Both folders are scanned first: their errors (missing, empty class folder) come before
    # any warning.
    val = ImageFolderDataset(args.data, "val")
    train = ImageFolderDataset(args.data, "train") if calib_size is not None else None
    splits = [val]
    if outputs is not None and len(val.classes) != outputs:
        problem = (f"{val.root} has {len(val.classes)} class folders but the model outputs "
                   f"{outputs} classes")
        if not args.allow_class_mismatch:
            raise UsageError(f"{problem}: labels are the folder indices in sorted order, so the "
                             "accuracy would mean nothing; pass data with one folder per class "
                             "(or --num-classes), or --allow-class-mismatch if the sorted folders "
                             "are the model's first classes")
        logger.warning("%s; continuing (--allow-class-mismatch): folder i in sorted order is "
                       "scored as class i", problem)
    if args.eval_size is not None and args.eval_size > len(val):
        logger.warning("--eval-size %d asks for more images than %s holds: evaluating on all %d",
                       args.eval_size, val.root, len(val))
    if train is not None and calib_size is not None:
        splits.append(train)
        if calib_size > len(train):
            logger.warning("--calib-size %d asks for more images than %s holds: calibrating on "
                           "all %d", calib_size, train.root, len(train))
        available = min(calib_size, len(train))
        if act_init_samples is not None and act_init_samples > available:
            logger.warning("--act-init-samples %d is more than the %d calibration images: "
                           "initializing activation scales on all %d", act_init_samples,
                           available, available)
    _warn_about_image_modes(splits, prep.channels)


def val_loader(args: argparse.Namespace, prep: Any, seed: int = 0) -> Any:
    if args.eval_size is not None and args.eval_size < 1:
        raise DataError(f"--eval-size {args.eval_size} is not positive: pass e.g. 1000")
    loader = eval_loader(args.data, prep, batch_size=max(1, args.eval_batch_size),
                         num_workers=args.workers, strict=args.strict)
    dataset = loader.dataset
    if args.eval_size is not None and args.eval_size < len(dataset):
        # Files are in class order: take a seeded random subset so every class is represented.
        gen = torch.Generator().manual_seed(seed)
        keep = sorted(torch.randperm(len(dataset), generator=gen)[: args.eval_size].tolist())
        dataset.samples = [dataset.samples[i] for i in keep]
        dataset.targets = [dataset.targets[i] for i in keep]
    return loader


# ------------------------------------------------------------------------- output folder and report

# Files by which an --out folder is recognized as holding a run.
RUN_FILES = ("report.json", "model.json", "checkpoint/checkpoint.pt")


def timestamp_dir() -> Path:
    return Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def check_out_is_free(out: Path, overwrite: bool) -> None:
    """Refuse an --out folder that holds another run's results, unless --overwrite."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not overwrite:
        raise UsageError(f"--out {out} already holds a run ({', '.join(found)}): pass --overwrite "
                         f"to replace it, --resume {out} to continue it, or another --out")


def make_out_dir(path: str | os.PathLike[str]) -> Path:
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output folder {out} ({exc.strerror}): pass another --out") from None
    return out


def peak_memory(device: torch.device | None) -> dict[str, float | None]:
    host = None
    try:
        import resource  # not on Windows

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        host = rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024  # bytes vs KiB
    except ImportError:
        pass
    device_mb = None
    if device is not None and device.type == "cuda":
        device_mb = torch.cuda.max_memory_allocated(device) / (1024 * 1024)
    return {"host_rss_mb": round(host, 1) if host is not None else None,
            "device_mb": round(device_mb, 1) if device_mb is not None else None}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
