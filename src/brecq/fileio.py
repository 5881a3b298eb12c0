"""Atomic file writes (a reader sees the old file or the new one, never half of one) and telling
a damaged torch file from one of another kind."""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write` to a temporary file beside `path`, then rename it over `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename it over `path` in one step."""
    _atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    _atomic_write(path, lambda handle: handle.write(data))


def damage_of(path: Path, exc: BaseException) -> str | None:
    """Why `torch.load(path)` failing with `exc` means the file is damaged, or None when the file
    is intact but of another kind (pickled objects, not a torch file at all)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError:
        return None
    if size == 0:
        return "the file is empty"
    text = str(exc)
    # torch.save writes a zip archive whose directory is at the end: a cut file loses it.
    if head == b"PK\x03\x04" and (not zipfile.is_zipfile(path) or "zip archive" in text):
        return f"a torch zip archive cut short or corrupted, {size:,} bytes"
    if isinstance(exc, EOFError) or "Ran out of input" in text or "unexpected EOF" in text:
        return f"the data ends early, {size:,} bytes"
    return None
