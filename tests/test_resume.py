"""A run killed mid-way resumes from its last finished unit and ends where a full run ends."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from brecq import BrecqConfig, CheckpointError, quantize
from brecq.demo import DemoResNet

CONFIG = dict(weight_bits=2, act_bits=4, iters_w=100, iters_a=50, calib_size=16, batch_size=4,
              act_init_samples=8, device="cpu", seed=3, method="brecq")

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from brecq import BrecqConfig, quantize
    from brecq.demo import DemoResNet
    torch.manual_seed(0)
    model = DemoResNet().eval()
    calib = torch.randn(16, 1, 28, 28)
    quantize(model, calib, BrecqConfig(**{config!r}), checkpoint_dir=sys.argv[1])
    """
)


def _inputs():
    torch.manual_seed(0)
    model = DemoResNet().eval()
    return model, torch.randn(16, 1, 28, 28)


def _done_steps(path):
    if not path.is_file():
        return 0
    try:
        return len(torch.load(path, weights_only=True)["done"])
    except Exception:  # noqa: BLE001 - a half-visible file is impossible (atomic), but be safe
        return 0


def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(config=CONFIG))
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")])
    try:
        deadline = time.monotonic() + 300
        while _done_steps(checkpoint) < 4:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_after = _done_steps(checkpoint)
    model, calib = _inputs()
    straight, _ = quantize(model, calib, BrecqConfig(**CONFIG))
    total = 2 * len(straight.units) + 1  # weight pass, activation init, activation pass
    assert 4 <= killed_after < total

    model, calib = _inputs()
    resumed, report = quantize(model, calib, BrecqConfig(**CONFIG),
                               checkpoint_dir=tmp_path / "run", resume=True)
    a, b = resumed.state_dict(), straight.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [u.name for u in report.units if u.phase == "weights"] == [
        u.name for u in straight.units]


def test_resume_refuses_a_different_config_or_missing_checkpoint(tmp_path):
    model, calib = _inputs()
    small = dict(CONFIG, iters_w=2, iters_a=2)
    quantize(model, calib, BrecqConfig(**small), checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="weight_bits: 2 -> 4"):
        quantize(model, calib, BrecqConfig(**dict(small, weight_bits=4)),
                 checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="calibration data differs"):
        quantize(model, calib + 1, BrecqConfig(**small), checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        quantize(model, calib, BrecqConfig(**small), checkpoint_dir=tmp_path / "x", resume=True)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        quantize(model, calib, BrecqConfig(**small), checkpoint_dir=tmp_path, resume=True)


class _Stop(Exception):
    pass


def test_interrupted_qdrop_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    # QDrop draws random masks: the checkpoint must carry the run's generators, and resuming
    # must give the same masks (and so the same result) as the run that was not interrupted.
    from brecq.recon.checkpoint import RunCheckpoint

    config = BrecqConfig(**dict(CONFIG, method="qdrop", iters_w=20))
    model, calib = _inputs()
    straight, _ = quantize(model, calib, config)
    mark_done = RunCheckpoint.mark_done

    def stop_after_three_units(self, *args, **kwargs):
        mark_done(self, *args, **kwargs)
        if len(self.done) == 3:
            raise _Stop

    monkeypatch.setattr(RunCheckpoint, "mark_done", stop_after_three_units)
    with pytest.raises(_Stop):
        quantize(model, calib, config, checkpoint_dir=tmp_path)
    monkeypatch.setattr(RunCheckpoint, "mark_done", mark_done)
    torch.manual_seed(99)  # the global generator plays no part
    resumed, _ = quantize(model, calib, config, checkpoint_dir=tmp_path, resume=True)
    a, b = resumed.state_dict(), straight.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_accepts_changed_runtime_options_and_refuses_recipe_changes(tmp_path):
    from brecq.recon.checkpoint import read_checkpoint

    model, calib = _inputs()
    small = dict(CONFIG, iters_w=2, iters_a=2)
    quantize(model, calib, BrecqConfig(**small), checkpoint_dir=tmp_path)
    # Where and how fast it runs is no part of the result: a resume may change all of it.
    runtime = dict(cache_device="cpu", cache_budget_gb=0.5, cuda_graph=False, dist_timeout=30.0)
    _, report = quantize(model, calib, BrecqConfig(**dict(small, **runtime)),
                         checkpoint_dir=tmp_path, resume=True)
    assert report.units  # restored from the checkpoint
    path = tmp_path / "checkpoint.pt"
    read_checkpoint(path, BrecqConfig(**small).resolved().replace(
        compile=True, device="cuda", autocast="bf16", channels_last=True))
    for change, message in (({"iters_w": 3}, "iters_w: 2 -> 3"), ({"act_bits": 8}, "act_bits: 4 -> 8"),
                            ({"method": "qdrop"}, "method: 'brecq' -> 'qdrop'")):
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(path, BrecqConfig(**dict(small, **change)).resolved())
