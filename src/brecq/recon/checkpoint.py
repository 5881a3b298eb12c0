"""Progress saved after every unit, so a killed run continues where it stopped.

The checkpoint holds the quantized model's state, which units are done, the report so far and
the states of the run's own random number generators (never torch's global ones, which the run
does not use): a resumed run takes exactly the steps the uninterrupted run would have taken
from that point, and ends with the same parameters.

With several ranks, rank 0 writes the file (with every rank's QDrop generator state) and every
rank reads it on resume: the directory must be visible to all of them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..config import BrecqConfig
from ..distributed import SINGLE_PROCESS, DistContext
from ..errors import CheckpointError
from ..fileio import atomic_torch_save, damage_of
from ..graph.model import QuantizedModel
from .report import QuantizationReport, UnitReport

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 2


def _fingerprint(data: Tensor, dist: DistContext) -> list[float]:
    """Sample count, sample size, sum and absolute sum of the calibration set (of all ranks)."""
    flat = data.detach().double().reshape(data.shape[0], -1)
    count, total, abs_total = dist.sum_values(
        [data.shape[0], float(flat.sum()), float(flat.abs().sum())])
    return [count, float(flat.shape[1]), total, abs_total]


def _same_data(saved: list[float], current: list[float]) -> bool:
    # Sums over shards differ from the whole set's sum in the last bits.
    return len(saved) == len(current) and all(
        math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) for a, b in zip(saved, current))


@dataclass(frozen=True)
class RunGenerators:
    """The run's random streams: mini-batch indices (one stream, the same on every rank) and
    QDrop's masks (on the compute device, one stream per rank so that ranks do not drop the
    same elements)."""

    batches: torch.Generator
    drops: torch.Generator

    @classmethod
    def seeded(cls, seed: int, rank: int, device: torch.device) -> RunGenerators:
        return cls(torch.Generator().manual_seed(seed),
                   torch.Generator(device).manual_seed(seed + rank))


def read_checkpoint(path: Path, config: BrecqConfig) -> dict:
    """The checkpoint at `path`, checked to be intact and written by a run with the scheme and
    recipe of `config` (a concrete, resolved config; its runtime options may differ: they decide
    where and how fast a run goes, not its result); CheckpointError naming the problem otherwise."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        damage = damage_of(path, exc)
        what = f"is damaged ({damage})" if damage else f"is unreadable ({type(exc).__name__})"
        raise CheckpointError(
            f"checkpoint {path} {what}: delete it and start the run again without --resume"
        ) from exc
    if not isinstance(payload, dict) or payload.get("version") != FORMAT_VERSION:
        version = payload.get("version") if isinstance(payload, dict) else None
        raise CheckpointError(
            f"checkpoint {path} has format {version!r}, this version reads {FORMAT_VERSION}: "
            "start again without --resume"
        )
    saved, current = payload["config"], config.result_settings()
    # A setting newer than the checkpoint was then at its default.
    defaults = BrecqConfig().to_dict()
    differing = sorted(k for k in current if saved.get(k, defaults.get(k)) != current[k])
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing)
        raise CheckpointError(
            f"the config differs from the checkpoint's ({details}): resume with the same "
            "settings or start a new run in another directory"
        )
    return payload


class RunCheckpoint:
    """Tracks finished units and, given a directory, saves the run after each of them."""

    def __init__(self, directory: str | Path | None, config: BrecqConfig, data: Tensor,
                 dist: DistContext = SINGLE_PROCESS) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.config = config
        self.dist = dist
        self.data_fingerprint = _fingerprint(data, dist)
        self.done: list[str] = []
        self.budget_spent = 0.0  # seconds of the time budget used by the runs before this one

    @property
    def path(self) -> Path | None:
        return self.directory / CHECKPOINT_FILE if self.directory is not None else None

    def is_done(self, phase: str, index: int) -> bool:
        return f"{phase}:{index}" in self.done

    def resume_hint(self) -> str:
        if self.path is None:
            return "pass a checkpoint directory (--out) to keep progress across failures"
        return f"finished units are saved in {self.path}; rerun with --resume {self.directory}"

    def mark_done(self, phase: str, index: int, qmodel: QuantizedModel,
                  report: QuantizationReport, generators: RunGenerators,
                  budget_spent: float = 0.0) -> None:
        """Record a finished unit pass (and, with a time budget, the seconds spent so far)."""
        self.done.append(f"{phase}:{index}")
        # Every rank takes part, even without a directory, so that no rank waits for the others.
        drop_states = self.dist.gather_objects(generators.drops.get_state())
        if self.path is None or not self.dist.is_main:
            return
        payload = {
            "version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "data": self.data_fingerprint,
            "done": list(self.done),
            "state": {k: v.detach().cpu() for k, v in qmodel.state_dict().items()},
            "report_units": [asdict(u) for u in report.units],
            "generator": generators.batches.get_state(),
            "drop_generators": drop_states,
            "budget_spent": budget_spent,
        }
        atomic_torch_save(payload, self.path)

    def restore(self, qmodel: QuantizedModel, report: QuantizationReport,
                generators: RunGenerators) -> None:
        if self.path is None:
            raise CheckpointError("resuming needs the directory of the interrupted run")
        if not self.path.is_file():
            raise CheckpointError(
                f"no checkpoint at {self.path}: start the run without --resume"
            )
        payload = read_checkpoint(self.path, self.config)
        if not _same_data(payload["data"], self.data_fingerprint):
            raise CheckpointError(
                "the calibration data differs from the checkpoint's: resume with the same data "
                "and seed, or start a new run in another directory"
            )
        qmodel.load_state_dict(payload["state"])
        report.units = [UnitReport(**row) for row in payload["report_units"]]
        generators.batches.set_state(payload["generator"])
        drop_states = payload["drop_generators"]
        if len(drop_states) != self.dist.world_size:
            logger.warning(
                "the checkpoint was written by %d rank(s), this run has %d: QDrop's random "
                "masks will differ from an uninterrupted run", len(drop_states), self.dist.world_size)
        generators.drops.set_state(drop_states[self.dist.rank % len(drop_states)])
        self.done = list(payload["done"])
        self.budget_spent = float(payload.get("budget_spent", 0.0))
        logger.info("resumed from %s: %d steps already done", self.path, len(self.done))

    def finish(self) -> None:
        if self.path is not None and self.dist.is_main:
            logger.info("run complete; its checkpoint stays at %s", self.path)
