"""How a unit's steps run: one `UnitStep`, called plainly, compiled, or replayed as a CUDA graph.

An executor takes a `UnitTask` and its progress bar, runs up to `schedule.iters` steps and
returns how many it ran (fewer when a step-size pass converged early).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..runtime import capture_graph, run_on_side_stream
from .early_stop import HoldoutStop
from .objective import Objective, UnitObjective
from .step import LoopOptions, LossMonitor, UnitStep, UnitTask, make_optimizers

logger = logging.getLogger(__name__)

Executor = Callable[[UnitTask, tqdm], int]

# Steps run eagerly (on a side stream on CUDA) before capture: they initialize the optimizer state
# and cuDNN/cuBLAS workspaces, which a capture must not do.
GRAPH_WARMUP_STEPS = 3


def _run_steps(step: UnitStep, bar: tqdm, advance: Callable[[int], None] | None = None) -> int:
    """Up to `schedule.iters` steps, each by `advance(step number)` (default: zero the gradients
    and call the step); stops early when the step-size pass converged, or where held-out early
    stopping ends it (`early_stop.HoldoutStop`). Returns the steps run."""
    monitor = LossMonitor(step.task, step.window, bar)
    patience = step.task.options.holdout_patience
    holdout = HoldoutStop(step, patience) if patience and step.task.holdout else None
    end, done = step.task.schedule.iters, 0
    while done < end:
        done += 1
        if advance is None:
            step.zero_grad()
            step()
        else:
            advance(done)
        bar.update(1)
        if monitor.converged(done):
            return done
        if holdout is not None:
            end = holdout.end_after(done, end)
    return end


def run_plain(task: UnitTask, bar: tqdm) -> int:
    """Each step called eagerly."""
    return _run_steps(UnitStep(task, make_optimizers(task, fused=True)), bar)


def run_compiled(task: UnitTask, bar: tqdm) -> int:
    """Each step with its forward, loss and regularizer under torch.compile (CUDA graphs on
    CUDA); eagerly if compiling fails."""
    step = UnitStep(task, make_optimizers(task, fused=True))
    mode = "reduce-overhead" if step.device.type == "cuda" else None
    compiled = torch.compile(step.regularized_loss, mode=mode, dynamic=False)
    # Compile on the first step's batch, without QDrop's draws (they would shift the masks).
    tables = step.tables
    probe = (*task.objective.local_batch(tables.indices[0]), tables.betas[0], tables.lambdas[0])
    try:
        loss = compiled(*probe)
        if loss.requires_grad:
            loss.backward()
        step.loss_fn = compiled
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
        logger.warning("torch.compile failed (%s: %s); reconstructing eagerly",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return _run_steps(step, bar)


class _GraphReplay:
    """Advances a `UnitStep`: a few warm-up steps (on a side stream on CUDA), then the step
    captured once as a CUDA graph and replayed; eagerly off CUDA or when the capture fails."""

    def __init__(self, step: UnitStep) -> None:
        self.step, self.device = step, step.device
        self.capture = self.device.type == "cuda"
        self.warmup = min(GRAPH_WARMUP_STEPS, step.task.schedule.iters)
        drop = step.task.drop_generator
        self.generators = [drop] if drop is not None else []
        self.replay: Callable[[], None] | None = None

    def __call__(self, done: int) -> None:
        if self.replay is not None:
            self.replay()
            return
        self.step.zero_grad()
        if self.capture and done > self.warmup:
            # Gradients are created inside the capture, in the graph's memory pool: every replay
            # then overwrites them rather than adding to the previous step's.
            self.replay = capture_graph(self.step, self.device, self.step.task.description,
                                        self.generators)
            if self.replay is None:  # capture failed: this and the remaining steps run eagerly
                self.capture = False
                self.step.zero_grad()
                self.step()
            else:
                self.replay()
        elif self.capture:
            run_on_side_stream(self.step, self.device)
        else:
            self.step()


def run_graph(task: UnitTask, bar: tqdm) -> int:
    """A few warm-up steps, then the step captured once as a CUDA graph and replayed: everything
    a step reads changes on the device, so a replay is one launch. Off CUDA (how its logic is
    tested without a GPU) the same step, with the same device-side tables, runs eagerly."""
    step = UnitStep(task, make_optimizers(task, fused=True, graph=True))
    return _run_steps(step, bar, _GraphReplay(step))


def select_executor(objective: Objective, options: LoopOptions) -> Executor:
    """CUDA-graph replay on CUDA in one process with the cache on the device; compiled when
    asked; plain otherwise."""
    # The cache's index device is the GPU only when every cached tensor is on it (a split cache
    # gathers on the host, which a graph cannot capture). Compare types: "cuda" != "cuda:0".
    if (options.cuda_graph and not options.compile and isinstance(objective, UnitObjective)
            and objective.device.type == "cuda" and objective.index_device.type == "cuda"):
        return run_graph
    return run_compiled if options.compile else run_plain
