"""What a unit's reconstruction needs from the whole network: its cached inputs and targets, and
the gradients of a network loss at its outputs (the Fisher weights)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from ..distributed import SINGLE_PROCESS, DistContext
from ..errors import DataError, ModelError
from ..graph.model import QuantizedModel, Unit
from .cache import GRAD, ActivationCache

logger = logging.getLogger(__name__)

CAPTURE_BATCH = 64


def as_tuple(out: Any) -> tuple[Tensor, ...]:
    """A module's output as a tuple of tensors (a single tensor becomes a 1-tuple)."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def calibration_tensor(data: Tensor | DataLoader | Iterable, limit: int) -> Tensor:
    """The first `limit` calibration samples as one tensor, checked for NaN/inf."""
    if isinstance(data, Tensor):
        samples = data[:limit]
    else:
        chunks, total = [], 0
        for batch in data:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, Tensor):
                raise DataError("calibration batches must be tensors or (tensor, label) pairs")
            chunks.append(x)
            total += x.shape[0]
            if total >= limit:
                break
        if not chunks:
            raise DataError("the calibration data is empty: pass at least one sample")
        samples = torch.cat(chunks)[:limit]
    if samples.shape[0] == 0:
        raise DataError("the calibration data is empty: pass at least one sample")
    if not torch.isfinite(samples).all():
        bad = int((~torch.isfinite(samples)).flatten(1).any(1).sum())
        raise DataError(
            f"{bad} calibration sample(s) contain NaN or inf: clean or drop them before quantizing"
        )
    if samples.shape[0] < limit:
        logger.warning("calibration data has %d samples, fewer than the %d asked for",
                       samples.shape[0], limit)
    return samples


class _Captured(Exception):
    """Raised from a hook to stop the forward pass once the unit has run."""


def batches(data: Tensor, device: torch.device, batch: int = CAPTURE_BATCH) -> Iterator[Tensor]:
    """`data` in consecutive mini-batches of `batch` samples, on `device`."""
    for start in range(0, data.shape[0], batch):
        yield data[start : start + batch].to(device)


@torch.no_grad()
def capture(
    qmodel: QuantizedModel, unit: Unit, data: Tensor, device: torch.device,
    cache: ActivationCache, *, weights: bool, acts: bool, inputs_key: str | None,
    outputs_key: str | None,
) -> None:
    """Run the network (in the given quantization state) up to `unit`; cache its inputs/outputs."""

    def hook(module, args, output):  # noqa: ANN001
        if inputs_key is not None:
            for k, value in enumerate(args):
                cache.append(f"{inputs_key}{k}", value)
        if outputs_key is not None:
            for k, value in enumerate(as_tuple(output)):
                cache.append(f"{outputs_key}{k}", value)
        raise _Captured

    handle = unit.module.register_forward_hook(hook)
    try:
        with qmodel.quantization(weights=weights, acts=acts):
            for x in batches(data, device):
                with contextlib.suppress(_Captured):
                    qmodel(x)
    finally:
        handle.remove()
    cache.finish()


def _logits(output) -> Tensor:  # noqa: ANN001
    if isinstance(output, Tensor):
        return output
    raise ModelError(
        "the Fisher loss needs a model that returns a logits tensor; use --loss mse for this model"
    )


@torch.no_grad()
def float_logits(qmodel: QuantizedModel, data: Tensor, device: torch.device) -> Tensor:
    with qmodel.quantization(weights=False, acts=False):
        return torch.cat([_logits(qmodel(x)).float().cpu() for x in batches(data, device)])


# The network loss of one mini-batch: (network output, index of its first sample) -> scalar.
BatchLoss = Callable[[Any, int], Tensor]


def output_gradients(qmodel: QuantizedModel, unit: Unit, data: Tensor, device: torch.device,
                     batch_loss: BatchLoss, *, weights: bool, acts: bool) -> list[list[Tensor]]:
    """Per mini-batch, the gradient of `batch_loss` at each of the unit's outputs (zeros where
    the loss does not depend on one), the network in the given quantization state."""
    outputs: list[Tensor] = []

    def hook(module, args, output):  # noqa: ANN001
        leaves = [o.detach().requires_grad_(True) for o in as_tuple(output)]
        outputs.extend(leaves)
        return type(output)(leaves) if isinstance(output, (tuple, list)) else leaves[0]

    handle = unit.module.register_forward_hook(hook)
    grads: list[list[Tensor]] = []
    try:
        with torch.enable_grad(), qmodel.quantization(weights=weights, acts=acts):
            for start, x in zip(range(0, data.shape[0], CAPTURE_BATCH), batches(data, device)):
                outputs.clear()
                loss = batch_loss(qmodel(x), start)
                gs = torch.autograd.grad(loss, outputs, allow_unused=True)
                grads.append([(g if g is not None else torch.zeros_like(o)).detach()
                              for g, o in zip(gs, outputs)])
    finally:
        handle.remove()
    return grads


def capture_fisher(
    qmodel: QuantizedModel, unit: Unit, data: Tensor, fp_logits: Tensor, device: torch.device,
    cache: ActivationCache, *, acts: bool, dist: DistContext = SINGLE_PROCESS,
    floor: float = 0.0,
) -> None:
    """Squared gradient of KL(float || quantized network) at the unit output, mean-normalized
    (by the mean over all ranks' samples), plus `floor`, over 1 + `floor` (mean weight 1).

    The pure squared gradient is heavy-tailed: most output elements get almost no weight. A
    floor keeps the plain output error of every element in the objective.

    The network runs in its current quantization state (earlier units reconstructed, this and
    later ones at their initial rounding); the gradient is taken at the unit's quantized output.
    """

    def kl_to_float(output: Any, start: int) -> Tensor:
        logits = _logits(output)
        target = fp_logits[start : start + logits.shape[0]].to(device)
        return F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(target, dim=1),
                        reduction="sum", log_target=True)

    grads = output_gradients(qmodel, unit, data, device, kl_to_float, weights=True, acts=acts)
    for k in range(len(grads[0])):
        squared = torch.cat([g[k] for g in grads]).pow(2)
        normalized = squared / dist.global_mean(squared).clamp_min(1e-12)
        cache.append(f"{GRAD}{k}", (normalized + floor) / (1 + floor))
    cache.finish()
