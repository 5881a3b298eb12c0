"""From a sensitivity table and budgets to per-layer bits: the search problem and its answer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .config import SearchConfig, parse_bitops_budget, parse_size_budget
from .sensitivity import SensitivityTable
from .solvers import (
    Option,
    Solution,
    exact_is_exact,
    exact_search,
    genetic_search,
    pareto_front,
)

logger = logging.getLogger(__name__)

# Above this many candidate assignments over all units the front is not tabulated per point.
_FRONT_POINTS = 400


@dataclass
class Problem:
    """The table as solver groups: one group per unit, one option per measured assignment."""

    table: SensitivityTable
    groups: list[list[Option]]
    act_bits: int  # activation bits used for BitOPs (32 for weight-only)

    @classmethod
    def from_table(cls, table: SensitivityTable) -> Problem:
        act_bits = table.act_bits if table.act_bits is not None else 32
        groups = []
        for unit in table.units:
            options = []
            for bits, error in zip(unit.assignments, unit.errors):
                infos = [table.layers[n] for n in unit.layers]
                options.append(Option(
                    size=sum(b * i.params for b, i in zip(bits, infos)), cost=float(error),
                    bitops=sum(b * act_bits * i.macs for b, i in zip(bits, infos)),
                ))
            groups.append(options)
        return cls(table, groups, act_bits)

    def uniform_bits(self, bits: int) -> dict[str, int]:
        """Every layer at `bits`, except fixed layers and the first/last-layer rule."""
        out = {}
        for name, info in self.table.layers.items():
            if info.fixed_bits is not None:
                out[name] = info.fixed_bits
            else:
                out[name] = info.rule_bits if info.rule_bits is not None else bits
        return out

    def size_of(self, bits: dict[str, int]) -> int:
        return sum(bits[n] * i.params for n, i in self.table.layers.items())

    def bitops_of(self, bits: dict[str, int]) -> int:
        return sum(bits[n] * self.act_bits * i.macs for n, i in self.table.layers.items())

    def choice_of(self, bits: dict[str, int]) -> tuple[int, ...] | None:
        """Option indices that give `bits`, or None when some unit did not measure them."""
        choice = []
        for unit in self.table.units:
            wanted = tuple(bits[n] for n in unit.layers)
            if wanted not in unit.assignments:
                return None
            choice.append(unit.assignments.index(wanted))
        return tuple(choice)

    def bits_of(self, choice: tuple[int, ...]) -> dict[str, int]:
        bits = {}
        for unit, k in zip(self.table.units, choice):
            bits.update(zip(unit.layers, unit.assignments[k]))
        return {n: bits[n] for n in self.table.layers}

    @property
    def total_params(self) -> int:
        return sum(i.params for i in self.table.layers.values())


@dataclass
class Allocation:
    """The chosen bits and everything needed to judge them."""

    bits: dict[str, int]
    size_budget: str
    budget_bits: int
    size_bits: int
    mean_bits: float
    sensitivity: float
    bitops: int
    bitops_budget: str | None
    bitops_limit: int | None
    solver: str
    genetic_sensitivity: float
    exact_sensitivity: float | None
    seconds: float
    uniform: list[dict[str, Any]] = field(default_factory=list)
    front: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def allocate_bits(table: SensitivityTable, search: SearchConfig, seed: int = 0) -> Allocation:
    """Least summed sensitivity within the budgets: the GA (seeded), checked by the exact solver."""
    started = time.perf_counter()
    missing = [n for n in table.layers if not any(n in u.layers for u in table.units)]
    if missing or not table.units:
        raise ConfigError("the sensitivity table is incomplete: measure every unit first")
    problem = Problem.from_table(table)
    uniform_size = lambda b: problem.size_of(problem.uniform_bits(b))  # noqa: E731
    budget = parse_size_budget(search.size_budget).resolve(uniform_size)
    bitops_limit = None
    if search.bitops_budget is not None:
        bitops_limit = parse_bitops_budget(search.bitops_budget).resolve(
            lambda b: problem.bitops_of(problem.uniform_bits(b)))
    ga = genetic_search(problem.groups, budget, bitops_limit, population=search.population,
                        generations=search.generations, mutation=search.mutation,
                        seed=seed)
    best, solver, exact = ga, "genetic", None
    if bitops_limit is None:
        # The exact optimum under the size budget checks the GA (and wins if the GA missed it).
        exact_sol = exact_search(problem.groups, budget)
        exact = exact_sol.cost
        if exact_sol.cost < ga.cost - 1e-12 * max(1.0, abs(ga.cost)):
            logger.warning("the GA's sensitivity %.6g is above the exact optimum %.6g: using the "
                           "exact solution (raise --generations or --population)", ga.cost,
                           exact_sol.cost)
            best, solver = exact_sol, "exact"
        exactness = "exact" if exact_is_exact(problem.groups, budget) else "near-exact (rounded sizes)"
        logger.info("GA sensitivity %.6g, %s optimum %.6g", ga.cost, exactness, exact_sol.cost)
    bits = problem.bits_of(best.choice)
    return Allocation(
        bits=bits, size_budget=search.size_budget, budget_bits=budget, size_bits=best.size,
        mean_bits=best.size / problem.total_params, sensitivity=best.cost, bitops=best.bitops,
        bitops_budget=search.bitops_budget, bitops_limit=bitops_limit, solver=solver,
        genetic_sensitivity=ga.cost, exact_sensitivity=exact,
        seconds=round(time.perf_counter() - started, 3),
        uniform=_uniform_points(problem, search), front=_front(problem),
    )


def _uniform_points(problem: Problem, search: SearchConfig) -> list[dict[str, Any]]:
    points = []
    for b in search.candidates:
        bits = problem.uniform_bits(b)
        choice = problem.choice_of(bits)
        if choice is None:
            continue
        sol = Solution.of(problem.groups, choice)
        points.append({"bits": b, "size_bits": sol.size, "mean_bits": sol.size / problem.total_params,
                       "sensitivity": sol.cost, "bitops": sol.bitops})
    return points


def _front(problem: Problem) -> list[dict[str, Any]]:
    front = pareto_front(problem.groups)
    if len(front) > _FRONT_POINTS:
        step = len(front) / _FRONT_POINTS
        front = [front[int(i * step)] for i in range(_FRONT_POINTS)] + [front[-1]]
    return [{"size_bits": s.size, "mean_bits": s.size / problem.total_params,
             "sensitivity": s.cost, "bitops": s.bitops} for s in front]
