"""What a quantization run reports: per unit and pass, parameters, loss before and after, time."""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict, dataclass, field

from ..methods import METHOD_REGISTRY
from ..text import format_table

logger = logging.getLogger(__name__)


@dataclass
class UnitReport:
    name: str
    kind: str
    phase: str  # "weights", "activations" or "joint"
    layers: int
    params: int
    loss_before: float
    loss_after: float
    seconds: float
    iterations: int = 0
    note: str = ""  # e.g. why a pass did not run under a time budget


@dataclass
class QuantizationReport:
    config: dict
    units: list[UnitReport] = field(default_factory=list)
    recon_seconds: float = 0.0
    device: str = ""
    world_size: int = 1
    # With a time budget: {"seconds": the budget, "spent": seconds used, "out_of_time": whether
    # some passes fell back to round-to-nearest}.
    time_budget: dict | None = None

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "device": self.device,
            "world_size": self.world_size,
            # A pass a time budget left out has no losses: null, not NaN (which JSON lacks).
            "units": [{k: None if isinstance(v, float) and math.isnan(v) else v
                       for k, v in asdict(u).items()} for u in self.units],
            "recon_seconds": self.recon_seconds,
            "time_budget": self.time_budget,
        }

    def summary(self) -> str:
        """A printable table: per unit and pass, parameters, loss before and after, time."""
        rows = [[u.name, u.kind, u.phase, f"{u.params:,}", f"{u.loss_before:.5g}",
                 f"{u.loss_after:.5g}", f"{u.iterations:,}", f"{u.seconds:.1f}"] for u in self.units]
        table = format_table(["unit", "kind", "pass", "params", "loss before", "loss after",
                              "iterations", "seconds"], rows, right=(3, 4, 5, 6, 7))
        name = self.config.get("method")
        method = METHOD_REGISTRY[name].title if name in METHOD_REGISTRY else name
        bits = f"W{self.config.get('weight_bits')}A{self.config.get('act_bits') or 32}"
        budget = ""
        if self.time_budget is not None:
            budget = f" (time budget {self.time_budget['seconds']:.0f}s"
            budget += ", out of time: round-to-nearest for the rest)" if self.time_budget[
                "out_of_time"] else ")"
        return (f"{method} {bits}: {len(self.units)} unit passes in {self.recon_seconds:.1f}s"
                f"{budget} on {self.device or '?'}\n{table}")

    def __str__(self) -> str:
        return self.summary()

    def log(self, level: int = logging.INFO) -> str:
        """Log the summary table, or write it to stderr when logging is not set up (no handler
        anywhere), so that it shows either way; returns it."""
        table = self.summary()
        if logger.hasHandlers():
            logger.log(level, "%s", table)
        else:
            sys.stderr.write(table + "\n")
        return table
