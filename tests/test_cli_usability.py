"""What a new user meets: saved folders from the API, data checks, --out safety, resume hints,
damaged files, progress output, readable reports, grouped help, `--method auto`."""

import fcntl
import functools
import json
import os
import pty
import shlex
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch

import brecq
from brecq import BrecqConfig
from brecq.cli import build_parser, main
from brecq.cli.quantize import resume_command
from brecq.methods import AUTO_RULES, auto_rule

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _cli_models import tiny_net  # noqa: E402
from test_cli import _make_split  # noqa: E402

TINY = f"{HERE / '_cli_models.py'}:tiny_net"
PREP = ["--crop", "32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]
FAST = ["--iters-w", "4", "--iters-a", "2", "--calib-size", "8", "--batch-size", "4",
        "--act-init-samples", "4", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two_classes")
    _make_split(root, "train", per_class=4)
    _make_split(root, "val", per_class=4)
    return root


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "brecq", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("brecq: error: "), proc.stderr
    return lines[0]


# ----------------------------------------------------------------------- 1: API-saved folders


@pytest.fixture(scope="module")
def api_saved(tmp_path_factory) -> Path:
    """A folder written by brecq.save_quantized with no model_info, as the README's API does."""
    pytest.importorskip("safetensors")
    out = tmp_path_factory.mktemp("api") / "saved"
    config = BrecqConfig(method="rtn", act_bits=8, calib_size=8, act_init_samples=4, device="cpu")
    qmodel, _ = brecq.quantize(tiny_net(), torch.randn(8, 3, 32, 32), config)
    brecq.save_quantized(qmodel, out, config=config)
    assert "name" not in json.loads((out / "model.json").read_text())
    return out


def test_eval_of_an_api_saved_folder_takes_model(api_saved, data):
    proc = _run("eval", "--quantized", str(api_saved), "--data", str(data), "--workers", "0")
    line = _error_line(proc)
    assert "--model" in line and "Traceback" not in proc.stderr
    proc = _run("eval", "--quantized", str(api_saved), "--model", TINY, *PREP, "--data",
                str(data), "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert f"(quantized, {api_saved})" in proc.stdout and "Images: 8" in proc.stdout


def test_export_of_an_api_saved_folder_names_the_flag(api_saved, tmp_path):
    pytest.importorskip("onnx")
    line = _error_line(_run("export", str(api_saved), "--out", str(tmp_path / "m.onnx")))
    assert "--model NAME" in line and "export_command" not in line
    proc = _run("export", str(api_saved), "--model", TINY, "--out", str(tmp_path / "m.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.onnx").stat().st_size > 0


# ----------------------------------------------------------------------- 2: data checks


def test_class_count_mismatch_is_refused_before_work_or_warned(data, tmp_path):
    # cifar_resnet20 has 10 outputs, the folder 2 classes.
    args = ["quantize", "--model", "cifar_resnet20", "--data", str(data), *FAST, "--out",
            str(tmp_path / "run")]
    line = _error_line(_run(*args))
    assert not (tmp_path / "run").exists()
    assert "2 class folders" in line and "outputs 10" in line and "--allow-class-mismatch" in line
    proc = _run("eval", "--model", "cifar_resnet20", "--data", str(data), "--workers", "0",
                "--allow-class-mismatch")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" in proc.stderr and "2 class folders" in proc.stderr


def test_grayscale_images_are_converted_with_a_warning(tmp_path):
    _make_split(tmp_path, "val", mode="L", per_class=4)
    proc = _run("eval", "--model", TINY, *PREP, "--data", str(tmp_path), "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert "8 of 8 sampled images" in proc.stderr and "grayscale" in proc.stderr


def test_wrong_channel_count_is_refused_naming_the_first_layer(data):
    line = _error_line(_run("eval", "--model", TINY, "--crop", "32", "--mean", "0.5",
                            "--std", "0.25", "--data", str(data), "--workers", "0"))
    assert "first layer 0 reads 3 channel(s)" in line and "gives 1" in line


def test_size_flags_larger_than_the_data_warn_with_the_count(data, tmp_path):
    proc = _run("quantize", "--model", TINY, *PREP, "--data", str(data), *FAST,
                "--calib-size", "50", "--eval-size", "200", "--skip-fp-eval", "--method", "rtn",
                "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert "--eval-size 200 asks for more images than" in proc.stderr
    assert "evaluating on all 8" in proc.stderr
    assert "--calib-size 50 asks for more images than" in proc.stderr
    assert "calibrating on all 8" in proc.stderr


# ----------------------------------------------------------------------- 3: --out safety


def test_out_holding_a_run_needs_overwrite(data, tmp_path):
    out = tmp_path / "run"
    args = ["quantize", "--model", TINY, *PREP, "--data", str(data), *FAST, "--method", "rtn",
            "--skip-fp-eval", "--out", str(out)]
    assert _run(*args).returncode == 0
    before = (out / "report.json").read_text()
    line = _error_line(_run(*args))
    assert "already holds a run" in line and "--overwrite" in line and "--resume" in line
    assert (out / "report.json").read_text() == before
    assert _run(*args, "--overwrite").returncode == 0


# ----------------------------------------------------------------------- 4: resume and damage


def _finished_run(data: Path, out: Path) -> list[str]:
    args = ["quantize", "--model", TINY, *PREP, "--data", str(data), *FAST, "--w-bits", "2",
            "--a-bits", "4", "--skip-fp-eval", "--out", str(out)]
    assert main(args) == 0
    return args


def test_resume_with_other_flags_is_refused_before_loading_data(data, tmp_path, capsys):
    args = _finished_run(data, tmp_path / "run")
    capsys.readouterr()
    # A data folder that does not exist: the config check must come first.
    code = main(["quantize", "--model", TINY, *PREP, "--data", str(tmp_path / "nowhere"), *FAST,
                 "--w-bits", "3", "--a-bits", "4", "--resume", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "config differs" in err and "weight_bits: 2 -> 3" in err, err
    assert "nowhere" not in err
    del args


def test_damaged_checkpoint_and_weights_are_called_damaged(data, tmp_path, capsys):
    _finished_run(data, tmp_path / "run")
    path = tmp_path / "run" / "checkpoint" / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    code = main(["quantize", "--model", TINY, *PREP, "--data", str(data), *FAST, "--w-bits", "2",
                 "--a-bits", "4", "--resume", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is damaged" in err and "cut short" in err, err
    weights = tmp_path / "w.pt"
    torch.save(tiny_net().state_dict(), weights)
    weights.write_bytes(weights.read_bytes()[:300])
    line = _error_line(_run("eval", "--model", TINY, "--weights", str(weights), *PREP, "--data",
                            str(data), "--workers", "0"))
    assert "is damaged" in line and "torch.save(model.state_dict()" not in line


def test_interrupt_prints_the_exact_resume_command(data, tmp_path, capsys, monkeypatch):
    from brecq.recon import pipeline

    real = pipeline.quantize

    @functools.wraps(real)
    def interrupted_after_saving(*args, **kwargs):
        result = real(*args, **kwargs)
        if kwargs.get("checkpoint_dir") is not None:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(pipeline, "quantize", interrupted_after_saving)
    out = tmp_path / "run"
    argv = ["quantize", "--model", TINY, *PREP, "--data", str(data), *FAST, "--w-bits", "2",
            "--a-bits", "4", "--skip-fp-eval", "--out", str(out)]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("brecq: interrupted; continue with: brecq quantize ")
    command = shlex.split(err.split("continue with: ")[1])
    assert command == ["brecq", *argv[:-2], "--resume", str(out)]
    monkeypatch.setattr(pipeline, "quantize", real)
    assert main(command[1:]) == 0
    assert (out / "report.json").is_file()


def test_resume_command_drops_out_and_overwrite():
    assert resume_command(["quantize", "--model", "m", "--out", "a b", "--overwrite"],
                          Path("a b")) == "brecq quantize --model m --resume 'a b'"


# ----------------------------------------------------------------------- 5: progress


def test_progress_lines_in_a_pipe_and_none_with_quiet(data, tmp_path):
    args = ["quantize", "--model", TINY, *PREP, "--data", str(data), *FAST, "--w-bits", "2",
            "--a-bits", "4", "--skip-fp-eval"]
    proc = _run(*args, "--out", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.splitlines()
    plan = [line for line in err if line.startswith("Plan: QDrop W2A4, 3 units: 3 x 4 joint iterations")]
    units = [line for line in err if line.startswith("joint unit ")]
    assert len(plan) == 1 and len(units) == 3, proc.stderr
    assert err.index(plan[0]) < err.index(units[0]) < err.index(
        next(line for line in err if line.startswith("Time estimate after the first unit")))
    assert "loss" in units[0] and "left" in units[0]
    assert "it/s" not in proc.stderr  # no bar in a pipe
    quiet = _run(*args, "-q", "--out", str(tmp_path / "b"))
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_progress_bar_on_a_terminal(data, tmp_path):
    main_fd, child_fd = pty.openpty()
    # A terminal 120 columns wide (a new pty has 0, and tqdm would draw empty bars).
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "brecq", "quantize", "--model", TINY, *PREP, "--data", str(data),
         *FAST, "--w-bits", "2", "--a-bits", "4", "--skip-fp-eval", "--out", str(tmp_path / "t")],
        stdout=subprocess.DEVNULL, stderr=child_fd, env=env)
    os.close(child_fd)
    chunks = []
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "j 1/3" in text and "4/4" in text and "loss=" in text, text
    assert "joint unit 1/3" not in text  # the bar replaces the line on a terminal
    assert "Plan: QDrop W2A4" in text and "Time estimate after the first unit: about" in text


def test_info_says_what_it_does_with_v():
    proc = _run("info", "--model", "cifar_resnet20", "-v")
    assert proc.returncode == 0, proc.stderr
    assert "Building cifar_resnet20" in proc.stderr and "Prepared in" in proc.stderr


# ----------------------------------------------------------------------- 6: readable results


def test_report_log_prints_a_table_without_logging_set_up():
    code = (
        "import torch, brecq\n"
        "from _cli_models import tiny_net\n"
        "q, r = brecq.quantize(tiny_net(), torch.randn(8, 3, 32, 32), brecq.BrecqConfig("
        "iters_w=3, iters_a=2, calib_size=8, act_init_samples=4, device='cpu'))\n"
        "text = r.log()\n"
        "assert text == r.summary() == str(r)\n"
        "print(q.describe())\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.splitlines()
    assert err[0].startswith("BRECQ W4A8: 6 unit passes")
    assert err[1].split() == ["unit", "kind", "pass", "params", "loss", "before", "loss", "after",
                              "iterations", "seconds"]
    assert len(err) == 3 + 6
    out = proc.stdout.splitlines()
    assert out[0].split()[:3] == ["#", "unit", "kind"] and len(out) == 2 + 3


def test_describe_rows_and_quantizer_mappings():
    qmodel = brecq.prepare(tiny_net(), BrecqConfig(act_bits=4), (torch.zeros(1, 3, 32, 32),))
    rows = qmodel.describe_rows()
    assert isinstance(rows, list) and rows[0]["name"] == qmodel.units[0].name
    assert isinstance(qmodel.describe(), str) and qmodel.units[0].name in qmodel.describe()
    assert set(qmodel.weight_quantizers) == set(qmodel.layers)
    assert all(hasattr(q, "bits") for q in qmodel.weight_quantizers.values())
    assert all(hasattr(q, "bits") for q in qmodel.act_quantizers.values())


# ----------------------------------------------------------------------- 7: help and names


def test_help_is_grouped_and_prints_each_default_once():
    parser = build_parser()
    quantize = parser._subparsers._group_actions[0].choices["quantize"]
    text = quantize.format_help()
    sections = [line for line in text.splitlines() if line and not line.startswith(" ")
                and line.endswith(":")]
    assert [s.split(" (")[0].rstrip(":") for s in sections[1:]] == [
        "model", "data and preprocessing", "quantization", "reconstruction", "runtime", "output",
        "onnxruntime benchmark"]
    for action in quantize._actions:
        assert (action.help or "").count("default:") <= 1, action.help


def test_activation_quantizers_are_named_after_modules_and_both_names_work():
    from brecq.models import build_model

    model, _ = build_model("cifar_resnet20")
    example = (torch.zeros(1, 3, 32, 32),)
    qmodel = brecq.prepare(model, BrecqConfig(act_bits=4), example)
    names = list(qmodel.act_quantizers)
    # The network input `x` and the stem's F.relu at the top level, F.relu inside the block
    # layer1.0 (twice), the block's second conv output (read by the residual add: onnxruntime
    # placement) named after the conv.
    assert names[:5] == ["x", "relu", "layer1.0.relu", "layer1.0.conv2", "layer1.0.relu@2"]
    research = brecq.prepare(model, BrecqConfig(act_bits=4, backend="none"), example)
    assert list(research.act_quantizers)[:3] == ["relu", "layer1.0.relu", "layer1.0.relu@2"]
    assert "flatten" in research.act_quantizers
    bits = {"layer1.0.relu@2": 6, "relu_3": 5}  # new name and old fx node name (layer1.1.relu)
    qmodel = brecq.prepare(model, BrecqConfig(act_bits=4, act_layer_bits=bits), example)
    assert qmodel.act_quantizers["layer1.0.relu@2"].bits == 6
    assert qmodel.act_quantizers["layer1.1.relu"].bits == 5
    with pytest.raises(brecq.ConfigError, match="nope"):
        brecq.prepare(model, BrecqConfig(act_bits=4, act_layer_bits={"nope": 4}), example)


def test_torchvision_module_called_twice_gets_numbered_names():
    torchvision = pytest.importorskip("torchvision")
    # Research placement: the max pool output is a layer input with a quantizer of its own (the
    # onnxruntime placement reuses the stem ReLU's quantizer there).
    qmodel = brecq.prepare(torchvision.models.resnet18(), BrecqConfig(act_bits=4, backend="none"),
                           (torch.zeros(1, 3, 64, 64),))
    assert {"layer1.0.relu", "layer1.0.relu@2", "maxpool"} <= set(qmodel.act_quantizers)


# ----------------------------------------------------------------------- 8: --method auto


def test_auto_rules_choose_qdrop_below_8_bit_acts_and_brecq_otherwise():
    assert [auto_rule(*bits).method for bits in ((4, 4), (2, 4), (3, 3), (2, 2))] == ["qdrop"] * 4
    assert [auto_rule(*bits).method for bits in ((2, None), (4, None), (4, 8))] == ["brecq"] * 3
    w2a4 = BrecqConfig(weight_bits=2, act_bits=4).resolved()
    assert (w2a4.method, w2a4.weight_lr, w2a4.act_lr, w2a4.round_lambda) == ("qdrop", 3e-3, 1.6e-4,
                                                                             0.01)
    w4a4 = BrecqConfig(weight_bits=4, act_bits=4).resolved()
    assert (w4a4.method, w4a4.weight_lr, w4a4.act_lr) == ("qdrop", 1e-3, 1.6e-4)
    w2 = BrecqConfig(weight_bits=2, act_bits=None).resolved()
    assert (w2.method, w2.round_lambda) == ("brecq", 0.03)
    assert BrecqConfig(weight_bits=4, act_bits=None).resolved().round_lambda == 0.01
    # Explicit settings win; explicit methods keep their plain defaults.
    assert BrecqConfig(weight_bits=2, act_bits=4, weight_lr=1e-3).resolved().weight_lr == 1e-3
    plain = BrecqConfig(weight_bits=2, act_bits=4, method="qdrop").resolved()
    assert (plain.weight_lr, plain.act_lr, plain.round_lambda) == (1e-3, 4e-5, 0.01)
    assert all(r.evidence for r in AUTO_RULES)
    assert BrecqConfig().method == "auto"
    again = BrecqConfig.from_dict(w2a4.to_dict())
    assert again == w2a4 and again.resolved() == w2a4


def test_auto_weight_only_run_reports_brecq_with_the_chosen_regularizer(data, tmp_path):
    out = tmp_path / "w2"
    proc = _run("quantize", "--model", TINY, *PREP, "--data", str(data), *FAST, "--w-bits", "2",
                "--a-bits", "32", "--skip-fp-eval", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("Method: BRECQ (auto: weights only or 8-bit activations), W2A32: ")
    assert "round_lambda 0.03" in first
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["method"] == "brecq" and report["config"]["round_lambda"] == 0.03
    assert report["method"] == first.removeprefix("Method: ")


def test_artifact_with_fx_node_names_still_loads(tmp_path):
    """Folders saved before quantizers were named after modules list fx node names."""
    safetensors = pytest.importorskip("safetensors.torch")
    from brecq.models import build_model

    model, _ = build_model("cifar_resnet20")
    config = BrecqConfig(method="rtn", act_bits=4, calib_size=8, act_init_samples=8, device="cpu")
    qmodel, _ = brecq.quantize(model, torch.randn(8, 3, 32, 32), config)
    brecq.save_quantized(qmodel, tmp_path, config=config, example_input=torch.zeros(1, 3, 32, 32))
    info = json.loads((tmp_path / "model.json").read_text())
    tensors = safetensors.load_file(tmp_path / "quantized.safetensors")
    for entry in info["act_quantizers"]:  # the old name: the quantizer module minus its suffix
        old = entry["quantizer"].removesuffix("_act_quant")
        for part in ("scale", "zero_point"):
            tensors[f"act/{old}/{part}"] = tensors.pop(f"act/{entry['name']}/{part}")
        entry["name"] = old
    assert "relu_1" in {e["name"] for e in info["act_quantizers"]}
    (tmp_path / "model.json").write_text(json.dumps(info))
    safetensors.save_file(tensors, tmp_path / "quantized.safetensors")
    loaded = brecq.load_quantized(build_model("cifar_resnet20")[0], tmp_path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), qmodel.cpu().eval()(x))


def test_output_piped_into_a_reader_that_stops_early_is_not_an_error():
    # `brecq info | head -3`: the reader closes the pipe after three lines.
    proc = subprocess.Popen([sys.executable, "-m", "brecq", "info", "--model", "cifar_resnet20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
    proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in stderr, stderr
