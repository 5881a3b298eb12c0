"""The offline MNIST demo: splits, model and the cached training."""

import logging
import time

import torch
import torch.fx

from brecq.demo import (
    DEMO_VERSION,
    MNIST_MEAN,
    MNIST_STD,
    DemoResNet,
    mnist_splits,
    pretrained_demo_model,
)
from brecq.evaluate import evaluate


def test_splits_are_sized_disjoint_and_seeded():
    splits = mnist_splits(seed=0)
    sizes = {k: (x.shape, y.shape) for k, (x, y) in splits.items()}
    assert sizes == {
        "train": ((3000, 1, 28, 28), (3000,)),
        "calib": ((1000, 1, 28, 28), (1000,)),
        "test": ((1000, 1, 28, 28), (1000,)),
    }
    for x, y in splits.values():
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert y.min() >= 0 and y.max() <= 9
    flat = {k: {r.numpy().tobytes() for r in x.flatten(1)} for k, (x, _) in splits.items()}
    assert [len(v) for v in flat.values()] == [3000, 1000, 1000]  # no duplicate digits
    assert not flat["train"] & flat["calib"]
    assert not flat["train"] & flat["test"]
    assert not flat["calib"] & flat["test"]
    allx = torch.cat([x for x, _ in splits.values()])
    # Normalized with the stated statistics: pixel 0 maps to -mean/std.
    assert torch.isclose(allx.min(), torch.tensor(-MNIST_MEAN / MNIST_STD))
    assert abs(float(allx.mean())) < 0.05 and abs(float(allx.std()) - 1) < 0.05
    again = mnist_splits(seed=0)
    assert torch.equal(again["calib"][0], splits["calib"][0])
    other = mnist_splits(seed=1)
    assert not torch.equal(other["test"][1], splits["test"][1])


def test_demo_resnet_traces_with_fx():
    model = DemoResNet().eval()
    x = torch.randn(2, 1, 28, 28)
    traced = torch.fx.symbolic_trace(model)
    assert torch.allclose(traced(x), model(x))
    assert model(x).shape == (2, 10)


def test_demo_model_trains_caches_and_reloads(tmp_path, caplog):
    splits = mnist_splits()
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="brecq.demo"):
        model = pretrained_demo_model(cache_dir=tmp_path)
    trained_in = time.perf_counter() - start
    assert "epoch" in caplog.text
    cached = tmp_path / f"{DEMO_VERSION}.pt"
    assert cached.is_file()
    assert not list(tmp_path.glob("*.tmp"))
    assert not model.training
    acc = evaluate(model, splits["test"], "cpu")["top1"]
    assert acc > 95.0, acc

    caplog.clear()
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="brecq.demo"):
        again = pretrained_demo_model(cache_dir=tmp_path)
    assert time.perf_counter() - start < min(5.0, trained_in)
    assert "loaded the demo model" in caplog.text and "epoch" not in caplog.text
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_corrupt_cache_is_replaced(tmp_path, monkeypatch):
    import brecq.demo as demo

    (tmp_path / f"{DEMO_VERSION}.pt").write_bytes(b"garbage")
    state = DemoResNet().state_dict()
    monkeypatch.setattr(demo, "_train", lambda device: state)
    model = pretrained_demo_model(cache_dir=tmp_path)
    assert torch.equal(model.fc.weight, state["fc.weight"])
    reloaded = torch.load(tmp_path / f"{DEMO_VERSION}.pt", weights_only=True)
    assert torch.equal(reloaded["fc.weight"], state["fc.weight"])


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    from brecq.demo import demo_cache_dir

    monkeypatch.setenv("BRECQ_CACHE", str(tmp_path / "c"))
    assert demo_cache_dir() == tmp_path / "c"
    assert demo_cache_dir(tmp_path / "x") == tmp_path / "x"
