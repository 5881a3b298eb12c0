"""One optimization step of a unit (forward, loss, regularizer, backward, optimizer step, clamp)
and what it reads: the run's schedule, its per-step tables and its optimizers.

Every per-step value (mini-batch indices, regularizer beta and weight, and for a replayed CUDA
graph the step sizes' learning rate) is read on the device through a step counter that the step
advances itself: the same step runs eagerly, compiled or captured once and replayed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import ReconRecipe
from ..distributed import DistContext
from ..errors import ReconstructionError
from ..methods import Phase
from ..quant import primitives as P
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from ..runtime import reduced_precision
from .objective import Objective

logger = logging.getLogger(__name__)

# Steps between loss checks (finite? converged?): the only host synchronizations of a pass.
CHECK_EVERY = 500
# Step sizes never reach zero (a zero step would divide by zero in the fake quantizer).
MIN_SCALE = 1e-8


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

    @classmethod
    def for_phase(cls, recipe: ReconRecipe, phase: Phase, iters: int | None = None) -> Schedule:
        """The settings of one phase of a resolved recipe (`BrecqConfig.resolved()`); `iters`
        replaces the recipe's iterations per unit. The one config -> schedule mapping."""
        return cls(
            iters=recipe.iterations(phase) if iters is None else iters,
            batch_size=recipe.batch_size, weight_lr=recipe.weight_lr, act_lr=recipe.step_size_lr,
            round_lambda=recipe.round_lambda, beta_start=recipe.beta_start,
            beta_end=recipe.beta_end, warmup=recipe.warmup,
            # Step sizes learned alone use the Lp loss of `act_loss_p`; passes with the rounding,
            # MSE.
            loss_p=2.0 if phase.learns_weights else recipe.act_loss_p,
            drop_prob=recipe.drop_prob if phase.drops else 0.0,
        )


@dataclass(frozen=True)
class LoopOptions:
    """How a unit's optimization runs. Only `autocast` changes the arithmetic (by design)."""

    autocast: str = "none"
    compile: bool = False
    early_stop: float = 0.0  # step-size-only passes: stop when a window improves less than this
    holdout_patience: int = 0  # checks of the held-out error without improvement (0: off)
    channels_last: bool = False  # 4-D batches in NHWC layout (faster convolutions on some devices)
    cuda_graph: bool = True  # on CUDA: replay each step from a captured CUDA graph


@dataclass(frozen=True)
class UnitTask:
    """One unit's optimization: the objective, what is learned, and how the steps run."""

    objective: Objective
    wqs: list[WeightQuantizer]
    act_quantizers: Sequence[ActQuantizer]
    schedule: Schedule
    options: LoopOptions
    dist: DistContext
    generator: torch.Generator  # mini-batch indices (the same on every rank)
    drop_generator: torch.Generator | None  # QDrop masks (one stream per rank)
    description: str
    holdout: int = 0  # the last samples of the cache, held out for early stopping (never drawn)

    def check(self, local_value: float, step: int, bar: tqdm) -> float:
        """The loss summed over ranks; raises if it is not finite."""
        value = self.dist.sum_values([local_value])[0] if self.dist.distributed else local_value
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"reconstruction loss became {value} at iteration {step} of {self.description}:"
                " check the calibration data for extreme values, or lower --w-lr/--a-lr"
            )
        bar.set_postfix(loss=f"{value:.4g}")
        return value


def cosine_lrs(base: float, iters: int) -> list[float]:
    """Cosine annealing from `base` to 0 over `iters` steps: the learning rate of each step."""
    return [base * (1 + math.cos(math.pi * k / iters)) / 2 for k in range(iters)]


def clamp_scales(act_quantizers: Sequence[ActQuantizer]) -> None:
    with torch.no_grad():
        for q in act_quantizers:
            q.scale.clamp_(min=MIN_SCALE)


def make_optimizers(task: UnitTask, fused: bool, graph: bool = False) -> list[torch.optim.Optimizer]:
    """Adam for the rounding variables and, last, for the step sizes.

    With `graph` the step-size learning rate is a device tensor (set each step from a table on
    the device), and on CUDA the optimizers keep their state on the device (`capturable`) so
    that a CUDA graph can replay their steps.
    """
    rounding = [q.alpha for q in task.wqs]
    scales = [q.scale for q in task.act_quantizers]
    # Fused Adam: one kernel for all parameters instead of several per parameter (where torch
    # has it: CPU and CUDA; elsewhere the default implementation).
    params = [*rounding, *scales]
    fusable = all(p.device.type in ("cpu", "cuda") for p in params)
    extra: dict = {"fused": True} if fused and fusable else {}
    if graph and params and params[0].device.type == "cuda":
        extra["capturable"] = True
    optimizers: list[torch.optim.Optimizer] = []
    if rounding:
        optimizers.append(torch.optim.Adam(rounding, lr=task.schedule.weight_lr, **extra))
    if scales:
        lr = torch.tensor(task.schedule.act_lr, device=scales[0].device) if graph else task.schedule.act_lr
        optimizers.append(torch.optim.Adam(scales, lr=lr, **extra))
    return optimizers


class StepSizeLR:
    """The step sizes' cosine-annealed learning rate, set before each of their optimizer steps:
    from the host (a plain float) or, for a replayed graph, from a table on the device."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule) -> None:
        self.group = optimizer.param_groups[0]
        self.rates = cosine_lrs(schedule.act_lr, schedule.iters)
        lr = self.group["lr"]
        self.table = (torch.tensor(self.rates, dtype=lr.dtype, device=lr.device)
                      if isinstance(lr, Tensor) else None)
        self.host_step = 0

    def set(self, counter: Tensor) -> None:
        if self.table is not None:
            self.group["lr"].copy_(self.table.index_select(0, counter).squeeze(0))
        else:
            self.group["lr"] = self.rates[self.host_step]
            self.host_step += 1


@dataclass(frozen=True)
class StepTables:
    """Mini-batch indices [iters, batch], regularizer beta and weight [iters] of every step."""

    indices: Tensor
    betas: Tensor
    lambdas: Tensor

    @classmethod
    def draw(cls, task: UnitTask) -> StepTables:
        schedule, objective = task.schedule, task.objective
        count, device = objective.num_samples - task.holdout, objective.device
        # One draw for the whole unit: no host-to-device copy per step.
        indices = torch.randint(count, (schedule.iters, min(schedule.batch_size, count)),
                                generator=task.generator).to(objective.index_device)
        # The regularizer's weight (0 during warm-up; counted once over ranks) and beta for every
        # step, on the device, so a compiled step sees tensors, not a new Python constant each step.
        betas, lambdas = [], []
        for step in range(schedule.iters):
            beta = P.beta_schedule(step, schedule.iters, schedule.warmup, schedule.beta_start,
                                   schedule.beta_end)
            betas.append(schedule.beta_start if beta is None else beta)
            off = beta is None or not task.wqs or not task.dist.is_main
            lambdas.append(0.0 if off else schedule.round_lambda)
        return cls(indices, torch.tensor(betas, device=device), torch.tensor(lambdas, device=device))


class UnitStep:
    """One optimization step; calling it runs the step and advances the step counter.

    `loss_fn` (forward, loss and regularizer) is what a compiling executor may replace.
    """

    def __init__(self, task: UnitTask, optimizers: list[torch.optim.Optimizer]) -> None:
        self.task = task
        self.optimizers = optimizers
        self.device = task.objective.device
        self.tables = StepTables.draw(task)
        self.lr = StepSizeLR(optimizers[-1], task.schedule) if task.act_quantizers else None
        self.counter = torch.zeros(1, dtype=torch.long, device=self.device)
        self.window = torch.zeros((), device=self.device)  # summed loss since the last check
        self.loss_fn = self.regularized_loss

    def regularized_loss(self, batch: tuple | None, share: float, beta: Tensor,
                         lam: Tensor) -> Tensor:
        if batch is None:  # another rank holds every sample of this step
            loss = torch.zeros((), device=self.device)
        else:
            with reduced_precision(self.task.options.autocast, self.device):
                loss = self.task.objective.loss(*batch) * share
        if self.task.wqs:
            loss = loss + lam * sum(q.regularizer(beta) for q in self.task.wqs)
        return loss

    def inputs(self, counter: Tensor) -> tuple[tuple | None, float, Tensor, Tensor]:
        """The batch, its share of the error, beta and the regularizer weight of step `counter`."""
        tables = self.tables
        index = tables.indices.index_select(0, counter.to(tables.indices.device)).squeeze(0)
        batch, share = self.task.objective.local_batch(index, self.task.schedule.drop_prob)
        return (batch, share, tables.betas.index_select(0, counter).squeeze(0),
                tables.lambdas.index_select(0, counter).squeeze(0))

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        task = self.task
        loss = self.loss_fn(*self.inputs(self.counter))
        if loss.requires_grad:
            loss.backward()
        else:  # nothing to differentiate on this rank: it still joins the gradient sum
            torch.zeros((), device=self.device, requires_grad=True).backward()
        if task.dist.distributed:
            task.dist.sum_gradients([*(q.alpha for q in task.wqs),
                                     *(q.scale for q in task.act_quantizers)])
        if self.lr is not None:
            self.lr.set(self.counter)
        for opt in self.optimizers:
            opt.step()
        clamp_scales(task.act_quantizers)
        self.window.add_(loss.detach())
        self.counter.add_(1)


class LossMonitor:
    """Checks the mean loss of every CHECK_EVERY steps (finite? converged?).

    These checks are the only host synchronizations of a pass.
    """

    def __init__(self, task: UnitTask, window: Tensor, bar: tqdm) -> None:
        self.task, self.window, self.bar = task, window, bar
        self.previous: float | None = None
        # Annealed rounding must run to its end; only step-size passes may stop early.
        self.early_stop = task.options.early_stop if not task.wqs else 0.0

    def converged(self, done: int) -> bool:
        """After `done` steps: check the window if it is full (or the pass ends); stop now?"""
        iters = self.task.schedule.iters
        if done % CHECK_EVERY and done != iters:
            return False
        steps_in_window = done % CHECK_EVERY or CHECK_EVERY
        value = self.task.check(float(self.window) / steps_in_window, done - 1, self.bar)
        self.window.zero_()
        previous, self.previous = self.previous, value
        if self.early_stop > 0 and previous is not None and previous - value < self.early_stop * previous:
            logger.debug("%s: converged after %d iterations", self.task.description, done)
            return True
        return False
