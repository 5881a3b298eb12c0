"""Progress of long runs: a tqdm bar per unit on a terminal, one line per unit otherwise.

The library reports through two loggers, never print: "brecq.progress" (the plan of a run and
its time estimate) and "brecq.progress.unit" (one line per finished unit). tqdm bars go to
stderr and appear only on a terminal; `quiet()` turns them off, for the command line's `-q`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger("brecq.progress")
unit_logger = logging.getLogger("brecq.progress.unit")

_settings = {"quiet": False}


@contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Within the block, no progress bars (the loggers are silenced by their level)."""
    previous = _settings["quiet"]
    _settings["quiet"] = enabled
    try:
        yield
    finally:
        _settings["quiet"] = previous


def is_quiet() -> bool:
    return _settings["quiet"]


def bar_disable(is_main: bool = True) -> bool | None:
    """tqdm's `disable=`: True when quiet or not the main process, else None (terminal only)."""
    return True if _settings["quiet"] or not is_main else None


def minutes(seconds: float) -> str:
    """A rough duration for an estimate: '40s', '12 min', '2.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class RunProgress:
    """Counts the iterations of a reconstruction run and estimates the time left from the rate
    so far (iterations cost about the same in every unit of one network: a rough figure)."""

    def __init__(self, total_iterations: int) -> None:
        self.total = total_iterations
        self.done = 0
        self.seconds = 0.0

    def add(self, iterations: int, seconds: float) -> None:
        self.done += iterations
        self.seconds += seconds

    def left(self) -> float | None:
        """Estimated seconds left, or None before any iteration ran."""
        if self.done == 0:
            return None
        return self.seconds / self.done * max(0, self.total - self.done)
