"""Optimize one unit: AdaRound rounding, activation step sizes (LSQ), or both (QDrop).

The unit's cached inputs come from the quantized network and its targets from the float one;
the loss is the unit's output error (optionally Fisher-weighted) plus, for the weights, the
rounding regularizer with an annealed beta. This module only sequences the math in
`brecq.quant.primitives`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..distributed import SINGLE_PROCESS, DistContext
from ..errors import ReconstructionError
from ..quant import primitives as P
from ..quant import state
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from .cache import ActivationCache

logger = logging.getLogger(__name__)

Q_IN = "q_in/"
FP_IN = "fp_in/"
FP_OUT = "fp_out/"
GRAD = "grad/"


class NonFiniteLossError(ReconstructionError, FloatingPointError):
    """The reconstruction loss became NaN or inf."""


@dataclass(frozen=True)
class Schedule:
    iters: int
    batch_size: int
    weight_lr: float
    act_lr: float
    round_lambda: float
    beta_start: float
    beta_end: float
    warmup: float
    loss_p: float
    drop_prob: float  # QDrop; 0 disables


def _as_tuple(out) -> tuple[Tensor, ...]:  # noqa: ANN001
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class UnitObjective:
    """Output error of a unit on cached mini-batches."""

    def __init__(self, unit: nn.Module, cache: ActivationCache, loss_p: float) -> None:
        self.unit = unit
        self.cache = cache
        self.loss_p = loss_p
        self.input_keys = cache.keys_with_prefix(Q_IN)
        self.fp_input_keys = cache.keys_with_prefix(FP_IN)
        self.output_keys = cache.keys_with_prefix(FP_OUT)
        self.grad_keys = cache.keys_with_prefix(GRAD)

    @property
    def num_samples(self) -> int:
        return len(self.cache)

    def inputs(self, index: Tensor, drop_prob: float) -> list[Tensor]:
        inputs = [self.cache.batch(k, index) for k in self.input_keys]
        if drop_prob > 0 and self.fp_input_keys:
            # QDrop on the unit input: each element is the float input with probability p.
            mixed = []
            for q_in, key in zip(inputs, self.fp_input_keys):
                fp_in = self.cache.batch(key, index)
                mixed.append(torch.where(torch.rand_like(q_in) < drop_prob, fp_in, q_in))
            inputs = mixed
        return inputs

    def error(self, index: Tensor, drop_prob: float = 0.0) -> Tensor:
        outputs = _as_tuple(self.unit(*self.inputs(index, drop_prob)))
        total = outputs[0].new_zeros(())
        for k, out in enumerate(outputs):
            target = self.cache.batch(self.output_keys[k], index)
            weight = self.cache.batch(self.grad_keys[k], index) if self.grad_keys else None
            total = total + P.lp_error(out, target, self.loss_p, weight)
        return total

    @torch.no_grad()
    def full_error(self, batch_size: int = 256) -> float:
        """Mean error over all cached samples (quantization as it is now, no dropping)."""
        count = len(self.cache)
        total, seen = 0.0, 0
        for start in range(0, count, batch_size):
            index = torch.arange(start, min(count, start + batch_size))
            total += float(self.error(index)) * len(index)
            seen += len(index)
        return total / max(1, seen)


class ShardedObjective:
    """A unit's error over the union of every rank's cache; each rank holds its own shard.

    Mini-batch indices are global (ranks' shards in rank order); each rank computes the error of
    the samples it owns, weighted by their share of the batch, so the sum over ranks is the
    single-process mean error and, once gradients are summed across ranks, its gradient.
    """

    def __init__(self, local: UnitObjective, dist: DistContext) -> None:
        self.local = local
        self.dist = dist
        sizes = dist.sizes(local.num_samples)
        self.offset = sum(sizes[: dist.rank])
        self.num_samples = sum(sizes)

    def error(self, index: Tensor, drop_prob: float = 0.0) -> Tensor:
        owned = index[(index >= self.offset) & (index < self.offset + self.local.num_samples)]
        if owned.numel() == 0:
            # Nothing of this batch is here: no gradient (sum_gradients counts it as zero).
            return torch.zeros((), device=self.local.cache.compute_device, requires_grad=True)
        share = owned.numel() / index.numel()
        return self.local.error(owned - self.offset, drop_prob) * share

    def full_error(self, batch_size: int = 256) -> float:
        count = self.local.num_samples
        total, seen = self.dist.sum_values([self.local.full_error(batch_size) * count, count])
        return total / seen


def optimize_unit(
    unit: nn.Module,
    cache: ActivationCache,
    weight_quantizers: Sequence[tuple[WeightQuantizer, Tensor]],
    act_quantizers: Sequence[ActQuantizer],
    schedule: Schedule,
    generator: torch.Generator,
    description: str = "",
    dist: DistContext = SINGLE_PROCESS,
) -> tuple[float, float]:
    """Optimize the given quantizers of `unit`; returns the output error before and after.

    `weight_quantizers` pairs each quantizer with its float weight: they get learned rounding.
    `act_quantizers` get their step sizes learned. Either may be empty. With several ranks
    (`dist`), `cache` holds this rank's shard and every rank ends with the same parameters.
    """
    objective = UnitObjective(unit, cache, schedule.loss_p)
    if dist.distributed:
        objective = ShardedObjective(objective, dist)
    before = objective.full_error()
    if schedule.iters == 0 or (not weight_quantizers and not act_quantizers):
        return before, before

    rounding = [q.begin_adaround(w) for q, w in weight_quantizers]
    optimizers = []
    if rounding:
        optimizers.append(torch.optim.Adam(rounding, lr=schedule.weight_lr))
    scheduler = None
    if act_quantizers:
        act_opt = torch.optim.Adam([q.scale for q in act_quantizers], lr=schedule.act_lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(act_opt, T_max=schedule.iters)
        optimizers.append(act_opt)
    wqs = [q for q, _ in weight_quantizers]
    count = objective.num_samples
    bar = tqdm(range(schedule.iters), desc=description, leave=False, dynamic_ncols=True,
               mininterval=1.0, disable=None if dist.is_main else True)
    with state.soft_rounding(wqs), state.dropping(act_quantizers, schedule.drop_prob):
        for step in bar:
            index = torch.randint(count, (min(schedule.batch_size, count),), generator=generator)
            loss = objective.error(index, schedule.drop_prob)
            beta = P.beta_schedule(step, schedule.iters, schedule.warmup, schedule.beta_start,
                                   schedule.beta_end)
            if rounding and beta is not None and schedule.round_lambda > 0 and dist.is_main:
                loss = loss + schedule.round_lambda * sum(q.regularizer(beta) for q in wqs)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.sum_gradients([*rounding, *(q.scale for q in act_quantizers)])
            for opt in optimizers:
                opt.step()
            if scheduler is not None:
                scheduler.step()
            for q in act_quantizers:
                with torch.no_grad():
                    q.scale.clamp_(min=1e-8)
            if step % 500 == 0 or step == schedule.iters - 1:
                value = dist.sum_values([float(loss.detach())])[0]
                if not torch.isfinite(torch.tensor(value)):
                    raise NonFiniteLossError(
                        f"reconstruction loss became {value} at iteration {step} of {description}:"
                        " check the calibration data for extreme values, or lower --w-lr/--a-lr"
                    )
                bar.set_postfix(loss=f"{value:.4g}")
    after = objective.full_error()
    return before, after
