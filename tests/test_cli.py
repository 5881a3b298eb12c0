"""The command line: generated config flags, quantize / eval / info, and one-line errors."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from brecq import BrecqConfig
from brecq.cli import build_parser, config_from_args, main

HERE = Path(__file__).resolve().parent
TINY = f"{HERE / '_cli_models.py'}:tiny_net"
SHARED = Path(__file__).resolve().parents[2] / "shared"
FAST = ["--iters-w", "2", "--iters-a", "2", "--calib-size", "8", "--batch-size", "4",
        "--act-init-samples", "4", "--workers", "0", "--device", "cpu", "--allow-class-mismatch"]


def _make_split(root: Path, split: str, classes=("cat", "dog"), per_class: int = 6,
                mode: str = "RGB") -> None:
    gen = torch.Generator().manual_seed(len(split))
    for c, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8)
            pixels[..., c % 3] = 255 - 20 * i  # a class-dependent colour channel
            Image.fromarray(pixels.numpy()).convert(mode).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    _make_split(root, "train")
    _make_split(root, "val")
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    # These runs are tiny; on a busy CI machine extra OpenMP threads only spin and slow them down.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "brecq", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def _parse(*argv: str, command: str = "quantize") -> BrecqConfig:
    args = build_parser().parse_args([command, *argv])
    return config_from_args(args)


def _assert_one_line_error(code: int, err: str, fragment: str = "") -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("brecq: error: "), err
    assert "Traceback" not in err
    assert fragment.lower() in lines[0].lower(), lines[0]


# ----------------------------------------------------------------------------- flags -> config


def test_flags_map_to_config_fields():
    assert _parse() == BrecqConfig()
    cfg = _parse("--w-bits", "2", "--a-bits", "32", "--method", "qdrop", "--w-symmetric",
                 "--layer-bits", '{"conv1": 8}', "--units", "layer1.0, layer1.1",
                 "--first-last-bits", "none", "--a-lr", "1e-4", "--iters-w", "7")
    assert cfg.weight_bits == 2 and cfg.act_bits is None and cfg.label == "W2A32"
    assert cfg.method == "qdrop" and cfg.weight_symmetric is True
    assert cfg.layer_bits == {"conv1": 8}
    assert cfg.unit_names == ("layer1.0", "layer1.1")
    assert cfg.first_last_bits is None and cfg.act_lr == 1e-4 and cfg.iters_w == 7
    assert _parse("--a-bits", "none").act_bits is None
    assert _parse("--a-bits", "4").act_bits == 4


def test_every_config_field_has_a_generated_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["quantize"].format_help()
    import dataclasses

    for field in dataclasses.fields(BrecqConfig):
        assert field.metadata["flag"] in help_text, field.name
    assert "--no-w-symmetric" in help_text  # booleans can also switch a --config value off


def test_config_file_is_merged_and_flags_win(tmp_path):
    path = tmp_path / "cfg.json"
    BrecqConfig(weight_bits=3, iters_w=11, weight_symmetric=True).to_json(path)
    cfg = _parse("--config", str(path), "--iters-w", "5", "--no-w-symmetric")
    assert cfg.weight_bits == 3 and cfg.iters_w == 5 and cfg.weight_symmetric is False
    partial = tmp_path / "partial.json"
    partial.write_text('{"granularity": "layer"}')
    cfg = _parse("--config", str(partial), "--a-bits", "6")
    assert cfg.granularity == "layer" and cfg.act_bits == 6 and cfg.weight_bits == 4


# ----------------------------------------------------------------------------- errors


def _bad_cases(data_dir: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty_class"
    _make_split(empty, "train")
    _make_split(empty, "val")
    (empty / "train" / "zebra").mkdir()
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    base = ["quantize", "--model", "cifar_resnet20", "--data", str(data_dir), *FAST,
            "--out", str(tmp_path / "out")]
    return {
        "missing data folder": (["quantize", "--model", "cifar_resnet20", "--data",
                                 str(tmp_path / "nowhere"), *FAST], "does not exist"),
        "empty class folder": (["quantize", "--model", "cifar_resnet20", "--data", str(empty),
                                *FAST], "empty"),
        "unknown model": (["quantize", "--model", "resnet19x", "--data", str(data_dir)],
                          "unknown model"),
        "one-bit weights": ([*base, "--w-bits", "1"], "weight_bits=1"),
        "mismatched checkpoint": ([*base, "--weights", str(wrong)], "does not match"),
        "missing checkpoint": ([*base, "--weights", str(tmp_path / "none.pt")], "does not exist"),
        "bad config JSON": ([*base, "--config", str(bad_json)], "not valid JSON"),
        "bad layer-bits JSON": ([*base, "--layer-bits", "{conv1: 8}"], "not valid JSON"),
        "bad choice": ([*base, "--method", "magic"], "invalid choice"),
        "resume": ([*base, "--resume", str(tmp_path / "no-run-here")], "--resume"),  # not a folder
        "model without data": (["quantize", "--model", "cifar_resnet20"], "--data"),
    }


@pytest.mark.parametrize("case", [
    "missing data folder", "empty class folder", "unknown model", "one-bit weights",
    "mismatched checkpoint", "missing checkpoint", "bad config JSON", "bad layer-bits JSON",
    "bad choice", "resume", "model without data",
])
def test_bad_input_is_one_line_and_exit_2(case, data_dir, tmp_path, capsys):
    argv, fragment = _bad_cases(data_dir, tmp_path)[case]
    code = main(argv)
    _assert_one_line_error(code, capsys.readouterr().err, fragment)


def test_errors_have_no_traceback_in_a_real_process(data_dir, tmp_path):
    cases = _bad_cases(data_dir, tmp_path)
    for case in ("unknown model", "one-bit weights", "missing data folder"):
        argv, fragment = cases[case]
        proc = _run(*argv)
        _assert_one_line_error(proc.returncode, proc.stderr, fragment)
        assert proc.stdout == ""


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    import brecq.cli.info as info_command

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(info_command, "run", interrupted)
    assert main(["info", "--model", "cifar_resnet20"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["brecq: interrupted"]


# ----------------------------------------------------------------------------- quantize


def test_quantize_end_to_end(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = _run("quantize", "--model", "cifar_resnet20", "--data", str(data_dir), *FAST,
                "--w-bits", "4", "--a-bits", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Method: QDrop (auto: activations below 8 bits), W4A4: ")
    assert lines[1].startswith("Full-precision accuracy: ")
    assert lines[2].startswith("Quantized accuracy before reconstruction (round-to-nearest, W4A4): ")
    assert lines[3].startswith("Weight quantization accuracy: ")
    assert lines[4].startswith("Full quantization (W4A4) accuracy: ")
    report = json.loads((out / "report.json").read_text())
    for key in ("config", "model", "accuracy", "units", "timing", "peak_memory", "device"):
        assert key in report, key
    assert report["config"] == BrecqConfig(
        weight_bits=4, act_bits=4, iters_w=2, iters_a=2, calib_size=8, batch_size=4,
        act_init_samples=4, device="cpu").resolved().to_dict()
    assert report["config"]["method"] == "qdrop" and report["method"].startswith("QDrop (auto")
    assert report["model"]["name"] == "cifar_resnet20" and report["model"]["weights"] is None
    assert report["model"]["preprocessing"]["crop"] == 32
    for key in ("fp", "before", "weight_only", "full"):
        assert 0.0 <= report["accuracy"][key] <= 100.0, key
    names = [u["name"] for u in report["units"]]
    assert "layer1.0" in names and "layer3.2" in names
    phases = {u["phase"] for u in report["units"]}
    assert phases == {"joint"}
    for unit in report["units"]:
        assert set(unit) >= {"name", "kind", "phase", "layers", "params", "loss_before",
                             "loss_after", "seconds"}
    assert report["timing"]["total_seconds"] >= report["timing"]["recon_seconds"] > 0
    assert report["peak_memory"]["host_rss_mb"] > 10
    assert report["peak_memory"]["device_mb"] is None and report["device"] == "cpu"
    assert report["data"]["eval_images"] == 12 and report["data"]["calib_images"] == 8


def test_quantize_weight_only_callable_model(data_dir, tmp_path, capsys):
    out = tmp_path / "w2"
    code = main(["quantize", "--model", TINY, "--data", str(data_dir), *FAST,
                 "--crop", "32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
                 "--w-bits", "2", "--a-bits", "32", "--granularity", "layer",
                 "--eval-size", "5", "--skip-fp-eval", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Full-precision" not in captured.out
    assert "(round-to-nearest, W2A32)" in captured.out
    assert "Weight quantization accuracy" in captured.out
    assert "Full quantization" not in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"]["fp"] is None and report["accuracy"]["full"] is None
    assert report["config"]["act_bits"] is None
    assert report["data"]["eval_images"] == 5
    assert report["model"]["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert {u["phase"] for u in report["units"]} == {"weights"}


def test_callable_model_without_preprocessing_is_an_error(data_dir, capsys):
    code = main(["quantize", "--model", TINY, "--data", str(data_dir), *FAST])
    _assert_one_line_error(code, capsys.readouterr().err, "--crop")


def test_quantized_model_is_saved_and_evaluated(data_dir, tmp_path, capsys):
    pytest.importorskip("brecq.export.artifact")
    out = tmp_path / "saved"
    assert main(["quantize", "--model", "cifar_resnet20", "--data", str(data_dir), *FAST,
                 "--skip-fp-eval", "--out", str(out)]) == 0
    first = capsys.readouterr().out
    full = float(first.split("Full quantization (W4A8) accuracy: ")[1].split()[0])
    assert (out / "report.json").is_file()
    assert main(["eval", "--quantized", str(out), "--data", str(data_dir), "--workers", "0",
                 "--device", "cpu", "--allow-class-mismatch"]) == 0
    text = capsys.readouterr().out
    assert f"Top-1 accuracy: {full:.2f}" in text


# ----------------------------------------------------------------------------- eval and info


def test_eval_full_precision(data_dir, capsys):
    assert main(["eval", "--model", "cifar_resnet20", "--data", str(data_dir), "--workers", "0",
                 "--device", "cpu", "--eval-size", "4", "--allow-class-mismatch"]) == 0
    out = capsys.readouterr().out
    assert "Top-1 accuracy: " in out and "Top-5 accuracy: " in out and "Images: 4" in out


def test_eval_needs_model_or_quantized(data_dir, capsys):
    _assert_one_line_error(main(["eval", "--data", str(data_dir)]), capsys.readouterr().err,
                           "--quantized")


def test_info_lists_cifar_resnet20_units(capsys):
    assert main(["info", "--model", "cifar_resnet20", "--w-bits", "2", "--a-bits", "4"]) == 0
    out = capsys.readouterr().out
    for stage in (1, 2, 3):
        for block in range(3):
            assert f"layer{stage}.{block}" in out
    assert "First layers: conv1" in out and "Last layers:  linear" in out
    assert "W2A4" in out and "21 quantized layers" not in out
    assert main(["info", "--model", "cifar_resnet20", "--granularity", "stage"]) == 0
    out = capsys.readouterr().out
    rows = out.split("reconstruction units:")[1].strip().splitlines()[2:]  # after header, rule
    assert [row.split()[1] for row in rows] == ["conv1", "layer1", "layer2", "layer3", "linear"]


def test_info_with_input_size_and_layer_bits(capsys):
    assert main(["info", "--model", TINY, "--input-size", "3,16,16",
                 "--layer-bits", '{"3.0": 3}', "--granularity", "layer", "--layers"]) == 0
    out = capsys.readouterr().out
    assert "input 3x16x16" in out
    assert "3.0" in out and "3 bits" in out
    code = main(["info", "--model", TINY, "--layer-bits", '{"nope": 3}', "--input-size", "3,8,8"])
    _assert_one_line_error(code, capsys.readouterr().err, "nope")


# ----------------------------------------------------------------------------- demo


@pytest.fixture
def demo_cache(request, monkeypatch) -> Path:
    cache = request.config.cache.mkdir("brecq-demo")  # trained once, reused by later runs
    monkeypatch.setenv("BRECQ_CACHE", str(cache))
    return cache


def test_demo_runs_offline_with_few_iterations(demo_cache, tmp_path, capsys):
    start = time.perf_counter()
    code = main(["quantize", "--iters-w", "20", "--iters-a", "10", "--act-init-samples", "64",
                 "--method", "brecq", "--out", str(tmp_path / "demo")])
    seconds = time.perf_counter() - start
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out
    assert "Full-precision accuracy: " in out
    assert "W4A4 round-to-nearest accuracy" in out and "W2A4 BRECQ accuracy" in out
    assert "QDrop" not in out
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["demo"] is True and report["config"]["iters_w"] == 20
    assert [r["bits"] + r["method"] for r in report["accuracy"]["runs"]] == [
        "W4A4rtn", "W4A4brecq", "W2A4rtn", "W2A4brecq"]
    assert report["accuracy"]["fp"] > 95
    print(f"demo with reduced iterations: {seconds:.1f}s")


@pytest.mark.slow
def test_full_demo_beats_round_to_nearest(demo_cache, tmp_path, capsys):
    start = time.perf_counter()
    assert main(["quantize", "--out", str(tmp_path / "demo")]) == 0
    seconds = time.perf_counter() - start
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    acc = {(r["bits"], r["method"]): r["top1"] for r in report["accuracy"]["runs"]}
    assert acc[("W2A4", "brecq")] > acc[("W2A4", "rtn")] + 1.0, acc
    assert seconds < 240, seconds  # 3 minutes on an idle 2-core machine, with some slack


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_cifar_resnet20_matches_reference_accuracy(tmp_path):
    weights = SHARED / "weights" / "cifar10" / "resnet20.pt"
    data = SHARED / "data" / "cifar10"
    if not weights.is_file() or not (data / "val").is_dir():
        pytest.skip(f"../shared with CIFAR-10 data and weights is not present at {SHARED}")
    proc = _run("quantize", "--model", "cifar_resnet20", "--weights", str(weights),
                "--data", str(data), "--w-bits", "4", "--a-bits", "4", "--iters-w", "500",
                "--iters-a", "200", "--out", str(tmp_path / "r20"), timeout=3600)
    assert proc.returncode == 0, proc.stderr
    assert "Full-precision accuracy: 81.03" in proc.stdout
    report = json.loads((tmp_path / "r20" / "report.json").read_text())
    assert report["accuracy"]["full"] > report["accuracy"]["before"]
