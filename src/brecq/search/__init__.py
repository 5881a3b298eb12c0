"""Mixed-precision bit allocation: per-unit sensitivity, a genetic search, an exact check.

`measure_sensitivity` (torch) measures each unit's output error for candidate bit assignments;
`allocate_bits` turns the table and a budget into per-layer bits with `genetic_search`, checked
against `exact_search` (`brecq.search.solvers`, numpy only). `brecq search-bits` runs both.
"""

from .allocation import Allocation, Problem, allocate_bits
from .config import SearchConfig, parse_bitops_budget, parse_size_budget
from .sensitivity import SensitivityTable, measure_sensitivity
from .solvers import Option, Solution, exact_search, exhaustive_search, genetic_search, pareto_front

__all__ = [
    "Allocation",
    "Option",
    "Problem",
    "SearchConfig",
    "SensitivityTable",
    "Solution",
    "allocate_bits",
    "exact_search",
    "exhaustive_search",
    "genetic_search",
    "measure_sensitivity",
    "parse_bitops_budget",
    "parse_size_budget",
    "pareto_front",
]
