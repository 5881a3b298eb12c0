"""Tracing a model with torch.fx, keeping whole the submodules fx cannot trace through.

Given example values for the forward's arguments, the tracer also runs each recorded operation
on them, so that code which unpacks a shape (`(*x.shape[:-1], heads, -1)`, as Hugging Face
attention does) traces: the number of dimensions comes from the example, the sizes stay symbolic.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.node import map_aggregate

from ..quant.modules import QUANTIZABLE_LAYERS

_UNKNOWN = object()
# Values whose length the example fixes for every input: a shape, a module's output tuple, the
# keys of a keyword dict. Never a tensor: its length is the batch size.
_STATIC_LENGTH = (torch.Size, tuple, list, type({}.keys()))


_VALUE_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__")


def _reads_tensor_values(node: fx.Node) -> bool:
    """Whether `node` depends on a tensor's contents turned into Python values (`.item()`)."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "call_method" and current.target in _VALUE_READS:
            return True
        if current.op == "call_function" and current.target in (bool, int, float):
            return True
        stack.extend(current.all_input_nodes)
    return False


class _ShapeProxy(fx.Proxy):
    """A proxy whose length the tracer knows from the example values."""

    def __len__(self) -> int:
        value = self.tracer.example_value(self.node)
        if isinstance(value, _STATIC_LENGTH):
            return len(value)
        return super().__len__()


class _LeafTracer(fx.Tracer):
    """An fx tracer that keeps weight layers and the modules in `leaves` whole.

    Weight layers stay whole even when a library subclasses them (timm's Conv2dSame computes its
    padding with Python control flow). When tracing fails, `failed_in` names the innermost module
    whose code raised, so the caller can retry with that module kept whole.
    """

    def __init__(self, leaves: set[str], prefix: str = "",
                 example: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.leaves = leaves
        self.prefix = prefix
        self.failed_in: str | None = None
        # Placeholder name -> example value; each node's value on the example, when known.
        self.example = example
        self.values: dict[fx.Node, Any] = {}
        self._evaluating = False

    def example_value(self, node: fx.Node) -> Any:  # noqa: ANN401
        return self.values.get(node, _UNKNOWN)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeProxy(node, self) if self.example is not None else super().proxy(node)

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """Module calls run as they are (no nodes recorded) while an example value is computed."""
        previous, self._evaluating = self._evaluating, True
        try:
            yield
        finally:
            self._evaluating = previous

    def _evaluate(self, node: fx.Node) -> Any:  # noqa: ANN401
        def concrete(value: Any) -> Any:  # noqa: ANN401
            if isinstance(value, fx.Node):
                if value not in self.values:
                    raise KeyError(value.name)
                return self.values[value]
            return value

        args, kwargs = map_aggregate(node.args, concrete), map_aggregate(node.kwargs, concrete)
        if node.op == "placeholder":  # a copy: in-place code must not change the caller's
            value = self.example[node.target]
            return value.clone() if isinstance(value, Tensor) else value
        with self._running(), torch.no_grad():
            if node.op == "get_attr":
                owner, _, attribute = node.target.rpartition(".")
                return getattr(self.root.get_submodule(owner), attribute)
            if node.op == "call_module":
                return self.root.get_submodule(node.target.removeprefix(self.prefix))(
                    *args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,  # noqa: ANN001, ANN201
                     proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.example is not None:
            # A value that fails to compute stays unknown: its length too.
            with contextlib.suppress(Exception):
                self.values[proxy.node] = self._evaluate(proxy.node)
        return proxy

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A condition on shapes (`q_len > 1`) takes its value on the example: the graph is for
        inputs of that rank and sizes on that side of the condition. Conditions on tensor values
        stay untraceable."""
        value = self.example_value(obj.node)
        if isinstance(value, (bool, int)) and not _reads_tensor_values(obj.node):
            return bool(value)
        return super().to_bool(obj)

    def iter(self, obj: fx.Proxy) -> Iterator:
        value = self.example_value(obj.node)
        if isinstance(value, _STATIC_LENGTH):
            return iter([obj[i] for i in range(len(value))])
        return super().iter(obj)

    def path_of_module(self, mod: nn.Module) -> str:
        # A submodule traced on its own gets the names it has in the whole model.
        return self.prefix + super().path_of_module(mod)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves:
            return True
        if isinstance(m, QUANTIZABLE_LAYERS + (nn.MultiheadAttention,)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:  # noqa: ANN401
        if self._evaluating:  # a module computing an example value reads its real parameters
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):  # noqa: ANN001, ANN201
        if self._evaluating:
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def bind_defaults(gm: fx.GraphModule, given: int) -> None:
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


class CallArguments:
    """One call of a module's forward, split into the tensors the traced graph takes (in the
    order of the forward's parameters) and the other values, fixed in the graph."""

    def __init__(self, signature: inspect.Signature, args: tuple, kwargs: dict) -> None:
        self.signature = signature
        bound = signature.bind(None, *args, **kwargs)  # None stands for `self`
        bound.apply_defaults()
        self.tensors: dict[str, Tensor] = {}
        self.constants: dict[str, Any] = {}
        for name, value in list(bound.arguments.items())[1:]:  # after `self`
            kind = self.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL and value:
                raise TypeError("a forward taking *args is not traced with example values")
            if kind is inspect.Parameter.VAR_KEYWORD:
                if any(v is not None for v in value.values()):
                    raise TypeError("only None is traced through a forward's **kwargs")
                self.tensors["**" + name] = {}  # not a graph input: emptied keyword arguments
            elif isinstance(value, Tensor):
                self.tensors[name] = value
            elif kind is not inspect.Parameter.VAR_POSITIONAL:
                self.constants[name] = value

    @classmethod
    def of(cls, model: nn.Module, args: tuple, kwargs: dict) -> CallArguments:
        return cls(inspect.signature(inspect.unwrap(type(model).forward)), args, kwargs)

    @property
    def plain(self) -> bool:
        """Whether the call passes tensors only, positionally (the graph takes it as it is)."""
        return not self.constants and all(not k.startswith("**") for k in self.tensors)

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        return tuple(v for k, v in self.tensors.items() if not k.startswith("**"))

    def select(self, args: tuple, kwargs: dict) -> tuple[Tensor, ...]:
        """The graph's inputs from a later call; fails when a fixed value differs."""
        call = CallArguments(self.signature, args, kwargs)
        changed = [k for k, v in call.constants.items() if self.constants.get(k, _UNKNOWN) != v]
        changed += [f"{k} (a tensor when traced)" for k in self.tensors if k not in call.tensors]
        changed += [f"{k} (fixed when traced)" for k in call.tensors if k not in self.tensors]
        if changed:
            raise ValueError(
                "a module traced for one set of non-tensor arguments is called with others ("
                f"{', '.join(changed)}; a Hugging Face model, say, passes no attention mask for a "
                "batch without padding): prepare with example inputs that call it as every batch "
                "does")
        return call.inputs


class BoundCall(nn.Module):
    """Runs `prepared`, a graph traced for one call of a module (`call`), from the arguments
    the model's code passes that module: their tensors, the fixed values checked."""

    def __init__(self, prepared: nn.Module, call: CallArguments) -> None:
        super().__init__()
        self.prepared = prepared
        self.call = call

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return self.prepared(*self.call.select(args, kwargs))


@contextlib.contextmanager
def _forward_unwrapped(model: nn.Module) -> Iterator[None]:
    """Trace the function a decorator wraps (transformers' gradient-checkpointing layers wrap
    forward in one taking *args, **kwargs, which fx cannot pass through)."""
    cls = type(model)
    inner = inspect.unwrap(cls.forward)
    if inner is cls.forward:
        yield
        return
    shim = type(cls.__name__, (cls,), {})
    shim.forward = inner  # set after creation: a class hook may wrap it again at creation
    model.__class__ = shim
    try:
        yield
    finally:
        model.__class__ = cls


def _drop_fixed_inputs(graph: fx.Graph, kept: set[str]) -> None:
    """Remove the placeholders of fixed values (and fx's checks on them) from `graph`."""
    fixed = [n for n in graph.nodes if n.op == "placeholder" and n.target not in kept]
    downstream, stack = set(), list(fixed)
    while stack:
        node = stack.pop()
        if node not in downstream:
            downstream.add(node)
            stack.extend(node.users)
    # fx's checks of the fixed values and reads of the emptied **kwargs lead nowhere: erase them.
    for node in reversed(list(graph.nodes)):
        if node in downstream and not node.users and node.op in ("call_function", "call_method"):
            graph.erase_node(node)
    for node in fixed:
        if node.users:
            raise TypeError(f"the traced graph still reads the fixed argument {node.target}")
        graph.erase_node(node)


def trace(model: nn.Module, root: nn.Module | None = None, prefix: str = "",
          call: CallArguments | None = None) -> tuple[fx.GraphModule, set[str]]:
    """Trace `model`, keeping whole each submodule fx cannot trace through; raises if the
    model's own forward is what fails. `model` may be the submodule `prefix` of `root`: the graph
    then names modules and attributes as `root` does. With `call` (an example call), the graph
    takes that call's tensors (`call.inputs`) and fixes its other arguments."""
    leaves: set[str] = set()
    while True:
        tracer = _LeafTracer(leaves, prefix, call.tensors if call is not None else None)
        if prefix:  # every node runs inside that submodule, as when traced from `root`
            tracer.module_stack[prefix[:-1]] = (prefix[:-1], type(model))
        try:
            if call is None:
                graph = tracer.trace(model)
            else:
                with _forward_unwrapped(model):
                    graph = tracer.trace(model, concrete_args=call.constants)
                _drop_fixed_inputs(graph, set(call.tensors) - {k for k in call.tensors
                                                                if k.startswith("**")})
        except Exception:
            if not tracer.failed_in or tracer.failed_in in leaves:
                raise
            leaves.add(tracer.failed_in)
            continue
        for node in graph.nodes:
            if node.op == "get_attr":
                node.target = prefix + node.target
        return fx.GraphModule(root or tracer.root, graph, type(model).__name__), leaves
