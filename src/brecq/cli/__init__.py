"""Command line: `brecq quantize`, `eval`, `info`, `search-bits`, `export` and `bench`.

One module per command, each with `add_subparser(subparsers)` and `run(args)`; `flags` builds
the quantization flags from `BrecqConfig`'s field metadata (flag, help, choices) and
annotations, so the CLI and the Python API share one list of options; `common` holds what the
commands share. Values come from, in rising priority: the dataclass defaults, `--config
file.json`, the flags given on the command line. Errors the user can fix print one line
`brecq: error: ...` and exit with code 2.

`brecq quantize` without `--model` and `--data` runs the offline MNIST demo.

The onnx, onnxruntime and matplotlib imports stay inside the library functions that need them,
so every command but `export`, `bench` and `quantize --export onnx` runs without them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import typing
from collections.abc import Iterator, Sequence

import torch

from .. import __version__, progress
from ..errors import BrecqError
from . import bench, evaluate, export, info, quantize, search_bits
from .common import PROG, UsageError
from .flags import add_config_arguments, config_from_args
from .quantize import RunInterrupted

__all__ = ["add_config_arguments", "build_parser", "config_from_args", "main"]

# In the order `brecq --help` lists them.
COMMANDS = (quantize, evaluate, info, search_bits, export, bench)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised, so `main` prints them on one line."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Post-training quantization of PyTorch models by block reconstruction "
        "(BRECQ, QDrop).",
        epilog="Run `brecq quantize` with no --model/--data for an offline demo (about 3 min "
        "on a laptop CPU).",
    )
    parser.add_argument("--version", action="version", version=f"brecq {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_subparser(subparsers)
    return parser


class _CliLogHandler(logging.StreamHandler):
    pass


@contextlib.contextmanager
def _cli_logging(verbosity: int, quiet: bool) -> Iterator[None]:
    """Warnings (more with -v) as `LEVEL name: message` on stderr, and progress: the plan and
    estimate as plain lines, per unit a tqdm bar on a terminal or a line otherwise; -q: none."""
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
