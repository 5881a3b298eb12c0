"""Turn a user's float model into a `QuantizedModel`.

Steps: copy the model; fold BatchNorm; swap Conv/Linear (and MultiheadAttention) for quantized
wrappers; put one activation quantizer on every tensor that a quantized layer reads, right at
the tensor's producer, so every consumer (residual adds included) sees the same quantized value;
find reconstruction units. All on the torch.fx graph. A model whose own forward fx cannot trace
has each child traced and prepared on its own graph; only one that calls weight layers from
untraceable code falls back to the module tree (layer inputs quantized at the layer,
`nn.Sequential` children as units).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
import logging
import operator
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..config import BrecqConfig
from ..errors import ConfigError, ModelError
from ..quant import state
from ..quant.modules import (
    QUANTIZABLE_LAYERS,
    QuantizedWeights,
    QuantLayer,
    QuantMultiheadAttention,
)
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from .fold_bn import fold_batchnorm_eager, fold_batchnorm_graph
from .placement import BACKEND_NONE, backend_points
from .units import UnitPlan, UnitPredicate, plan_units

logger = logging.getLogger(__name__)

_INPUT = "<input>"
_OUTPUT = "<output>"


@dataclass(frozen=True)
class Unit:
    """One reconstruction unit: a callable module and the quantizers it owns."""

    name: str
    kind: str
    module: nn.Module
    layers: tuple[str, ...]
    act_quantizers: tuple[str, ...]


class QuantizedModel(nn.Module):
    """A fake-quantized copy of a model, with its layers, activation quantizers and units.

    `network` holds every parameter under the original module names (so its state dict is
    independent of the unit split); `forward` runs the units in order.
    """

    def __init__(
        self,
        network: nn.Module,
        layers: dict[str, QuantizedWeights],
        act_quantizers: dict[str, ActQuantizer],
        units: list[Unit],
        runner: nn.Module | None,
        first_layers: tuple[str, ...],
        last_layers: tuple[str, ...],
        traced: bool,
    ) -> None:
        super().__init__()
        self.network = network
        self.layers = layers
        self.act_quantizers = act_quantizers
        self.units = units
        self.first_layers = first_layers
        self.last_layers = last_layers
        self.traced = traced
        # Shape of the example input the model was prepared with (batch of 1): enough to
        # rebuild the same units when a saved model is loaded.
        self.example_input_shape: list[int] | None = None
        # The runner shares the network's modules; registering it would duplicate the state dict.
        object.__setattr__(self, "_runner", runner)

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003
        return (self._runner or self.network)(*args, **kwargs)

    def _apply(self, fn, recurse=True):  # noqa: ANN001
        super()._apply(fn, recurse)
        if self._runner is not None:
            self._runner._apply(fn, recurse)  # tensors the unit graphs hold directly
        return self

    @property
    def weight_quantizers(self) -> dict[str, WeightQuantizer]:
        """Weight quantizers by layer name (`layer.bias`-style for other weights), as
        `act_quantizers` maps names to activation quantizers."""
        return {
            f"{name}.{weight_name}" if weight_name != "weight" else name: quantizer
            for name, layer in self.layers.items()
            for weight_name, _, quantizer in layer.weight_quantizers()
        }

    @contextmanager
    def quantization(self, *, weights: bool = True, acts: bool = True) -> Iterator[None]:
        """Run with weight and/or activation quantization switched on or off."""
        with state.quantization(self.network, weights=weights, acts=acts):
            yield

    def describe(self) -> str:
        """A printable table of the units: kind, layers, parameters, weight and activation bits."""
        from ..text import units_table

        return units_table(self.describe_rows())

    def describe_rows(self) -> list[dict]:
        """Units with their layers, parameter counts and quantizer bit widths."""
        rows = []
        for unit in self.units:
            params = sum(self.layers[name].num_weight_params for name in unit.layers)
            rows.append({
                "name": unit.name,
                "kind": unit.kind,
                "layers": list(unit.layers),
                "weight_bits": {n: self._layer_bits(n) for n in unit.layers},
                "act_quantizers": {n: self.act_quantizers[n].bits for n in unit.act_quantizers},
                "params": params,
            })
        return rows

    def _layer_bits(self, name: str) -> int:
        return next(q.bits for _, _, q in self.layers[name].weight_quantizers())


# --------------------------------------------------------------------------------------------
# Bit widths and quantizer construction


def _check_names(requested: dict | tuple | None, known: list[str], what: str) -> None:
    for name in requested or ():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"{what} names {name!r}, which is not a quantized layer of this model{hint}; "
                "run `brecq info` to list the names"
            )


def _weight_quantizer(config: BrecqConfig, bits: int, weight: Tensor) -> WeightQuantizer:
    # onnxruntime's fast integer kernels take int8 weights with zero point 0: 8-bit weights are
    # symmetric for it; narrower affine codes minus their zero point fit int8 at export anyway.
    symmetric = config.weight_symmetric or (config.backend != BACKEND_NONE and bits == 8)
    quantizer = WeightQuantizer(
        bits, symmetric=symmetric,
        per_channel=config.weight_granularity == "channel",
    )
    quantizer.calibrate(weight.detach(), config.scale_search, config.lp_norm)
    return quantizer


def _quantized_layer(module: nn.Module, config: BrecqConfig, bits: int) -> QuantizedWeights:
    if isinstance(module, nn.MultiheadAttention):
        return QuantMultiheadAttention(
            module,
            _weight_quantizer(config, bits, module.in_proj_weight),
            _weight_quantizer(config, bits, module.out_proj.weight),
        )
    return QuantLayer(module, _weight_quantizer(config, bits, module.weight))


def _is_quantizable(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return module._qkv_same_embed_dim
    return isinstance(module, QUANTIZABLE_LAYERS)


def _layer_bits(name: str, config: BrecqConfig, special: set[str]) -> int:
    if name in config.layer_bits:
        return config.layer_bits[name]
    if config.first_last_bits is not None and name in special:
        return config.first_last_bits
    return config.weight_bits


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


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def _is_float_layer(name: str, config: BrecqConfig) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in config.float_layers or ())


# --------------------------------------------------------------------------------------------
# torch.fx path


class _LeafTracer(fx.Tracer):
    """An fx tracer that keeps weight layers and the modules in `leaves` whole.

    Weight layers stay whole even when a library subclasses them (timm's Conv2dSame computes its
    padding with Python control flow). When tracing fails, `failed_in` names the innermost module
    whose code raised, so the caller can retry with that module kept whole.
    """

    def __init__(self, leaves: set[str], prefix: str = "") -> None:
        super().__init__()
        self.leaves = leaves
        self.prefix = prefix
        self.failed_in: str | None = None

    def path_of_module(self, mod: nn.Module) -> str:
        # A submodule traced on its own gets the names it has in the whole model.
        return self.prefix + super().path_of_module(mod)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves:
            return True
        if isinstance(m, QUANTIZABLE_LAYERS + (nn.MultiheadAttention,)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):  # noqa: ANN001, ANN201
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def _bind_defaults(gm: fx.GraphModule, given: int) -> None:
    """Replace the optional inputs the example inputs leave out (timm's `attn_mask=None`) by their
    defaults: a placeholder threaded through every block would leave no single-tensor cut."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders[given:]:
        if node.args:  # has a default value
            default = node.args[0]
            for user in list(node.users):
                user.args = fx.node.map_arg(user.args, lambda a, n=node, d=default: d if a is n else a)
                user.kwargs = fx.node.map_arg(user.kwargs,
                                              lambda a, n=node, d=default: d if a is n else a)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _trace(model: nn.Module, root: nn.Module | None = None,
           prefix: str = "") -> tuple[fx.GraphModule, set[str]]:
    """Trace `model`, keeping whole each submodule fx cannot trace through; raises if the
    model's own forward is what fails. `model` may be the submodule `prefix` of `root`: the graph
    then names modules and attributes as `root` does."""
    leaves: set[str] = set()
    while True:
        tracer = _LeafTracer(leaves, prefix)
        if prefix:  # every node runs inside that submodule, as when traced from `root`
            tracer.module_stack[prefix[:-1]] = (prefix[:-1], type(model))
        try:
            graph = tracer.trace(model)
        except Exception:
            if not tracer.failed_in or tracer.failed_in in leaves:
                raise
            leaves.add(tracer.failed_in)
            continue
        for node in graph.nodes:
            if node.op == "get_attr":
                node.target = prefix + node.target
        return fx.GraphModule(root or tracer.root, graph, type(model).__name__), leaves


class _TensorRecorder(fx.Interpreter):
    """Marks which nodes produce tensors, so shape arithmetic is not taken for data flow."""

    def run_node(self, node: fx.Node):  # noqa: ANN201
        result = super().run_node(node)
        node.meta["brecq_is_tensor"] = isinstance(result, Tensor)
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
                if name.startswith(node.target + ".") and not _is_float_layer(name, config)
                and _is_quantizable(gm.get_submodule(name))
            )
    return {leaf: names for leaf, names in inner.items() if names}


def _quantize_inside(gm: fx.GraphModule, inner: dict[str, tuple[str, ...]], config: BrecqConfig,
                     special: set[str], layers: dict[str, QuantizedWeights],
                     act_quantizers: dict[str, ActQuantizer]) -> None:
    """Quantize the layers inside untraced modules, each activation input right at its layer."""
    for name in (n for names in inner.values() for n in names):
        layer = _quantized_layer(gm.get_submodule(name), config, _layer_bits(name, config, special))
        layers[name] = layer
        if config.act_bits is not None:
            bits = config.act_layer_bits.get(name, config.act_bits)
            wrapped = _InputQuantized(layer, ActQuantizer(bits, symmetric=config.act_symmetric))
            if config.integer_bias and isinstance(layer, QuantLayer):
                layer.quantize_bias(wrapped.input_quantizer)
            act_quantizers[name] = wrapped.input_quantizer
            _set_submodule(gm, name, wrapped)
        else:
            _set_submodule(gm, name, layer)


def _quantize_direct_reads(gm: fx.GraphModule, original: dict[str, nn.Module], names: list[str],
                           config: BrecqConfig, special: set[str],
                           layers: dict[str, QuantizedWeights]) -> dict:
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
            if isinstance(module, QUANTIZABLE_LAYERS) and not _is_float_layer(owner, config):
                reads.setdefault(owner, []).append(node)
    quantizer_nodes = {}
    for name, nodes in reads.items():
        layer = _quantized_layer(original[name], config, _layer_bits(name, config, special))
        _set_submodule(gm, name, layer)
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


def _prepare_traced(
    gm: fx.GraphModule, config: BrecqConfig, example_inputs: tuple,
    unit_predicate: UnitPredicate | None, leaves: set[str] = frozenset(),
    called: list[str] = (), original: dict[str, nn.Module] | None = None,
    model_input: bool = True,
) -> QuantizedModel:
    """`model_input`: whether the graph's inputs are the model's (not a submodule's) inputs."""
    original = original if original is not None else dict(gm.named_modules())
    folded = fold_batchnorm_graph(gm)
    if leaves:
        # Inside modules fx could not trace, pairs come from one run (tensor identity).
        folded += fold_batchnorm_eager(gm, example_inputs, within=leaves)
    logger.info("folded %d BatchNorm layers into the layers before them", folded)
    _TensorRecorder(gm).run(*example_inputs)

    layer_nodes = {
        n for n in gm.graph.nodes
        if n.op == "call_module" and _is_quantizable(gm.get_submodule(n.target))
        and not _is_float_layer(n.target, config)
    }
    names = sorted({n.target for n in layer_nodes})
    inner = _layers_inside(gm, leaves, list(called), config)
    _check_names(config.layer_bits, names + [n for ns in inner.values() for n in ns], "layer_bits")
    _check_names(config.first_layers, names, "first_layers")
    _check_names(config.last_layers, names, "last_layers")

    first = config.first_layers
    if first is None:
        first = tuple(sorted({
            n.target for n in layer_nodes
            if any(_INPUT in _nearest_layers(a, layer_nodes, upstream=True)
                   for a in _activation_inputs(n, gm.get_submodule(n.target)))
        }))
    last = config.last_layers
    if last is None:
        last = tuple(sorted({n.target for n in layer_nodes if _reaches_output(n, layer_nodes)}))
    special = set(first) | set(last)

    layers: dict[str, QuantizedWeights] = {}
    for name in names:
        layer = _quantized_layer(gm.get_submodule(name), config, _layer_bits(name, config, special))
        _set_submodule(gm, name, layer)
        layers[name] = layer

    act_quantizers: dict[str, ActQuantizer] = {}
    _quantize_inside(gm, inner, config, special, layers, act_quantizers)
    inner.update(_quantize_direct_reads(gm, original, names, config, special, layers))
    if config.act_bits is not None:
        producers: dict[fx.Node, set[str]] = {}
        for node in gm.graph.nodes:
            if node in layer_nodes:
                for value in _activation_inputs(node, layers[node.target]):
                    if value.op != "get_attr":
                        producers.setdefault(value, set()).add(node.target)
        own, reuse = backend_points(gm, layer_nodes, set(last), list(producers), config.backend)
        act_names = _activation_names(gm, own)
        _check_names(config.act_layer_bits, [*act_names.values(), *(p.name for p in own)],
                     "act_layer_bits")
        for producer in own:
            consumers = producers.get(producer, set())
            # `act_bits` is the width of what layers multiply; a tensor only the backend needs
            # quantized (e.g. a residual add input) is stored and added in int8 there anyway.
            bits = config.act_bits if producer in producers else max(config.act_bits, 8)
            if config.first_last_bits is not None:
                upstream = _nearest_layers(producer, layer_nodes, upstream=True)
                feeds_last = bool(consumers & set(last))
                after_first = bool(upstream) and upstream <= set(first)
                # E.g. a pooling input that only the classifier reads on (backend placement).
                downstream = _nearest_layers(producer, layer_nodes, upstream=False)
                before_last = bool(downstream) and downstream <= set(last)
                # The network input feeds the first layers: it is as wide as their weights.
                is_model_input = producer.op == "placeholder" and model_input
                if feeds_last or after_first or before_last or is_model_input:
                    bits = config.first_last_bits
            key = act_names[producer]
            bits = config.act_layer_bits.get(key, config.act_layer_bits.get(producer.name, bits))
            quantizer = ActQuantizer(bits, symmetric=config.act_symmetric)
            gm.add_submodule(producer.name + "_act_quant", quantizer)
            act_quantizers[key] = quantizer
            _insert_quantizer(gm, producer, producer.name, key, owner=True)
        for node, source in reuse.items():
            _insert_quantizer(gm, node, source.name, act_names[source], owner=False)
        if config.integer_bias:
            _quantize_biases(gm, layer_nodes, layers, act_quantizers)
    gm.graph.lint()
    gm.recompile()

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
    return QuantizedModel(gm, layers, act_quantizers, units, runner, tuple(first),
                          tuple(last), traced=True)


# --------------------------------------------------------------------------------------------
# Module-tree fallback


def _execution_order(model: nn.Module, example_inputs: tuple) -> tuple[list[str], dict]:
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
    order, io = _execution_order(model, example_inputs)
    original = dict(model.named_modules())
    model_in = {id(t) for t in example_inputs if isinstance(t, Tensor)}
    model_out = id(io[""][1])
    pending = [name for name, _ in model.named_children()]
    traced: dict[str, tuple] = {}
    while pending:
        name = pending.pop()
        if not any((layer.startswith(name + ".") or layer == name)
                   and not _is_float_layer(layer, config) for layer in called):
            continue
        if isinstance(original[name], _WEIGHT_LAYERS):
            return None  # called by code fx cannot trace: only the module tree reaches it
        args, output, kwargs = io.get(name, ((None,), None, {}))
        try:
            if kwargs or not all(isinstance(a, Tensor) for a in args):
                raise TypeError("only positional tensor inputs are traced")
            gm, leaves = _trace(original[name], model, name + ".")
        except Exception:  # noqa: BLE001 - its own forward does not trace: try its children
            pending += [f"{name}.{child}" for child, _ in original[name].named_children()]
            continue
        traced[name] = (gm, leaves, args, any(id(a) in model_in for a in args), id(output) == model_out)
    if not traced:
        return None
    children: dict[str, QuantizedModel] = {}
    for name, (gm, leaves, args, is_first, is_last) in traced.items():
        _bind_defaults(gm, len(args))
        children[name] = _prepare_traced(
            gm, _scoped(config, name, is_first, is_last), args, unit_predicate, leaves, called,
            original, model_input=is_first)
        _set_submodule(model, name, children[name])
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
    _check_names(config.layer_bits, list(layers), "layer_bits")
    _check_names(config.act_layer_bits, list(act_quantizers), "act_layer_bits")
    for what in ("first_layers", "last_layers", "unit_names"):
        _check_names(getattr(config, what), [*layers, *(u.name for c in ordered for u in c.units)],
                     what)
    return QuantizedModel(
        model, layers, act_quantizers,
        # a child taken whole ("net" granularity) is a unit named after the child
        [dataclasses.replace(u, name=n) if u.kind == "net" else u
         for n in sorted(children, key=order.index) for u in children[n].units], None,
        tuple(n for c in ordered for n in c.first_layers),
        tuple(n for c in ordered for n in c.last_layers), traced=False)


def _prepare_module_tree(
    model: nn.Module, config: BrecqConfig, example_inputs: tuple,
    unit_predicate: UnitPredicate | None,
) -> QuantizedModel:
    folded = fold_batchnorm_eager(model, example_inputs)
    logger.info("folded %d BatchNorm layers into the layers before them", folded)
    if config.backend != BACKEND_NONE and config.act_bits is not None:
        logger.warning("backend %r placement needs the torch.fx graph: without it only layer "
                       "inputs are quantized, and an exported model runs partly in float",
                       config.backend)
    order, io = _execution_order(model, example_inputs)
    modules = dict(model.named_modules())
    names = [n for n in order if _is_quantizable(modules[n]) and not _is_float_layer(n, config)]
    names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    if not names:
        raise ConfigError("the model has no Conv or Linear layer to quantize")
    _check_names(config.layer_bits, names, "layer_bits")
    model_in = {id(t) for t in io[""][0] if isinstance(t, Tensor)}
    model_out = id(io[""][1])
    first = config.first_layers or tuple(
        n for n in names if any(id(a) in model_in for a in io[n][0])
    )
    last = config.last_layers or tuple(n for n in names if id(io[n][1]) == model_out)
    special = set(first) | set(last)

    layers: dict[str, QuantizedWeights] = {}
    act_quantizers: dict[str, ActQuantizer] = {}
    for name in names:
        layer = _quantized_layer(modules[name], config, _layer_bits(name, config, special))
        if config.act_bits is not None and name not in first:
            bits = config.first_last_bits if (
                config.first_last_bits is not None and name in last) else config.act_bits
            bits = config.act_layer_bits.get(name, bits)
            layer = _InputQuantized(layer, ActQuantizer(bits, symmetric=config.act_symmetric))
            if config.integer_bias and isinstance(layer.layer, QuantLayer):
                layer.layer.quantize_bias(layer.input_quantizer)
            act_quantizers[name] = layer.input_quantizer
            layers[name] = layer.layer
        else:
            layers[name] = layer
        _set_submodule(model, name, layer)

    granularity = config.granularity
    unit_modules: list[str]
    if config.unit_names or unit_predicate is not None:
        chosen = list(config.unit_names or []) + [
            n for n in order if unit_predicate is not None and unit_predicate(n)
        ]
        missing = [n for n in chosen if n not in modules]
        if missing:
            raise ConfigError(f"unit {missing[0]!r} is not a module of the model: check the name")
        unit_modules = chosen
    elif granularity == "layer":
        unit_modules = list(names)
    elif granularity == "net":
        unit_modules = []
    else:
        stages = [
            n for n in order
            if isinstance(modules[n], nn.Sequential) and any(lay.startswith(n + ".") for lay in names)
        ]
        stages = [s for s in stages if not any(s.startswith(o + ".") for o in stages)]
        if granularity == "stage":
            unit_modules = stages
        else:
            unit_modules = [
                f"{s}.{child}" for s in stages for child, _ in modules[s].named_children()
                if any(lay == f"{s}.{child}" or lay.startswith(f"{s}.{child}.") for lay in names)
            ]
    units: list[Unit] = []
    if granularity == "net" and not unit_modules:
        units.append(Unit("net", "net", model, tuple(names), tuple(act_quantizers)))
    else:
        covered = set()
        ordered = [n for n in order if n in unit_modules or n in names]
        for name in ordered:
            if name in covered:
                continue
            inner = tuple(lay for lay in names if lay == name or lay.startswith(name + "."))
            if not inner or any(lay in covered for lay in inner):
                continue
            covered.update(inner)
            covered.add(name)
            kind = "layer" if len(inner) == 1 and inner[0] == name else (
                "stage" if granularity == "stage" else "block")
            units.append(Unit(name, kind, model.get_submodule(name), inner,
                              tuple(a for a in act_quantizers if a in inner)))
    return QuantizedModel(model, layers, act_quantizers, units, None, tuple(first), tuple(last),
                          traced=False)


class _InputQuantized(nn.Module):
    """Fallback placement: quantize a layer's activation input right before the layer."""

    def __init__(self, layer: QuantizedWeights, input_quantizer: ActQuantizer) -> None:
        super().__init__()
        self.layer = layer
        self.input_quantizer = input_quantizer

    def forward(self, x: Tensor, *args, **kwargs):  # noqa: ANN002, ANN003
        if isinstance(self.layer, QuantMultiheadAttention):
            args = tuple(self.input_quantizer(a) for a in args[:2]) + tuple(args[2:])
        return self.layer(self.input_quantizer(x), *args, **kwargs)


# --------------------------------------------------------------------------------------------
# The "nothing left in float" check


# Modules with weights the check looks for: the quantizable ones and those it must name as not
# supported rather than leave in float silently.
_WEIGHT_LAYERS = (*QUANTIZABLE_LAYERS, nn.MultiheadAttention, nn.modules.conv._ConvTransposeNd)


def _called_weight_layers(model: nn.Module, example_inputs: tuple) -> list[str]:
    """Names of the weight layers one forward pass calls, in order."""
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if name and isinstance(module, _WEIGHT_LAYERS):
            def pre_hook(mod, args, name=name):  # noqa: ANN001
                if name not in order:
                    order.append(name)
            handles.append(module.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _float_reason(name: str, module: nn.Module, qmodel: QuantizedModel, read_directly: bool) -> str:
    if isinstance(module, nn.MultiheadAttention) and not module._qkv_same_embed_dim:
        return "MultiheadAttention with key/value sizes unlike the query is not supported"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transposed convolutions are not supported"
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
        if not isinstance(module, _WEIGHT_LAYERS):
            continue
        if name in quantized or _is_float_layer(name, config):
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
    unused = [n for n, m in modules.items() if _is_quantizable(m) and n not in called
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
    called = _called_weight_layers(work, example_inputs)
    modules = dict(work.named_modules())
    direct_reads: set[str] = set()
    try:
        traced, leaves = _trace(work)
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
            work = copy.deepcopy(model).eval()
            qmodel = _prepare_module_tree(work, config, example_inputs, unit_predicate)
    else:
        if leaves:
            logger.warning(
                "torch.fx cannot trace into %s of %s; each is kept as one node of the graph, its "
                "weight layers quantized with their activation input at the layer",
                ", ".join(sorted(leaves)), type(model).__name__,
            )
        _bind_defaults(traced, len(example_inputs))
        direct_reads = {n.target.rpartition(".")[0] for n in traced.graph.nodes if n.op == "get_attr"}
        qmodel = _prepare_traced(traced, config, example_inputs, unit_predicate, leaves, called,
                                 modules)
    _check_all_quantized(modules, qmodel, called, direct_reads, config)
    if len(example_inputs) == 1 and isinstance(example_inputs[0], Tensor):
        qmodel.example_input_shape = [1, *example_inputs[0].shape[1:]]
    return qmodel
