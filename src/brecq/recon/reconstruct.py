"""Optimize one unit: AdaRound rounding, activation step sizes (LSQ), or both (QDrop).

The unit's cached inputs come from the quantized network and its targets from the float one;
the loss is the unit's output error (optionally Fisher-weighted) plus, for the weights, the
rounding regularizer with an annealed beta. This module only sequences the math in
`brecq.quant.primitives`: the step itself is `step.UnitStep`, and `executors` run it plainly,
compiled, or as a replayed CUDA graph. All of them draw all mini-batch indices of a unit at once
from `generator`, keep the per-step schedule and the loss on the device (one synchronization per
500 steps) and use fused Adam; QDrop's masks come from `drop_generator`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..distributed import SINGLE_PROCESS, DistContext
from ..progress import bar_disable
from ..quant import state
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from .cache import ActivationCache
from .early_stop import holdout_size
from .executors import Executor, select_executor
from .objective import Objective, ShardedObjective, UnitObjective
from .step import LoopOptions, Schedule, UnitTask

logger = logging.getLogger(__name__)

# Timed steps of a probe (`seconds_per_step`).
PROBE_STEPS = 4


@dataclass(frozen=True)
class UnitResult:
    loss_before: float
    loss_after: float
    iterations: int
    seconds_per_iteration: float | None = None  # measured by the probe of a budgeted run


def seconds_per_step(task: UnitTask, run: Executor) -> float:
    """Seconds one step of `task` takes, timed on probe steps whose effects are undone: the
    learned parameters and the random generators are as before, so the pass that follows takes
    exactly the steps it would have taken without the probe. (An untimed step pays what only the
    first pays, e.g. lazy initializations; then runs of 1 and 1 + PROBE_STEPS steps, whose
    difference leaves out the setup that every run pays once.)"""
    alphas = [q.alpha.detach().clone() for q in task.wqs]
    scales = [q.scale.detach().clone() for q in task.act_quantizers]
    generators = [g for g in (task.generator, task.drop_generator) if g is not None]
    states = [g.get_state() for g in generators]
    quiet = dataclasses.replace(task.options, early_stop=0.0, holdout_patience=0)
    seconds = []
    for steps in (1, 1, 1 + PROBE_STEPS):
        probe = dataclasses.replace(
            task, schedule=dataclasses.replace(task.schedule, iters=steps), options=quiet)
        started = time.perf_counter()
        run(probe, tqdm(total=steps, disable=True))  # ends with a host synchronization
        seconds.append(time.perf_counter() - started)
    with torch.no_grad():
        for q, alpha in zip(task.wqs, alphas):
            q.alpha.copy_(alpha)
            q.alpha.grad = None
        for q, scale in zip(task.act_quantizers, scales):
            q.scale.copy_(scale)
            q.scale.grad = None
    for g, saved in zip(generators, states):
        g.set_state(saved)
    return max(0.0, seconds[2] - seconds[1]) / PROBE_STEPS


def optimize_unit(
    unit: nn.Module,
    cache: ActivationCache,
    weight_quantizers: Sequence[tuple[WeightQuantizer, Tensor]],
    act_quantizers: Sequence[ActQuantizer],
    schedule: Schedule,
    generator: torch.Generator,
    description: str = "",
    options: LoopOptions | None = None,
    dist: DistContext = SINGLE_PROCESS,
    drop_generator: torch.Generator | None = None,
    executor: Executor | None = None,
    plan: Callable[[float], int] | None = None,
) -> UnitResult:
    """Optimize the given quantizers of `unit`; returns the output error before and after.

    `weight_quantizers` pairs each quantizer with its float weight: they get learned rounding.
    `act_quantizers` get their step sizes learned. Either may be empty. Mini-batches are drawn
    from `generator`; QDrop (`schedule.drop_prob` > 0) needs `drop_generator` on the compute
    device. With several ranks (`dist`), `cache` holds this rank's shard and every rank ends
    with the same parameters. `executor` overrides how the steps run (`select_executor`).
    `plan(seconds per step)`, given, decides the iterations after a probe (`seconds_per_step`)
    instead of `schedule.iters` (0: the quantizers stay as they are, i.e. round to nearest).
    """
    options = options or LoopOptions()
    if schedule.drop_prob > 0 and drop_generator is None:
        raise ValueError("QDrop (drop_prob > 0) draws its masks from drop_generator: pass one")
    objective: Objective = UnitObjective(unit, cache, schedule.loss_p, options.channels_last,
                                         drop_generator)
    if dist.distributed:
        objective = ShardedObjective(objective, dist)
    before = objective.full_error()
    if schedule.iters == 0 or (not weight_quantizers and not act_quantizers):
        return UnitResult(before, before, 0)

    initial_scales = [q.scale.detach().clone() for q in act_quantizers]
    for q, w in weight_quantizers:
        q.begin_adaround(w)
    wqs = [q for q, _ in weight_quantizers]
    holdout = (holdout_size(objective.num_samples, schedule.batch_size)
               if options.holdout_patience else 0)
    task = UnitTask(objective, wqs, act_quantizers, schedule, options, dist, generator,
                    drop_generator, description, holdout)
    run = executor or select_executor(objective, options)
    step_seconds = None
    with state.soft_rounding(wqs), state.dropping(act_quantizers, schedule.drop_prob,
                                                  drop_generator):
        if plan is not None:
            step_seconds = seconds_per_step(task, run)
            task = dataclasses.replace(
                task, schedule=dataclasses.replace(schedule, iters=plan(step_seconds)))
        iterations = _run_with_bar(task, run) if task.schedule.iters else 0
    after = objective.full_error()
    if not weight_quantizers and after > before:
        # Learned step sizes that fit the unit worse than their initialization are not kept
        # (the Lp-searched scales are often already near a local optimum at low bit widths).
        with torch.no_grad():
            for q, scale in zip(act_quantizers, initial_scales):
                q.scale.copy_(scale)
        logger.info("%s: learned step sizes raised the loss %.5g -> %.5g; kept the initial ones",
                    description, before, after)
        after = objective.full_error()
    return UnitResult(before, after, iterations, step_seconds)


def _run_with_bar(task: UnitTask, run: Executor) -> int:
    # On a terminal each unit's bar stays as its record (iterations, loss, time).
    bar = tqdm(total=task.schedule.iters, desc=task.description, leave=True, dynamic_ncols=True,
               mininterval=1.0, disable=bar_disable(task.dist.is_main))
    iterations = run(task, bar)
    bar.close()
    return iterations
