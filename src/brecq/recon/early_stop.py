"""Per-unit early stopping on a held-out slice of the unit's cache (`--holdout-patience`).

The last sixteenth of a unit's cached samples (at least one mini-batch, at most half) is held
out: mini-batches are drawn from the rest. About twenty times per pass the unit's error on the
held-out samples is measured as the model would be if the pass ended now: hard rounding, no
QDrop dropping. `PlateauStop` decides from these values alone when they have stopped improving.

What stopping means depends on what the pass learns:
- step sizes only (BRECQ's second pass): the pass ends at once;
- rounding variables (AdaRound, QDrop's joint pass): their hard rounding is meaningful only
  once the regularizer's beta has annealed to its end and pushed every variable to one side. So
  the pass does not end: the rest of its schedule (betas, regularizer weights, the step sizes'
  learning rates) is compressed onto a short final anneal (`final_anneal_steps`) that ends
  where the full schedule ends (beta_end), and the pass stops after it. Checks start once the
  warm-up is over, because before it nothing pulls the rounding towards its final values.
Either way the unit leaves its pass hard-rounded (as every pass does) and valid.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ..quant import state
from .objective import EVAL_BATCH

if TYPE_CHECKING:
    from .step import UnitStep, UnitTask

logger = logging.getLogger(__name__)

HOLDOUT_FRACTION = 16  # one sample in this many is held out
CHECKS_PER_PASS = 20
MIN_CHECK_INTERVAL = 10
TOLERANCE = 1e-3  # a relative improvement below this is no improvement
FINAL_ANNEAL_FRACTION = 0.1  # of the configured iterations
MIN_FINAL_ANNEAL = 20


def holdout_size(samples: int, batch_size: int) -> int:
    """Samples held out of `samples`: a sixteenth, at least one mini-batch, at most half."""
    return min(samples // 2, max(samples // HOLDOUT_FRACTION, batch_size))


def check_interval(iterations: int) -> int:
    return max(MIN_CHECK_INTERVAL, iterations // CHECKS_PER_PASS)


def final_anneal_steps(iterations: int, remaining: int) -> int:
    """Steps the rest of a rounding schedule is compressed onto when its pass stops early."""
    return min(remaining, max(MIN_FINAL_ANNEAL, int(FINAL_ANNEAL_FRACTION * iterations)))


def compressed_positions(start: int, end: int, steps: int) -> list[int]:
    """`steps` schedule positions from `start` to `end - 1` (both included), evenly spaced: the
    schedule values the compressed final anneal takes, in order."""
    if steps <= 1:
        return [end - 1] * steps
    return [start + round(j * (end - 1 - start) / (steps - 1)) for j in range(steps)]


class PlateauStop:
    """Stop when `patience` checks in a row have not improved the best value by more than
    `tolerance` of it."""

    def __init__(self, patience: int, tolerance: float = TOLERANCE) -> None:
        self.patience, self.tolerance = patience, tolerance
        self.best: float | None = None
        self.stale = 0

    def update(self, value: float) -> bool:
        """Record one check's value; True when the pass should stop."""
        if self.best is None or value < self.best * (1 - self.tolerance):
            self.best, self.stale = value, 0
        else:
            self.stale += 1
        return self.stale >= self.patience


@contextmanager
def as_final(task: UnitTask) -> Iterator[None]:
    """Within: the unit's quantizers as after the pass (hard rounding, no dropping)."""
    learned = [q for q in task.wqs if q.learned]
    for q in learned:
        q.set_soft(False)
    try:
        with state.dropping(task.act_quantizers, 0.0, None), torch.no_grad():
            yield
    finally:
        for q in learned:
            q.set_soft(True)


class HoldoutStop:
    """Checks a running pass's held-out error and, when it has stopped improving, ends the pass
    (step sizes) or compresses the rest of its schedule onto a final anneal (rounding)."""

    def __init__(self, step: UnitStep, patience: int) -> None:
        self.step = step
        task = step.task
        self.iters = task.schedule.iters
        self.every = check_interval(self.iters)
        # Rounding: only the annealing part, after the warm-up, may end early.
        self.first = int(task.schedule.warmup * self.iters) if task.wqs else 0
        count = task.objective.num_samples
        self.holdout = torch.arange(count - task.holdout, count)
        self.stop = PlateauStop(patience)

    def error(self) -> float:
        """Mean error of the held-out samples (summed over ranks)."""
        objective, task = self.step.task.objective, self.step.task
        total = torch.zeros((), device=objective.device)
        with as_final(task):
            for chunk in self.holdout.split(EVAL_BATCH):
                total += objective.error(chunk.to(objective.index_device)) * len(chunk)
        value = float(total)
        if task.dist.distributed:
            value = task.dist.sum_values([value])[0]
        return value / len(self.holdout)

    def end_after(self, done: int, end: int) -> int:
        """The step the pass ends at, after `done` steps of a pass to end at `end`."""
        if end < self.iters or done <= self.first or done % self.every or done >= end:
            return end
        if not self.stop.update(self.error()):
            return end
        task = self.step.task
        if not task.wqs:
            logger.info("%s: held-out error flat; stopped after %d of %d iterations",
                        task.description, done, self.iters)
            return done
        steps = final_anneal_steps(self.iters, end - done)
        self.compress(done, end, steps)
        logger.info("%s: held-out error flat after %d of %d iterations; final anneal of %d",
                    task.description, done, self.iters, steps)
        return done + steps

    def compress(self, done: int, end: int, steps: int) -> None:
        """Steps done..done+steps-1 take the schedule values of done..end-1, evenly spaced."""
        tables, lr = self.step.tables, self.step.lr
        positions = compressed_positions(done, end, steps)
        index = torch.tensor(positions, device=tables.betas.device)
        for table in (tables.betas, tables.lambdas):
            table[done:done + steps] = table.index_select(0, index)
        if lr is not None:
            lr.rates[done:done + steps] = [lr.rates[p] for p in positions]
            if lr.table is not None:
                lr.table[done:done + steps] = lr.table.index_select(0, index.to(lr.table.device))
