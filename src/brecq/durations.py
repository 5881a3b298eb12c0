"""Durations as people write them: "45" (seconds), "90s", "2.5m", "1h"."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(value: Any) -> float:
    """Seconds from a number of seconds or a string such as "45", "90s", "2.5m" or "1h"."""
    if isinstance(value, bool):
        raise ConfigError(f"{value!r} is not a duration: give seconds, e.g. 90 or '90s'")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().lower()
    scale = DURATION_UNITS.get(text[-1:])
    number = text[:-1] if scale is not None else text
    try:
        return float(number) * (scale or 1.0)
    except ValueError:
        raise ConfigError(f"{value!r} is not a duration: give seconds (90, '90s') or minutes"
                          " ('5m') or hours ('1h')") from None
