"""Top-1 / top-5 accuracy of a classifier over a loader or a pair of tensors, and the paired
comparison of two classifiers' top-1 decisions on the same images."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import DataError
from .progress import is_quiet

__all__ = ["decision_changes", "evaluate"]

logger = logging.getLogger(__name__)


def _batches(
    data: Any, batch_size: int
) -> tuple[Iterable[tuple[torch.Tensor, torch.Tensor]], int | None]:
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
    ):
        images, labels = data
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{images.shape[0]} images but {labels.shape[0]} labels: pass one label per image"
            )
        n = images.shape[0]
        batches = [
            (images[i : i + batch_size], labels[i : i + batch_size])
            for i in range(0, n, batch_size)
        ]
        return batches, len(batches)
    try:
        total = len(data)
    except TypeError:
        total = None
    return data, total


def evaluate(
    model: nn.Module,
    loader: Any,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    batch_size: int = 256,
    progress: bool | None = None,
    desc: str = "eval",
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of `model` and the number of images seen.

    `loader` yields `(images, labels)` batches, or is an `(images, labels)` pair of tensors
    (split into batches of `batch_size`). The model is moved to `device` and put in eval mode for
    the run; its train/eval mode is restored afterwards. `max_batches` stops early. The tqdm bar
    is shown only on a terminal unless `progress` says otherwise.
    Returns `{"top1": float, "top5": float, "count": int}`.
    """
    device = torch.device(device)
    batches, total = _batches(loader, batch_size)
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    was_training = model.training
    model.to(device)
    model.eval()
    show = (sys.stderr.isatty() and not is_quiet()) if progress is None else progress
    correct1 = correct5 = count = 0
    try:
        with torch.inference_mode():
            bar = tqdm(batches, total=total, desc=desc, disable=not show, leave=False)
            for i, (images, labels) in enumerate(bar):
                if max_batches is not None and i >= max_batches:
                    break
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                logits = model(images)
                if isinstance(logits, (tuple, list)):
                    logits = logits[0]
                k = min(5, logits.shape[-1])
                top = logits.topk(k, dim=-1).indices
                hits = top.eq(labels.view(-1, 1))
                correct1 += int(hits[:, 0].sum())
                correct5 += int(hits.any(dim=1).sum())
                count += int(labels.shape[0])
                if show:
                    bar.set_postfix(top1=f"{100.0 * correct1 / count:.2f}")
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("no images were evaluated: the evaluation data is empty")
    result = {
        "top1": 100.0 * correct1 / count,
        "top5": 100.0 * correct5 / count,
        "count": count,
    }
    logger.info(
        "%s: top-1 %.2f%%, top-5 %.2f%% on %d images", desc, result["top1"], result["top5"], count
    )
    return result


def decision_changes(reference: Any, candidate: Any, labels: Any) -> dict[str, float | int]:
    """How `candidate`'s top-1 decisions differ from `reference`'s on the same labelled images.

    Two top-1 figures a few tenths apart can come from a handful of images: what decides whether
    the difference is real is how many decisions changed and in which direction. `gained` counts
    images the candidate gets right and the reference wrong, `lost` the reverse; `p_value` is the
    exact two-sided sign test (McNemar's exact test) of gained vs lost under "either direction is
    equally likely", so a small value says the top-1 difference is unlikely to be chance of which
    borderline images flipped. Inputs are predicted and true class indices (tensors or arrays).
    """
    reference, candidate, labels = (torch.as_tensor(t).reshape(-1) for t in (reference, candidate,
                                                                             labels))
    if not reference.shape == candidate.shape == labels.shape:
        raise DataError(f"{reference.numel()} reference, {candidate.numel()} candidate predictions "
                        f"and {labels.numel()} labels: pass one prediction of each per label")
    ref_right, cand_right = reference.eq(labels), candidate.eq(labels)
    gained = int((cand_right & ~ref_right).sum())
    lost = int((ref_right & ~cand_right).sum())
    discordant = gained + lost
    # Exact binomial tail with integers: 0.5**n underflows a float past n = 1074.
    tail = sum(math.comb(discordant, k) for k in range(min(gained, lost) + 1))
    p_value = min(1.0, float(Fraction(2 * tail, 2 ** discordant)))
    return {"images": int(labels.numel()), "changed": int(reference.ne(candidate).sum()),
            "gained": gained, "lost": lost, "p_value": p_value}
