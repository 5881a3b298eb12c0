"""How much each candidate bit assignment of a unit's layers costs, measured once and cached.

For every reconstruction unit, the unit's float inputs and outputs are cached once; then each
candidate assignment of bit widths to the unit's layers is applied (weights quantized with the
Lp-searched scale and nearest rounding, or after a short AdaRound) and the unit's output error is
measured on those inputs. Measuring whole units, not layers one at a time, captures how the
layers of a block interact.

The `fisher` metric weights the squared output error by the diagonal Fisher information of the
model's loss at the unit output (squared gradients of the cross-entropy against labels drawn
from the model's own predictions), so `0.5 * sum F * dz^2` estimates the loss increase and is
comparable across units; `mse` is the plain squared error per sample (not comparable across
units of different output scale).

The table is saved as JSON with a fingerprint of the model weights, calibration samples and the
settings that change it; a later search with another budget reuses it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BrecqConfig
from ..errors import ConfigError
from ..fileio import atomic_write_text
from ..graph.layers import calibrated_weight_quantizer
from ..graph.model import QuantizedModel, Unit, weight_label
from ..graph.prepare import prepare
from ..hashing import hash_tensor
from ..methods import BRECQ, WEIGHTS
from ..quant.quantizers import WeightQuantizer
from ..recon.cache import FP_OUT, Q_IN, ActivationCache
from ..recon.capture import CAPTURE_BATCH, as_tuple, capture, output_gradients
from ..recon.reconstruct import optimize_unit
from ..recon.step import Schedule
from ..runtime import CachePlacement, resolve_device
from .config import SearchConfig

logger = logging.getLogger(__name__)

FISHER = "fisher/"
TABLE_VERSION = 1

_SEARCH_ONLY_FIELDS = {"size_budget", "bitops_budget", "population", "generations", "mutation"}


@dataclass
class LayerInfo:
    """A weight layer: parameter count, multiply-accumulates per sample, and fixed bits if any."""

    params: int
    macs: int
    fixed_bits: int | None  # not searched: kept at these bits
    rule_bits: int | None  # bits under the first/last-layer rule (None: as the other layers)


@dataclass
class UnitSensitivity:
    """Measured output error of a unit for each candidate assignment of its layers' bits."""

    name: str
    layers: tuple[str, ...]
    assignments: list[tuple[int, ...]]
    errors: list[float]  # with the configured rounding
    nearest_errors: list[float]  # with nearest rounding (equal to errors for rounding=nearest)
    seconds: float = 0.0


@dataclass
class SensitivityTable:
    fingerprint: str
    act_bits: int | None
    layers: dict[str, LayerInfo]
    units: list[UnitSensitivity] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": TABLE_VERSION,
            "fingerprint": self.fingerprint,
            "act_bits": self.act_bits,
            "layers": {n: dataclasses.asdict(info) for n, info in self.layers.items()},
            "units": [{**dataclasses.asdict(u), "layers": list(u.layers),
                       "assignments": [list(a) for a in u.assignments]} for u in self.units],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityTable:
        return cls(
            fingerprint=data["fingerprint"], act_bits=data["act_bits"],
            layers={n: LayerInfo(**info) for n, info in data["layers"].items()},
            units=[UnitSensitivity(u["name"], tuple(u["layers"]),
                                   [tuple(a) for a in u["assignments"]], list(u["errors"]),
                                   list(u["nearest_errors"]), u.get("seconds", 0.0))
                   for u in data["units"]],
        )

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")


def load_table(path: Path, fingerprint: str) -> SensitivityTable | None:
    """The cached table at `path` if it was measured for `fingerprint`, else None."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("version") != TABLE_VERSION or data.get("fingerprint") != fingerprint:
            logger.info("sensitivity cache %s is for another model/data/config: measuring anew",
                        path)
            return None
        return SensitivityTable.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("sensitivity cache %s is unreadable (%s): measuring anew", path, exc)
        return None


# ------------------------------------------------------------------------------ fingerprint


def fingerprint(model: nn.Module, samples: Tensor, config: BrecqConfig,
                search: SearchConfig) -> str:
    """Hash of what the table depends on: weights, samples, the quantization scheme, the units and
    seed, the probe's schedule and the measuring settings of the search. The runtime options and
    the rest of the recipe (the final run's method, iterations, calibration size) do not enter."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        hash_tensor(h, tensor)
    hash_tensor(h, samples)
    settings = {
        "scheme": dataclasses.asdict(config.scheme),
        "units": [config.granularity, config.unit_names],
        "seed": config.seed,
        "probe": dataclasses.asdict(probe_schedule(config, search)),
        "search": {k: v for k, v in search.to_dict().items() if k not in _SEARCH_ONLY_FIELDS},
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:24]


# ------------------------------------------------------------------------------ layers


@torch.no_grad()
def layer_infos(qmodel: QuantizedModel, example: Tensor, config: BrecqConfig,
                search: SearchConfig) -> dict[str, LayerInfo]:
    """Parameters, MACs per sample and fixed bits of every weight layer, in unit order."""
    macs: dict[str, int] = {}
    handles = []
    for name, layer in qmodel.layers.items():
        def hook(module, args, output, name=name):  # noqa: ANN001
            out = output[0] if isinstance(output, (tuple, list)) else output
            conv = isinstance(getattr(module, "layer", None), nn.modules.conv._ConvNd)
            channels = out.shape[1] if conv else out.shape[-1]
            # Each output position multiplies a full weight row (conv: in/groups x kernel).
            positions = out.numel() // (out.shape[0] * channels) if out.dim() > 1 else 1
            macs[name] = positions * module.num_weight_params

        handles.append(layer.register_forward_hook(hook))
    try:
        with qmodel.quantization(weights=False, acts=False):
            qmodel(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    special = set(qmodel.first_layers) | set(qmodel.last_layers)
    infos = {}
    for unit in qmodel.units:
        for name in unit.layers:
            rule = config.first_last_bits if name in special else None
            fixed = config.layer_bits.get(name)
            if fixed is None and rule is not None and not search.search_first_last:
                fixed = rule
            infos[name] = LayerInfo(qmodel.layers[name].num_weight_params, macs.get(name, 0),
                                    fixed, rule)
    return infos


def candidate_assignments(layers: Sequence[str], infos: dict[str, LayerInfo],
                          candidates: Sequence[int], max_combinations: int) -> list[tuple[int, ...]]:
    """Bit assignments to measure for a unit's layers (fixed layers keep their bits).

    All combinations when there are at most `max_combinations`; otherwise only those whose
    searched layers sit on the same or neighbouring candidate levels (a deep unit's layers rarely
    want widths far apart, and the count then grows as 2^layers, not candidates^layers).
    """
    levels = sorted(candidates)
    choices = [[infos[n].fixed_bits] if infos[n].fixed_bits is not None else levels
               for n in layers]
    every = list(itertools.product(*choices))
    if len(every) <= max_combinations:
        return every
    searched = [i for i, n in enumerate(layers) if infos[n].fixed_bits is None]
    kept = []
    for combo in every:
        idx = [levels.index(combo[i]) for i in searched]
        if max(idx) - min(idx) <= 1:
            kept.append(combo)
    return kept


# ------------------------------------------------------------------------------ measuring


class _QuantizerBank:
    """Weight quantizers calibrated once per (layer, bits), swapped into the layers on demand."""

    def __init__(self, qmodel: QuantizedModel, config: BrecqConfig) -> None:
        self.qmodel, self.config = qmodel, config
        self._made: dict[tuple[str, int], dict[str, WeightQuantizer]] = {}

    def get(self, name: str, bits: int) -> dict[str, WeightQuantizer]:
        """Quantizers of `bits` for the weights of layer `name`, by weight quantizer name."""
        key = (name, bits)
        if key not in self._made:
            self._made[key] = {
                weight_label(name, weight_name): calibrated_weight_quantizer(
                    self.config, bits, w, channel_axis=q.channel_axis, groups=q.groups)
                for weight_name, w, q in self.qmodel.layers[name].weight_quantizers()
            }
        return self._made[key]

    @contextmanager
    def assigned(self, layers: Sequence[str], bits: Sequence[int], fresh: bool = False
                 ) -> Iterator[list[tuple[WeightQuantizer, Tensor]]]:
        """Layers use quantizers of the given bits inside (copies when `fresh`); restored after."""
        chosen = {
            label: copy.deepcopy(q) if fresh else q
            for name, b in zip(layers, bits) for label, q in self.get(name, b).items()
        }
        with self.qmodel.weight_quantizers_swapped(chosen):
            yield [(q, w.detach()) for name in layers
                   for _, w, q in self.qmodel.layers[name].weight_quantizers()]


@torch.no_grad()
def unit_error(unit: nn.Module, cache: ActivationCache, fisher: bool,
               batch_size: int = CAPTURE_BATCH) -> float:
    """Mean over samples of the summed squared output error (Fisher-weighted: 0.5 F dz^2)."""
    inputs = cache.keys_with_prefix(Q_IN)
    targets = cache.keys_with_prefix(FP_OUT)
    weights = cache.keys_with_prefix(FISHER)
    count = len(cache)
    total = 0.0
    for start in range(0, count, batch_size):
        index = torch.arange(start, min(count, start + batch_size))
        outs = as_tuple(unit(*[cache.batch(k, index) for k in inputs]))
        for k, out in enumerate(outs):
            err = (out.float() - cache.batch(targets[k], index).float()).pow(2)
            if fisher:
                err = 0.5 * err * cache.batch(weights[k], index)
            total += float(err.sum())
    return total / max(1, count)


def _capture_fisher(qmodel: QuantizedModel, unit: Unit, data: Tensor, labels: Tensor,
                    device: torch.device, cache: ActivationCache) -> None:
    """Squared gradients of the float model's cross-entropy (sampled labels) at the unit output."""

    def cross_entropy(logits: Any, start: int) -> Tensor:
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise ConfigError("the fisher sensitivity needs a model that returns a "
                              "[batch, classes] logits tensor: use --sensitivity-metric mse")
        y = labels[start : start + logits.shape[0]].to(device)
        return F.cross_entropy(logits.float(), y, reduction="sum")

    for grads in output_gradients(qmodel, unit, data, device, cross_entropy, weights=False,
                                  acts=False):
        for k, g in enumerate(grads):
            cache.append(f"{FISHER}{k}", g.pow(2))
    cache.finish()


@torch.no_grad()
def _sampled_labels(qmodel: QuantizedModel, data: Tensor, device: torch.device,
                    generator: torch.Generator) -> Tensor:
    """Labels drawn from the float model's predictions (the true Fisher's expectation)."""
    with qmodel.quantization(weights=False, acts=False):
        logits = torch.cat([qmodel(data[s : s + CAPTURE_BATCH].to(device)).float().cpu()
                            for s in range(0, data.shape[0], CAPTURE_BATCH)])
    return torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)


def probe_schedule(config: BrecqConfig, search: SearchConfig) -> Schedule:
    """The short AdaRound of `rounding=adaround`: BRECQ's rounding pass with the plain defaults
    unless given, so that it compares bit widths the same way whatever method the final run uses
    (it learns no step sizes: their learning rate stays the default)."""
    probe = config.replace(method=BRECQ.name, act_lr=None).resolved()
    return Schedule.for_phase(probe.recipe, WEIGHTS, iters=search.rounding_iters)


def _measure_unit(qmodel: QuantizedModel, unit: Unit, bank: _QuantizerBank,
                  assignments: list[tuple[int, ...]], data: Tensor, labels: Tensor | None,
                  config: BrecqConfig, search: SearchConfig, device: torch.device,
                  generator: torch.Generator) -> UnitSensitivity:
    started = time.perf_counter()
    cache = CachePlacement.resolve(config, device).new_cache(device)
    errors, nearest = [], []
    try:
        capture(qmodel, unit, data, device, cache, weights=False, acts=False, inputs_key=Q_IN,
                outputs_key=FP_OUT)
        if labels is not None:
            _capture_fisher(qmodel, unit, data, labels, device, cache)
        schedule = probe_schedule(config, search)
        fisher = labels is not None
        with qmodel.quantization(weights=True, acts=False):
            for bits in assignments:
                adaround = search.rounding == "adaround" and search.rounding_iters > 0
                with bank.assigned(unit.layers, bits, fresh=adaround) as pairs:
                    near = unit_error(unit.module, cache, fisher)
                    if adaround:
                        optimize_unit(unit.module, cache, pairs, [], schedule, generator,
                                      description=f"sensitivity {unit.name} {bits}")
                        err = unit_error(unit.module, cache, fisher)
                    else:
                        err = near
                nearest.append(near)
                errors.append(err)
    finally:
        cache.clear()
    return UnitSensitivity(unit.name, unit.layers, assignments, errors, nearest,
                           round(time.perf_counter() - started, 3))


def measure_sensitivity(model: nn.Module, samples: Tensor, config: BrecqConfig,
                        search: SearchConfig, cache_path: Path | None = None) -> SensitivityTable:
    """Sensitivity of every unit's candidate assignments; cached at `cache_path` when given.

    The cache is rewritten after every unit, so an interrupted measurement resumes where it
    stopped.
    """
    device = resolve_device(config.device)
    data = samples[: search.samples]
    key = fingerprint(model, data, config, search)
    table = load_table(cache_path, key) if cache_path is not None else None
    was_training = model.training
    try:
        qmodel = prepare(model, config.replace(act_bits=None), (data[:2],))
    finally:
        model.train(was_training)
    qmodel.to(device)
    if table is None:
        table = SensitivityTable(key, config.act_bits, layer_infos(qmodel, data, config, search))
    done = {u.name for u in table.units}
    if len(done) == len(qmodel.units):
        logger.info("sensitivity: all %d units from the cache %s", len(done), cache_path)
        return table
    generator = torch.Generator().manual_seed(config.seed)
    labels = (_sampled_labels(qmodel, data, device, generator)
              if search.metric == "fisher" else None)
    bank = _QuantizerBank(qmodel, config)
    measured = {u.name: u for u in table.units}
    for k, unit in enumerate(qmodel.units):
        if unit.name in measured:
            continue
        assignments = candidate_assignments(unit.layers, table.layers, search.candidates,
                                            search.max_combinations)
        result = _measure_unit(qmodel, unit, bank, assignments, data, labels, config, search,
                               device, generator)
        measured[unit.name] = result
        table.units = [measured[u.name] for u in qmodel.units if u.name in measured]
        logger.info("sensitivity unit %d/%d %s: %d assignments in %.1fs", k + 1,
                    len(qmodel.units), unit.name, len(assignments), result.seconds)
        if cache_path is not None:
            table.save(cache_path)
    return table
