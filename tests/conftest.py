"""Shared fixtures: tiny models and the optional ../shared data."""

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_dir() -> Path:
    if not (SHARED / "data" / "cifar10" / "val").is_dir() or not (SHARED / "weights").is_dir():
        pytest.skip(f"../shared with CIFAR-10 data and weights is not present at {SHARED}")
    return SHARED
