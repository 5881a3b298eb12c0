"""Model-wide quantization state as context managers.

Each manager calls the quantizers' own methods on entry and restores what it found on exit, so
a state never leaks out of the `with` block that set it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .quantizers import ActQuantizer, Sampler, WeightQuantizer


def weight_quantizers_of(module: nn.Module) -> list[WeightQuantizer]:
    return [m for m in module.modules() if isinstance(m, WeightQuantizer)]


def act_quantizers_of(module: nn.Module) -> list[ActQuantizer]:
    return [m for m in module.modules() if isinstance(m, ActQuantizer)]


@contextmanager
def quantization(module: nn.Module, *, weights: bool, acts: bool) -> Iterator[None]:
    """Enable or disable weight and activation quantization inside `module`."""
    weight_qs = weight_quantizers_of(module)
    act_qs = act_quantizers_of(module)
    saved = [(q, q.enabled) for q in [*weight_qs, *act_qs]]
    try:
        for q in weight_qs:
            q.enable(weights)
        for q in act_qs:
            q.enable(acts)
        yield
    finally:
        for q, enabled in saved:
            q.enable(enabled)


@contextmanager
def calibrating(act_quantizers: Iterable[ActQuantizer], method: str, p: float,
                sampler: Sampler | None = None) -> Iterator[None]:
    """Uninitialized activation quantizers take their scale from the first tensor they see.

    `sampler` (see `ActQuantizer.calibrate`) chooses the elements each scale search runs on.
    """
    quantizers = list(act_quantizers)
    try:
        for q in quantizers:
            q.begin_calibration(method, p, sampler)
        yield
    finally:
        for q in quantizers:
            q.end_calibration()


@contextmanager
def dropping(act_quantizers: Iterable[ActQuantizer], prob: float,
             generator: torch.Generator | None = None) -> Iterator[None]:
    """QDrop: each activation element keeps its float value with probability `prob` (drawn from
    `generator`)."""
    quantizers = list(act_quantizers)
    saved = [(q.drop_prob, q.drop_generator) for q in quantizers]
    try:
        for q in quantizers:
            q.set_drop(prob, generator)
        yield
    finally:
        for q, (prob_before, generator_before) in zip(quantizers, saved):
            q.set_drop(prob_before, generator_before)


@contextmanager
def soft_rounding(weight_quantizers: Iterable[WeightQuantizer]) -> Iterator[None]:
    """Learned rounding is soft (differentiable) inside, hard again on exit."""
    quantizers = [q for q in weight_quantizers if q.learned]
    try:
        for q in quantizers:
            q.set_soft(True)
        yield
    finally:
        for q in quantizers:
            q.set_soft(False)
