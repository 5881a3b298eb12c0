"""Choosing one option per group under a size budget: a genetic algorithm and exact solvers.

The problem is a multiple-choice knapsack: every group (a reconstruction unit) has options (a bit
width per layer of the unit), each with a size (weight bits), a cost (measured sensitivity) and a
BitOPs count; pick one option per group to minimize the summed cost with the summed size (and,
optionally, BitOPs) within budget. Pure Python and numpy: nothing here knows about torch.

- `genetic_search`: population, tournament selection, uniform crossover, mutation, elitism;
  every individual is repaired onto the feasible set, so the result never exceeds a budget.
- `exact_search`: dynamic programming over integer size units (size budget only).
- `exhaustive_search`: all combinations, for tiny problems (both budgets).
- `pareto_front`: the least cost at every size, from the same dynamic program.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

# Dynamic programming table width above which sizes are rounded up to a coarser unit.
MAX_DP_CELLS = 200_000


@dataclass(frozen=True)
class Option:
    """One choice of a group: its size (bits), cost (sensitivity) and BitOPs."""

    size: int
    cost: float
    bitops: int = 0


Groups = Sequence[Sequence[Option]]


@dataclass(frozen=True)
class Solution:
    """The chosen option index of every group, with the totals they add up to."""

    choice: tuple[int, ...]
    size: int
    cost: float
    bitops: int

    @classmethod
    def of(cls, groups: Groups, choice: Sequence[int]) -> Solution:
        picked = [groups[g][int(c)] for g, c in enumerate(choice)]
        return cls(tuple(int(c) for c in choice), sum(o.size for o in picked),
                   float(sum(o.cost for o in picked)), sum(o.bitops for o in picked))


def _check(groups: Groups, size_budget: int, bitops_budget: int | None) -> None:
    if not groups or any(len(g) == 0 for g in groups):
        raise ConfigError("the search needs at least one group, each with at least one option")
    smallest = sum(min(o.size for o in g) for g in groups)
    if smallest > size_budget:
        raise ConfigError(
            f"the size budget ({size_budget:,} bits) is below the smallest configuration "
            f"({smallest:,} bits, every layer at its lowest candidate): raise the budget or add "
            "lower bit widths to the candidates"
        )
    if bitops_budget is not None:
        fewest = sum(min(o.bitops for o in g) for g in groups)
        if fewest > bitops_budget:
            raise ConfigError(
                f"the BitOPs budget ({bitops_budget:,}) is below the smallest configuration "
                f"({fewest:,}): raise it or add lower bit widths to the candidates"
            )


# ------------------------------------------------------------------------------ exact


def _size_unit(sizes: list[int], budget: int) -> int:
    """The integer size unit of the table: exact (gcd) when the table stays small enough."""
    unit = 0
    for s in [*sizes, budget]:
        unit = math.gcd(unit, s)
    unit = max(unit, 1)
    if budget // unit > MAX_DP_CELLS:
        # Rounding sizes *up* keeps every solution the table accepts within the true budget.
        unit = math.ceil(budget / MAX_DP_CELLS)
    return unit


def exact_is_exact(groups: Groups, size_budget: int) -> bool:
    """Whether `exact_search` is exact for this problem (no size rounding needed)."""
    sizes = [o.size for g in groups for o in g]
    unit = _size_unit(sizes, size_budget)
    return all(s % unit == 0 for s in sizes)


def _dp_tables(groups: Groups, capacity: int, unit: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Least cost at each exact (rounded) total size, and each group's argmin for backtracking."""
    cells = capacity // unit + 1
    best = np.full(cells, np.inf)
    best[0] = 0.0
    picks = []
    for group in groups:
        nxt = np.full(cells, np.inf)
        pick = np.full(cells, -1, dtype=np.int32)
        for k, option in enumerate(group):
            step = math.ceil(option.size / unit)
            if step >= cells:
                continue
            shifted = np.full(cells, np.inf)
            shifted[step:] = best[: cells - step] + option.cost
            better = shifted < nxt
            nxt[better] = shifted[better]
            pick[better] = k
        best = nxt
        picks.append(pick)
    return best, picks


def _backtrack(groups: Groups, picks: list[np.ndarray], cell: int, unit: int) -> tuple[int, ...]:
    choice = []
    for g in range(len(groups) - 1, -1, -1):
        k = int(picks[g][cell])
        choice.append(k)
        cell -= math.ceil(groups[g][k].size / unit)
    return tuple(reversed(choice))


def exact_search(groups: Groups, size_budget: int) -> Solution:
    """The least-cost choice within `size_budget` by dynamic programming over sizes.

    Exact when the sizes share a unit that keeps the table under `MAX_DP_CELLS` cells (ResNet
    layer sizes do); otherwise sizes are rounded up to a coarser unit, which can only miss
    solutions very close to the budget, never exceed it.
    """
    _check(groups, size_budget, None)
    unit = _size_unit([o.size for g in groups for o in g], size_budget)
    best, picks = _dp_tables(groups, size_budget, unit)
    cell = int(np.argmin(best))
    return Solution.of(groups, _backtrack(groups, picks, cell, unit))


def pareto_front(groups: Groups, max_size: int | None = None) -> list[Solution]:
    """Least-cost solutions at every achievable size: each one smaller or better than the next."""
    if max_size is None:
        max_size = sum(max(o.size for o in g) for g in groups)
    _check(groups, max_size, None)
    unit = _size_unit([o.size for g in groups for o in g], max_size)
    best, picks = _dp_tables(groups, max_size, unit)
    front: list[Solution] = []
    for cell in np.flatnonzero(np.isfinite(best)):
        if not front or best[cell] < front[-1].cost - 1e-12 * max(1.0, abs(front[-1].cost)):
            front.append(Solution.of(groups, _backtrack(groups, picks, int(cell), unit)))
    return front


def exhaustive_search(groups: Groups, size_budget: int, bitops_budget: int | None = None,
                      max_combinations: int = 1_000_000) -> Solution:
    """Every combination checked: exact under both budgets, for small problems only."""
    _check(groups, size_budget, bitops_budget)
    count = math.prod(len(g) for g in groups)
    if count > max_combinations:
        raise ConfigError(f"{count:,} combinations are too many to enumerate: use exact_search "
                          "or genetic_search")
    best = None
    for choice in itertools.product(*(range(len(g)) for g in groups)):
        sol = Solution.of(groups, choice)
        if sol.size > size_budget or (bitops_budget is not None and sol.bitops > bitops_budget):
            continue
        if best is None or sol.cost < best.cost:
            best = sol
    assert best is not None  # _check guarantees the all-smallest choice fits
    return best


# ------------------------------------------------------------------------------ genetic


class _Arrays:
    """The problem as padded arrays [groups, max options] for vectorized totals."""

    def __init__(self, groups: Groups) -> None:
        width = max(len(g) for g in groups)
        self.counts = np.array([len(g) for g in groups])
        self.size = np.zeros((len(groups), width), dtype=np.int64)
        self.bitops = np.zeros((len(groups), width), dtype=np.int64)
        self.cost = np.full((len(groups), width), np.inf)
        for g, group in enumerate(groups):
            for k, o in enumerate(group):
                self.size[g, k], self.bitops[g, k], self.cost[g, k] = o.size, o.bitops, o.cost
        self.rows = np.arange(len(groups))

    def totals(self, genes: np.ndarray) -> tuple[int, int, float]:
        return (int(self.size[self.rows, genes].sum()), int(self.bitops[self.rows, genes].sum()),
                float(self.cost[self.rows, genes].sum()))


def _repair(arr: _Arrays, genes: np.ndarray, size_budget: int, bitops_budget: int | None) -> None:
    """Move `genes` (in place) into the budgets by the cheapest downgrades per unit saved.

    Each step switches one group to an option with a smaller size (or fewer BitOPs, whichever
    budget is exceeded) that adds the least cost per unit of excess removed. The all-smallest
    choice fits (checked up front), so this always ends feasible.
    """
    while True:
        size, bitops, _ = arr.totals(genes)
        over_size = size - size_budget
        over_ops = bitops - bitops_budget if bitops_budget is not None else 0
        if over_size <= 0 and over_ops <= 0:
            return
        cur = genes[:, None]
        d_size = arr.size[arr.rows, genes][:, None] - arr.size
        d_ops = arr.bitops[arr.rows, genes][:, None] - arr.bitops
        d_cost = arr.cost - arr.cost[arr.rows, genes][:, None]
        # Saving, in fractions of the excess of each violated budget.
        saved = np.zeros_like(d_cost)
        if over_size > 0:
            saved += np.clip(d_size, 0, over_size) / over_size
        if over_ops > 0:
            saved += np.clip(d_ops, 0, over_ops) / over_ops
        valid = (saved > 0) & np.isfinite(arr.cost) & (d_size >= 0) & (d_ops >= 0)
        valid &= np.arange(arr.cost.shape[1])[None, :] != cur
        if not valid.any():
            # Only when one budget's smallest options are not the other's: nothing fits both.
            raise ConfigError("no configuration meets both the size and the BitOPs budget: "
                              "raise one of them")
        ratio = np.where(valid, np.maximum(d_cost, 0.0) / np.where(valid, saved, 1.0), np.inf)
        g, k = np.unravel_index(int(np.argmin(ratio)), ratio.shape)
        genes[g] = k


def _improve(arr: _Arrays, genes: np.ndarray, size_budget: int, bitops_budget: int | None) -> None:
    """Greedy local search: take the single-group change that lowers the cost most and still fits."""
    while True:
        size, bitops, _ = arr.totals(genes)
        new_size = size - arr.size[arr.rows, genes][:, None] + arr.size
        new_ops = bitops - arr.bitops[arr.rows, genes][:, None] + arr.bitops
        gain = arr.cost[arr.rows, genes][:, None] - arr.cost
        fits = new_size <= size_budget
        if bitops_budget is not None:
            fits &= new_ops <= bitops_budget
        gain = np.where(fits & np.isfinite(arr.cost), gain, -np.inf)
        g, k = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if not gain[g, k] > 1e-15:
            return
        genes[g] = k


def genetic_search(
    groups: Groups, size_budget: int, bitops_budget: int | None = None, *, population: int = 64,
    generations: int = 150, crossover: float = 0.9, mutation: float | None = None,
    tournament: int = 3, elite: int = 2, seed: int = 0,
) -> Solution:
    """Least summed cost within the budgets found by a seeded genetic algorithm.

    Individuals are one option index per group. Each generation keeps the `elite` best, fills the
    rest with children of tournament-selected parents (uniform crossover with probability
    `crossover`, then each gene re-drawn with probability `mutation`, default 1/groups), repairs
    every child onto the feasible set and polishes it with a greedy single-change local search
    (a memetic step: mutation explores, the local search uses leftover budget). Same seed, same
    result.
    """
    _check(groups, size_budget, bitops_budget)
    if population < 2 or generations < 0 or tournament < 1 or not 0 <= elite < population:
        raise ConfigError("genetic_search needs population >= 2, generations >= 0, tournament >= 1"
                          " and 0 <= elite < population")
    rng = np.random.default_rng(seed)
    arr = _Arrays(groups)
    n = len(groups)
    p_mut = 1.0 / n if mutation is None else mutation

    def fix(genes: np.ndarray) -> np.ndarray:
        _repair(arr, genes, size_budget, bitops_budget)
        _improve(arr, genes, size_budget, bitops_budget)
        return genes

    pop = [fix((rng.random(n) * arr.counts).astype(np.int64)) for _ in range(population)]
    fitness = np.array([arr.totals(p)[2] for p in pop])
    for _ in range(generations):
        order = np.argsort(fitness, kind="stable")
        nxt = [pop[i].copy() for i in order[:elite]]
        while len(nxt) < population:
            a, b = (min(rng.integers(population, size=tournament), key=lambda i: fitness[i])
                    for _ in range(2))
            child = pop[a].copy()
            if rng.random() < crossover:
                take = rng.random(n) < 0.5
                child[take] = pop[b][take]
            flip = rng.random(n) < p_mut
            child[flip] = (rng.random(int(flip.sum())) * arr.counts[flip]).astype(np.int64)
            nxt.append(fix(child))
        pop = nxt
        fitness = np.array([arr.totals(p)[2] for p in pop])
    return Solution.of(groups, pop[int(np.argmin(fitness))])
