"""The flag builder: argparse options generated from config dataclass fields, and the values back.

A field with a "flag" in its metadata gets one option whose type, metavar and `--help` text
follow from the field's annotation and metadata ("help", "choices", "metavar"). Every generated
option defaults to None, so `given_dataclass_values` can tell the flags given on the command line
from the ones left out, and `config_from_args` can layer them over `--config` and the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import FLAG_GROUPS, BrecqConfig
from ..errors import ConfigError
from ..search.config import read_bits_file

_NONE_WORDS = ("none", "null")


class _NoneValue:
    """Marks an explicit 'none' given on the command line (None itself means 'not given')."""

    def __repr__(self) -> str:
        return "none"


NONE = _NoneValue()


def parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def parse_float(text: str) -> float:
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


def parse_floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers, e.g. 0.485,0.456,0.406"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} has no numbers")
    return values


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 3,224,224"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must list positive integers, e.g. 3,224,224")
    return values


def _argparse_errors(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` with its ConfigError turned into argparse's error for a bad value."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, else (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _value_parser(field: dataclasses.Field, base: Any) -> tuple[Callable[[str], Any], str]:
    """The argparse `type` and default metavar for a field of (non-optional) type `base`."""
    origin = typing.get_origin(base)
    if base is int:
        return parse_int, "N"
    if base is float:
        return parse_float, "X"
    if base is str:
        return str, "NAME"
    if base is dict or origin is dict:
        return _json_mapping, "JSON"
    if (base is tuple or origin is tuple) and typing.get_args(base)[:1] == (int,):
        return parse_ints, "N,N,..."
    if base is tuple or origin is tuple:
        return _names, "A,B,..."
    raise TypeError(f"{field.name}: no command-line parser for {base!r}")  # pragma: no cover


def _config_option(field: dataclasses.Field, tp: Any) -> dict[str, Any]:
    """argparse keyword arguments for one config field (without the flag name)."""
    meta = field.metadata
    base, optional = _unwrap_optional(tp)
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
    parse, metavar = _value_parser(field, base)
    if "parse" in meta:  # a field whose flag reads its own notation (e.g. durations: 90s, 5m)
        parse = _argparse_errors(meta["parse"])
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


def help_group(parser: argparse.ArgumentParser, key: str) -> Any:
    """The `--help` section `key` of `parser`; all sections are made at the first call, so they
    print in HELP_GROUPS order (empty ones are not printed)."""
    groups = parser.__dict__.setdefault("_brecq_groups", {})
    if not groups:
        for name, title in HELP_GROUPS.items():
            groups[name] = parser.add_argument_group(title)
    return groups[key]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config`, `--bits-config` and one flag per BrecqConfig field to `parser`."""
    group = help_group(parser, "quantization")
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
                            lambda name: help_group(parser, where.get(name, "quantization")))


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


def config_file_values(path: str) -> dict[str, Any]:
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
        values.update(config_file_values(args.config))
    given = given_config_values(args)
    if getattr(args, "bits_config", None):
        given["layer_bits"] = {**values.get("layer_bits", {}), **read_bits_file(args.bits_config),
                               **given.get("layer_bits", {})}
    values.update(given)
    values.update(fixed)
    return BrecqConfig.from_dict(values)
