"""The benchmark scripts' own logic: settings chosen on the held-out split, run overrides."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accuracy  # noqa: E402
import tune  # noqa: E402


def test_tune_chooses_best_mean_of_complete_points_and_breaks_ties_to_the_earlier():
    # Point 2 has the best single run but lacks a seed: it must not win on a partial mean.
    assert tune.choose([[80.0, 81.0], [81.0, 80.0], [90.0]], seeds=2) == 0
    assert tune.choose([[80.0, 81.0], [81.0, 81.0]], seeds=2) == 1
    assert tune.choose([[85.0], []], seeds=2) is None


def test_tune_grid_expands_every_combination_in_order():
    study = tune.Study("resnet20", "qdrop", "W2A4", {"weight_lr": [1e-3, 3e-3], "act_lr": [4e-5]})
    assert study.points == [{"weight_lr": 1e-3, "act_lr": 4e-5}, {"weight_lr": 3e-3, "act_lr": 4e-5}]


def test_accuracy_override_parses_json_values_and_names_bad_fields():
    assert accuracy.parse_override("weight_lr=3e-3") == ("weight_lr", 0.003)
    assert accuracy.parse_override("loss=mse") == ("loss", "mse")
    with pytest.raises(argparse.ArgumentTypeError, match="round_lambda"):
        accuracy.parse_override("round_lamda=0.03")


def test_overrides_reach_the_config_and_the_run_identity():
    args = accuracy.build_parser().parse_args(["--set", "round_lambda=0.03", "--seeds", "0"])
    args.overrides = dict(args.overrides)
    args.budget_label, args.iters_w, args.iters_a = "cpu", 2000, 500
    config = accuracy.make_config("brecq-block", "W2A32", 0, args)
    assert config.round_lambda == 0.03 and config.act_bits is None
    with_override = accuracy.base_record("resnet20", "brecq-block", "W2A32", 0, args)
    args.overrides = {}
    plain = accuracy.base_record("resnet20", "brecq-block", "W2A32", 0, args)
    assert accuracy.run_key(with_override) != accuracy.run_key(plain)


def test_tune_spec_errors_name_the_problem_before_any_run(tmp_path):
    spec = tmp_path / "spec.json"
    with pytest.raises(tune.SpecError, match="cannot read"):
        tune.load_spec(spec)
    spec.write_text("{not json")
    with pytest.raises(tune.SpecError, match="not valid JSON"):
        tune.load_spec(spec)
    spec.write_text('{"studies": [{"model": "resnet20", "method": "qdrop", "bits": "W2A4",'
                    ' "grid": {"weight_lrr": [0.001]}}]}')
    with pytest.raises(tune.SpecError, match="weight_lrr"):
        tune.load_spec(spec)
    spec.write_text('{"studies": [{"model": "resnet20", "method": "qdrop", "bits": "W2A4",'
                    ' "grid": {"weight_lr": [0.001, 0.003]}}]}')
    _, studies = tune.load_spec(spec)
    assert len(studies[0].points) == 2


def test_accuracy_refuses_a_bad_override_value_before_running(capsys):
    with pytest.raises(SystemExit) as exc:
        accuracy.main(["--models", "resnet20", "--methods", "rtn", "--bits", "W4A4",
                       "--set", "round_lambda=-1"])
    assert exc.value.code == 2
    assert "round_lambda" in capsys.readouterr().err


def test_model_zoo_row_and_table_for_a_small_model(tmp_path, monkeypatch):
    import model_zoo

    monkeypatch.setattr(sys, "argv", ["model_zoo.py", "--out", str(tmp_path / "zoo"),
                                      "--models", "squeezenet1_1"])
    model_zoo.main()
    row = model_zoo.json.loads((tmp_path / "zoo.jsonl").read_text())
    assert row["quantized"] == row["total"] == 26 and row["recon"] == "yes"
    assert row["float_rel_err"] < 1e-4 and row["cosine"] > 0.9
    assert "| squeezenet1_1 | 1.2 | 4x3x64x64 | 26 / 26 | fx |" in (tmp_path / "zoo.md").read_text()


def test_data_root_comes_from_the_environment_and_missing_data_skips(tmp_path, monkeypatch, capsys):
    import common

    monkeypatch.setenv("BRECQ_DATA_ROOT", str(tmp_path))
    assert common.default_data_root() == tmp_path
    cifar = common.Cifar10.under(tmp_path)
    assert cifar.weights("resnet56") == tmp_path / "weights" / "cifar10" / "resnet56.pt"
    assert accuracy.main(["--models", "resnet20", "--methods", "rtn", "--bits", "W4A4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SKIP:") and str(tmp_path / "data" / "cifar10" / "train") in out
    assert str(cifar.weights("resnet20")) in out


def _accuracy_record(method, overrides=None, split="val", seed=0, top1=78.0):
    """One run as accuracy.py writes it (CPU budget, ResNet-20, W2A4)."""
    return {"model": "resnet20", "method": method, "bits": "W2A4", "seed": seed, "budget": "cpu",
            "eval_split": split, "eval_count_requested": None, "top1": top1, "top5": 98.0,
            "eval_count": 10000, "seconds": 1300.0, "recon_seconds": 1250.0, "device": "cpu",
            "config": {"iters_w": 2000, "iters_a": 500, "calib_size": 1024, "act_lr": None},
            **({"overrides": overrides} if overrides else {}), "host": "vm", "torch_threads": 1}


def test_time_to_accuracy_report_table_and_plot_from_records(tmp_path, capsys):
    import json

    import time_to_accuracy as tta

    with pytest.raises(SystemExit) as exc:
        tta.main(["--help"])
    assert exc.value.code == 0 and "--ladder" in capsys.readouterr().out
    cell = {"model": "resnet20", "bits": "W2A4", "method": "auto", "backend": "none", "settings": {},
            "calib_size": 1024, "device": "cpu", "eval_count_requested": None}
    runs = [{"cell": cell, "label": tta.cell_label(cell), "source": "measured", "budget": budget,
             "seed": seed, "top1": top1, "recon_seconds": secs, "load_average_start": [load, 1, 1]}
            for budget, seed, top1, secs, load in [(250, 0, 76.5, 140.0, 1.0), (250, 1, 77.5, 160.0, 2.0),
                                                   (500, 0, 78.0, 300.0, 1.5)]]
    runs.append({**runs[2], "source": "accuracy_cpu_v2.jsonl", "budget": 2000, "top1": 78.5,
                 "recon_seconds": 1250.0})
    out = tmp_path / "tta.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in runs))
    assert tta.main(["--report-only", "--out", str(out)]) == 0
    table = (tmp_path / "tta.md").read_text()
    assert "| resnet20 W2A4 auto | measured | 250 | 0,1 | 77.00 | 76.50 | 77.50 | 150 | 1.50 |" in table
    assert "| resnet20 W2A4 auto | measured | 500 | 0 | 78.00 | 78.00 | 78.00 | 300 | 1.50 |" in table
    assert "| resnet20 W2A4 auto | accuracy_cpu_v2.jsonl | 2,000 | 0 | 78.50 |" in table
    assert "| resnet20 | W2A4 | QDrop code | 77.79 | about 1,150 |" in table
    assert "| resnet20 | W2A4 | BRECQ code | 75.70 | not measured |" in table
    assert (tmp_path / "tta.png").read_bytes().startswith(b"\x89PNG")


def test_time_to_accuracy_imports_only_the_accuracy_runs_of_the_same_recipe(tmp_path, capsys):
    import json

    import time_to_accuracy as tta

    tuned = {"weight_lr": 3e-3, "act_lr": 1.6e-4}  # what --method auto resolves to at W2A4
    source = tmp_path / "accuracy_x.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in [
        {"model": "resnet20", "method": "fp", "bits": "FP32", "seed": None, "top1": 81.0},
        _accuracy_record("qdrop", tuned, top1=78.3), _accuracy_record("qdrop", top1=77.4),
        _accuracy_record("brecq-block", top1=77.7), _accuracy_record("qdrop", tuned, "holdout"),
    ]))
    out = tmp_path / "tta.jsonl"
    args = ["--bits", "W2A4", "--method", "auto", "--import-jsonl", str(source), "--out", str(out)]
    assert tta.main(args) == 0
    assert tta.main(args) == 0  # a second import copies nothing again
    assert "copied 1 run(s)" in capsys.readouterr().out
    (point,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (point["source"], point["budget"], point["top1"]) == ("accuracy_x.jsonl", 2000, 78.3)
    assert tta.main(["--method", "qdrop", "--import-jsonl", str(source), "--out", str(out)]) == 0
    assert [json.loads(line)["top1"] for line in out.read_text().splitlines()] == [78.3, 77.4]


def test_time_to_accuracy_refuses_fields_its_flags_set_and_skips_without_data(tmp_path, monkeypatch,
                                                                              capsys):
    import time_to_accuracy as tta

    with pytest.raises(SystemExit) as exc:
        tta.main(["--set", "iters_w=100"])
    assert exc.value.code == 2 and "iters_w" in capsys.readouterr().err
    monkeypatch.setenv("BRECQ_DATA_ROOT", str(tmp_path))
    assert tta.main(["--ladder", "250", "--seeds", "0", "--out", str(tmp_path / "t.jsonl")]) == 0
    assert capsys.readouterr().out.startswith("SKIP:")
