"""Distributed reconstruction: real processes on CPU (gloo), as torchrun would start them."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from brecq import BrecqConfig, ConfigError, ReconstructionError, quantize
from brecq.demo import DemoResNet
from brecq.distributed import DistContext, session
from brecq.quant import quantizers

# Fisher loss and quantized activations: the Fisher normalization and the activation-scale
# search both need statistics of all ranks. A batch of 4 out of 2 x 8 samples often lies on one
# rank only, so the other contributes no sample in that step. No step-size learning here: on this
# toy model a 1e-7 change of the loss already moves some learned step sizes by 20% in a single
# process (Adam's steps are as large as the smallest scales), so only the rounding and the
# initial scales can be compared with a one-process run.
EXACT = dict(weight_bits=2, act_bits=4, iters_w=24, iters_a=0, calib_size=16, batch_size=4,
             act_init_samples=16, loss="fisher", device="cpu", seed=1, method="brecq")
# QDrop learns step sizes and draws random masks, differently on every rank: the ranks must
# still end with identical parameters.
QDROP = dict(EXACT, method="qdrop", loss="mse", iters_w=12)
# Small enough that the activation scale searches run on strided subsamples, as on real models.
SEARCH_ELEMENTS = 5000

WORKER = textwrap.dedent(
    """
    import json, sys, time, torch
    from pathlib import Path
    from brecq import BrecqConfig, quantize
    from brecq.demo import DemoResNet
    from brecq.distributed import session
    from brecq.quant import quantizers

    quantizers._MAX_SEARCH_ELEMENTS = {search_elements}
    out = Path(sys.argv[1])
    configs = [BrecqConfig(**c) for c in json.loads(sys.argv[2])]
    torch.manual_seed(0)
    model = DemoResNet().eval()
    calib = torch.randn(16, 1, 28, 28)
    with session(torch.device("cpu"), configs[0].dist_timeout) as dist:
        (out / f"joined{dist.rank}").touch()
        for k, config in enumerate(configs):
            qmodel, report = quantize(model, dist.shard(calib), config)
            torch.save(qmodel.state_dict(), out / f"run{k}_rank{dist.rank}.pt")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(tmp_path: Path, configs: list[dict], world: int = 2) -> list[subprocess.Popen]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.replace("{search_elements}", str(SEARCH_ELEMENTS)))
    port = _free_port()
    procs = []
    for rank in range(world):
        # What torchrun sets for each worker.
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WORLD_SIZE=str(world),
                   RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), json.dumps(configs)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _learned(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith(("alpha", "scale", "zero_point"))}


def test_two_ranks_match_each_other_and_one_process_on_the_union(tmp_path, monkeypatch):
    procs = _start_ranks(tmp_path, [EXACT, QDROP])
    monkeypatch.setattr(quantizers, "_MAX_SEARCH_ELEMENTS", SEARCH_ELEMENTS)
    torch.manual_seed(0)
    model = DemoResNet().eval()
    calib = torch.randn(16, 1, 28, 28)
    ref = quantize(model, calib, BrecqConfig(**EXACT))[0].state_dict()
    for code, err in _finish(procs, timeout=240):
        assert code == 0, err
    for k in range(2):
        a = torch.load(tmp_path / f"run{k}_rank0.pt", weights_only=True)
        b = torch.load(tmp_path / f"run{k}_rank1.pt", weights_only=True)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[n], b[n]) for n in a), "ranks differ"

    dist = torch.load(tmp_path / "run0_rank0.pt", weights_only=True)
    learned = _learned(ref)
    assert any(k.endswith("alpha") for k in learned) and any("act_quant" in k for k in learned)
    for name in learned:
        diff = (dist[name] - ref[name]).abs().max().item()
        assert torch.allclose(dist[name], ref[name], rtol=1e-5, atol=1e-6), (name, diff)
        if name.endswith("alpha"):
            flipped = ((dist[name] >= 0) != (ref[name] >= 0)).float().mean().item()
            assert flipped <= 0.002, (name, flipped)


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_rank_that_dies_or_hangs_ends_the_others_with_an_error(tmp_path, how):
    timeout = 8
    long_run = dict(EXACT, iters_w=1_000_000, dist_timeout=timeout)
    procs = _start_ranks(tmp_path, [long_run])
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"joined{r}").exists() for r in range(2)):
            assert all(p.poll() is None for p in procs), procs[0].stderr.read()
            assert time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.1)
        time.sleep(1)  # into the reconstruction
        os.kill(procs[1].pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        started = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout + 30)
        elapsed = time.monotonic() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert procs[0].returncode != 0
    assert "ReconstructionError" in err and "rank 0 of 2" in err, err
    assert "--dist-timeout 8s" in err, err
    assert elapsed < timeout + 20, elapsed


def test_sharding_is_contiguous_even_and_complete():
    parts = [DistContext(rank, 3).shard_range(10) for rank in range(3)]
    assert parts == [(0, 4), (4, 7), (7, 10)]
    assert DistContext(1, 2).shard(torch.arange(5)).tolist() == [3, 4]


def test_gathered_search_sample_is_the_one_of_the_whole_tensor(monkeypatch):
    monkeypatch.setattr(quantizers, "_MAX_SEARCH_ELEMENTS", 100)
    whole = torch.randn(1000)
    shards = [whole[:370], whole[370:]]
    pieces: dict[int, list] = {0: [], 1: []}

    class TwoRanks(DistContext):
        """Rank `rank` of two: records what it sends, then replays both ranks' pieces."""

        replay = False

        def sizes(self, count):
            return [len(s) for s in shards]

        def gather(self, flat):
            if not self.replay:
                pieces[self.rank].append(flat)
                return flat
            k = self.calls
            self.calls += 1
            return torch.cat([pieces[0][k], pieces[1][k]])

    for rank in (0, 1):
        TwoRanks(rank, 2).gather_search_sample(shards[rank])
    ctx = TwoRanks(1, 2)
    ctx.replay, ctx.calls = True, 0
    expected = quantizers.search_sample(whole)
    assert expected.numel() < whole.numel()
    assert torch.equal(ctx.gather_search_sample(shards[1]), expected)


def test_single_process_context_passes_values_through():
    single = DistContext()
    assert single.is_main and not single.distributed
    assert single.sum_values([1.5, 2]) == [1.5, 2.0]
    flat = torch.arange(4.0)
    assert single.gather_search_sample(flat) is flat
    single.check_identical({"w": flat}, "weights", "")


def test_launch_environment_errors_are_clear(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="RANK, MASTER_ADDR, MASTER_PORT not set"), \
            session(torch.device("cpu"), 5):
        pass
    monkeypatch.setattr("brecq.recon.pipeline.current", lambda *a: DistContext(0, 2))
    with pytest.raises(ConfigError, match="calib_size=1 is smaller than the 2 ranks"):
        quantize(DemoResNet().eval(), torch.randn(4, 1, 28, 28),
                 BrecqConfig(calib_size=1, device="cpu"))


def test_mismatching_tensors_are_named():
    class FakeGather(DistContext):
        """Rank 0 of two whose peer holds a different 'b'."""

        def sizes(self, count):
            return [count, count]

    ctx = FakeGather(0, 2)
    peer = {"a": torch.ones(2), "b": torch.zeros(2)}

    def all_gather(parts, local):
        parts[0].copy_(local)
        from brecq.distributed import _digest
        parts[1].copy_(torch.tensor([_digest(peer[n]) for n in sorted(peer)]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("brecq.distributed.torch_dist.all_gather", all_gather)
        with pytest.raises(ReconstructionError, match=r"differ between ranks \(1 of 2 tensors: b\)"):
            ctx.check_identical({"a": torch.ones(2), "b": torch.ones(2)}, "weights", "fix it")


@pytest.mark.slow
def test_torchrun_cli_writes_once_and_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    from test_cli import _make_split

    data = tmp_path / "images"
    _make_split(data, "train")
    _make_split(data, "val")
    models = Path(__file__).with_name("_cli_models.py")
    args = ["quantize", "--model", f"{models}:tiny_net", "--crop", "32", "--mean", "0.5,0.5,0.5",
            "--std", "0.25,0.25,0.25", "--data", str(data), "--iters-w", "20", "--iters-a", "10",
            "--calib-size", "8", "--batch-size", "4", "--act-init-samples", "8", "--workers", "0",
            "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                "2", "-m", "brecq"]
    two = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("Full quantization (W4A8) accuracy") == 1, two.stdout
    one = subprocess.run([sys.executable, "-m", "brecq", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("two", "one")]
    assert reports[0]["world_size"] == 2 and reports[1]["world_size"] == 1
    assert reports[0]["accuracy"] == reports[1]["accuracy"]
    assert reports[0]["data"] == reports[1]["data"]
    a, b = (load_file(tmp_path / d / "quantized.safetensors") for d in ("two", "one"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].double(), b[name].double(), rtol=1e-5, atol=1e-7), name
