"""ImageNet-layout image folders: calibration sampling and evaluation loading.

A data directory holds `train/<class>/<image>` and `val/<class>/<image>`. Classes are indexed in
sorted order of their folder names, as `torchvision.datasets.ImageFolder` does. Files that cannot
be decoded as images are skipped and counted (or, with `strict=True`, reported as a DataError).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .errors import DataError

__all__ = [
    "ImageFolderDataset",
    "SkippingDataLoader",
    "check_finite",
    "eval_loader",
    "find_classes",
    "image_modes",
    "load_calibration",
]

logger = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]


def check_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Return `tensor` unchanged, or raise DataError if it holds NaN or inf values."""
    if tensor.is_floating_point() or tensor.is_complex():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise DataError(
                f"{what} has {bad} NaN/inf values out of {tensor.numel()}: check the images and "
                "the normalization (a std of 0 divides by zero)"
            )
    return tensor


def _as_transform(transform: Any) -> Transform:
    # Accept a `brecq.models.Preprocessing` (or anything with to_transform) as well as a callable.
    if hasattr(transform, "to_transform"):
        return transform.to_transform()
    if transform is None or not callable(transform):
        raise DataError(
            f"transform {transform!r} is not callable: pass a torchvision transform that "
            "returns a tensor (e.g. Preprocessing.to_transform())"
        )
    return transform


def _split_dir(data_dir: str | os.PathLike[str], split: str) -> Path:
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(
            f"data directory {root} does not exist: pass a folder with train/<class>/ and "
            "val/<class>/ image folders"
        )
    if not root.is_dir():
        raise DataError(f"data directory {root} is a file: pass the folder that holds {split}/")
    sub = root / split
    if not sub.is_dir():
        raise DataError(
            f"{root} has no {split}/ folder: put the images in {sub}/<class>/ (ImageNet layout)"
        )
    return sub


def _visible(entry: os.DirEntry[str]) -> bool:
    return not entry.name.startswith(".")


def find_classes(split_dir: str | os.PathLike[str]) -> list[str]:
    """Sorted class-folder names of `split_dir` (DataError if there are none)."""
    split_dir = Path(split_dir)
    with os.scandir(split_dir) as it:
        classes = sorted(e.name for e in it if e.is_dir() and _visible(e))
    if not classes:
        raise DataError(
            f"{split_dir} has no class folders: put the images in {split_dir}/<class>/<image>"
        )
    return classes


class ImageFolderDataset(Dataset):
    """Images of `root/<split>/<class>/*` with sorted class indices.

    `__getitem__` returns `(tensor, label)`, or `(None, path)` when the file cannot be decoded,
    so that callers can skip and count unreadable files instead of crashing.
    """

    def __init__(self, data_dir: str | os.PathLike[str], split: str, transform: Any = None) -> None:
        self.root = _split_dir(data_dir, split)
        self.split = split
        self.transform = _as_transform(transform) if transform is not None else None
        self.classes = find_classes(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        samples: list[tuple[str, int]] = []
        for cls in self.classes:
            files = []
            for dirpath, dirnames, filenames in os.walk(self.root / cls, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
            if not files:
                raise DataError(
                    f"class folder {self.root / cls} is empty: add its images or remove the folder"
                )
            samples += [(f, self.class_to_idx[cls]) for f in sorted(files)]
        self.samples = samples
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor | None:
        """The transformed image at `index`, or None if the file is not a readable image."""
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except Exception:  # not an image, truncated, corrupt, or a decompression bomb
            return None
        out = self.transform(img) if self.transform is not None else img
        return out

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        img = self.load(index)
        if img is None:
            return None, self.samples[index][0]
        return img, self.samples[index][1]


def image_modes(dataset: ImageFolderDataset, sample: int = 16) -> dict[str, int]:
    """Colour modes (PIL: "L" grayscale, "RGB", ...) of up to `sample` files spread evenly over
    `dataset`, counted; only the headers are read. Unreadable files are left out."""
    count = len(dataset.samples)
    picks = sorted({i * count // sample for i in range(sample)}) if count else []
    modes: dict[str, int] = {}
    for index in picks:
        try:
            with Image.open(dataset.samples[index][0]) as img:
                mode = img.mode
        except Exception:  # noqa: BLE001 - unreadable files are skipped (and counted) when loading
            continue
        modes[mode] = modes.get(mode, 0) + 1
    return modes


def _collate_skipping(batch: Sequence[tuple[Any, Any]]) -> tuple[Any, Any, list[str]]:
    good = [(x, y) for x, y in batch if x is not None]
    bad = [str(p) for x, p in batch if x is None]
    if not good:
        return None, None, bad
    images = torch.stack([x for x, _ in good])
    labels = torch.tensor([y for _, y in good], dtype=torch.int64)
    return images, labels, bad


class SkippingDataLoader(DataLoader):
    """A DataLoader over `ImageFolderDataset` that yields `(images, labels)` and skips files
    that cannot be decoded; `skipped` holds their count after (or during) an epoch."""

    def __init__(self, dataset: ImageFolderDataset, strict: bool = False, **kwargs: Any) -> None:
        super().__init__(dataset, collate_fn=_collate_skipping, **kwargs)
        self.strict = strict
        self.skipped = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        self.skipped = 0
        for images, labels, bad in super().__iter__():
            if bad:
                if self.strict:
                    raise DataError(
                        f"cannot read image {bad[0]}: delete or replace the file, or run "
                        "without strict mode to skip unreadable files"
                    )
                self.skipped += len(bad)
                logger.debug("skipped unreadable files: %s", ", ".join(bad))
            if images is not None:
                yield images, labels
        if self.skipped:
            logger.warning("skipped %d unreadable file(s) in %s", self.skipped, self.dataset.root)


def eval_loader(
    data_dir: str | os.PathLike[str],
    transform: Any,
    split: str = "val",
    batch_size: int = 100,
    num_workers: int = 4,
    strict: bool = False,
    pin_memory: bool = False,
) -> SkippingDataLoader:
    """A DataLoader of `(images, labels)` over `data_dir/<split>`, in file order.

    Unreadable files are skipped (their count is logged and kept in `loader.skipped`), or with
    `strict=True` raise DataError naming the file.
    """
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} is not positive: use e.g. 100")
    dataset = ImageFolderDataset(data_dir, split, transform)
    workers = max(0, int(num_workers))
    return SkippingDataLoader(
        dataset,
        strict=strict,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def load_calibration(
    data_dir: str | os.PathLike[str],
    transform: Any,
    num_samples: int = 1024,
    seed: int = 0,
    strict: bool = False,
    split: str = "train",
    num_threads: int | None = None,
) -> torch.Tensor:
    """Draw `num_samples` images uniformly at random from `data_dir/<split>` -> [N, C, H, W].

    The draw is a seeded permutation of all files (same seed, same images), transformed with the
    evaluation `transform` (no augmentation). Unreadable files are skipped and replaced by the
    next ones of the permutation; their count is logged. With `strict=True` the first unreadable
    file raises DataError. If fewer readable images exist than asked, all of them are used (with
    a warning).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise DataError(f"num_samples={num_samples!r} is not a positive integer: use e.g. 1024")
    dataset = ImageFolderDataset(data_dir, split, transform)
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(dataset), generator=gen).tolist()
    threads = num_threads or min(8, os.cpu_count() or 1)

    images: list[torch.Tensor] = []
    skipped = 0
    pos = 0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        while len(images) < num_samples and pos < len(order):
            chunk = order[pos : pos + num_samples - len(images)]
            pos += len(chunk)
            for idx, img in zip(chunk, pool.map(dataset.load, chunk)):
                if img is None:
                    if strict:
                        raise DataError(
                            f"cannot read image {dataset.samples[idx][0]}: delete or replace the "
                            "file, or run without strict mode to skip unreadable files"
                        )
                    skipped += 1
                    logger.debug("skipped unreadable file %s", dataset.samples[idx][0])
                    continue
                if not isinstance(img, torch.Tensor):
                    raise DataError(
                        f"transform returned {type(img).__name__}, not a tensor: end it with "
                        "ToTensor() (e.g. use Preprocessing.to_transform())"
                    )
                images.append(img)
    if skipped:
        logger.warning("skipped %d unreadable file(s) in %s", skipped, dataset.root)
    if not images:
        raise DataError(
            f"no readable images in {dataset.root} ({skipped} files could not be decoded): "
            "add JPEG/PNG images under its class folders"
        )
    if len(images) < num_samples:
        logger.warning(
            "asked for %d calibration images but %s has only %d readable: using %d",
            num_samples,
            dataset.root,
            len(images),
            len(images),
        )
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise DataError(
            f"calibration images have different shapes {sorted(shapes)[:3]}: use a transform "
            "with a fixed center crop (e.g. Preprocessing.to_transform())"
        )
    batch = torch.stack(images)
    check_finite(batch, f"calibration data from {dataset.root}")
    logger.info(
        "loaded %d calibration images %s from %s", len(images), tuple(batch.shape), dataset.root
    )
    return batch
