"""All units in order: capture their inputs and targets, optimize, move on.

BRECQ runs two passes over the units: learned rounding with activations off, then activation
step sizes with everything on. QDrop runs one pass that learns both, dropping quantization of
activations at random. `rtn` stops after initializing scales (round-to-nearest baseline).
Each method's phases are its entry in `brecq.methods.METHOD_REGISTRY`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .. import progress
from ..config import BrecqConfig, ReconRecipe
from ..distributed import SINGLE_PROCESS, DistContext, current
from ..errors import ConfigError, DataError, ModelError, ReconstructionError
from ..graph.prepare import QuantizedModel, Unit, prepare
from ..methods import METHOD_REGISTRY, Phase
from ..quant import state
from ..text import format_table
from .cache import ActivationCache
from .checkpoint import RunCheckpoint
from .reconstruct import (
    FP_IN,
    FP_OUT,
    GRAD,
    Q_IN,
    LoopOptions,
    Schedule,
    UnitResult,
    optimize_unit,
)

logger = logging.getLogger(__name__)

CAPTURE_BATCH = 64


@dataclass
class UnitReport:
    name: str
    kind: str
    phase: str  # "weights", "activations" or "joint"
    layers: int
    params: int
    loss_before: float
    loss_after: float
    seconds: float
    iterations: int = 0


@dataclass
class QuantizationReport:
    config: dict
    units: list[UnitReport] = field(default_factory=list)
    recon_seconds: float = 0.0
    device: str = ""
    world_size: int = 1

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "device": self.device,
            "world_size": self.world_size,
            "units": [asdict(u) for u in self.units],
            "recon_seconds": self.recon_seconds,
        }

    def summary(self) -> str:
        """A printable table: per unit and pass, parameters, loss before and after, time."""
        rows = [[u.name, u.kind, u.phase, f"{u.params:,}", f"{u.loss_before:.5g}",
                 f"{u.loss_after:.5g}", f"{u.iterations:,}", f"{u.seconds:.1f}"] for u in self.units]
        table = format_table(["unit", "kind", "pass", "params", "loss before", "loss after",
                              "iterations", "seconds"], rows, right=(3, 4, 5, 6, 7))
        method = {"brecq": "BRECQ", "qdrop": "QDrop", "rtn": "round-to-nearest"}.get(
            self.config.get("method"), self.config.get("method"))
        bits = f"W{self.config.get('weight_bits')}A{self.config.get('act_bits') or 32}"
        return (f"{method} {bits}: {len(self.units)} unit passes in {self.recon_seconds:.1f}s on "
                f"{self.device or '?'}\n{table}")

    def __str__(self) -> str:
        return self.summary()

    def log(self, level: int = logging.INFO) -> str:
        """Log the summary table, or write it to stderr when logging is not set up (no handler
        anywhere), so that it shows either way; returns it."""
        table = self.summary()
        if logger.hasHandlers():
            logger.log(level, "%s", table)
        else:
            sys.stderr.write(table + "\n")
        return table


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a valid torch device: use cpu, cuda or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available: use --device cpu")
    return device


@dataclass(frozen=True)
class CachePlacement:
    """Where unit caches live: `storage` device, with at most `device_budget` bytes on a GPU."""

    storage: torch.device
    device_budget: int | None

    @classmethod
    def resolve(cls, config: BrecqConfig, device: torch.device) -> CachePlacement:
        storage = device if config.cache_device == "auto" else resolve_device(config.cache_device)
        budget = None
        if config.cache_device == "auto" and device.type != "cpu":
            if config.cache_budget_gb is not None:
                budget = int(config.cache_budget_gb * 2**30)
            elif device.type == "cuda":
                # A quarter of what is free leaves room for the unit's own forward and backward.
                budget = torch.cuda.mem_get_info(device)[0] // 4
        return cls(storage, budget)

    def new_cache(self, device: torch.device) -> ActivationCache:
        return ActivationCache(device, self.storage, self.device_budget)


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


def _batches(data: Tensor, device: torch.device, batch: int = CAPTURE_BATCH):
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
            outs = output if isinstance(output, (tuple, list)) else (output,)
            for k, value in enumerate(outs):
                cache.append(f"{outputs_key}{k}", value)
        raise _Captured

    handle = unit.module.register_forward_hook(hook)
    try:
        with qmodel.quantization(weights=weights, acts=acts):
            for x in _batches(data, device):
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
        return torch.cat([_logits(qmodel(x)).float().cpu() for x in _batches(data, device)])


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
    outputs: list[Tensor] = []

    def hook(module, args, output):  # noqa: ANN001
        outs = output if isinstance(output, (tuple, list)) else (output,)
        leaves = [o.detach().requires_grad_(True) for o in outs]
        outputs.extend(leaves)
        return type(output)(leaves) if isinstance(output, (tuple, list)) else leaves[0]

    handle = unit.module.register_forward_hook(hook)
    grads: list[list[Tensor]] = []
    try:
        with qmodel.quantization(weights=True, acts=acts):
            for start, x in zip(range(0, data.shape[0], CAPTURE_BATCH), _batches(data, device)):
                outputs.clear()
                target = fp_logits[start : start + x.shape[0]].to(device)
                logits = _logits(qmodel(x))
                kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(target, dim=1),
                              reduction="sum", log_target=True)
                gs = torch.autograd.grad(kl, outputs, allow_unused=True)
                grads.append([
                    (g if g is not None else torch.zeros_like(o)).detach()
                    for g, o in zip(gs, outputs)
                ])
    finally:
        handle.remove()
    for k in range(len(grads[0])):
        squared = torch.cat([g[k] for g in grads]).pow(2)
        normalized = squared / dist.global_mean(squared).clamp_min(1e-12)
        cache.append(f"{GRAD}{k}", (normalized + floor) / (1 + floor))
    cache.finish()


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


def phase_schedule(recipe: ReconRecipe, phase: Phase, iters: int | None = None) -> Schedule:
    """The optimization settings of one phase of a resolved recipe (`BrecqConfig.resolved()`);
    `iters` replaces the recipe's iterations per unit."""
    act_lr = recipe.act_lr if recipe.act_lr is not None else METHOD_REGISTRY[recipe.method].default_act_lr
    return Schedule(
        iters=recipe.iterations(phase) if iters is None else iters, batch_size=recipe.batch_size,
        weight_lr=recipe.weight_lr, act_lr=act_lr, round_lambda=recipe.round_lambda,
        beta_start=recipe.beta_start, beta_end=recipe.beta_end, warmup=recipe.warmup,
        # Step sizes learned alone use the Lp loss of `act_loss_p`; passes with the rounding, MSE.
        loss_p=2.0 if phase.learns_weights else recipe.act_loss_p,
        drop_prob=recipe.drop_prob if phase.drops else 0.0,
    )


def _reconstruct_pass(
    qmodel: QuantizedModel, data: Tensor, config: BrecqConfig, device: torch.device,
    placement: CachePlacement, report: QuantizationReport, *, phase: Phase,
    fp_logits: Tensor | None, generator: torch.Generator, checkpoint: RunCheckpoint,
    dist: DistContext, run_progress: progress.RunProgress,
) -> None:
    schedule = phase_schedule(config.recipe, phase)
    options = LoopOptions(loop=config.recon_loop, autocast=config.autocast,
                          compile=config.compile, early_stop=config.early_stop,
                          channels_last=config.channels_last, cuda_graph=config.cuda_graph)
    for k, unit in enumerate(qmodel.units):
        if checkpoint.is_done(phase.name, k):
            continue
        started = time.perf_counter()
        try:
            result = _reconstruct_unit(
                qmodel, unit, k, data, device, placement, phase=phase, schedule=schedule,
                options=options, fp_logits=fp_logits, generator=generator, dist=dist,
                fisher_floor=config.fisher_floor,
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
                                 result.iterations)
        report.units.append(unit_report)
        first = run_progress.done == 0
        run_progress.add(schedule.iters, unit_report.seconds)
        if dist.is_main:
            peak = (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
                    if device.type == "cuda" else "")
            left = run_progress.left()
            progress.unit_logger.info(
                "%s unit %d/%d %s: loss %.5g -> %.5g (%d iterations, %.1fs%s)%s", phase.name, k + 1,
                len(qmodel.units), unit.name, result.loss_before, result.loss_after,
                result.iterations, unit_report.seconds, peak,
                f"; about {progress.minutes(left)} left" if left else "")
            if first and left:
                progress.logger.info("Time estimate after the first unit: about %s more",
                                     progress.minutes(left))
        checkpoint.mark_done(phase.name, k, qmodel, report, generator)


def _reconstruct_unit(
    qmodel: QuantizedModel, unit: Unit, k: int, data: Tensor, device: torch.device,
    placement: CachePlacement, *, phase: Phase, schedule: Schedule, options: LoopOptions,
    fp_logits: Tensor | None, generator: torch.Generator, dist: DistContext,
    fisher_floor: float = 0.0,
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
                unit.module, cache, weight_qs, act_qs, schedule, generator,
                description=f"{phase.name[:1]} {k + 1}/{len(qmodel.units)} {unit.name}",
                options=options, dist=dist,
            )
    finally:
        cache.clear()


def _announce_plan(qmodel: QuantizedModel, config: BrecqConfig, checkpoint: RunCheckpoint,
                   dist: DistContext) -> progress.RunProgress:
    """Log the run's plan (units, passes, iterations); return its iteration counter."""
    units = len(qmodel.units)
    method = METHOD_REGISTRY[config.method]
    recipe = config.recipe
    passes = [(p.name, p.plan, recipe.iterations(p))
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
    device = resolve_device(config.device)
    if config.autocast == "tf32" and device.type != "cuda":
        raise ConfigError(f"autocast 'tf32' needs a CUDA device, not {device}: use --autocast bf16"
                          " (or none) on this device")
    placement = CachePlacement.resolve(config, device)
    dist = current(config.dist_timeout)
    if config.calib_size < dist.world_size:
        raise ConfigError(f"calib_size={config.calib_size} is smaller than the {dist.world_size}"
                          " ranks: every rank needs calibration samples; use more samples")
    # QDrop's random masks come from torch's global generator: a different stream per rank, so
    # that ranks do not drop the same elements. Mini-batch indices are global: one stream.
    torch.manual_seed(config.seed + dist.rank)
    generator = torch.Generator().manual_seed(config.seed)
    start, stop = dist.shard_range(config.calib_size)
    data = calibration_tensor(calib_data, stop - start)

    started = time.perf_counter()
    was_training = model.training
    try:
        qmodel = prepare(model, config, (data[:2],), unit_predicate)
    finally:
        model.train(was_training)
    qmodel.to(device)
    report = QuantizationReport(config=config.to_dict(), device=str(device),
                                world_size=dist.world_size)
    checkpoint = RunCheckpoint(checkpoint_dir, config, data, dist)
    if resume:
        checkpoint.restore(qmodel, report, generator)
    dist.check_identical(qmodel.state_dict(), "model weights",
                         "load the same model and weights on every rank")
    fp_logits = float_logits(qmodel, data, device) if config.loss == "fisher" else None
    run_progress = _announce_plan(qmodel, config, checkpoint, dist)
    common = dict(fp_logits=fp_logits, generator=generator, checkpoint=checkpoint, dist=dist,
                  run_progress=run_progress)

    for phase in METHOD_REGISTRY[config.method].phases_run(bool(qmodel.act_quantizers)):
        if phase.optimizes:
            _reconstruct_pass(qmodel, data, config, device, placement, report, phase=phase, **common)
        elif not checkpoint.is_done(phase.name, 0):
            initialize_activations(qmodel, data, config, device, dist)
            checkpoint.mark_done(phase.name, 0, qmodel, report, generator)
    dist.check_identical(
        qmodel.state_dict(), "quantization parameters",
        "run the same brecq version, model and config on the same kind of device everywhere",
    )
    report.recon_seconds = time.perf_counter() - started
    checkpoint.finish()
    return qmodel, report
