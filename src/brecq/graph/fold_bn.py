"""Fold BatchNorm into the conv or linear layer that feeds it.

On a torch.fx graph the pairs come from the data flow: a BatchNorm whose input is a conv/linear
output used by nothing else. Without a graph, pairs are found by running the model once and
matching tensor identities (the BatchNorm's input is the very tensor the conv returned).
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *_TRANSPOSED)
_FOLDABLE = (*_CONVS, nn.Linear)


@torch.no_grad()
def fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Rewrite `layer`'s weight and bias so that layer(x) equals bn(layer_before(x)) in eval."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    fold_statistics(layer, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


@torch.no_grad()
def fold_statistics(layer: nn.Module, mean: torch.Tensor, var: torch.Tensor,
                    gamma: torch.Tensor | None, beta: torch.Tensor | None, eps: float) -> None:
    """Rewrite `layer`'s weight and bias to include an eval-mode batch norm of its output."""
    inv_std = torch.rsqrt(var + eps)
    gamma = gamma if gamma is not None else torch.ones_like(inv_std)
    beta = beta if beta is not None else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    weight = layer.weight
    kernel_ones = [1] * (weight.dim() - 2)
    if isinstance(layer, _TRANSPOSED):
        # Weight [in, out / groups, *k]: output channel j of group g is column j of block g.
        groups = layer.groups
        blocks = weight.view(groups, weight.shape[0] // groups, *weight.shape[1:])
        blocks.mul_(factor.reshape(groups, 1, -1, *kernel_ones))
    else:
        weight.mul_(factor.reshape(-1, 1, *kernel_ones))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(mean)
    new_bias = (bias - mean) * factor + beta
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


def _foldable_pair(layer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(layer, _FOLDABLE) or not isinstance(bn, BATCHNORMS):
        return False
    if not bn.track_running_stats or bn.running_mean is None:
        return False
    if type(bn).forward is not nn.modules.batchnorm._BatchNorm.forward:
        return False  # a subclass that does more than normalize (timm's BatchNormAct2d)
    out_features = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if isinstance(layer, nn.Linear) and not isinstance(bn, nn.BatchNorm1d):
        return False
    return out_features == bn.num_features


def fold_batchnorm_graph(gm: fx.GraphModule) -> int:
    """Fold every conv/linear -> BatchNorm pair of the graph in place; returns how many."""
    modules = dict(gm.named_modules())
    calls_per_target: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls_per_target[node.target] = calls_per_target.get(node.target, 0) + 1
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), BATCHNORMS):
            continue
        producer = node.args[0] if node.args else None
        if not isinstance(producer, fx.Node) or producer.op != "call_module":
            continue
        layer = modules.get(producer.target)
        bn = modules[node.target]
        if len(producer.users) != 1 or not _foldable_pair(layer, bn):
            continue
        if calls_per_target[producer.target] > 1:
            continue  # a layer called twice would change at its other call site too
        fold_into(layer, bn)
        node.replace_all_uses_with(producer)
        gm.graph.erase_node(node)
        folded += 1
    folded += _fold_functional(gm, modules, calls_per_target)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


def _fold_functional(gm: fx.GraphModule, modules: dict[str, nn.Module],
                     calls_per_target: dict[str, int]) -> int:
    """Fold eval-mode `F.batch_norm` calls on a layer's output (BatchNorm subclasses that also
    apply an activation, such as timm's BatchNormAct2d, trace to this)."""
    folded = 0
    signature = inspect.signature(F.batch_norm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.batch_norm:
            continue
        bound = signature.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        args = bound.arguments
        producer = args["input"]
        if not isinstance(producer, fx.Node) or producer.op != "call_module":
            continue
        layer = modules.get(producer.target)
        stats = [args[k] for k in ("running_mean", "running_var", "weight", "bias")]
        # Only convolutions: their channel axis is the one batch_norm normalizes.
        if (args["training"] is not False or not isinstance(layer, _CONVS)
                or len(_value_users(producer)) != 1 or calls_per_target[producer.target] > 1
                or not all(a is None or (isinstance(a, fx.Node) and a.op == "get_attr")
                           for a in stats)
                or stats[0] is None or stats[1] is None):
            continue
        mean, var, gamma, beta = (None if a is None else _attribute(gm, a.target) for a in stats)
        if mean.numel() != layer.out_channels:
            continue
        fold_statistics(layer, mean, var, gamma, beta, float(args["eps"]))
        node.replace_all_uses_with(producer)
        gm.graph.erase_node(node)
        for attr in stats:
            if attr is not None and not attr.users:
                gm.graph.erase_node(attr)
        folded += 1
    return folded


_METADATA = ("ndim", "shape", "dtype", "device", "dim", "size")


def _value_users(node: fx.Node) -> list[fx.Node]:
    """Users of `node` that read its values, not only its shape (a folded output keeps it)."""
    return [
        user for user in node.users
        if not (user.op in ("call_function", "call_method") and user.args and user.args[0] is node
                and (user.target in _METADATA[-2:] or (user.target is getattr
                                                       and user.args[1] in _METADATA[:4])))
    ]


def _attribute(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


@torch.no_grad()
def fold_batchnorm_eager(model: nn.Module, example_inputs: tuple,
                         within: set[str] | None = None) -> int:
    """Fold pairs found by tensor identity during one forward pass (for untraceable code).

    With `within`, only pairs inside those submodules are folded (the rest of the model was
    folded on its graph).
    """
    calls: list[tuple[str, nn.Module, object, object]] = []
    handles = []
    for name, module in model.named_modules():
        inside = within is None or any(name.startswith(prefix + ".") for prefix in within)
        if inside and isinstance(module, _FOLDABLE + BATCHNORMS):
            def hook(mod, args, output, name=name):  # noqa: ANN001
                calls.append((name, mod, args[0] if args else None, output))
            handles.append(module.register_forward_hook(hook))
    try:
        model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    # `calls` holds references to every tensor, so identities cannot be reused during matching.
    producer_of = {id(out): (name, mod) for name, mod, _, out in calls if isinstance(mod, _FOLDABLE)}
    call_count: dict[str, int] = {}
    for name, _, _, _ in calls:
        call_count[name] = call_count.get(name, 0) + 1
    parents = dict(model.named_modules())
    folded = 0
    for name, mod, inp, _ in calls:
        if not isinstance(mod, BATCHNORMS) or id(inp) not in producer_of:
            continue
        layer_name, layer = producer_of[id(inp)]
        if call_count[name] > 1 or call_count[layer_name] > 1 or not _foldable_pair(layer, mod):
            continue
        fold_into(layer, mod)
        parent_name, _, attr = name.rpartition(".")
        setattr(parents[parent_name] if parent_name else model, attr, nn.Identity())
        folded += 1
    return folded
