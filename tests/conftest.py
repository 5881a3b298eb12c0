"""Shared fixtures: tiny models and the optional ../shared data."""

import os
from pathlib import Path

# The suite is many tiny models: one thread each avoids oversubscribing small CI machines, and
# subprocesses started by tests inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_dir() -> Path:
    if not (SHARED / "data" / "cifar10" / "val").is_dir() or not (SHARED / "weights").is_dir():
        pytest.skip(f"../shared with CIFAR-10 data and weights is not present at {SHARED}")
    return SHARED
