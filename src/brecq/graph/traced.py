"""Preparing a model on its torch.fx graph: one activation quantizer on every tensor that a
quantized layer reads (and on both inputs of activation matmuls, see `placement`), right at the
tensor's producer, so every consumer (residual adds included) sees the same quantized value;
units follow the data flow and run as sub-graphs."""

from __future__ import annotations

import logging
import operator
import re
from collections.abc import Iterable

import torch.fx as fx
from torch import Tensor, nn

from ..config import BrecqConfig
from ..quant.modules import QUANTIZABLE_LAYERS, QuantizedWeights, QuantLayer, QuantMultiheadAttention
from ..quant.quantizers import ActQuantizer, Log2Quantizer
from .fold_bn import fold_batchnorm_eager, fold_batchnorm_graph
from .layers import LayerBits, input_kind, is_float_layer, is_quantizable, set_submodule
from .model import QuantizedModel, Unit
from .placement import (
    BACKEND_NONE,
    MATMUL_INPUT,
    SOFTMAX_OUTPUT,
    backend_points,
    tensor_kind,
    transformer_points,
)
from .units import SIDE_TENSOR, UnitPlan, UnitPredicate, plan_units

logger = logging.getLogger(__name__)

_INPUT = "<input>"
_OUTPUT = "<output>"


def _activation_names(gm: fx.GraphModule, producers: Iterable[fx.Node]) -> dict[fx.Node, str]:
    """Names of the activation quantizers, after what produces each tensor: the module
    (`layer1.0.relu`), or for a function inside a module that module and the function
    (`F.relu` in `layer1.0`: `layer1.0.relu`); the fx node name (`relu`, `flatten`) at the top
    level. A name taken twice (a module called twice) gets `@2`, `@3`, ... in graph order."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    names: dict[fx.Node, str] = {}
    taken: dict[str, int] = {}
    for node in sorted(producers, key=order.__getitem__):
        stack = node.meta.get("nn_module_stack") or {}
        if node.op == "call_module":
            base = str(node.target)
        elif stack:
            scope = next(reversed(stack.values()))[0]
            base = f"{scope}.{re.sub(r'_[0-9]+$', '', node.name)}"
        else:
            base = node.name
        taken[base] = taken.get(base, 0) + 1
        names[node] = base if taken[base] == 1 else f"{base}@{taken[base]}"
    return names


class _TensorRecorder(fx.Interpreter):
    """Marks which nodes produce tensors, so shape arithmetic is not taken for data flow, and
    which produce side tensors: integer or boolean tensors with the inputs' batch dimension
    (attention masks, token indices), no activations (`units.SIDE_TENSOR`)."""

    def __init__(self, gm: fx.GraphModule, batch: int | None) -> None:
        super().__init__(gm)
        self.batch = batch

    def run_node(self, node: fx.Node):  # noqa: ANN201
        result = super().run_node(node)
        node.meta["brecq_is_tensor"] = isinstance(result, Tensor)
        node.meta[SIDE_TENSOR] = (
            isinstance(result, Tensor) and not result.is_floating_point()
            and not result.is_complex() and result.dim() > 0 and result.shape[0] == self.batch)
        return result


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a.meta.get("brecq_is_tensor", False)]


def _nearest_layers(start: fx.Node, layer_nodes: set[fx.Node], upstream: bool) -> set:
    """Layers reached from `start` without crossing another layer: upstream (`start` itself
    included) the layers or model input it reads from, downstream the layers or model output
    that read it."""
    found, stack, seen = set(), [start] if upstream else list(start.users), set()
    end_op, end_mark = ("placeholder", _INPUT) if upstream else ("output", _OUTPUT)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in layer_nodes:
            found.add(node.target)
        elif node.op == end_op:
            found.add(end_mark)
        else:
            stack.extend(_tensor_inputs(node) if upstream else node.users)
    return found


def _reaches_output(start: fx.Node, layer_nodes: set[fx.Node]) -> bool:
    stack, seen = list(start.users), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "output":
            return True
        if node not in layer_nodes:
            stack.extend(node.users)
    return False


def _activation_inputs(node: fx.Node, module: nn.Module) -> list[fx.Node]:
    attention = isinstance(module, (QuantMultiheadAttention, nn.MultiheadAttention))
    count = 3 if attention else 1
    return [a for a in node.args[:count] if isinstance(a, fx.Node)]


def _quantize_biases(gm: fx.GraphModule, layer_nodes: set[fx.Node],
                     layers: dict[str, QuantizedWeights],
                     act_quantizers: dict[str, ActQuantizer]) -> None:
    """Put the bias of each layer that reads a quantized activation on its int32 grid."""
    sources: dict[str, set[str]] = {}
    for node in layer_nodes:
        value = node.args[0] if node.args else None
        key = value.meta.get("brecq_act_source") if isinstance(value, fx.Node) else None
        sources.setdefault(node.target, set()).add(key)
    for name, keys in sources.items():
        layer = layers[name]
        # A layer called on several tensors has no single input step: its bias stays float.
        if isinstance(layer, QuantLayer) and len(keys) == 1 and None not in keys:
            layer.quantize_bias(act_quantizers[next(iter(keys))])


def _insert_quantizer(gm: fx.GraphModule, producer: fx.Node, submodule: str, key: str,
                      owner: bool) -> None:
    """Route every use of `producer` (except the network output) through the quantizer
    `submodule + "_act_quant"`, known to users as `key`.

    A reused quantizer (owner False) is called a second time on values already on its grid, so
    it changes nothing; it is learned with the unit that owns it, not where it is reused.
    """
    with gm.graph.inserting_after(producer):
        qnode = gm.graph.call_module(submodule + "_act_quant", (producer,))
    qnode.meta["nn_module_stack"] = dict(producer.meta.get("nn_module_stack") or {})
    qnode.meta["brecq_is_tensor"] = True
    qnode.meta["brecq_act_source"] = key
    if owner:
        qnode.meta["brecq_act_quantizer"] = key
    producer.replace_all_uses_with(
        qnode, delete_user_cb=lambda user: user is not qnode and user.op != "output"
    )


def _build_unit_module(gm: fx.GraphModule, nodes: list[fx.Node], plan: UnitPlan):
    """A GraphModule for nodes[plan.start..plan.end]: external values in, later-used values out."""
    inside = set(nodes[plan.start : plan.end + 1])
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[fx.Node] = []

    def lookup(value: fx.Node) -> fx.Node:
        if value not in env:
            if value.op == "get_attr":
                env[value] = graph.get_attr(value.target)
            else:
                inputs.append(value)
                env[value] = graph.placeholder(value.name)
        return env[value]

    for node in nodes[plan.start : plan.end + 1]:
        for value in node.all_input_nodes:
            if value not in inside:
                lookup(value)
    for node in nodes[plan.start : plan.end + 1]:
        env[node] = graph.node_copy(node, lookup)
    outputs = [n for n in nodes[plan.start : plan.end + 1] if any(u not in inside for u in n.users)]
    graph.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    module = fx.GraphModule(gm, graph, class_name="Unit")
    return module, inputs, outputs


def _build_runner(gm: fx.GraphModule, nodes: list[fx.Node], plans: list[UnitPlan]):
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    units: dict[str, nn.Module] = {}
    modules = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node)
    for k, plan in enumerate(plans):
        module, inputs, outputs = _build_unit_module(gm, nodes, plan)
        key = f"unit_{k}"
        units[key] = module
        modules.append(module)
        call = graph.call_module(key, tuple(env[v] for v in inputs))
        if len(outputs) == 1:
            env[outputs[0]] = call
        else:
            for i, out in enumerate(outputs):
                env[out] = graph.call_function(operator.getitem, (call, i))
    for node in gm.graph.nodes:
        if node.op == "output":
            graph.node_copy(node, lambda value: env[value])
    return fx.GraphModule(units, graph, class_name="UnitRunner"), modules


def _layers_inside(gm: fx.GraphModule, leaves: set[str], called: list[str],
                   config: BrecqConfig) -> dict[str, tuple[str, ...]]:
    """Weight layers (in execution order) inside each module that is one node of the graph."""
    inner: dict[str, tuple[str, ...]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in leaves and node.target not in inner:
            inner[node.target] = tuple(
                name for name in called
                if name.startswith(node.target + ".") and not is_float_layer(name, config)
                and is_quantizable(gm.get_submodule(name))
            )
    return {leaf: names for leaf, names in inner.items() if names}


def _quantize_direct_reads(gm: fx.GraphModule, original: dict[str, nn.Module], names: list[str],
                           bits: LayerBits, layers: dict[str, QuantizedWeights]) -> dict:
    """Quantize the weights of layers the model's code reads directly (torchvision's Swin passes
    `self.qkv.weight` to a function): the read goes through the layer's weight quantizer. The
    activation such a function takes stays float: what it does with it is unknown here.

    Returns {weight quantizer node target: (layer name,)} for unit planning. (The graph module
    holds only the read attributes under such a path, so the layer comes from `original`.)
    """
    reads: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        owner, _, attr = node.target.rpartition(".") if node.op == "get_attr" else ("", "", "")
        if attr in ("weight", "bias") and owner and owner not in names:
            module = original.get(owner)
            if isinstance(module, QUANTIZABLE_LAYERS) and not is_float_layer(owner, bits.config):
                reads.setdefault(owner, []).append(node)
    quantizer_nodes = {}
    for name, nodes in reads.items():
        layer = bits.quantized_layer(name, original[name])
        set_submodule(gm, name, layer)
        layers[name] = layer
        for node in nodes:
            node.target = f"{name}.layer.{node.target.rpartition('.')[2]}"
            if node.target.endswith(".weight"):
                with gm.graph.inserting_after(node):
                    quantized = gm.graph.call_module(f"{name}.weight_quantizer", (node,))
                quantized.meta.update(brecq_is_tensor=True,
                                      nn_module_stack=dict(node.meta.get("nn_module_stack") or {}))
                node.replace_all_uses_with(
                    quantized, delete_user_cb=lambda user, q=quantized: user is not q)
                quantizer_nodes[f"{name}.weight_quantizer"] = (name,)
    return quantizer_nodes


def _fold_and_record(gm: fx.GraphModule, example_inputs: tuple, leaves: set[str]) -> None:
    """Fold BatchNorm into the layers before it and mark which nodes produce tensors."""
    folded = fold_batchnorm_graph(gm)
    if leaves:
        # Inside modules fx could not trace, pairs come from one run (tensor identity).
        folded += fold_batchnorm_eager(gm, example_inputs, within=leaves)
    logger.info("folded %d BatchNorm layers into the layers before them", folded)
    batch = next((x.shape[0] for x in example_inputs if isinstance(x, Tensor) and x.dim()), None)
    _TensorRecorder(gm, batch).run(*example_inputs)


def _resolve_bits(gm: fx.GraphModule, layer_nodes: set[fx.Node], names: list[str],
                  inner: dict[str, tuple[str, ...]], config: BrecqConfig) -> LayerBits:
    """First layers: those reading the graph input; last: those whose output reaches the graph
    output without crossing another layer."""
    first = sorted({
        n.target for n in layer_nodes
        if any(_INPUT in _nearest_layers(a, layer_nodes, upstream=True)
               for a in _activation_inputs(n, gm.get_submodule(n.target)))
    })
    last = sorted({n.target for n in layer_nodes if _reaches_output(n, layer_nodes)})
    return LayerBits(config, names + [n for ns in inner.values() for n in ns], first, last)


def _act_quantizer(gm: fx.GraphModule, producer: fx.Node, point_kind: str | None,
                   readers: set[nn.Module], bits: int, config: BrecqConfig) -> ActQuantizer:
    """The quantizer of the tensor `producer` (`readers`: the layers that read it): log2 for
    attention probabilities if `softmax_quantizer` says so (`auto`: below 8 bits, where the
    uniform grid has too few levels for small probabilities; at 8 bits log2's sqrt(2) steps are
    the coarser), else the affine one."""
    kinds = {input_kind(layer) for layer in readers}
    layer_kind = kinds.pop() if len(kinds) == 1 else "layer input" if kinds else None
    kind = tensor_kind(producer, gm, layer_kind, point_kind)
    log2 = config.softmax_quantizer == "log2" or (config.softmax_quantizer == "auto" and bits < 8)
    if point_kind == SOFTMAX_OUTPUT and log2:
        return Log2Quantizer(bits, kind=kind)
    return ActQuantizer(bits, symmetric=config.act_symmetric, kind=kind)


def _place_act_quantizers(gm: fx.GraphModule, layer_nodes: set[fx.Node], bits: LayerBits,
                          layers: dict[str, QuantizedWeights],
                          act_quantizers: dict[str, ActQuantizer], model_input: bool) -> None:
    """One activation quantizer at the producer of each tensor layers read (and of each the
    backend needs quantized), reused where the backend reads the same values again."""
    config = bits.config
    first, last = set(bits.first), set(bits.last)
    producers: dict[fx.Node, set[str]] = {}
    for node in gm.graph.nodes:
        if node in layer_nodes:
            for value in _activation_inputs(node, layers[node.target]):
                if value.op != "get_attr":
                    producers.setdefault(value, set()).add(node.target)
    points = transformer_points(gm, set(producers), config.quantize_matmul_inputs,
                                config.quantize_residual_adds and config.backend == BACKEND_NONE)
    own, reuse = backend_points(gm, layer_nodes, last, list(producers), config.backend, points,
                                inner_graph=not model_input)
    act_names = _activation_names(gm, own)
    bits.check_act_names([*act_names.values(), *(p.name for p in own), *act_quantizers])
    for producer in own:
        beside_first_or_last = False
        if config.first_last_bits is not None:
            upstream = _nearest_layers(producer, layer_nodes, upstream=True)
            # E.g. a pooling input that only the classifier reads on (backend placement).
            downstream = _nearest_layers(producer, layer_nodes, upstream=False)
            beside_first_or_last = (
                bool(producers.get(producer, set()) & last)
                or (bool(upstream) and upstream <= first)
                or (bool(downstream) and downstream <= last)
                # The network input feeds the first layers: it is as wide as their weights.
                or (producer.op == "placeholder" and model_input)
            )
        key = act_names[producer]
        quantizer = _act_quantizer(
            gm, producer, points.get(producer), {layers[name] for name in producers.get(producer, ())},
            bits.act_bits(key, alias=producer.name,
                          # Matmul inputs and softmax outputs are multiplied as layer inputs are.
                          read_by_layers=producer in producers or points.get(producer) in (
                              MATMUL_INPUT, SOFTMAX_OUTPUT),
                          beside_first_or_last=beside_first_or_last), config)
        gm.add_submodule(producer.name + "_act_quant", quantizer)
        act_quantizers[key] = quantizer
        _insert_quantizer(gm, producer, producer.name, key, owner=True)
    for node, source in reuse.items():
        _insert_quantizer(gm, node, source.name, act_names[source], owner=False)
    if config.integer_bias:
        _quantize_biases(gm, layer_nodes, layers, act_quantizers)


def _build_units(gm: fx.GraphModule, names: list[str], inner: dict[str, tuple[str, ...]],
                 act_quantizers: dict[str, ActQuantizer], config: BrecqConfig,
                 unit_predicate: UnitPredicate | None) -> tuple[list[Unit], nn.Module]:
    """The units of the prepared graph and the module that runs them in order."""
    plans = plan_units(
        gm.graph, set(names), config.granularity, config.unit_names, unit_predicate, inner
    )
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    runner, modules = _build_runner(gm, nodes, plans)
    units = []
    for plan, module in zip(plans, modules):
        aqs = tuple(
            n.meta["brecq_act_quantizer"] for n in nodes[plan.start : plan.end + 1]
            if "brecq_act_quantizer" in n.meta
        ) + tuple(name for name in plan.layers if name in act_quantizers and name not in names)
        units.append(Unit(plan.name, plan.kind, module, plan.layers, aqs))
    return units, runner


def prepare_traced(
    gm: fx.GraphModule, config: BrecqConfig, example_inputs: tuple,
    unit_predicate: UnitPredicate | None, leaves: set[str] = frozenset(),
    called: list[str] = (), original: dict[str, nn.Module] | None = None,
    model_input: bool = True,
) -> QuantizedModel:
    """Quantize the traced `gm` in place. `leaves`: modules kept whole in the graph; `called`:
    the weight layers a forward pass calls, in order; `original`: the model's modules before
    preparation; `model_input`: whether the graph's inputs are the model's (not a submodule's)."""
    original = original if original is not None else dict(gm.named_modules())
    _fold_and_record(gm, example_inputs, leaves)
    layer_nodes = {
        n for n in gm.graph.nodes
        if n.op == "call_module" and is_quantizable(gm.get_submodule(n.target))
        and not is_float_layer(n.target, config)
    }
    names = sorted({n.target for n in layer_nodes})
    inner = _layers_inside(gm, leaves, list(called), config)
    bits = _resolve_bits(gm, layer_nodes, names, inner, config)

    layers: dict[str, QuantizedWeights] = {}
    for name in names:
        layer = bits.quantized_layer(name, gm.get_submodule(name))
        set_submodule(gm, name, layer)
        layers[name] = layer
    act_quantizers: dict[str, ActQuantizer] = {}
    for name in (n for ns in inner.values() for n in ns):  # quantized with their input at them
        bits.quantize_at_input(gm, name, layers, act_quantizers)
    inner.update(_quantize_direct_reads(gm, original, names, bits, layers))
    if config.act_bits is not None:
        _place_act_quantizers(gm, layer_nodes, bits, layers, act_quantizers, model_input)
    gm.graph.lint()
    gm.recompile()
    units, runner = _build_units(gm, names, inner, act_quantizers, config, unit_predicate)
    return QuantizedModel(gm, layers, act_quantizers, units, runner, bits.first, bits.last,
                          traced=True)
