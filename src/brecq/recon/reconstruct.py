"""Optimize one unit: AdaRound rounding, activation step sizes (LSQ), or both (QDrop).

The unit's cached inputs come from the quantized network and its targets from the float one;
the loss is the unit's output error (optionally Fisher-weighted) plus, for the weights, the
rounding regularizer with an annealed beta. This module only sequences the math in
`brecq.quant.primitives`.

Two loops run the same optimization. `eager` is the straightforward one (one host-side batch draw,
one Python float per regularizer beta and a fresh optimizer kernel per parameter every step); it
is kept as the speed baseline. `fast` draws all mini-batch indices of a unit at once, keeps the
per-step schedule and the loss monitor on the device (one synchronization per 500 steps), uses
fused Adam, and can run under `torch.compile` and reduced-precision autocast. On CUDA, with the
unit's cache on the device, the fast loop captures one whole step (batch gather, forward, loss,
backward, Adam step) as a CUDA graph and replays it: the step's schedule values, the mini-batch
indices and the learning rate are read on the device from a step counter that the graph itself
advances, so a replay is one launch. All loops draw the same samples from the same generator.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..distributed import SINGLE_PROCESS, DistContext
from ..errors import ReconstructionError
from ..progress import bar_disable
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


LOOPS = ("fast", "eager")
AUTOCASTS = ("none", "bf16", "fp16", "tf32")
# Mini-batch of the full-cache error evaluations: small enough that a 224x224 ResNet-50 unit's
# forward stays within a few GiB of GPU memory beside its cache.
EVAL_BATCH = 64
# Steps between loss checks (finite? converged?): the only host synchronizations of the fast loop.
CHECK_EVERY = 500


@dataclass(frozen=True)
class LoopOptions:
    """How a unit's optimization runs. Only `autocast` changes the arithmetic (by design)."""

    loop: str = "fast"
    autocast: str = "none"
    compile: bool = False
    early_stop: float = 0.0  # step-size-only passes: stop when a window improves less than this
    channels_last: bool = False  # 4-D batches in NHWC layout (faster convolutions on some devices)
    cuda_graph: bool = True  # fast loop on CUDA: replay each step from a captured CUDA graph


@dataclass(frozen=True)
class UnitResult:
    loss_before: float
    loss_after: float
    iterations: int


def _as_tuple(out) -> tuple[Tensor, ...]:  # noqa: ANN001
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@contextlib.contextmanager
def reduced_precision(kind: str, device: torch.device) -> Iterator[None]:
    """Autocast to bf16/fp16, or allow TF32 matmuls and convolutions on CUDA; `none` does nothing."""
    if kind in ("bf16", "fp16"):
        dtype = torch.bfloat16 if kind == "bf16" else torch.float16
        # No cast cache: each weight is cast once per step anyway, and a CUDA graph capture
        # must not keep cached casts from outside the graph.
        with torch.autocast(device.type, dtype=dtype, cache_enabled=False):
            yield
    elif kind == "tf32":
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    else:
        yield


class UnitObjective:
    """Output error of a unit on cached mini-batches."""

    def __init__(self, unit: nn.Module, cache: ActivationCache, loss_p: float,
                 channels_last: bool = False) -> None:
        self.unit = unit
        self.cache = cache
        self.loss_p = loss_p
        cache.use_channels_last(channels_last)
        self.input_keys = cache.keys_with_prefix(Q_IN)
        self.fp_input_keys = cache.keys_with_prefix(FP_IN)
        self.output_keys = cache.keys_with_prefix(FP_OUT)
        self.grad_keys = cache.keys_with_prefix(GRAD)

    @property
    def num_samples(self) -> int:
        return len(self.cache)

    @property
    def device(self) -> torch.device:
        return self.cache.compute_device

    @property
    def index_device(self) -> torch.device:
        return self.cache.index_device

    def local_batch(self, index: Tensor, drop_prob: float = 0.0) -> tuple[tuple | None, float]:
        """The batch of samples `index` and its share of the mean error (1: all samples here)."""
        return self.batch(index, drop_prob), 1.0

    def batch(self, index: Tensor, drop_prob: float = 0.0) -> tuple[list[Tensor], ...]:
        """Inputs, targets and Fisher weights (empty list without) of samples `index`."""
        inputs = [self.cache.batch(k, index) for k in self.input_keys]
        if drop_prob > 0 and self.fp_input_keys:
            # QDrop on the unit input: each element is the float input with probability p.
            mixed = []
            for q_in, key in zip(inputs, self.fp_input_keys):
                fp_in = self.cache.batch(key, index)
                mixed.append(torch.where(torch.rand_like(q_in) < drop_prob, fp_in, q_in))
            inputs = mixed
        targets = [self.cache.batch(k, index) for k in self.output_keys]
        weights = [self.cache.batch(k, index) for k in self.grad_keys]
        return inputs, targets, weights

    def loss(self, inputs: list[Tensor], targets: list[Tensor], weights: list[Tensor]) -> Tensor:
        outputs = _as_tuple(self.unit(*inputs))
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for k, out in enumerate(outputs):
            weight = weights[k] if weights else None
            total = total + P.lp_error(out.float(), targets[k], self.loss_p, weight)
        return total

    def error(self, index: Tensor, drop_prob: float = 0.0) -> Tensor:
        return self.loss(*self.batch(index, drop_prob))

    @torch.no_grad()
    def full_error(self, batch_size: int = EVAL_BATCH) -> float:
        """Mean error over all cached samples (quantization as it is now, no dropping)."""
        count = len(self.cache)
        total = torch.zeros((), device=self.cache.compute_device)
        for start in range(0, count, batch_size):
            index = torch.arange(start, min(count, start + batch_size))
            total += self.error(index) * len(index)
        return float(total) / max(1, count)


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
        self.device = local.device
        self.index_device = local.index_device
        self.loss = local.loss

    def local_batch(self, index: Tensor, drop_prob: float = 0.0) -> tuple[tuple | None, float]:
        owned = index[(index >= self.offset) & (index < self.offset + self.local.num_samples)]
        if owned.numel() == 0:
            return None, 0.0
        return self.local.batch(owned - self.offset, drop_prob), owned.numel() / index.numel()

    def error(self, index: Tensor, drop_prob: float = 0.0) -> Tensor:
        batch, share = self.local_batch(index, drop_prob)
        if batch is None:
            # Nothing of this batch is here: no gradient (sum_gradients counts it as zero).
            return torch.zeros((), device=self.device, requires_grad=True)
        return self.loss(*batch) * share

    def full_error(self, batch_size: int = EVAL_BATCH) -> float:
        count = self.local.num_samples
        total, seen = self.dist.sum_values([self.local.full_error(batch_size) * count, count])
        return total / seen


Objective = UnitObjective | ShardedObjective


def _optimizers(
    rounding: list[nn.Parameter], act_quantizers: Sequence[ActQuantizer], schedule: Schedule,
    fused: bool, graph: bool = False,
) -> tuple[list[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler | None]:
    """Adam for the rounding variables and for the step sizes (cosine-annealed learning rate).

    With `graph` the step-size learning rate is a device tensor that the graph loop sets each
    step from a precomputed cosine schedule (no host-side scheduler), and on CUDA the optimizers
    keep their state on the device (`capturable`) so that a CUDA graph can replay their steps.
    """
    # Fused Adam: one kernel for all parameters instead of several per parameter (where torch
    # has it: CPU and CUDA; elsewhere the default implementation).
    params = [*rounding, *(q.scale for q in act_quantizers)]
    fusable = all(p.device.type in ("cpu", "cuda") for p in params)
    extra: dict = {"fused": True} if fused and fusable else {}
    if graph and params and params[0].device.type == "cuda":
        extra["capturable"] = True
    optimizers: list[torch.optim.Optimizer] = []
    if rounding:
        optimizers.append(torch.optim.Adam(rounding, lr=schedule.weight_lr, **extra))
    scheduler = None
    if act_quantizers:
        scales = [q.scale for q in act_quantizers]
        if graph:
            lr = torch.tensor(schedule.act_lr, device=scales[0].device)
            optimizers.append(torch.optim.Adam(scales, lr=lr, **extra))
        else:
            act_opt = torch.optim.Adam(scales, lr=schedule.act_lr, **extra)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(act_opt, T_max=schedule.iters)
            optimizers.append(act_opt)
    return optimizers, scheduler


def _uses_cuda_graph(objective: Objective, options: LoopOptions) -> bool:
    """Whether the fast loop can replay captured steps: CUDA, one process, cache on the device."""
    # The cache's index device is the GPU only when every cached tensor is on it (a split cache
    # gathers on the host, which a graph cannot capture). Compare types: "cuda" != "cuda:0".
    return (options.loop == "fast" and options.cuda_graph and not options.compile
            and isinstance(objective, UnitObjective) and objective.device.type == "cuda"
            and objective.index_device.type == "cuda")


def optimize_unit(
    unit: nn.Module,
    cache: ActivationCache,
    weight_quantizers: Sequence[tuple[WeightQuantizer, Tensor]],
    act_quantizers: Sequence[ActQuantizer],
    schedule: Schedule,
    generator: torch.Generator,
    description: str = "",
    options: LoopOptions = LoopOptions(),
    dist: DistContext = SINGLE_PROCESS,
) -> UnitResult:
    """Optimize the given quantizers of `unit`; returns the output error before and after.

    `weight_quantizers` pairs each quantizer with its float weight: they get learned rounding.
    `act_quantizers` get their step sizes learned. Either may be empty. With several ranks
    (`dist`), `cache` holds this rank's shard and every rank ends with the same parameters.
    """
    objective: Objective = UnitObjective(unit, cache, schedule.loss_p, options.channels_last)
    if dist.distributed:
        objective = ShardedObjective(objective, dist)
    before = objective.full_error()
    if schedule.iters == 0 or (not weight_quantizers and not act_quantizers):
        return UnitResult(before, before, 0)

    initial_scales = [q.scale.detach().clone() for q in act_quantizers]
    rounding = [q.begin_adaround(w) for q, w in weight_quantizers]
    graph = _uses_cuda_graph(objective, options)
    optimizers, scheduler = _optimizers(rounding, act_quantizers, schedule,
                                        fused=options.loop == "fast", graph=graph)
    wqs = [q for q, _ in weight_quantizers]
    # On a terminal each unit's bar stays as its record (iterations, loss, time).
    bar = tqdm(range(schedule.iters), desc=description, leave=True, dynamic_ncols=True,
               mininterval=1.0, disable=bar_disable(dist.is_main))
    run = _graph_loop if graph else _fast_loop if options.loop == "fast" else _eager_loop
    loop = _Loop(wqs, act_quantizers, optimizers, scheduler, schedule, options, dist, description)
    with state.soft_rounding(wqs), state.dropping(act_quantizers, schedule.drop_prob):
        iterations = run(objective, loop, generator, bar)
    bar.close()
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
    return UnitResult(before, after, iterations)


@dataclass(frozen=True)
class _Loop:
    """What both loops share: the quantizers, their optimizers and how to run."""

    wqs: list[WeightQuantizer]
    act_quantizers: Sequence[ActQuantizer]
    optimizers: list[torch.optim.Optimizer]
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    schedule: Schedule
    options: LoopOptions
    dist: DistContext
    description: str

    def step(self, loss: Tensor) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.dist.distributed:
            self.dist.sum_gradients([*(q.alpha for q in self.wqs),
                                     *(q.scale for q in self.act_quantizers)])
        for opt in self.optimizers:
            opt.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.act_quantizers:
            with torch.no_grad():
                torch._foreach_clamp_min_([q.scale for q in self.act_quantizers], 1e-8)

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


def _eager_loop(objective: Objective, loop: _Loop, generator: torch.Generator, bar: tqdm) -> int:
    schedule, count = loop.schedule, objective.num_samples
    for step in bar:
        index = torch.randint(count, (min(schedule.batch_size, count),), generator=generator)
        with reduced_precision(loop.options.autocast, objective.device):
            loss = objective.error(index, schedule.drop_prob)
        beta = P.beta_schedule(step, schedule.iters, schedule.warmup, schedule.beta_start,
                               schedule.beta_end)
        if loop.wqs and beta is not None and schedule.round_lambda > 0 and loop.dist.is_main:
            loss = loss + schedule.round_lambda * sum(q.regularizer(beta) for q in loop.wqs)
        loop.step(loss)
        if step % CHECK_EVERY == 0 or step == schedule.iters - 1:
            loop.check(float(loss.detach()), step, bar)
    return schedule.iters


def _step_tensors(objective: Objective, loop: _Loop,
                  generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Mini-batch indices [iters, batch], regularizer beta and weight [iters] of every step."""
    schedule, wqs, device = loop.schedule, loop.wqs, objective.device
    count = objective.num_samples
    # One draw for the whole unit: the same samples the eager loop draws step by step, without a
    # host-to-device copy per step.
    indices = torch.randint(count, (schedule.iters, min(schedule.batch_size, count)),
                            generator=generator).to(objective.index_device)
    # The regularizer's weight (0 during warm-up; counted once over ranks) and beta for every
    # step, on the device, so a compiled step sees tensors, not a new Python constant each step.
    betas, lambdas = [], []
    for step in range(schedule.iters):
        beta = P.beta_schedule(step, schedule.iters, schedule.warmup, schedule.beta_start,
                               schedule.beta_end)
        betas.append(schedule.beta_start if beta is None else beta)
        off = beta is None or not wqs or not loop.dist.is_main
        lambdas.append(0.0 if off else schedule.round_lambda)
    return indices, torch.tensor(betas, device=device), torch.tensor(lambdas, device=device)


class _LossMonitor:
    """Sums the loss on the device and checks its mean every CHECK_EVERY steps (finite? converged?).

    These checks are the only host synchronizations of the fast and graph loops.
    """

    def __init__(self, loop: _Loop, bar: tqdm, device: torch.device) -> None:
        self.loop, self.bar = loop, bar
        self.window = torch.zeros((), device=device)
        self.previous: float | None = None
        # Annealed rounding must run to its end; only step-size passes may stop early.
        self.early_stop = loop.options.early_stop if not loop.wqs else 0.0

    def converged(self, done: int) -> bool:
        """After `done` steps: check the window if it is full (or the pass ends); stop now?"""
        iters = self.loop.schedule.iters
        if done % CHECK_EVERY and done != iters:
            return False
        steps_in_window = done % CHECK_EVERY or CHECK_EVERY
        value = self.loop.check(float(self.window) / steps_in_window, done - 1, self.bar)
        self.window.zero_()
        previous, self.previous = self.previous, value
        if self.early_stop > 0 and previous is not None and previous - value < self.early_stop * previous:
            logger.debug("%s: converged after %d iterations", self.loop.description, done)
            return True
        return False


def _fast_loop(objective: Objective, loop: _Loop, generator: torch.Generator, bar: tqdm) -> int:
    schedule, wqs, device = loop.schedule, loop.wqs, objective.device
    indices, betas_t, lambdas_t = _step_tensors(objective, loop, generator)

    def step_loss(batch: tuple, share: float, beta: Tensor, lam: Tensor) -> Tensor:
        if batch is None:  # another rank holds every sample of this step
            loss = torch.zeros((), device=device)
        else:
            with reduced_precision(loop.options.autocast, device):
                loss = objective.loss(*batch) * share
        if wqs:
            loss = loss + lam * sum(q.regularizer(beta) for q in wqs)
        return loss

    if loop.options.compile:
        step_loss = _compiled(step_loss, device, objective.local_batch(indices[0]), betas_t[0],
                              lambdas_t[0], loop.optimizers)
    monitor = _LossMonitor(loop, bar, device)
    for step in bar:
        loss = step_loss(*objective.local_batch(indices[step], schedule.drop_prob),
                         betas_t[step], lambdas_t[step])
        if loss.requires_grad:
            loop.step(loss)
        else:  # nothing to differentiate on this rank: it still joins the gradient sum
            loop.step(torch.zeros((), device=device, requires_grad=True))
        monitor.window += loss.detach()
        if monitor.converged(step + 1):
            return step + 1
    return schedule.iters


# Steps run eagerly (on a side stream on CUDA) before capture: they initialize the optimizer state
# and cuDNN/cuBLAS workspaces, which a capture must not do.
GRAPH_WARMUP_STEPS = 3


def _graph_loop(objective: UnitObjective, loop: _Loop, generator: torch.Generator, bar: tqdm,
                capture: bool | None = None) -> int:
    """The fast loop's steps, replayed from one captured CUDA graph after a short warm-up.

    Everything a step reads changes on the device: a step counter (advanced inside the graph)
    selects the mini-batch indices, beta, the regularizer weight and the cosine-annealed
    step-size learning rate from per-step tables. With `capture=False` (the default off CUDA) the
    same step runs eagerly each time, which is how its logic is tested without a GPU.
    """
    schedule, wqs, device = loop.schedule, loop.wqs, objective.device
    capture = device.type == "cuda" if capture is None else capture
    indices, betas_t, lambdas_t = _step_tensors(objective, loop, generator)
    counter = torch.zeros(1, dtype=torch.long, device=device)
    act_lr: Tensor | None = None
    act_lrs: Tensor | None = None
    if loop.act_quantizers:
        act_lr = loop.optimizers[-1].param_groups[0]["lr"]
        assert isinstance(act_lr, Tensor), "graph loop needs a tensor step-size learning rate"
        # CosineAnnealingLR's schedule (eta_min 0) in closed form: the rate of step k.
        steps = torch.arange(schedule.iters, dtype=torch.float64)
        act_lrs = (schedule.act_lr * (1 + torch.cos(math.pi * steps / schedule.iters)) / 2).to(
            device=device, dtype=act_lr.dtype)
    monitor = _LossMonitor(loop, bar, device)
    window = monitor.window
    scales = [q.scale for q in loop.act_quantizers]

    def step() -> None:
        index = indices.index_select(0, counter.to(indices.device)).squeeze(0)
        beta = betas_t.index_select(0, counter).squeeze(0)
        lam = lambdas_t.index_select(0, counter).squeeze(0)
        with reduced_precision(loop.options.autocast, device):
            loss = objective.error(index, schedule.drop_prob)
        if wqs:
            loss = loss + lam * sum(q.regularizer(beta) for q in wqs)
        loss.backward()
        if act_lr is not None and act_lrs is not None:
            act_lr.copy_(act_lrs.index_select(0, counter).squeeze(0))
        for opt in loop.optimizers:
            opt.step()
        if scales:
            with torch.no_grad():
                torch._foreach_clamp_min_(scales, 1e-8)
        window.add_(loss.detach())
        counter.add_(1)

    def zero_grad() -> None:
        for opt in loop.optimizers:
            opt.zero_grad(set_to_none=True)

    replay: Callable[[], None] | None = None
    warmup = min(GRAPH_WARMUP_STEPS, schedule.iters) if capture else schedule.iters
    for done in range(1, schedule.iters + 1):
        if replay is not None:
            replay()
        elif done <= warmup or not capture:
            zero_grad()
            if capture:
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    step()
                torch.cuda.current_stream(device).wait_stream(side)
            else:
                step()
        else:
            replay = _capture_step(step, zero_grad, device, loop.description)
            if replay is None:  # capture failed: this and the remaining steps run eagerly
                capture = False
                zero_grad()
                step()
            else:
                replay()
        bar.update(1)
        if monitor.converged(done):
            return done
    return schedule.iters


def _capture_step(step: Callable[[], None], zero_grad: Callable[[], None], device: torch.device,
                  description: str) -> Callable[[], None] | None:
    """`step` captured as a CUDA graph (its replay), or None if it cannot be captured."""
    graph = torch.cuda.CUDAGraph()
    # Gradients are created inside the capture, in the graph's memory pool: every replay then
    # overwrites them rather than adding to the previous step's.
    zero_grad()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
        logger.warning("%s: CUDA graph capture failed (%s: %s); reconstructing eagerly",
                       description, type(exc).__name__,
                       str(exc).splitlines()[0] if str(exc) else "")
        torch.cuda.synchronize(device)
        return None
    return graph.replay


def _compiled(
    fn: Callable[..., Tensor], device: torch.device, probe: tuple[tuple | None, float],
    beta: Tensor, lam: Tensor, optimizers: list[torch.optim.Optimizer],
) -> Callable[..., Tensor]:
    """`fn` under torch.compile (CUDA graphs on CUDA), or `fn` itself if compiling fails."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    compiled = torch.compile(fn, mode=mode, dynamic=False)
    try:
        loss = compiled(*probe, beta, lam)
        if loss.requires_grad:
            loss.backward()
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
        logger.warning("torch.compile failed (%s: %s); reconstructing eagerly",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        compiled = fn
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return compiled
