"""The straightforward reconstruction loop the library started from, kept as the speed baseline.

Each step draws its mini-batch on the host, computes beta as a Python float, rebuilds the loss
and takes one unfused Adam step per parameter; the loss is read back on the host every
CHECK_EVERY steps. It optimizes the same objective as the library's executors, with the same
samples in the same order, so its result agrees with theirs up to float rounding; only its
speed differs. `speed.py` times it against them (variant `eager`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from brecq.quant import primitives as P
from brecq.recon import reconstruct
from brecq.recon.step import CHECK_EVERY, UnitTask, clamp_scales, cosine_lrs, make_optimizers
from brecq.runtime import reduced_precision


def run_eager(task: UnitTask, bar: tqdm) -> int:
    """An executor (see `brecq.recon.executors`) that runs every step the straightforward way."""
    schedule, objective, wqs = task.schedule, task.objective, task.wqs
    optimizers = make_optimizers(task, fused=False)
    step_size_rates = cosine_lrs(schedule.act_lr, schedule.iters)
    count = objective.num_samples
    for step in range(schedule.iters):
        index = torch.randint(count, (min(schedule.batch_size, count),), generator=task.generator)
        with reduced_precision(task.options.autocast, objective.device):
            loss = objective.error(index, schedule.drop_prob)
        beta = P.beta_schedule(step, schedule.iters, schedule.warmup, schedule.beta_start,
                               schedule.beta_end)
        if wqs and beta is not None and schedule.round_lambda > 0 and task.dist.is_main:
            loss = loss + schedule.round_lambda * sum(q.regularizer(beta) for q in wqs)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if task.dist.distributed:
            task.dist.sum_gradients([*(q.alpha for q in wqs),
                                     *(q.scale for q in task.act_quantizers)])
        if task.act_quantizers:
            optimizers[-1].param_groups[0]["lr"] = step_size_rates[step]
        for opt in optimizers:
            opt.step()
        clamp_scales(task.act_quantizers)
        bar.update(1)
        if step % CHECK_EVERY == 0 or step == schedule.iters - 1:
            task.check(float(loss.detach()), step, bar)
    return schedule.iters


@contextmanager
def in_pipeline() -> Iterator[None]:
    """Inside the block, `brecq.quantize` runs every unit with the eager baseline."""
    chosen = reconstruct.select_executor
    reconstruct.select_executor = lambda objective, options: run_eager
    try:
        yield
    finally:
        reconstruct.select_executor = chosen
