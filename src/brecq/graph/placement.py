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
- both inputs and the output of residual adds (QLinearAdd; not the adds of a bias or mask to
  attention scores, which stay float up to the softmax);
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

Transformers (any backend): both inputs of every matmul between two activations (attention's
Q.K^T and probabilities.V, `quantize_matmul_inputs`) get a quantizer of `act_bits`, since a
matmul multiplies them as a layer does. The point is the matmul input itself, not the tensor it
moves values from: Q, K and V usually come out of one qkv Linear through reshape / permute /
unbind, and a quantizer at the Linear's output would give all three one scale (and, with
backend onnxruntime, the 8 bits of a layer output). Two exceptions keep one rounding per value:
a softmax output (through dropout) is quantized at the softmax, with the quantizer
`softmax_quantizer` chooses; and a tensor that layers read is already quantized at `act_bits`.
With `quantize_residual_adds`, backend "none" also quantizes both inputs of adds of two
activations, as backend onnxruntime does.

Every quantized tensor has a kind ("linear input", "matmul input", "softmax output",
"layernorm output", "gelu output", ...) for `brecq info`: `tensor_kind`.

Ops are recognized by their type or function (a table of operations, not of architectures).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

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

_MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm}
_MATMUL_METHODS = {"matmul", "bmm"}
_SOFTMAX = ((nn.Softmax,), {F.softmax, torch.softmax, torch.Tensor.softmax}, {"softmax"})
_LAYERNORM = ((nn.LayerNorm, nn.GroupNorm, nn.RMSNorm), {F.layer_norm, F.group_norm, F.rms_norm},
              set())
_GELU = ((nn.GELU,), {F.gelu}, set())

# Kinds of quantized tensors (`tensor_kind`).
MATMUL_INPUT = "matmul input"
SOFTMAX_OUTPUT = "softmax output"
RESIDUAL_ADD_INPUT = "residual add input"


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


def _adds_attention_bias(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether the add `node` adds a bias or mask to attention scores: its sum reaches only
    softmaxes, through ops that move values and further such adds (Swin: relative position
    bias, then the shift mask). A mask holds -inf or the dtype's lowest value where attention is
    masked, which no grid of a few bits holds next to the scores; so the sum stays float, as
    the scores do, and these adds are no residual adds."""
    stack, seen = list(node.users), set()
    while stack:
        user = stack.pop()
        if user in seen or is_softmax(user, gm):
            continue
        seen.add(user)
        if not (moves_values(user, gm) or _is_add(user)):
            return False
        stack.extend(user.users)
    return bool(node.users)


def _is_residual_add(node: fx.Node, gm: fx.GraphModule) -> bool:
    return _is_add(node) and not _adds_attention_bias(node, gm)


def _output_point(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """The end of the chain of folded activations that `node`'s output alone feeds."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not _matches(user, gm, _FOLDED_MODULES, _FOLDED_FUNCTIONS, _FOLDED_METHODS):
            break
        node = user
    return node


def value_source(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """The node whose values `node` holds: `node` itself, or through ops that move values."""
    while moves_values(node, gm) and _tensor_inputs(node):
        node = _tensor_inputs(node)[0]
    return node


def _matmul_operands(node: fx.Node) -> list:
    """The two operands of a product of tensors that is not a weight layer (torch.matmul, `@`,
    bmm, `.matmul`, `.bmm`, a two-operand torch.einsum); [] for any other node."""
    if node.op == "call_function" and node.target is torch.einsum:
        operands = node.args[1:]
        operands = operands[0] if len(operands) == 1 and isinstance(operands[0], (list, tuple)) \
            else operands
        return list(operands) if len(operands) == 2 else []
    matmul = (node.op == "call_function" and node.target in _MATMUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MATMUL_METHODS)
    return list(node.args[:2]) if matmul else []


def is_matmul(node: fx.Node) -> bool:
    """Whether `node` multiplies two tensors (attention's Q.K^T, probabilities.V), not weights."""
    return bool(_matmul_operands(node))


def is_softmax(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A softmax: the function, the tensor method, or an `nn.Softmax` module (timm's Swin)."""
    return _matches(node, gm, *_SOFTMAX)


def _is_activation(node: object, gm: fx.GraphModule) -> bool:
    """A tensor computed from the input, not a parameter or buffer (moved or not)."""
    return _is_tensor(node) and value_source(node, gm).op != "get_attr"


def transformer_points(gm: fx.GraphModule, layer_inputs: set[fx.Node], matmuls: bool,
                       residual_adds: bool) -> dict[fx.Node, str]:
    """{node to quantize: MATMUL_INPUT, SOFTMAX_OUTPUT or RESIDUAL_ADD_INPUT} for both inputs
    of matmuls between two activations (`matmuls`) and of adds of two (`residual_adds`), in
    graph order; tensors that `layer_inputs` quantize already are left out."""
    points: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        operands = _matmul_operands(node) if matmuls else []
        kind = MATMUL_INPUT
        if not operands and residual_adds and _is_residual_add(node, gm):
            operands, kind = list(node.args[:2]), RESIDUAL_ADD_INPUT
        if not all(_is_activation(a, gm) for a in operands):
            continue
        for operand in operands:
            source = value_source(operand, gm)
            if source in layer_inputs or operand in layer_inputs:
                continue
            if kind == MATMUL_INPUT and is_softmax(source, gm):
                points.setdefault(source, SOFTMAX_OUTPUT)
            else:
                points.setdefault(operand, kind)
    return points


def tensor_kind(node: fx.Node, gm: fx.GraphModule, layer_kind: str | None,
                point_kind: str | None) -> str:
    """What the quantized tensor `node` is, for reports: the op that computed its values (a
    softmax, LayerNorm or GELU), else why it is quantized (`point_kind` from
    `transformer_points`, `layer_kind` such as "linear input" for tensors layers read), else
    where the backend needs it."""
    source = value_source(node, gm)
    for ops, kind in ((_SOFTMAX, SOFTMAX_OUTPUT), (_LAYERNORM, "layernorm output"),
                      (_GELU, "gelu output")):
        if _matches(source, gm, *ops):
            return kind
    if point_kind is not None or layer_kind is not None:
        return point_kind or layer_kind
    if source.op == "placeholder":
        return "network input"
    for test, kind in ((lambda n: _is_residual_add(n, gm), RESIDUAL_ADD_INPUT),
                       (lambda n: _matches(n, gm, _POOL_MODULES, _POOL_FUNCTIONS, set()), "pool input"),
                       (lambda n: n.op == "call_function" and n.target in _CONCAT_FUNCTIONS,
                        "concat input")):
        if any(test(user) for user in node.users):
            return kind
    return "add output" if _is_add(source) else "concat output" if (
        source.op == "call_function" and source.target in _CONCAT_FUNCTIONS) else "layer output"


def backend_points(gm: fx.GraphModule, layer_nodes: set[fx.Node], last_layers: set[str],
                   layer_inputs: list[fx.Node], backend: str,
                   own_points: Iterable[fx.Node] = (),
                   inner_graph: bool = False) -> tuple[list[fx.Node], dict]:
    """Tensors to quantize for `backend`: (nodes that get a quantizer of their own, in graph
    order; {node: earlier node whose quantizer it reuses}).

    `layer_inputs` are the tensors quantized layers read (placeholders included); with backend
    "none" those that are not placeholders get a quantizer, and the placeholders too in an
    `inner_graph` (a child of a model traced child by child: its inputs are activations inside
    the network, not the network input, which the papers' placement leaves float). `own_points`
    (from `transformer_points`) get a quantizer of their own with any backend.
    """
    read = set(layer_inputs)
    own_points = {n: None for n in own_points if n not in read}
    if backend == BACKEND_NONE:
        return [n for n in layer_inputs if inner_graph or n.op != "placeholder"] + list(own_points), {}
    wanted: set[fx.Node] = read | set(own_points)
    for node in gm.graph.nodes:
        if node in layer_nodes and node.target not in last_layers:
            wanted.add(_output_point(node, gm))
        elif _is_residual_add(node, gm) or (
                node.op == "call_function" and node.target in _CONCAT_FUNCTIONS):
            wanted.update(_tensor_inputs(node))
            wanted.add(_output_point(node, gm))
        elif _matches(node, gm, _POOL_MODULES, _POOL_FUNCTIONS, set()):
            wanted.update(_tensor_inputs(node)[:1])
    # A quantizer only the network output would read changes nothing (the output stays float).
    wanted = {n for n in wanted if n in layer_inputs or n in own_points or (
        _is_tensor(n) and n.op != "get_attr" and any(u.op != "output" for u in n.users))}
    own: list[fx.Node] = []
    reuse: dict[fx.Node, fx.Node] = {}
    quantized: set[fx.Node] = set()
    for node in gm.graph.nodes:  # graph order: a source is settled before what moves it
        if node not in wanted:
            continue
        source = node
        while node not in own_points and moves_values(source, gm) and _tensor_inputs(source):
            source = _tensor_inputs(source)[0]
            if source in quantized:
                reuse[node] = reuse.get(source, source)
                break
        else:
            own.append(node)
        quantized.add(node)
    return own, reuse
