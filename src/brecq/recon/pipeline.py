"""All units in order: capture their inputs and targets, optimize, move on.

BRECQ runs two passes over the units: learned rounding with activations off, then activation
step sizes with everything on. QDrop runs one pass that learns both, dropping quantization of
activations at random. `rtn` stops after initializing scales (round-to-nearest baseline).
Each method's phases are its entry in `brecq.methods.METHOD_REGISTRY`.
With a time budget (`recon/budget.py`) every unit's iterations are planned from measured step
times before it runs; with held-out early stopping (`recon/early_stop.py`) a unit's pass may
end early. This module only sequences them.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .. import progress
from ..config import BrecqConfig
from ..distributed import SINGLE_PROCESS, DistContext, current
from ..errors import ConfigError, ReconstructionError
from ..graph.model import QuantizedModel, Unit
from ..graph.prepare import prepare
from ..graph.reparam import layernorm_reparameterized
from ..methods import METHOD_REGISTRY, Phase
from ..quant import state
from ..runtime import CachePlacement, resolve_device
from .budget import TimeBudget, WorkKey
from .cache import FP_IN, FP_OUT, Q_IN
from .capture import calibration_tensor, capture, capture_fisher, float_logits
from .checkpoint import RunCheckpoint, RunGenerators
from .reconstruct import UnitResult, optimize_unit
from .report import QuantizationReport, UnitReport
from .step import LoopOptions, Schedule

logger = logging.getLogger(__name__)


def _unit_params(qmodel: QuantizedModel, unit: Unit) -> int:
    return sum(qmodel.layers[name].num_weight_params for name in unit.layers)


@torch.no_grad()
def initialize_activations(qmodel: QuantizedModel, data: Tensor, config: BrecqConfig,
                           device: torch.device,
                           dist: DistContext = SINGLE_PROCESS) -> None:
    """Set every activation scale from one forward pass, each seeing quantized upstream values.

    With several ranks, the `act_init_samples` are spread over the ranks (each takes the first
    of its shard) and every scale is searched on the observations of all of them.
    """
    if not qmodel.act_quantizers:
        return
    start, stop = dist.shard_range(config.act_init_samples or 1)
    sample = data[: max(1, stop - start)].to(device)
    with qmodel.quantization(weights=True, acts=True), state.calibrating(
        qmodel.act_quantizers.values(), config.scale_search, config.lp_norm,
        dist.gather_search_sample if dist.distributed else None,
    ):
        qmodel(sample)


def _reconstruct_pass(
    qmodel: QuantizedModel, data: Tensor, config: BrecqConfig, device: torch.device,
    placement: CachePlacement, report: QuantizationReport, *, phase: Phase,
    fp_logits: Tensor | None, generators: RunGenerators, checkpoint: RunCheckpoint,
    dist: DistContext, run_progress: progress.RunProgress, budget: TimeBudget | None = None,
) -> None:
    schedule = Schedule.for_phase(config.recipe, phase)
    options = LoopOptions(autocast=config.autocast, compile=config.compile, early_stop=config.early_stop,
                          channels_last=config.channels_last, cuda_graph=config.cuda_graph,
                          holdout_patience=config.holdout_patience)
    for k, unit in enumerate(qmodel.units):
        if checkpoint.is_done(phase.name, k):
            continue
        started = time.perf_counter()
        key = (phase.name, k)
        plan = None if budget is None else functools.partial(_budget_plan, budget, key, started, dist)
        if plan is not None and _agreed(dist, budget.plan(key)) == 0:
            # Out of time: the unit keeps what it has (no capture; losses not measured).
            result = UnitResult(float("nan"), float("nan"), 0)
        else:
            try:
                result = _reconstruct_unit(
                    qmodel, unit, k, data, device, placement, phase=phase, schedule=schedule,
                    options=options, fp_logits=fp_logits, generators=generators, dist=dist,
                    fisher_floor=config.fisher_floor, plan=plan,
                )
            except torch.OutOfMemoryError as exc:
                raise ReconstructionError(
                    f"out of memory while reconstructing unit {unit.name!r} ({phase.name}): lower "
                    f"--batch-size (now {config.batch_size}), keep the cache on the host with "
                    f"--cache-device cpu, or use fewer --calib-size samples; "
                    f"{checkpoint.resume_hint()}"
                ) from exc
        unit_report = UnitReport(unit.name, unit.kind, phase.name, len(unit.layers),
                                 _unit_params(qmodel, unit), result.loss_before,
                                 result.loss_after, time.perf_counter() - started,
                                 result.iterations, _note(budget, result))
        report.units.append(unit_report)
        if budget is not None:
            budget.finish(key, result.iterations, unit_report.seconds, result.seconds_per_iteration)
        _log_unit(qmodel, k, unit_report, schedule.iters, run_progress, device, dist,
                  budget.left() if budget is not None else None)
        checkpoint.mark_done(phase.name, k, qmodel, report, generators,
                             budget_spent=budget.spent() if budget is not None else 0.0)


def _note(budget: TimeBudget | None, result: UnitResult) -> str:
    out_of_time = budget is not None and budget.out_of_time and result.iterations == 0
    return "round-to-nearest: out of time" if out_of_time else ""


def _agreed(dist: DistContext, count: int) -> int:
    """Rank 0's count on every rank (their clocks differ; their iteration counts may not)."""
    return int(dist.sum_values([count if dist.is_main else 0])[0]) if dist.distributed else count


def _budget_plan(budget: TimeBudget, key: WorkKey, started: float, dist: DistContext,
                 seconds_per_iteration: float) -> int:
    """Iterations of pass `key` after its probe (`optimize_unit`'s `plan`)."""
    return _agreed(dist, budget.plan(key, seconds_per_iteration, time.perf_counter() - started))


def _log_unit(qmodel: QuantizedModel, k: int, unit_report: UnitReport, iters: int,
              run_progress: progress.RunProgress, device: torch.device,
              dist: DistContext, budget_left: float | None = None) -> None:
    """Count a finished unit's iterations and log its line (and, after the first, the time
    estimate: at most what a time budget leaves)."""
    first = run_progress.done == 0
    run_progress.add(iters, unit_report.seconds)
    if not dist.is_main:
        return
    peak = (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
            if device.type == "cuda" else "")
    left = run_progress.left()
    if left and budget_left is not None:
        left = min(left, budget_left)
    progress.unit_logger.info(
        "%s unit %d/%d %s: loss %.5g -> %.5g (%d iterations, %.1fs%s)%s", unit_report.phase,
        k + 1, len(qmodel.units), unit_report.name, unit_report.loss_before,
        unit_report.loss_after, unit_report.iterations, unit_report.seconds, peak,
        f"; about {progress.minutes(left)} left" if left else "")
    if first and left:
        progress.logger.info("Time estimate after the first unit: about %s more",
                             progress.minutes(left))


def _reconstruct_unit(
    qmodel: QuantizedModel, unit: Unit, k: int, data: Tensor, device: torch.device,
    placement: CachePlacement, *, phase: Phase, schedule: Schedule, options: LoopOptions,
    fp_logits: Tensor | None, generators: RunGenerators, dist: DistContext,
    fisher_floor: float = 0.0, plan: Callable[[float], int] | None = None,
) -> UnitResult:
    acts_on = phase.learns_acts
    cache = placement.new_cache(device)
    try:
        capture(qmodel, unit, data, device, cache, weights=True, acts=acts_on,
                inputs_key=Q_IN, outputs_key=None)
        capture(qmodel, unit, data, device, cache, weights=False, acts=False,
                inputs_key=FP_IN if phase.drops else None, outputs_key=FP_OUT)
        if fp_logits is not None:
            capture_fisher(qmodel, unit, data, fp_logits, device, cache, acts=acts_on, dist=dist,
                           floor=fisher_floor)
        weight_qs = []
        if phase.learns_weights:
            weight_qs = [
                (q, w.detach()) for name in unit.layers
                for _, w, q in qmodel.layers[name].weight_quantizers()
            ]
        act_qs = [qmodel.act_quantizers[n] for n in unit.act_quantizers] if acts_on else []
        with qmodel.quantization(weights=True, acts=acts_on):
            return optimize_unit(
                unit.module, cache, weight_qs, act_qs, schedule, generators.batches,
                description=f"{phase.name[:1]} {k + 1}/{len(qmodel.units)} {unit.name}",
                options=options, dist=dist, drop_generator=generators.drops, plan=plan,
            )
    finally:
        cache.clear()


def _announce_plan(qmodel: QuantizedModel, config: BrecqConfig, checkpoint: RunCheckpoint,
                   dist: DistContext) -> progress.RunProgress:
    """Log the run's plan (units, passes, iterations); return its iteration counter."""
    units = len(qmodel.units)
    method = METHOD_REGISTRY[config.method]
    passes = [(p.name, p.plan, config.recipe.iterations(p))
              for p in method.phases_run(bool(qmodel.act_quantizers)) if p.optimizes]
    todo = sum(iters for phase, _, iters in passes for k in range(units)
               if not checkpoint.is_done(phase, k))
    if passes and dist.is_main:
        plan = ", then ".join(f"{units} x {iters:,} {what} iterations" for _, what, iters in passes)
        resumed = f"; {todo:,} left after resuming" if checkpoint.done else ""
        progress.logger.info("Plan: %s %s, %d units: %s (%s iterations%s); time estimate after "
                             "the first unit", method.title, config.label, units, plan,
                             f"{sum(i for *_, i in passes) * units:,}", resumed)
    return progress.RunProgress(todo)


def quantize(
    model: nn.Module,
    calib_data: Tensor | DataLoader | Iterable,
    config: BrecqConfig | None = None,
    *,
    unit_predicate: Callable[[str], bool] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> tuple[QuantizedModel, QuantizationReport]:
    """Quantize `model` post-training; the model itself is left untouched.

    `calib_data` is a tensor of samples or an iterable of batches (tensors or (x, y) pairs).
    `unit_predicate(module_name)` may choose the reconstruction units instead of discovery.
    With `checkpoint_dir`, progress is saved after every unit; `resume=True` continues from
    there and ends with the same result as an uninterrupted run.
    Returns the fake-quantized model and a per-unit report.

    Under an initialized torch.distributed process group (e.g. `brecq quantize` run by
    torchrun) every rank calls this with the same model and config and its own contiguous
    shard of the calibration set, up to its share of `calib_size` (`DistContext.shard`); pass
    the same `checkpoint_dir` everywhere (rank 0 writes it). Every rank returns the same
    model, equal to a single-process run on the union of the shards up to float rounding.
    """
    # `auto` and the method-dependent defaults become concrete values: the report, the checkpoint
    # and every step below see what actually runs.
    config = (config or BrecqConfig()).resolved()
    device, placement, dist = _runtime(config)
    # Every random draw comes from the run's own generators: the caller's global state is left
    # as it was, and the same seed gives the same result.
    generators = RunGenerators.seeded(config.seed, dist.rank, device)
    start, stop = dist.shard_range(config.calib_size)
    data = calibration_tensor(calib_data, stop - start)

    started = time.perf_counter()
    qmodel = _prepared(model, config, data, unit_predicate, dist).to(device)
    report = QuantizationReport(config=config.to_dict(), device=str(device),
                                world_size=dist.world_size)
    checkpoint = RunCheckpoint(checkpoint_dir, config, data, dist)
    if resume:
        checkpoint.restore(qmodel, report, generators)
    dist.check_identical(qmodel.state_dict(), "model weights",
                         "load the same model and weights on every rank")
    budget = _time_budget(qmodel, config, checkpoint, started, data[:config.batch_size], device)
    run = _Run(qmodel, data, config, device, placement, report, checkpoint, dist, generators,
               budget)
    run.all_passes()
    dist.check_identical(
        qmodel.state_dict(), "quantization parameters",
        "run the same brecq version, model and config on the same kind of device everywhere",
    )
    report.recon_seconds = time.perf_counter() - started
    report.time_budget = budget.summary() if budget is not None else None
    checkpoint.finish()
    return qmodel, report


def _time_budget(qmodel: QuantizedModel, config: BrecqConfig, checkpoint: RunCheckpoint,
                 started: float, batch: Tensor, device: torch.device) -> TimeBudget | None:
    """The run's `TimeBudget` (None without `time_budget`): its clock started at `started`,
    less what the run it resumes spent, and the passes left."""
    if config.time_budget is None:
        return None
    phases = METHOD_REGISTRY[config.method].phases_run(bool(qmodel.act_quantizers))
    queue = [((p.name, k), config.recipe.iterations(p) if p.optimizes else 0)
             for p in phases for k in (range(len(qmodel.units)) if p.optimizes else (0,))
             if not checkpoint.is_done(p.name, k)]
    budget = TimeBudget(config.time_budget, queue, spent_before=checkpoint.budget_spent,
                        started=started)
    budget.unit_weights = _unit_forward_seconds(qmodel, batch, device)
    progress.logger.info("Time budget: %.0fs (%.0fs left); iterations per unit follow from"
                         " measured step times", budget.seconds, budget.left())
    return budget


@torch.no_grad()
def _unit_forward_seconds(qmodel: QuantizedModel, batch: Tensor,
                          device: torch.device) -> dict[int, float]:
    """How much a step of each unit costs against another's: its forward seconds on one
    mini-batch (the second of two passes: the first pays one-off costs) plus their mean, for
    the share of a step that does not grow with the unit (optimizer, schedule, overheads)."""
    seconds: dict[int, float] = {}
    began: dict[int, float] = {}

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def enter(k: int) -> Callable:
        return lambda *_: began.__setitem__(k, clock())

    def leave(k: int) -> Callable:
        return lambda *_: seconds.__setitem__(k, clock() - began[k])

    handles = [h for k, unit in enumerate(qmodel.units)
               for h in (unit.module.register_forward_pre_hook(enter(k)),
                         unit.module.register_forward_hook(leave(k)))]
    try:
        with qmodel.quantization(weights=True, acts=False):
            for _ in range(2):
                qmodel(batch.to(device))
    finally:
        for h in handles:
            h.remove()
    mean = sum(seconds.values()) / max(1, len(seconds))
    return {k: value + mean for k, value in seconds.items()}


def _runtime(config: BrecqConfig) -> tuple[torch.device, CachePlacement, DistContext]:
    """The compute device, where unit caches go and this process's place among the ranks."""
    device = resolve_device(config.device)
    if config.autocast == "tf32" and device.type != "cuda":
        raise ConfigError(f"autocast 'tf32' needs a CUDA device, not {device}: use --autocast bf16"
                          " (or none) on this device")
    placement = CachePlacement.resolve(config, device)
    dist = current(config.dist_timeout)
    if config.calib_size < dist.world_size:
        raise ConfigError(f"calib_size={config.calib_size} is smaller than the {dist.world_size}"
                          " ranks: every rank needs calibration samples; use more samples")
    return device, placement, dist


def _prepared(model: nn.Module, config: BrecqConfig, data: Tensor,
              unit_predicate: Callable[[str], bool] | None, dist: DistContext) -> QuantizedModel:
    """`prepare` (after the LayerNorm reparameterization on a copy, when the config asks for
    it), leaving the model in the training mode it was in."""
    was_training, source = model.training, model
    try:
        if config.layernorm_reparam and config.act_bits is not None:
            # The samples that initialize the activation scales, as `initialize_activations`
            # spreads them over the ranks.
            start, stop = dist.shard_range(config.act_init_samples or 1)
            source, _ = layernorm_reparameterized(
                model, data[: max(1, stop - start)], config.act_bits,
                symmetric=config.act_symmetric, batch_size=config.batch_size, gather=dist.gather)
        return prepare(source, config, (data[:2],), unit_predicate)
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class _Run:
    """One quantization run's state, and its passes over the units in the method's order."""

    qmodel: QuantizedModel
    data: Tensor
    config: BrecqConfig
    device: torch.device
    placement: CachePlacement
    report: QuantizationReport
    checkpoint: RunCheckpoint
    dist: DistContext
    generators: RunGenerators
    budget: TimeBudget | None = None

    def all_passes(self) -> None:
        config, qmodel = self.config, self.qmodel
        fp_logits = (float_logits(qmodel, self.data, self.device) if config.loss == "fisher"
                     else None)
        run_progress = _announce_plan(qmodel, config, self.checkpoint, self.dist)
        for phase in METHOD_REGISTRY[config.method].phases_run(bool(qmodel.act_quantizers)):
            if phase.optimizes:
                self.reconstruct(phase, fp_logits, run_progress)
            else:
                self.initialize_activations(phase)

    def initialize_activations(self, phase: Phase) -> None:
        """Initialize activation scales once (a resumed run has them from its checkpoint)."""
        if not self.checkpoint.is_done(phase.name, 0):
            started = time.perf_counter()
            initialize_activations(self.qmodel, self.data, self.config, self.device, self.dist)
            spent = 0.0
            if self.budget is not None:
                self.budget.finish((phase.name, 0), 0, time.perf_counter() - started, None)
                spent = self.budget.spent()
            self.checkpoint.mark_done(phase.name, 0, self.qmodel, self.report, self.generators,
                                      budget_spent=spent)

    def reconstruct(self, phase: Phase, fp_logits: Tensor | None,
                    run_progress: progress.RunProgress) -> None:
        _reconstruct_pass(self.qmodel, self.data, self.config, self.device, self.placement,
                          self.report, phase=phase, fp_logits=fp_logits,
                          generators=self.generators, checkpoint=self.checkpoint,
                          dist=self.dist, run_progress=run_progress, budget=self.budget)
