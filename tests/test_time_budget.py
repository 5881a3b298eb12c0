"""--time-budget (splitting a budget over units and passes) and --holdout-patience (per-unit
early stopping on a held-out slice of the cache): the pure rules alone, then small runs."""

import argparse
import json
import math

import pytest
import torch
import torch._dynamo  # noqa: F401 - the first optimizer imports it (seconds), not a run's budget
from torch import nn

from brecq import BrecqConfig, ConfigError, quantize
from brecq.cli.flags import add_config_arguments, config_from_args
from brecq.recon import budget as budget_module
from brecq.recon.budget import TimeBudget, Work, split_budget
from brecq.recon.checkpoint import CHECKPOINT_FILE
from brecq.recon.early_stop import PlateauStop, compressed_positions, final_anneal_steps, holdout_size

# ----------------------------------------------------------------------------- split_budget


def test_budget_is_split_in_proportion_to_the_configured_iterations():
    work = [Work(1000, 0.01), Work(500, 0.01), Work(1000, 0.02)]
    # All configured: 10 + 5 + 20 = 35 s; half of it gives each half of its iterations.
    assert split_budget(17.5, work, floor=10) == [500, 250, 500]
    assert split_budget(100.0, work, floor=10) == [1000, 500, 1000]  # never more than configured


def test_overheads_come_off_the_budget_first():
    work = [Work(1000, 0.01, overhead=2.0), Work(1000, 0.01, overhead=3.0)]
    assert split_budget(15.0, work, floor=10) == [500, 500]


def test_a_pass_never_gets_fewer_than_the_floor_and_the_others_pay_for_it():
    work = [Work(100, 0.01), Work(1000, 0.01)]
    # 2 s at the same fraction would give [18, 181]; the first is held at 50 instead.
    counts = split_budget(2.0, work, floor=50)
    assert counts[0] == 50
    assert counts[1] == 150
    assert sum(c * 0.01 for c in counts) <= 2.0 + 1e-9
    assert split_budget(2.0, [Work(20, 0.01), Work(1000, 0.01)], floor=50)[0] == 20  # all it has


def test_when_floors_do_not_fit_the_rest_falls_back_to_round_to_nearest():
    work = [Work(1000, 0.01), Work(1000, 0.01), Work(1000, 0.01)]
    assert split_budget(1.2, work, floor=50) == [50, 50, 0]
    assert split_budget(0.2, work, floor=50) == [0, 0, 0]


def test_the_plan_is_made_again_with_the_time_actually_left():
    now = [0.0]
    queue = [(("joint", k), 1000) for k in range(3)]
    budget = TimeBudget(30.0, queue, clock=lambda: now[0], floor=50)
    first = budget.plan(("joint", 0), seconds_per_iteration=0.01, elapsed=0.0)
    assert first == int(1000 * 30 * (1 - budget_module.RESERVE) / 30)
    # The first unit was slower than measured: the next ones get less.
    now[0] = 20.0
    budget.finish(("joint", 0), first, 20.0, 0.01)
    second = budget.plan(("joint", 1), seconds_per_iteration=0.01, elapsed=0.0)
    assert 50 <= second < first
    # Out of time: round to nearest from here on, and it stays so.
    now[0] = 29.99
    budget.finish(("joint", 1), second, 9.99, 0.01)
    assert budget.plan(("joint", 2)) == 0
    assert budget.out_of_time and budget.summary()["out_of_time"]


def test_units_not_measured_yet_are_estimated_from_their_relative_cost():
    budget = TimeBudget(100.0, [(("joint", 0), 100), (("joint", 1), 100)], clock=lambda: 0.0)
    budget.unit_weights = {0: 1.0, 1: 3.0}
    assert budget._cost(("joint", 1), (("joint", 0), 0.01)) == pytest.approx(0.03)


# ----------------------------------------------------------------------------- early stopping


def test_plateau_stop_keeps_going_while_the_loss_falls():
    stop = PlateauStop(patience=2)
    assert not any(stop.update(1.0 / (1 + k)) for k in range(50))


def test_plateau_stop_stops_a_flat_or_rising_curve_after_its_patience():
    stop = PlateauStop(patience=3)
    curve = [1.0, 0.5, 0.3, 0.2999, 0.31, 0.30]
    decisions = [stop.update(v) for v in curve]
    assert decisions == [False, False, False, False, False, True]


def test_holdout_is_a_sixteenth_at_least_a_batch_at_most_half():
    assert holdout_size(1024, 32) == 64
    assert holdout_size(256, 32) == 32
    assert holdout_size(40, 32) == 20


def test_final_anneal_covers_the_rest_of_the_schedule_up_to_its_end():
    positions = compressed_positions(300, 1000, 100)
    assert positions[0] == 300 and positions[-1] == 999 and len(positions) == 100
    assert positions == sorted(positions)
    assert final_anneal_steps(2000, 1500) == 200
    assert final_anneal_steps(100, 5) == 5


# ----------------------------------------------------------------------------- config and flag


@pytest.mark.parametrize("text, seconds", [("90s", 90.0), ("2m", 120.0), ("45", 45.0),
                                           ("1.5m", 90.0)])
def test_time_budget_flag_takes_seconds_or_minutes(text, seconds):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    config = config_from_args(parser.parse_args(["--time-budget", text]))
    assert config.time_budget == seconds
    assert config.recipe.time_budget == seconds


@pytest.mark.parametrize("text", ["ninety", "5x", "-1", "0"])
def test_bad_time_budgets_are_refused(text, capsys):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    with pytest.raises((SystemExit, ConfigError)):
        config_from_args(parser.parse_args(["--time-budget", text]))


def test_time_budget_round_trips_through_json_as_seconds():
    config = BrecqConfig(time_budget="5m", holdout_patience=3)
    assert config.time_budget == 300.0
    data = json.loads(config.to_json())
    assert data["time_budget"] == 300.0 and data["holdout_patience"] == 3
    assert BrecqConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="holdout_patience"):
        BrecqConfig(holdout_patience=-1)


# ----------------------------------------------------------------------------- runs


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()
    return model, torch.randn(64, 3, 8, 8)


BASE = dict(weight_bits=2, act_bits=4, calib_size=64, batch_size=16, act_init_samples=8,
            device="cpu", seed=0, method="qdrop")


def _hard_rounded(qmodel):
    quantizers = [q for layer in qmodel.layers.values() for _, _, q in layer.weight_quantizers()]
    return all(not q.soft for q in quantizers) and any(q.alpha is not None for q in quantizers)


def test_a_budgeted_run_ends_within_its_budget_hard_rounded_with_its_report():
    model, calib = _tiny()
    budget = 4.0
    config = BrecqConfig(**BASE, iters_w=100_000, time_budget=budget)
    qmodel, report = quantize(model, calib, config)
    # The plan follows measured step times, so a loaded machine can overrun a little; the 100,000
    # configured iterations would take minutes, so twice the budget still tells the two apart.
    assert report.recon_seconds <= 2 * budget
    assert report.time_budget["seconds"] == budget
    assert report.time_budget["spent"] <= 2 * budget
    ran = [u.iterations for u in report.units]
    assert all(0 <= n < 100_000 for n in ran) and ran[0] >= budget_module.MIN_ITERATIONS
    assert _hard_rounded(qmodel)
    assert json.loads(json.dumps(report.to_dict()))["time_budget"]["seconds"] == budget
    assert torch.isfinite(qmodel(calib[:4])).all()


def test_holdout_early_stopping_ends_a_flat_unit_before_its_iterations():
    model, calib = _tiny()
    config = BrecqConfig(**BASE, iters_w=500, holdout_patience=1, beta_start=2.0, warmup=0.0)
    qmodel, report = quantize(model, calib, config)
    ran = [u.iterations for u in report.units]
    assert min(ran) < 500, ran
    assert _hard_rounded(qmodel)


def test_a_resumed_budgeted_run_uses_the_budget_left(tmp_path):
    model, calib = _tiny()
    config = BrecqConfig(**BASE, iters_w=200, time_budget=60.0)
    quantize(model, calib, config, checkpoint_dir=tmp_path)
    path = tmp_path / CHECKPOINT_FILE
    payload = torch.load(path, weights_only=True)
    assert 0 < payload["budget_spent"] < 60.0
    # As if killed after the first joint unit with the budget spent.
    keep = payload["done"].index("joint:0") + 1
    payload["done"] = payload["done"][:keep]
    payload["report_units"] = payload["report_units"][:1]
    payload["budget_spent"] = 60.0
    torch.save(payload, path)
    qmodel, report = quantize(model, calib, config, checkpoint_dir=tmp_path, resume=True)
    resumed = report.units[1:]
    assert resumed and all(u.iterations == 0 and "round-to-nearest" in u.note for u in resumed)
    assert all(math.isnan(u.loss_after) for u in resumed)
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False))["units"][-1]["loss_after"] is None
    assert report.time_budget["spent"] >= 60.0 and report.time_budget["out_of_time"]
    assert _hard_rounded(qmodel)


# ----------------------------------------------------------------------------- benchmark ladder


def test_time_to_accuracy_takes_a_ladder_of_time_budgets(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import time_to_accuracy as tta

    parser = tta.build_parser()
    args = parser.parse_args(["--budgets", "120s,200s,5m", "--time-iters", "1000"])
    cell = tta.check_cell(parser, args)
    assert args.ladder == [120, 200, 300]
    config = tta.make_config(cell, 200, seed=1)
    assert (config.time_budget, config.iters_w, config.iters_a) == (200.0, 1000, 250)
    assert "time budget" in tta.cell_label(cell) and tta.budget_text(cell, 200) == "200s"
    # Iteration ladders are unchanged: no time budget, the same cell as before.
    plain = tta.check_cell(parser, parser.parse_args(["--ladder", "500"]))
    assert "time_budget_iters" not in plain and tta.make_config(plain, 500, 0).time_budget is None
    runs = [{"cell": cell, "label": tta.cell_label(cell), "source": "measured", "budget": 120,
             "seed": 0, "top1": 77.0, "recon_seconds": 118.0, "load_average_start": [1.0, 1, 1]}]
    tta.write_markdown(runs, tmp_path / "t.md")
    assert "| measured | 120s | 0 | 77.00 |" in (tmp_path / "t.md").read_text()
    with pytest.raises(SystemExit):
        parser.parse_args(["--budgets", "soon"])
