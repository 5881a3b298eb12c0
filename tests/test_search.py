"""Mixed-precision search: solvers against exact answers, budgets, sensitivity, the CLI."""

import json
import math

import numpy as np
import pytest
import torch

from brecq.cli import main
from brecq.config import BrecqConfig
from brecq.errors import ConfigError
from brecq.search import (
    Option,
    SearchConfig,
    exact_search,
    exhaustive_search,
    genetic_search,
    measure_sensitivity,
    pareto_front,
    parse_bitops_budget,
    parse_size_budget,
)
from brecq.search.config import read_bits_file
from brecq.search.sensitivity import LayerInfo, candidate_assignments
from test_cli import FAST, TINY, _assert_one_line_error, _make_split

PREP = ["--crop", "32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]
QUICK_SEARCH = ["--sensitivity-samples", "8", "--population", "8", "--generations", "5",
                "--workers", "0", "--device", "cpu"]


def _random_problem(rng: np.random.Generator, groups: int, with_bitops: bool = False):
    """Groups like units: options of more bits are larger and usually (not always) cheaper."""
    problem = []
    for _ in range(groups):
        params = int(rng.integers(1, 6)) * 16
        options = []
        for bits in sorted(rng.choice([2, 3, 4, 6, 8], size=int(rng.integers(1, 5)), replace=False)):
            cost = float(rng.exponential(1.0) / bits**2)
            macs = int(rng.integers(1, 4))
            options.append(Option(size=int(bits) * params, cost=cost,
                                  bitops=int(bits) * 8 * macs * params if with_bitops else 0))
        problem.append(options)
    return problem


def _budget(rng: np.random.Generator, problem) -> int:
    low = sum(min(o.size for o in g) for g in problem)
    high = sum(max(o.size for o in g) for g in problem)
    return int(rng.integers(low, high + 1))


# ----------------------------------------------------------------------------- solvers


@pytest.mark.parametrize("seed", range(12))
def test_exact_solver_matches_exhaustive_and_ga_reaches_it(seed):
    rng = np.random.default_rng(seed)
    problem = _random_problem(rng, groups=int(rng.integers(3, 8)))
    budget = _budget(rng, problem)
    truth = exhaustive_search(problem, budget)
    exact = exact_search(problem, budget)
    assert exact.size <= budget and math.isclose(exact.cost, truth.cost, rel_tol=1e-9)
    ga = genetic_search(problem, budget, population=24, generations=40, seed=seed)
    assert ga.size <= budget
    assert ga.cost <= truth.cost * 1.01 + 1e-12  # the optimum or within 1%
    assert ga.cost >= truth.cost - 1e-12  # it cannot beat the optimum: totals are honest


@pytest.mark.parametrize("seed", range(8))
def test_ga_never_exceeds_size_and_bitops_budgets(seed):
    rng = np.random.default_rng(100 + seed)
    problem = _random_problem(rng, groups=6, with_bitops=True)
    budget = _budget(rng, problem)
    low_ops = sum(min(o.bitops for o in g) for g in problem)
    high_ops = sum(max(o.bitops for o in g) for g in problem)
    ops_budget = int(rng.integers(low_ops, high_ops + 1))
    try:
        truth = exhaustive_search(problem, budget, ops_budget)
    except ConfigError:
        pytest.skip("no configuration fits both budgets in this random draw")
    ga = genetic_search(problem, budget, ops_budget, population=24, generations=40, seed=seed)
    assert ga.size <= budget and ga.bitops <= ops_budget
    assert ga.cost <= truth.cost * 1.02 + 1e-12


def test_ga_is_deterministic_under_a_seed_and_budget_below_minimum_is_an_error():
    problem = _random_problem(np.random.default_rng(7), groups=10)
    budget = _budget(np.random.default_rng(8), problem)
    first = genetic_search(problem, budget, population=16, generations=10, seed=3)
    assert first == genetic_search(problem, budget, population=16, generations=10, seed=3)
    smallest = sum(min(o.size for o in g) for g in problem)
    for solve in (exact_search, genetic_search, exhaustive_search):
        with pytest.raises(ConfigError, match="below the smallest configuration"):
            solve(problem, smallest - 1)


def test_pareto_front_is_monotone_and_each_point_is_optimal():
    problem = _random_problem(np.random.default_rng(11), groups=5)
    front = pareto_front(problem)
    sizes = [p.size for p in front]
    costs = [p.cost for p in front]
    assert sizes == sorted(sizes) and costs == sorted(costs, reverse=True)
    assert len(set(sizes)) == len(sizes)
    for point in front:
        assert math.isclose(exhaustive_search(problem, point.size).cost, point.cost, rel_tol=1e-9)


# ----------------------------------------------------------------------------- budgets and config


def test_size_budget_parsing():
    assert parse_size_budget("3bit").mean_bits == 3.0
    assert parse_size_budget("2.5 bits").mean_bits == 2.5
    assert parse_size_budget("0.1MB").amount == 800_000
    assert parse_size_budget("64KiB").amount == 64 * 1024 * 8
    assert parse_size_budget("5000B").amount == 40_000
    # 2.5bit lies halfway between the uniform 2- and 3-bit sizes.
    assert parse_size_budget("2.5bit").resolve(lambda b: 100 * b + 7) == 257
    assert parse_bitops_budget("2.5G").amount == 2_500_000_000
    assert parse_bitops_budget("3bit").resolve(lambda b: 10 * b) == 30


@pytest.mark.parametrize("text, fragment", [
    ("", "empty"), ("three bits", "not understood"), ("1bit", "outside"), ("9bit", "outside"),
    ("0MB", "not positive"), ("12 parsecs", "not understood"),
])
def test_bad_size_budgets_are_config_errors(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_size_budget(text)


@pytest.mark.parametrize("changes, fragment", [
    ({"candidates": (1, 4)}, "candidate bits"), ({"candidates": ()}, "must list"),
    ({"rounding": "stochastic"}, "unknown"), ({"population": 1}, "population"),
    ({"mutation": 1.5}, "probability"), ({"bitops_budget": "lots"}, "not understood"),
])
def test_search_config_validation(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        SearchConfig(**changes)
    assert SearchConfig(candidates=(8, 2, 4, 2)).candidates == (2, 4, 8)


def test_candidate_pruning_keeps_neighbouring_levels_for_deep_units():
    infos = {n: LayerInfo(params=10, macs=10, fixed_bits=None, rule_bits=None) for n in "abc"}
    assert len(candidate_assignments("abc", infos, (2, 3, 4, 8), 64)) == 64
    pruned = candidate_assignments("abc", infos, (2, 3, 4, 8), 10)
    # Four single-level assignments plus, for each neighbouring pair, 2^3 - 2 mixes.
    assert len(pruned) == 4 + 3 * 6 and (2, 3, 2) in pruned and (2, 4, 2) not in pruned
    infos["b"] = LayerInfo(params=10, macs=10, fixed_bits=8, rule_bits=8)
    assert all(a[1] == 8 for a in candidate_assignments("abc", infos, (2, 4), 64))


def test_bits_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_bits_file(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ConfigError, match="not readable JSON"):
        read_bits_file(bad)
    bad.write_text('{"layers": {"fc": 4}}')
    with pytest.raises(ConfigError, match='no "bits" object'):
        read_bits_file(bad)
    bad.write_text('{"bits": {"fc": 9}}')
    with pytest.raises(ConfigError, match="'fc'"):
        read_bits_file(bad)


# ----------------------------------------------------------------------------- sensitivity


def test_sensitivity_falls_with_more_bits_and_is_cached(tmp_path):
    from _cli_models import tiny_net

    torch.manual_seed(0)
    model = tiny_net().eval()
    samples = torch.randn(16, 3, 16, 16)
    config = BrecqConfig(device="cpu", act_bits=8)
    search = SearchConfig(samples=16, candidates=(2, 8))
    cache = tmp_path / "sens.json"
    table = measure_sensitivity(model, samples, config, search, cache)
    assert [u.layers for u in table.units] and set(table.layers) == {"0", "3.0", "6"}
    for unit in table.units:
        by_bits = dict(zip(unit.assignments, unit.errors))
        low = by_bits[tuple(2 for _ in unit.layers)]
        high = by_bits[tuple(8 for _ in unit.layers)]
        assert high < low, unit.name
    assert table.layers["3.0"].macs == 8 * 8 * 4 * 4 * 9  # 8x8 outputs, 4 channels, 4x3x3 row
    stamp = cache.stat().st_mtime_ns
    again = measure_sensitivity(model, samples, config, search.replace(size_budget="2bit"), cache)
    assert again.to_dict() == table.to_dict() and cache.stat().st_mtime_ns == stamp
    other = measure_sensitivity(model, samples + 0.5, config, search, tmp_path / "other.json")
    assert other.fingerprint != table.fingerprint


def test_sensitivity_fingerprint_ignores_runtime_options_and_the_final_runs_recipe():
    from brecq.search.sensitivity import fingerprint

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    samples = torch.randn(8, 4)
    search = SearchConfig(samples=8, candidates=(2, 4))
    base = BrecqConfig(act_bits=8)
    key = fingerprint(model, samples, base, search)
    for same in ({"device": "cuda", "cache_device": "cpu", "cache_budget_gb": 1.0, "compile": True,
                  "cuda_graph": False, "autocast": "bf16", "channels_last": True,
                  "dist_timeout": 5.0},
                 {"method": "qdrop", "iters_w": 7, "iters_a": 3, "calib_size": 64, "act_lr": 1e-2,
                  "drop_prob": 0.1, "loss": "fisher"}):
        assert fingerprint(model, samples, base.replace(**same), search) == key, same
    for other in ({"first_last_bits": 4}, {"scale_search": "minmax"}, {"granularity": "layer"},
                  {"seed": 1}, {"weight_lr": 3e-3}, {"act_bits": 4}):
        assert fingerprint(model, samples, base.replace(**other), search) != key, other
    assert fingerprint(model, samples, base, search.replace(rounding_iters=5)) != key
    assert fingerprint(model, samples, base, search.replace(size_budget="2bit")) == key


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_images")
    _make_split(root, "train")
    _make_split(root, "val")
    return root


def test_search_bits_cli_end_to_end_and_quantize_with_bits_config(data_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    out = tmp_path / "search"
    cache = tmp_path / "sens.json"
    code = main(["search-bits", "--model", TINY, "--data", str(data_dir), *PREP, *QUICK_SEARCH,
                 "--size-budget", "3bit", "--sensitivity-cache", str(cache), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Chosen:" in captured.out and "bits.json" in captured.out
    result = json.loads((out / "bits.json").read_text())
    bits = result["bits"]
    assert set(bits) == {"0", "3.0", "6"}  # every weight layer is named
    assert result["search"]["size_bits"] <= result["search"]["budget_bits"]
    assert (out / "pareto.png").stat().st_size > 1000
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["front"] and {p["bits"] for p in pareto["uniform"]} >= {2, 3, 4, 8}

    # Another budget reuses the sensitivity table (the same random tiny model again).
    stamp = cache.stat().st_mtime_ns
    torch.manual_seed(0)
    assert main(["search-bits", "--model", TINY, "--data", str(data_dir), *PREP, *QUICK_SEARCH,
                 "--size-budget", "2bit", "--sensitivity-cache", str(cache),
                 "--out", str(tmp_path / "two")]) == 0
    capsys.readouterr()
    assert cache.stat().st_mtime_ns == stamp
    two = json.loads((tmp_path / "two" / "bits.json").read_text())
    assert two["search"]["size_bits"] <= two["search"]["budget_bits"] < result["search"]["budget_bits"]

    run = tmp_path / "run"
    code = main(["quantize", "--model", TINY, "--data", str(data_dir), *PREP, *FAST,
                 "--skip-fp-eval", "--bits-config", str(out / "bits.json"),
                 "--layer-bits", '{"6": 5}', "--out", str(run)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((run / "report.json").read_text())
    assert report["config"]["layer_bits"] == {**bits, "6": 5}  # --layer-bits overrides the file


def test_bits_config_errors_are_one_line(data_dir, tmp_path, capsys):
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"bits": {"0": 4, "conv9": 4}}))
    code = main(["quantize", "--model", TINY, "--data", str(data_dir), *PREP, *FAST,
                 "--bits-config", str(unknown), "--out", str(tmp_path / "x")])
    _assert_one_line_error(code, capsys.readouterr().err, "'conv9'")
    code = main(["quantize", "--model", TINY, "--data", str(data_dir), *PREP, *FAST,
                 "--bits-config", str(tmp_path / "missing.json")])
    _assert_one_line_error(code, capsys.readouterr().err, "does not exist")
    code = main(["search-bits", "--model", TINY, "--data", str(data_dir), *PREP, *QUICK_SEARCH,
                 "--size-budget", "tiny", "--out", str(tmp_path / "y")])
    _assert_one_line_error(code, capsys.readouterr().err, "not understood")
