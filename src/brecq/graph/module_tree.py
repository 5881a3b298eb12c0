"""The fallback for a model that calls weight layers from code torch.fx cannot trace: quantize
on the module tree, each layer's activation input right at the layer, with `nn.Sequential`
children (stages) and their children (blocks) as units."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ..config import BrecqConfig
from ..errors import ConfigError
from ..quant.modules import QuantizedWeights
from ..quant.quantizers import ActQuantizer
from .fold_bn import fold_batchnorm_eager
from .layers import LayerBits, is_float_layer, is_quantizable
from .model import QuantizedModel, Unit
from .placement import BACKEND_NONE
from .units import UnitPredicate

logger = logging.getLogger(__name__)


def execution_order(model: nn.Module, example_inputs: tuple) -> tuple[list[str], dict]:
    """Names of modules in the order they first run, and each one's first (args, output, kwargs)."""
    order: list[str] = []
    io: dict[str, tuple] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        def pre_hook(mod, args, name=name):  # noqa: ANN001
            if name not in order:
                order.append(name)  # pre-hooks give parents before their children

        def hook(mod, args, kwargs, output, name=name):  # noqa: ANN001
            io.setdefault(name, (args, output, kwargs))

        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            output = model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    io[""] = (example_inputs, output, {})
    return order, io


def prepare_module_tree(
    model: nn.Module, config: BrecqConfig, example_inputs: tuple,
    unit_predicate: UnitPredicate | None,
) -> QuantizedModel:
    """Quantize `model` in place on its module tree."""
    folded = fold_batchnorm_eager(model, example_inputs)
    logger.info("folded %d BatchNorm layers into the layers before them", folded)
    if config.backend != BACKEND_NONE and config.act_bits is not None:
        logger.warning("backend %r placement needs the torch.fx graph: without it only layer "
                       "inputs are quantized, and an exported model runs partly in float",
                       config.backend)
    order, io = execution_order(model, example_inputs)
    modules = dict(model.named_modules())
    names = [n for n in order if is_quantizable(modules[n]) and not is_float_layer(n, config)]
    names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    if not names:
        raise ConfigError("the model has no Conv or Linear layer to quantize")
    model_in = {id(t) for t in io[""][0] if isinstance(t, Tensor)}
    model_out = id(io[""][1])
    bits = LayerBits(config, names,
                     [n for n in names if any(id(a) in model_in for a in io[n][0])],
                     [n for n in names if id(io[n][1]) == model_out])
    layers: dict[str, QuantizedWeights] = {}
    act_quantizers: dict[str, ActQuantizer] = {}
    for name in names:
        bits.quantize_at_input(model, name, layers, act_quantizers)
    bits.check_act_names(act_quantizers)
    units = _units(model, modules, order, names, act_quantizers, config, unit_predicate)
    return QuantizedModel(model, layers, act_quantizers, units, None, bits.first, bits.last,
                          traced=False)


def _unit_modules(modules: dict[str, nn.Module], order: list[str], names: list[str],
                  config: BrecqConfig, unit_predicate: UnitPredicate | None) -> list[str]:
    """The modules to make units of: those asked for, else as the granularity says."""
    if config.unit_names or unit_predicate is not None:
        chosen = list(config.unit_names or []) + [
            n for n in order if unit_predicate is not None and unit_predicate(n)
        ]
        missing = [n for n in chosen if n not in modules]
        if missing:
            raise ConfigError(f"unit {missing[0]!r} is not a module of the model: check the name")
        return chosen
    if config.granularity == "layer":
        return list(names)
    if config.granularity == "net":
        return []
    stages = [
        n for n in order
        if isinstance(modules[n], nn.Sequential) and any(lay.startswith(n + ".") for lay in names)
    ]
    stages = [s for s in stages if not any(s.startswith(o + ".") for o in stages)]
    if config.granularity == "stage":
        return stages
    return [
        f"{s}.{child}" for s in stages for child, _ in modules[s].named_children()
        if any(lay == f"{s}.{child}" or lay.startswith(f"{s}.{child}.") for lay in names)
    ]


def _units(model: nn.Module, modules: dict[str, nn.Module], order: list[str], names: list[str],
           act_quantizers: dict[str, ActQuantizer], config: BrecqConfig,
           unit_predicate: UnitPredicate | None) -> list[Unit]:
    """Units in execution order: each chosen module, and each layer outside all of them
    (`modules`: the model's modules before its layers were quantized)."""
    unit_modules = _unit_modules(modules, order, names, config, unit_predicate)
    if config.granularity == "net" and not unit_modules:
        return [Unit("net", "net", model, tuple(names), tuple(act_quantizers))]
    units: list[Unit] = []
    covered = set()
    for name in (n for n in order if n in unit_modules or n in names):
        if name in covered:
            continue
        inner = tuple(lay for lay in names if lay == name or lay.startswith(name + "."))
        if not inner or any(lay in covered for lay in inner):
            continue
        covered.update(inner)
        covered.add(name)
        kind = "layer" if len(inner) == 1 and inner[0] == name else (
            "stage" if config.granularity == "stage" else "block")
        units.append(Unit(name, kind, model.get_submodule(name), inner,
                          tuple(a for a in act_quantizers if a in inner)))
    return units
