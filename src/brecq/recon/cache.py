"""Cached unit inputs and targets over the calibration set, kept where memory allows.

Tensors are stored on a *storage* device and moved to the compute device one mini-batch at a
time, so a large model's calibration set never has to sit on the GPU as a whole. With a device
budget, tensors go to the compute device while the budget lasts and to host memory (pinned
when the compute device is a GPU) after that.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Key prefixes of a unit's cache: its inputs in the quantized network, its inputs and outputs in
# the float network, and the Fisher weights of its outputs.
Q_IN = "q_in/"
FP_IN = "fp_in/"
FP_OUT = "fp_out/"
GRAD = "grad/"


class ActivationCache:
    """Named stacks of per-sample tensors ([N, ...]) with mini-batch access."""

    def __init__(self, compute_device: torch.device, storage_device: torch.device,
                 device_budget_bytes: int | None = None) -> None:
        self.compute_device = torch.device(compute_device)
        self.storage_device = torch.device(storage_device)
        self.device_budget_bytes = device_budget_bytes
        self._pending: dict[str, list[Tensor]] = {}
        self._stored: dict[str, Tensor] = {}
        # Keys of 4-D tensors stored as [N, H, W, C]: a gathered batch of them is a channels-last
        # [B, C, H, W] view without a copy (index_select does not keep channels-last strides).
        self._nhwc: set[str] = set()

    def _host_for(self, nbytes: int) -> bool:
        """Whether a tensor of `nbytes` goes to host memory instead of the storage device."""
        if self.device_budget_bytes is None or self.storage_device.type == "cpu":
            return False
        on_device = sum(t.numel() * t.element_size() for t in self._stored.values()
                        if t.device == self.storage_device)
        return on_device + nbytes > self.device_budget_bytes

    def append(self, key: str, chunk: Tensor) -> None:
        """Add a chunk of samples (first dimension) to `key`; call `finish` when done."""
        # Chunks wait in host memory when a budget may send them there: the device then never
        # holds more than the budget plus one chunk.
        staging = torch.device("cpu") if self.device_budget_bytes is not None else self.storage_device
        self._pending.setdefault(key, []).append(chunk.detach().to(staging))

    def finish(self) -> None:
        for key, chunks in self._pending.items():
            stacked = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
            if self._host_for(stacked.numel() * stacked.element_size()):
                stacked = stacked.cpu()
                if self.compute_device.type == "cuda":
                    stacked = stacked.pin_memory()
            else:
                stacked = stacked.to(self.storage_device)
                if stacked.device.type == "cpu" and self.compute_device.type == "cuda":
                    stacked = stacked.pin_memory()
            self._stored[key] = stacked
        self._pending.clear()

    @property
    def index_device(self) -> torch.device:
        """Where mini-batch indices should live: with the stored tensors, host if they are split."""
        devices = {t.device for t in self._stored.values()}
        return devices.pop() if len(devices) == 1 else torch.device("cpu")

    def placement(self) -> dict[str, str]:
        """Where each cached tensor lives (key -> device)."""
        return {key: str(t.device) for key, t in self._stored.items()}

    def __contains__(self, key: str) -> bool:
        return key in self._stored

    def __len__(self) -> int:
        return next(iter(self._stored.values())).shape[0] if self._stored else 0

    def get(self, key: str) -> Tensor:
        stored = self._stored[key]
        return stored.permute(0, 3, 1, 2) if key in self._nhwc else stored

    def batch(self, key: str, index: Tensor) -> Tensor:
        """Samples `index` of `key` on the compute device."""
        stored = self._stored[key]
        # index_select: a plain gather, several times faster than advanced indexing on CPU.
        picked = stored.index_select(0, index.to(stored.device))
        picked = picked.to(self.compute_device, non_blocking=stored.is_pinned())
        return picked.permute(0, 3, 1, 2) if key in self._nhwc else picked

    def use_channels_last(self, enabled: bool = True) -> None:
        """Hand out 4-D batches in channels-last layout (stored as NHWC), or in the default one."""
        for key, stored in self._stored.items():
            if stored.dim() != 4 or (key in self._nhwc) == enabled:
                continue
            order = (0, 2, 3, 1) if enabled else (0, 3, 1, 2)
            moved = stored.permute(*order).contiguous()
            self._stored[key] = moved.pin_memory() if stored.is_pinned() else moved
            if enabled:
                self._nhwc.add(key)
            else:
                self._nhwc.discard(key)

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return sorted((k for k in self._stored if k.startswith(prefix)), key=_natural)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._stored.values())

    def clear(self) -> None:
        self._pending.clear()
        self._stored.clear()
        self._nhwc.clear()


def _natural(key: str) -> tuple:
    head, _, tail = key.rpartition("/")
    return (head, int(tail)) if tail.isdigit() else (key, -1)
