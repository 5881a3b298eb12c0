"""The checks of `BrecqConfig`'s fields (and the bit-width checks other configs share): each bad
value raises a ConfigError that names the field and what it takes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .durations import duration_seconds
from .errors import ConfigError

MIN_BITS = 2
MAX_BITS = 8

_NON_NEGATIVE_INTS = ("iters_w", "iters_a", "act_init_samples", "holdout_patience")
_POSITIVE_INTS = ("calib_size", "batch_size")
_POSITIVE_NUMBERS = ("lp_norm", "act_loss_p", "beta_start", "beta_end", "dist_timeout")
_OPTIONAL_LEARNING_RATES = ("weight_lr", "act_lr")
_BIT_MAPS = ("layer_bits", "act_layer_bits")
_NAME_LISTS = ("first_layers", "last_layers", "float_layers", "unit_names")


def check_bits(bits: Any, what: str) -> int:
    """Return `bits` as an int if it is a supported bit width, else raise ConfigError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(
            f"{what}={bits!r} is not supported: use an integer from {MIN_BITS} to {MAX_BITS} bits"
        )
    return bits


def check_choices(config: Any) -> None:
    """ConfigError for the first field of the config dataclass `config` whose value is not one
    of the field's `choices` (see `config.flag_field`)."""
    for f in dataclasses.fields(config):
        value, allowed = getattr(config, f.name), f.metadata.get("choices")
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{f.name}={value!r} is unknown: choose one of {', '.join(allowed)}")


def _check_types(config: Any) -> None:
    check_bits(config.weight_bits, "weight_bits")
    for name in ("act_bits", "first_last_bits"):
        if getattr(config, name) is not None:
            check_bits(getattr(config, name), name)
    check_choices(config)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type in ("bool", bool) and not isinstance(value, bool):
            raise ConfigError(f"{f.name}={value!r} must be true or false")


def _check_numbers(config: Any) -> None:
    for name in _NON_NEGATIVE_INTS:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name}={value!r} must be a non-negative integer")
    for name in _POSITIVE_INTS:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    for name in _POSITIVE_NUMBERS:
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{name}={value!r} must be a positive number")
    for name in _OPTIONAL_LEARNING_RATES:
        value = getattr(config, name)
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ConfigError(f"{name}={value!r} must be a positive number (or None for the"
                              " method's default)")


def _check_ranges(config: Any) -> None:
    if config.cache_budget_gb is not None and not config.cache_budget_gb >= 0:
        raise ConfigError(f"cache_budget_gb={config.cache_budget_gb!r} must be >= 0 (or None)")
    if not (config.fisher_floor >= 0 and math.isfinite(config.fisher_floor)):
        raise ConfigError(f"fisher_floor={config.fisher_floor!r} must be a finite number >= 0:"
                          " use e.g. 1.0, or 0 for the pure squared gradient")
    if not 0 <= config.early_stop < 1:
        raise ConfigError(f"early_stop={config.early_stop!r} must be in [0, 1): a fraction of"
                          " the loss, 0 turns early stopping off")
    if config.round_lambda is not None and not (
            isinstance(config.round_lambda, (int, float)) and config.round_lambda >= 0):
        raise ConfigError(f"round_lambda={config.round_lambda!r} must be >= 0 (or None for the"
                          " method's default)")
    if not 0 <= config.warmup < 1:
        raise ConfigError(f"warmup={config.warmup!r} must be in [0, 1)")
    if not 0 <= config.drop_prob <= 1:
        raise ConfigError(f"drop_prob={config.drop_prob!r} must be in [0, 1]")


def checked_fields(config: Any) -> dict[str, Any]:
    """Check every field of the `BrecqConfig` `config`; return the fields whose value takes a
    canonical form (a duration in seconds, bit maps as dicts, name lists as tuples)."""
    _check_types(config)
    canonical: dict[str, Any] = {}
    if config.time_budget is not None:
        seconds = duration_seconds(config.time_budget)
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ConfigError(f"time_budget={config.time_budget!r} must be a positive number of"
                              " seconds (or None for no limit)")
        canonical["time_budget"] = seconds
    _check_numbers(config)
    _check_ranges(config)
    for name in _BIT_MAPS:
        mapping = getattr(config, name)
        if not isinstance(mapping, dict):
            raise ConfigError(f"{name} must map layer names to bit widths, got {mapping!r}")
        for key, bits in mapping.items():
            check_bits(bits, f"{name}[{key!r}]")
        canonical[name] = dict(mapping)
    for name in _NAME_LISTS:
        names = getattr(config, name)
        if names is not None:
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"{name} must be a list of module names, got {names!r}")
            canonical[name] = tuple(names)
    return canonical
