"""`brecq bench` and `brecq quantize --export onnx`: onnxruntime latency, size and top-1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")

FAST = ["--iters-w", "2", "--iters-a", "2", "--calib-size", "8", "--batch-size", "4",
        "--act-init-samples", "4", "--workers", "0", "--device", "cpu"]
BENCH = ["--bench-runs", "3", "--bench-batch", "4", "--bench-warmup", "1"]
TINY = [str(Path(__file__).with_name("_cli_models.py")) + ":tiny_net", "--crop", "32",
        "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(5):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8)
                pixels[..., c] = 255
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "brecq", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def _check(result: dict, images: int | None) -> None:
    for batch in ("batch_1", "batch_4"):
        timing = result["latency_ms"][batch]
        for model in ("float", "quantized"):
            assert 0 < timing[model]["min_ms"] <= timing[model]["median_ms"]
        assert timing["speedup_min"] > 0
    assert result["runs"] == 3 and result["threads"] == 1
    assert result["size_bytes"]["quantized"] > 0 and result["size_bytes"]["float"] > 0
    assert result["float_compute_ops_left"] == {}  # every conv/linear runs as an integer kernel
    assert result["quantized_ops"]["QLinearConv"] == 2 and result["quantized_ops"]["QGemm"] == 1
    if images is None:
        assert "accuracy" not in result
    else:
        acc = result["accuracy"]
        assert acc["images"] == images
        assert 0 <= acc["onnx_top1"]["quantized"] <= 100
        assert 0 <= acc["agreement_with_pytorch"] <= 100
        change = acc["vs_float"]
        assert change["images"] == images
        assert change["gained"] + change["lost"] <= change["changed"] <= images
        assert 0 < change["p_value"] <= 1


def test_quantize_export_onnx_then_bench(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = _run("quantize", "--model", *TINY, "--data", str(data_dir), *FAST,
                "--w-bits", "8", "--a-bits", "8", "--skip-fp-eval", "--out", str(out),
                "--export", "onnx", *BENCH)
    assert proc.returncode == 0, proc.stderr
    assert "float Conv/Gemm/MatMul left after onnxruntime's optimizations: none" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    _check(report["onnx"], images=10)
    assert (out / "model.onnx").is_file() and (out / "model_float.onnx").is_file()

    proc = _run("bench", str(out), *BENCH)
    assert proc.returncode == 0, proc.stderr
    _check(json.loads((out / "bench.json").read_text()), images=None)
    proc = _run("bench", str(out), *BENCH, "--data", str(data_dir), "--eval-size", "4",
                "--out", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    assert "agreement with PyTorch fake-quantized" in proc.stdout
    assert "top-1 decisions changed from float" in proc.stdout
    _check(json.loads((tmp_path / "b.json").read_text()), images=4)


def test_bench_bad_input_is_one_line(tmp_path):
    proc = _run("bench", str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("brecq: error: ") and len(proc.stderr.strip().splitlines()) == 1
