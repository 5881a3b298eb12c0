"""Turn a user's float model into a `QuantizedModel`.

Steps: copy the model; write attention explicitly (`attention`: nn.MultiheadAttention as
Linear projections with matmul and softmax, F.scaled_dot_product_attention decomposed on the
graph); fold BatchNorm; swap Conv/Linear (and a MultiheadAttention left whole) for quantized
wrappers; put one activation quantizer on every tensor that a quantized layer reads, right at
the tensor's producer, so every consumer (residual adds included) sees the same quantized value;
find reconstruction units. All on the torch.fx graph. A model whose own forward fx cannot trace
(or traces only by keeping whole a module holding weight layers) has each child traced and
prepared on its own graph; a child called with keyword or non-tensor arguments is traced for
that call (its tensors are the graph's inputs, the rest fixed). Only one that calls weight
layers from untraceable code falls back to the module tree (layer inputs quantized at the
layer, `nn.Sequential` children as units).

The paths live in `traced` and `module_tree`, what they share in `layers`; this module chooses
between them and checks that no weight layer the forward pass uses is left in float unasked.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..config import BrecqConfig
from ..errors import ModelError
from ..quant import state
from .attention import decompose_sdpa, explicit_multihead_attention
from .layers import (
    WEIGHT_LAYERS,
    LayerBits,
    check_float_layers,
    check_names,
    is_float_layer,
    is_quantizable,
    set_submodule,
)
from .model import QuantizedModel
from .module_tree import execution_order, prepare_module_tree
from .traced import prepare_traced
from .tracing import BoundCall, CallArguments, bind_defaults, trace
from .units import UnitPredicate

logger = logging.getLogger(__name__)


def _scoped(config: BrecqConfig, prefix: str, first: bool, last: bool) -> BrecqConfig:
    """`config` for the submodule `prefix` prepared on its own: the names inside it, and first or
    last layers found in its graph only where its input or output is the model's."""
    def inside(names):  # noqa: ANN001, ANN202
        return tuple(n for n in names or () if n == prefix or n.startswith(prefix + "."))

    return config.replace(
        layer_bits={k: v for k, v in config.layer_bits.items() if k.startswith(prefix + ".")},
        act_layer_bits={k: v for k, v in config.act_layer_bits.items()
                        if k.startswith(prefix + ".")},
        first_layers=inside(config.first_layers) if config.first_layers is not None or not first
        else None,
        last_layers=inside(config.last_layers) if config.last_layers is not None or not last
        else None,
        unit_names=None if config.unit_names is None else inside(config.unit_names),
    )


def _prepare_by_children(
    model: nn.Module, config: BrecqConfig, example_inputs: tuple,
    unit_predicate: UnitPredicate | None, called: list[str],
) -> QuantizedModel | None:
    """For a model whose own forward fx cannot trace: prepare each child that holds weight
    layers on its own fx graph (descending into a child whose own forward fails too), so inside
    it quantizers sit at producers, BatchNorm folds on the graph and units follow data flow; the
    model's forward then runs as written, calling the prepared children. A child's input gets its
    quantizer at the child's boundary. None when a weight layer runs outside every traceable
    child, or when the model's forward fails or computes otherwise with the prepared children
    (`model` is then changed: start the fallback from a fresh copy)."""
    order, io = execution_order(model, example_inputs)
    original = dict(model.named_modules())
    model_in = {id(t) for t in example_inputs if isinstance(t, Tensor)}
    model_out = id(io[""][1])
    pending = [name for name, _ in model.named_children()]
    traced: dict[str, tuple] = {}
    while pending:
        name = pending.pop()
        if not any((layer.startswith(name + ".") or layer == name)
                   and not is_float_layer(layer, config) for layer in called):
            continue
        if isinstance(original[name], WEIGHT_LAYERS):
            return None  # called by code fx cannot trace: only the module tree reaches it
        args, output, kwargs = io.get(name, ((None,), None, {}))
        try:
            # Non-tensor arguments (None, flags) are fixed in the graph, tensors are its inputs.
            call = CallArguments.of(original[name], args, kwargs)
            gm, leaves = trace(original[name], model, name + ".", call)
            with torch.no_grad():
                if type(gm(*call.inputs)) is not type(output):  # fx made a dataclass a dict
                    raise TypeError("the graph returns another type than the module")
        except Exception:  # noqa: BLE001 - its own forward does not trace: try its children
            pending += [f"{name}.{child}" for child, _ in original[name].named_children()]
            continue
        decompose_sdpa(gm)
        inputs = call.inputs
        traced[name] = (gm, leaves, call, any(id(a) in model_in for a in inputs),
                        id(output) == model_out)
    if not traced:
        return None
    children: dict[str, QuantizedModel] = {}
    for name, (gm, leaves, call, is_first, is_last) in traced.items():
        bind_defaults(gm, len(call.inputs))
        children[name] = prepare_traced(
            gm, _scoped(config, name, is_first, is_last), call.inputs, unit_predicate, leaves,
            called, original, model_input=is_first)
        set_submodule(model, name, children[name] if call.plain else BoundCall(children[name], call))
    try:  # the model's own code may also use what was replaced (a child's attributes, say)
        with torch.no_grad(), state.quantization(model, weights=False, acts=False):
            torch.testing.assert_close(model(*example_inputs), io[""][1], rtol=1e-3, atol=1e-3)
    except Exception as exc:  # noqa: BLE001 - any failure or difference: not usable
        logger.info("preparing the children of %s on their own changes its output (%s)",
                    type(model).__name__, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    ordered = [children[name] for name in sorted(children, key=order.index)]
    layers = {k: v for c in ordered for k, v in c.layers.items()}
    act_quantizers = {k: v for c in ordered for k, v in c.act_quantizers.items()}
    bits = LayerBits(config, layers, [n for c in ordered for n in c.first_layers],
                     [n for c in ordered for n in c.last_layers])
    bits.check_act_names(act_quantizers)
    check_names(config.unit_names, [*layers, *(u.name for c in ordered for u in c.units)],
                "unit_names")
    return QuantizedModel(
        model, layers, act_quantizers,
        # a child taken whole ("net" granularity) is a unit named after the child
        [dataclasses.replace(u, name=n) if u.kind == "net" else u
         for n in sorted(children, key=order.index) for u in children[n].units], None,
        bits.first, bits.last, traced=False)


def _prepare_leaves_by_children(
    model: nn.Module, config: BrecqConfig, example_inputs: tuple,
    unit_predicate: UnitPredicate | None, called: list[str], leaves: set[str],
) -> QuantizedModel | None:
    """A model fx traces only by keeping whole a module that holds weight layers (a wrapper
    around a Hugging Face model, whose own forward builds masks fx cannot trace): prepared by
    its children instead when that puts every weight layer on a graph, so none is left inside
    an opaque node. None otherwise (`model` is then unchanged)."""
    if not any(layer.startswith(leaf + ".") for layer in called for leaf in leaves):
        return None
    candidate = copy.deepcopy(model)
    qmodel = _prepare_by_children(candidate, config, example_inputs, unit_predicate, called)
    if qmodel is not None:
        logger.warning(
            "torch.fx cannot trace into %s of %s; its children are traced and prepared one by "
            "one instead, and the code around them runs as written", ", ".join(sorted(leaves)),
            type(model).__name__)
    return qmodel


# --------------------------------------------------------------------------------------------
# The "nothing left in float" check


def _called_weight_layers(model: nn.Module, example_inputs: tuple) -> dict[str, int]:
    """The weight layers one forward pass calls, in order of their first call, with how many
    times each is called."""
    calls: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if name and isinstance(module, WEIGHT_LAYERS):
            def pre_hook(mod, args, name=name):  # noqa: ANN001
                calls[name] = calls.get(name, 0) + 1
            handles.append(module.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _warn_shared_call_sites(qmodel: QuantizedModel, calls: dict[str, int]) -> None:
    """Name the layers called more often than a graph tells their calls apart (inside a module
    fx cannot trace, on the module tree, in a child the model's untraceable forward calls
    several times): those calls share one set of activation quantizers."""
    sites = dict.fromkeys(qmodel.layers, 0)
    owners = {id(layer): name for name, layer in qmodel.layers.items()}
    for gm in (m for m in qmodel.network.modules() if isinstance(m, torch.fx.GraphModule)):
        for node in gm.graph.nodes:
            if node.op == "call_module":
                module = gm.get_submodule(node.target)
                # The layer itself, or the wrapper quantizing its input (`InputQuantized`).
                name = owners.get(id(module), owners.get(id(getattr(module, "layer", None))))
                if name is not None:
                    sites[name] += 1
    shared = [f"{name} ({calls[name]} calls)" for name in qmodel.layers
              if calls.get(name, 0) > max(sites[name], 1)]
    if shared:
        logger.warning(
            "%d layer(s) run several times per forward pass where no traced graph tells the "
            "calls apart, so all calls share the activation quantizers calibrated on the first: "
            "%s", len(shared), ", ".join(shared[:10]) + (" ..." if len(shared) > 10 else ""))


def _float_reason(name: str, module: nn.Module, qmodel: QuantizedModel, read_directly: bool) -> str:
    if read_directly:
        return ("the model's code reads its weight directly (e.g. F.linear(x, self.fc.weight)) "
                "and also calls the layer, or outside the traced graph")
    if not qmodel.traced:
        return "the model's forward is not traceable by torch.fx and its fallback did not reach it"
    return "it is not called as a module in the traced graph"


def _check_all_quantized(modules: dict[str, nn.Module], qmodel: QuantizedModel, called: list[str],
                         direct_reads: set[str], config: BrecqConfig) -> None:
    """Fail when a Conv/Linear that takes part in the forward pass is left in float unasked
    (`modules`: the model's modules before prepare)."""
    quantized = set(qmodel.layers)
    missing = []
    for name in dict.fromkeys([*called, *sorted(n for n in direct_reads if n in modules)]):
        module = modules[name]
        if not isinstance(module, WEIGHT_LAYERS):
            continue
        if name in quantized or is_float_layer(name, config):
            continue
        if any(name.startswith(q + ".") for q in quantized):
            continue  # part of a quantized layer (the out_proj of a MultiheadAttention)
        reason = _float_reason(name, module, qmodel, name in direct_reads)
        missing.append(f"{name} ({type(module).__name__}): {reason}")
    if missing:
        raise ModelError(
            f"{len(missing)} weight layer(s) would stay in float: " + "; ".join(missing)
            + ". Name them (or fnmatch patterns) in float_layers (--float-layers) to keep them"
            " in float on purpose"
        )
    unused = [n for n, m in modules.items() if is_quantizable(m) and n not in called
              and n not in direct_reads and not any(n.startswith(q + ".") for q in quantized)]
    if unused:
        logger.info("%d weight layers are not used by the forward pass and stay as they are: %s",
                    len(unused), ", ".join(unused[:10]) + (" ..." if len(unused) > 10 else ""))


# --------------------------------------------------------------------------------------------


def prepare(
    model: nn.Module,
    config: BrecqConfig,
    example_inputs: tuple,
    unit_predicate: Callable[[str], bool] | None = None,
) -> QuantizedModel:
    """A quantized copy of `model` (which is left untouched), ready for reconstruction."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model).eval()
    # Example inputs go where the model is: a model already moved to a GPU (e.g. after evaluating
    # it there) is prepared as it is.
    model_device = next((p.device for p in work.parameters()), None)
    if model_device is not None:
        example_inputs = tuple(x.to(model_device) if isinstance(x, Tensor) else x
                               for x in example_inputs)
    check_float_layers(config, dict(work.named_modules()))
    # Attention as matmul and softmax nodes; an nn.MultiheadAttention kept in float stays whole.
    explicit_multihead_attention(
        work, example_inputs,
        keep=lambda name: is_float_layer(name, config) or is_float_layer(f"{name}.out_proj", config))
    calls = _called_weight_layers(work, example_inputs)
    called = list(calls)
    modules = dict(work.named_modules())
    direct_reads: set[str] = set()
    qmodel: QuantizedModel | None = None
    try:
        # Example values let shape-unpacking code trace (`view(*x.shape[:-1], heads, -1)`).
        root_call = CallArguments.of(work, example_inputs, {})
        traced, leaves = trace(work, call=root_call if root_call.plain else None)
    except Exception as exc:  # noqa: BLE001 - any tracing failure: trace the parts, or the tree
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        qmodel = _prepare_by_children(work, config, example_inputs, unit_predicate, called)
        if qmodel is not None:
            logger.warning(
                "torch.fx cannot trace the forward of %s (%s); its children are traced and "
                "prepared one by one, and its own forward runs as written", type(model).__name__,
                reason)
        else:
            logger.warning(
                "torch.fx cannot trace %s (%s), nor can its children stand for it; falling back "
                "to the module tree: activation inputs are quantized at each layer and "
                "nn.Sequential children are the units", type(model).__name__, reason)
            # The module tree quantizes nn.MultiheadAttention whole: start from the original.
            work = copy.deepcopy(model).eval()
            calls = _called_weight_layers(work, example_inputs)
            called = list(calls)
            modules = dict(work.named_modules())
            qmodel = prepare_module_tree(work, config, example_inputs, unit_predicate)
    else:
        qmodel = _prepare_leaves_by_children(work, config, example_inputs, unit_predicate, called,
                                             leaves)
    if qmodel is None:
        if leaves:
            logger.warning(
                "torch.fx cannot trace into %s of %s; each is kept as one node of the graph, its "
                "weight layers quantized with their activation input at the layer",
                ", ".join(sorted(leaves)), type(model).__name__,
            )
        bind_defaults(traced, len(example_inputs))
        decompose_sdpa(traced)
        direct_reads = {n.target.rpartition(".")[0] for n in traced.graph.nodes if n.op == "get_attr"}
        qmodel = prepare_traced(traced, config, example_inputs, unit_predicate, leaves, called,
                                modules)
    _check_all_quantized(modules, qmodel, called, direct_reads, config)
    _warn_shared_call_sites(qmodel, calls)
    if len(example_inputs) == 1 and isinstance(example_inputs[0], Tensor):
        qmodel.example_input_shape = [1, *example_inputs[0].shape[1:]]
    return qmodel
