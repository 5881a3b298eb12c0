"""The benchmark scripts' own logic: settings chosen on the held-out split, run overrides."""

import argparse
import sys
from pathlib import Path

import pytest
import torch

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
    runs[2]["quantize_cpu_seconds"] = 120.0  # recorded by newer runs only
    runs.append({**runs[2], "source": "accuracy_cpu_v2.jsonl", "budget": 2000, "top1": 78.5,
                 "recon_seconds": 1250.0})
    out = tmp_path / "tta.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in runs))
    assert tta.main(["--report-only", "--out", str(out)]) == 0
    table = (tmp_path / "tta.md").read_text()
    assert "| resnet20 W2A4 auto | measured | 250 | 0,1 | 77.00 | 76.50 | 77.50 | 150 |  | 1.50 |" in table
    assert "| resnet20 W2A4 auto | measured | 500 | 0 | 78.00 | 78.00 | 78.00 | 300 | 120 | 1.50 |" in table
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


# ----------------------------------------------------------------------------- transformer benchmarks


def test_cifar_vit_help_refusals_and_skip_without_data(tmp_path, monkeypatch, capsys):
    import cifar_vit

    with pytest.raises(SystemExit) as exc:
        cifar_vit.main(["--help"])
    assert exc.value.code == 0 and "--set" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cifar_vit.main(["--set", "weight_bits=2"])  # --bits sets it
    assert exc.value.code == 2 and "weight_bits" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cifar_vit.main(["--methods", "adaroun"])
    assert exc.value.code == 2 and "adaroun" in capsys.readouterr().err
    monkeypatch.setenv("BRECQ_DATA_ROOT", str(tmp_path))
    assert cifar_vit.main(["--out", str(tmp_path / "v.jsonl"), "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("SKIP:")
    assert not (tmp_path / "v.jsonl").exists()


def test_cifar_vit_augment_crops_and_flips_without_changing_values():
    import cifar_vit

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    out = cifar_vit.augment(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    kept = set(out[out != 0].tolist())  # zeros come from the padding only
    assert kept <= set(x.flatten().tolist()) and len(kept) >= 2 * 3 * 6 * 6
    same = cifar_vit.augment(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, same)


def _tiny_cifar(root, per_class=2):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = root / "data" / "cifar10" / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{k}.png")


def test_cifar_vit_trains_caches_and_quantizes_a_tiny_run(tmp_path, capsys):
    pytest.importorskip("timm")
    import json

    import cifar_vit

    _tiny_cifar(tmp_path)
    out = tmp_path / "vit.jsonl"
    args = ["--data-root", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
            "--methods", "fp,rtn", "--bits", "W8A8", "--calib-size", "4", "--out", str(out)]
    assert cifar_vit.main(args) == 0
    (weights,) = (tmp_path / "cache").glob("cifar_vit_*.pt")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["bits"]) for r in rows] == [("fp", "FP32"), ("rtn", "W8A8")]
    assert rows[1]["weight_quantizers"] > 0 and 0 <= rows[1]["top1"] <= 100
    table = (tmp_path / "vit.md").read_text()
    assert "| rtn | 500 | 4 | 0 | none | 4 |" in table
    assert cifar_vit.main(args) == 0  # cached weights, every run done: nothing runs again
    assert len(out.read_text().splitlines()) == 2
    assert weights.stat().st_mtime_ns == next((tmp_path / "cache").glob("cifar_vit_*.pt")).stat().st_mtime_ns
    capsys.readouterr()


def test_minilm_help_sentences_and_skip_without_the_model(tmp_path, monkeypatch, capsys):
    import minilm

    with pytest.raises(SystemExit) as exc:
        minilm.main(["--help"])
    assert exc.value.code == 0 and "--wrapper" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        minilm.main(["--set", "iters_w=10"])
    assert exc.value.code == 2 and "iters_w" in capsys.readouterr().err
    sents = minilm.sentences()
    assert len(sents) > 1000 and len(set(sents)) == len(sents)
    calib, held = minilm.split_halves(sents, 0)
    assert not set(calib) & set(held) and abs(len(calib) - len(held)) <= 1
    assert minilm.split_halves(sents, 0) == (calib, held) != minilm.split_halves(sents, 1)
    monkeypatch.setattr(minilm, "model_zip", lambda: None)
    assert minilm.main(["--out", str(tmp_path / "m.jsonl")]) == 0
    assert "SKIP:" in capsys.readouterr().out and not (tmp_path / "m.jsonl").exists()


def test_minilm_pooling_ignores_padding_and_fidelity_of_identical_embeddings_is_perfect():
    import minilm

    hidden = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    padded = hidden.clone()
    padded[0, 2:] = 1e3  # what a padding position holds must not matter
    emb = minilm.mean_pooled(padded, mask)
    assert torch.allclose(emb[0], torch.nn.functional.normalize(hidden[0, :2].mean(0), dim=0))
    ref = torch.nn.functional.normalize(torch.randn(10, 8), dim=1)
    assert minilm.fidelity(ref, ref)["nn_agreement"] == 100.0
    noisy = minilm.fidelity(torch.nn.functional.normalize(ref + torch.randn(10, 8), dim=1), ref)
    assert noisy["cosine_mean"] < 0.99


def test_minilm_layer_by_layer_wrapper_matches_the_hugging_face_model():
    transformers = pytest.importorskip("transformers")
    import minilm

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     attn_implementation="eager")
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    tokens = torch.stack([ids, mask], 1)
    with torch.no_grad():
        want = minilm.StackedInputs(model)(tokens)
        got = minilm.LayerByLayer(model)(tokens)
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-5)


def test_step_cost_refuses_bad_iteration_pairs_and_skips_without_data(tmp_path, capsys):
    import step_cost

    with pytest.raises(SystemExit):
        step_cost.main(["--iters", "210,10", "--data-root", str(tmp_path)])
    assert "two increasing counts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        step_cost.main(["--set", "weight_bits=3", "--data-root", str(tmp_path)])
    assert "weight_bits" in capsys.readouterr().err
    assert step_cost.main(["--data-root", str(tmp_path)]) == 0
    assert "SKIP:" in capsys.readouterr().out


def test_onnx_latency_redraw_keeps_quantize_statics_quantizer_and_moves_only_the_rounding(tmp_path):
    """The re-draw behind the W8A8 chance figures: with no spread it is quantize_static's model;
    with 1% it rounds some weights the other way, each still within one step of its float value."""
    pytest.importorskip("onnxruntime.quantization")
    import numpy as np
    import onnx
    from onnx import numpy_helper

    import onnx_latency

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 6 * 6, 4))
    float_path = onnx_latency._export_float(net, tmp_path / "float.onnx", (3, 8, 8))
    static = onnx_latency._quantize_static(float_path, tmp_path / "static.onnx",
                                           torch.randn(64, 3, 8, 8))

    def tensors(path: Path) -> dict:
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}

    rng = np.random.default_rng(0)
    original, floats = tensors(static), tensors(float_path)
    same = tensors(onnx_latency._redraw_weight_rounding(static, float_path, tmp_path / "a.onnx",
                                                        rng, spread=0.0))
    codes = [name for name in original if name.endswith("_quantized")]
    assert len(codes) == 4  # the conv's and the linear's weights and biases
    for name in codes:  # float ties may round either way: at most one code apart
        assert np.abs(same[name].astype(np.int64) - original[name]).max() <= 1
    moved = tensors(onnx_latency._redraw_weight_rounding(static, float_path, tmp_path / "b.onnx",
                                                         rng, spread=0.01))
    changed = 0
    for weight in ("0.weight", "3.weight"):
        scale = moved[weight + "_scale"]
        ratio = scale / original[weight + "_scale"]
        assert ((ratio >= 1) & (ratio < 1.01 + 1e-6)).all()
        shape = (-1,) + (1,) * (floats[weight].ndim - 1)
        dequantized = moved[weight + "_quantized"] * scale.reshape(shape)
        assert (np.abs(dequantized - floats[weight]) <= 0.5 * scale.reshape(shape) + 1e-7).all()
        changed += int((moved[weight + "_quantized"] != original[weight + "_quantized"]).sum())
        bias = weight.replace("weight", "bias")  # int32 bias step = input step x weight step
        bias_scale = moved[bias + "_quantized_scale"]
        np.testing.assert_allclose(bias_scale / original[bias + "_quantized_scale"], ratio, rtol=1e-5)
        assert (np.abs(moved[bias + "_quantized"] * bias_scale - floats[bias])
                <= 0.5 * bias_scale + 1e-7).all()
    assert changed > 0
