"""Where a deployment backend needs activation quantizers, read from the torch.fx graph.

`prepare` always quantizes every tensor a quantized layer reads (the research placement of
BRECQ/QDrop, `backend="none"`). An integer runtime needs more: onnxruntime turns a
DequantizeLinear -> op -> QuantizeLinear group into one integer kernel only when the op's inputs
*and* output are quantized, so with `backend="onnxruntime"` these tensors get quantizers too:

- the network input, when a quantized layer reads it (the first conv becomes QLinearConv);
- every quantized layer's output, after the ReLU/ReLU6/Hardtanh/clamp it feeds alone
  (onnxruntime folds those into the QuantizeLinear), unless it only goes to the network output
  (the classifier's logits stay float: a Gemm/MatMul without an output QuantizeLinear still runs
  as QGemm / MatMulIntegerToFloat);
- both inputs and the output of residual adds (QLinearAdd);
- the inputs of pooling (QLinearAveragePool / QLinearGlobalAveragePool; max pooling runs on
  int8 as is) and of the classifier (already a layer input);
- the inputs and the output of concatenations (QLinearConcat requantizes each input with its own
  scale, so the inputs need no shared scale for onnxruntime).

A tensor that only moves or selects the values of a quantized tensor (max pooling, flatten,
reshape, slicing, zero padding, dropout at inference, ...) lies on that tensor's grid already:
it reuses the same quantizer, which leaves its values unchanged (no extra rounding) and gives
onnxruntime equal scales on both sides, so it drops the Q/DQ pair and moves int8 values.

`prepare` gives the tensors no quantized layer reads 8 bits (int8 is what onnxruntime stores and
adds them in); `act_bits` stays the width of what the layers multiply.

Ops are recognized by their type or function (a table of operations, not of architectures).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

BACKEND_NONE = "none"

# Elementwise activations onnxruntime folds into the QuantizeLinear that follows them.
_FOLDED_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_FOLDED_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, torch.clamp}
_FOLDED_METHODS = {"relu", "clamp"}

# Ops whose output values are a selection of their first input's values.
_MOVE_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                 nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d,
                 nn.Dropout2d, nn.Dropout3d, nn.ChannelShuffle)
_MOVE_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                   torch.unsqueeze, operator.getitem, F.max_pool1d, F.max_pool2d, F.max_pool3d,
                   F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.dropout,
                   torch.channel_shuffle}
_MOVE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze",
                 "contiguous"}

_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveAvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_POOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                   F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.max_pool1d, F.max_pool2d,
                   F.max_pool3d}

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_CONCAT_FUNCTIONS = {torch.cat, torch.concat}


def _is_tensor(node: object) -> bool:
    return isinstance(node, fx.Node) and node.meta.get("brecq_is_tensor", False)


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if _is_tensor(a)]


def _matches(node: fx.Node, gm: fx.GraphModule, modules: tuple, functions: set,
             methods: set) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), modules)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _is_zero_pad(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not F.pad:
        return False
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    return mode == "constant" and value in (None, 0, 0.0)


def moves_values(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether `node`'s output holds only values of its first tensor input (and zeros)."""
    return _is_zero_pad(node) or _matches(node, gm, _MOVE_MODULES, _MOVE_FUNCTIONS, _MOVE_METHODS)


def _is_add(node: fx.Node) -> bool:
    adds = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("add", "add_"))
    return adds and sum(_is_tensor(a) for a in node.args[:2]) == 2


def _output_point(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """The end of the chain of folded activations that `node`'s output alone feeds."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not _matches(user, gm, _FOLDED_MODULES, _FOLDED_FUNCTIONS, _FOLDED_METHODS):
            break
        node = user
    return node


def backend_points(gm: fx.GraphModule, layer_nodes: set[fx.Node], last_layers: set[str],
                   layer_inputs: list[fx.Node], backend: str) -> tuple[list[fx.Node], dict]:
    """Tensors to quantize for `backend`: (nodes that get a quantizer of their own, in graph
    order; {node: earlier node whose quantizer it reuses}).

    `layer_inputs` are the tensors quantized layers read (placeholders included); with backend
    "none" exactly those that are not placeholders get a quantizer, as before.
    """
    if backend == BACKEND_NONE:
        return [n for n in layer_inputs if n.op != "placeholder"], {}
    wanted: set[fx.Node] = set(layer_inputs)
    for node in gm.graph.nodes:
        if node in layer_nodes and node.target not in last_layers:
            wanted.add(_output_point(node, gm))
        elif _is_add(node) or (node.op == "call_function" and node.target in _CONCAT_FUNCTIONS):
            wanted.update(_tensor_inputs(node))
            wanted.add(_output_point(node, gm))
        elif _matches(node, gm, _POOL_MODULES, _POOL_FUNCTIONS, set()):
            wanted.update(_tensor_inputs(node)[:1])
    # A quantizer only the network output would read changes nothing (the output stays float).
    wanted = {n for n in wanted if n in layer_inputs or (
        _is_tensor(n) and n.op != "get_attr" and any(u.op != "output" for u in n.users))}
    own: list[fx.Node] = []
    reuse: dict[fx.Node, fx.Node] = {}
    quantized: set[fx.Node] = set()
    for node in gm.graph.nodes:  # graph order: a source is settled before what moves it
        if node not in wanted:
            continue
        source = node
        while moves_values(source, gm) and _tensor_inputs(source):
            source = _tensor_inputs(source)[0]
            if source in quantized:
                reuse[node] = reuse.get(source, source)
                break
        else:
            own.append(node)
        quantized.add(node)
    return own, reuse
