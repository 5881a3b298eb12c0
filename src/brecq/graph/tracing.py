"""Tracing a model with torch.fx, keeping whole the submodules fx cannot trace through."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from ..quant.modules import QUANTIZABLE_LAYERS


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


def trace(model: nn.Module, root: nn.Module | None = None,
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
