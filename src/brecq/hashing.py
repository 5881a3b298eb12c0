"""Hashing tensors by content, for fingerprints and comparisons across processes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def hash_tensor(h: Any, tensor: Tensor) -> None:
    """Feed `tensor`'s shape, dtype and bytes to the hashlib object `h`."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    h.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
    h.update(flat.view(torch.uint8).numpy().tobytes())
