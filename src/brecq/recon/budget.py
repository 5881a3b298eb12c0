"""Fitting a whole reconstruction into a time budget (`--time-budget`).

Before a unit's pass runs, a few probe steps on its real cache (their effects undone) measure
what one step costs. Every unit and pass still to run then gets the same fraction of its
configured iterations, the largest with which all of them fit in the time left
(`split_budget`): the schedule's shape (warm-up, the regularizer's beta annealing, the step
sizes' cosine learning rate) is scaled to the iterations that fit, never cut off mid-anneal.
The plan is made again before every unit with the time actually left, so slower units later in
the network, a busier machine or iterations saved by early stopping are taken into account.
No pass gets fewer than `MIN_ITERATIONS`; when even that does not fit, it and every pass after
it keep what they have (round-to-nearest weights, initialized step sizes), with a log line.

Iteration counts follow from measured times: a budgeted run's result depends on the machine's
speed and load, not only on its seed. Without a budget nothing here runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

MIN_ITERATIONS = 50
# Share of the time left that each plan keeps in reserve for what the estimates miss (timing
# noise, each unit's final error, checkpoint writes).
RESERVE = 0.05

WorkKey = tuple[str, int]  # (phase name, unit index)


@dataclass(frozen=True)
class Work:
    """One unit's pass still to run: its configured iterations and estimated costs."""

    iterations: int
    seconds_per_iteration: float
    overhead: float = 0.0  # seconds outside its steps: capture, errors, probe, checkpoint


def split_budget(seconds: float, work: Sequence[Work], floor: int = MIN_ITERATIONS) -> list[int]:
    """Iterations of each pass of `work` (in run order) so that all of it fits in `seconds`.

    Every pass gets the same fraction (at most 1) of its configured iterations, but at least
    `floor` of them (all, if it has fewer); passes held at the floor leave the others a smaller
    fraction. When even the floors do not fit, the passes that fit at their floor in run order
    get it and the first that does not, and all after it, get 0 (round to nearest).
    """
    floors = [min(floor, w.iterations) for w in work]
    free = seconds - sum(w.overhead for w in work)
    if free < sum(f * w.seconds_per_iteration for f, w in zip(floors, work)):
        counts: list[int] = []
        left = seconds
        for f, w in zip(floors, work):
            cost = w.overhead + f * w.seconds_per_iteration
            if cost > left:
                return counts + [0] * (len(work) - len(counts))
            counts.append(f)
            left -= cost
        return counts
    pinned = [False] * len(work)
    while True:
        pinned_cost = sum(f * w.seconds_per_iteration
                          for f, w, p in zip(floors, work, pinned) if p)
        rest_cost = sum(w.iterations * w.seconds_per_iteration
                        for w, p in zip(work, pinned) if not p)
        scale = 1.0 if rest_cost <= 0 else min(1.0, (free - pinned_cost) / rest_cost)
        newly = [i for i, (f, w, p) in enumerate(zip(floors, work, pinned))
                 if not p and scale * w.iterations < f]
        if not newly:
            break
        for i in newly:
            pinned[i] = True
    return [f if p else int(scale * w.iterations) for f, w, p in zip(floors, work, pinned)]


class TimeBudget:
    """A budgeted run's clock, the passes it has still to run and what passes have cost so far.

    `queue` lists the passes left in run order with their configured iterations (0 for a pass
    that learns nothing, e.g. the activation scales' initialization, which only costs time).
    Passes not measured yet are estimated from the measured ones (`_cost`), scaled by
    `unit_weights`; every plan starts again from the time actually left.
    """

    def __init__(self, seconds: float, queue: Sequence[tuple[WorkKey, int]], *,
                 spent_before: float = 0.0, started: float | None = None,
                 floor: int = MIN_ITERATIONS, clock: Callable[[], float] = time.perf_counter,
                 ) -> None:
        self.seconds = seconds
        self.queue = list(queue)
        self.spent_before = spent_before  # by the interrupted run this one resumes
        self.clock = clock
        self.started = clock() if started is None else started
        self.floor = floor
        self.step_costs: dict[WorkKey, float] = {}  # seconds per iteration, measured
        self.overheads: list[float] = []  # seconds outside the steps of each finished pass
        self.out_of_time = False
        # Relative cost of each unit's steps (unit index -> e.g. its forward seconds), which
        # scales measured step costs to units not measured yet; 1 each when not known.
        self.unit_weights: dict[int, float] = {}

    def spent(self) -> float:
        return self.spent_before + self.clock() - self.started

    def left(self) -> float:
        return max(0.0, self.seconds - self.spent())

    def _cost(self, key: WorkKey, current: tuple[WorkKey, float] | None) -> float:
        """Seconds per iteration of a pass not measured yet: the measured passes of its phase
        (the `current` one included), else all measured passes, scaled from their units'
        `unit_weights` to its unit's; 0 if nothing is measured."""
        pool = [*self.step_costs.items(), *([current] if current is not None else [])]
        known = [(k, c) for k, c in pool if k[0] == key[0]] or pool
        if not known:
            return 0.0
        weight = sum(self.unit_weights.get(k[1], 1.0) for k, _ in known)
        return sum(c for _, c in known) / weight * self.unit_weights.get(key[1], 1.0)

    def _overhead(self, elapsed: float | None) -> float:
        if self.overheads:
            return sum(self.overheads) / len(self.overheads)
        return elapsed or 0.0

    def plan(self, key: WorkKey, seconds_per_iteration: float | None = None,
             elapsed: float | None = None) -> int:
        """Iterations for the pass `key` (the first of the queue left): with the measured
        `seconds_per_iteration` after its probe (`elapsed` seconds into the pass), or before it
        starts from the costs measured so far. 0: it, and every pass after it, keeps
        round-to-nearest."""
        if self.out_of_time:
            return 0
        rest = self.queue[self._index(key):]
        measured = seconds_per_iteration is not None
        current = (key, seconds_per_iteration) if measured else None
        work = [Work(rest[0][1], seconds_per_iteration if measured else self._cost(key, None),
                     0.0 if measured else self._overhead(elapsed))]  # a probed pass's is spent
        work += [Work(iters, self._cost(k, current), self._overhead(elapsed))
                 for k, iters in rest[1:]]
        if self.left() > 0 and not measured and not self.step_costs:
            return rest[0][1]  # nothing measured yet: the probe decides
        count = split_budget(self.left() * (1 - RESERVE), work, self.floor)[0] if self.left() > 0 else 0
        if count == 0 and rest[0][1] > 0:
            self.out_of_time = True
            passes = sum(1 for _, iters in rest if iters > 0)
            logger.warning(
                "time budget: %.1fs left of %.0fs cannot fit %d iterations of %s unit %d: it and"
                " the %d unit pass(es) after it keep round-to-nearest weights and their"
                " initialized step sizes", self.left(), self.seconds, min(self.floor, rest[0][1]),
                key[0], key[1] + 1, passes - 1)
        return count

    def _index(self, key: WorkKey) -> int:
        return next(i for i, (k, _) in enumerate(self.queue) if k == key)

    def finish(self, key: WorkKey, iterations: int, seconds: float,
               seconds_per_iteration: float | None) -> None:
        """Record a finished pass (`seconds` in all) and take it off the queue."""
        if seconds_per_iteration is not None:
            self.step_costs[key] = seconds_per_iteration
            self.overheads.append(max(0.0, seconds - iterations * seconds_per_iteration))
        self.queue.pop(self._index(key))

    def summary(self) -> dict:
        """What the report records about the budget."""
        return {"seconds": self.seconds, "spent": self.spent(), "out_of_time": self.out_of_time}
