"""Cached unit inputs and targets over the calibration set, kept where memory allows.

Tensors are stored on a *storage* device (the compute device when they fit, else host memory,
pinned when the compute device is a GPU) and moved to the compute device one mini-batch at a
time, so a large model's calibration set never has to sit on the GPU as a whole.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ActivationCache:
    """Named stacks of per-sample tensors ([N, ...]) with mini-batch access."""

    def __init__(self, compute_device: torch.device, storage_device: torch.device) -> None:
        self.compute_device = torch.device(compute_device)
        self.storage_device = torch.device(storage_device)
        self._pending: dict[str, list[Tensor]] = {}
        self._stored: dict[str, Tensor] = {}

    @property
    def _pin(self) -> bool:
        return self.storage_device.type == "cpu" and self.compute_device.type == "cuda"

    def append(self, key: str, chunk: Tensor) -> None:
        """Add a chunk of samples (first dimension) to `key`; call `finish` when done."""
        self._pending.setdefault(key, []).append(chunk.detach().to(self.storage_device))

    def finish(self) -> None:
        for key, chunks in self._pending.items():
            stacked = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
            self._stored[key] = stacked.pin_memory() if self._pin else stacked
        self._pending.clear()

    def __contains__(self, key: str) -> bool:
        return key in self._stored

    def __len__(self) -> int:
        return next(iter(self._stored.values())).shape[0] if self._stored else 0

    def get(self, key: str) -> Tensor:
        return self._stored[key]

    def batch(self, key: str, index: Tensor) -> Tensor:
        """Samples `index` of `key` on the compute device."""
        stored = self._stored[key]
        picked = stored[index.to(stored.device)]
        return picked.to(self.compute_device, non_blocking=self._pin)

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return sorted((k for k in self._stored if k.startswith(prefix)), key=_natural)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._stored.values())

    def clear(self) -> None:
        self._pending.clear()
        self._stored.clear()


def _natural(key: str) -> tuple:
    head, _, tail = key.rpartition("/")
    return (head, int(tail)) if tail.isdigit() else (key, -1)
