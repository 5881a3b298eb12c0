"""Attention as explicit graph nodes: Q·K^T and attention·V as `torch.matmul`, the softmax as
`torch.softmax`, so that quantizers can sit on both inputs of each matmul and on the softmax
output.

Two sources of opaque attention are opened up, both in float and numerically equal to what
they replace:

- `F.scaled_dot_product_attention` calls in a traced graph (timm's fused attention) are
  rewritten into transpose, matmul, scale, mask add, softmax, matmul (`decompose_sdpa`);
- `nn.MultiheadAttention` modules are swapped, before tracing, for `ExplicitMultiheadAttention`,
  which holds the q/k/v/output projections as `nn.Linear` layers and computes attention with
  matmul and softmax (`explicit_multihead_attention`).

Dropout inside attention is not reproduced: models are prepared in eval mode, where it is off.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

_SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                "enable_gqa")


# --------------------------------------------------------------------------------------------
# Masks: computed by one graph node each (they carry no activations to quantize)


def _additive(mask: Tensor, dtype: torch.dtype, masked_when: bool) -> Tensor:
    """`mask` as a bias added to attention scores: a boolean mask becomes -inf where it equals
    `masked_when`, 0 elsewhere; a float mask is added as it is."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    keep = ~mask if masked_when else mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~keep, -math.inf)


def _causal(scores: Tensor) -> Tensor:
    """The causal bias of scores (..., L, S): position i sees positions j <= i."""
    rows, cols = scores.shape[-2:]
    allowed = torch.ones(rows, cols, dtype=torch.bool, device=scores.device).tril()
    return _additive(allowed, scores.dtype, masked_when=False)


def sdpa_bias(scores: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
    """The bias `F.scaled_dot_product_attention` adds to its scores (boolean True: attend)."""
    bias = torch.zeros((), dtype=scores.dtype, device=scores.device)
    if is_causal:
        bias = bias + _causal(scores)
    if attn_mask is not None:
        bias = bias + _additive(attn_mask, scores.dtype, masked_when=False)
    return bias


def mha_bias(scores: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
             is_causal: bool) -> Tensor:
    """The bias `nn.MultiheadAttention` adds to scores (N, H, L, S) (boolean True: masked).
    `attn_mask` is (L, S) or (N * H, L, S); `key_padding_mask` (N, S); `is_causal` without a
    mask makes a causal one (with a mask it is only a hint, as in torch)."""
    bias = torch.zeros((), dtype=scores.dtype, device=scores.device)
    if attn_mask is not None:
        mask = _additive(attn_mask, scores.dtype, masked_when=True)
        bias = bias + (mask.view(scores.shape) if mask.dim() == 3 else mask)
    elif is_causal:
        bias = bias + _causal(scores)
    if key_padding_mask is not None:
        padding = _additive(key_padding_mask, scores.dtype, masked_when=True)
        bias = bias + padding[:, None, None, :]
    return bias


def default_scale(query: Tensor) -> float:
    return 1.0 / math.sqrt(query.shape[-1])


def repeat_kv_heads(kv: Tensor, query: Tensor) -> Tensor:
    """Grouped-query attention: each key/value head serves query heads / kv heads queries."""
    return kv.repeat_interleave(query.shape[-3] // kv.shape[-3], dim=-3)


for _helper in ("sdpa_bias", "mha_bias", "default_scale", "repeat_kv_heads"):
    fx.wrap(_helper)


# --------------------------------------------------------------------------------------------
# F.scaled_dot_product_attention in a traced graph


def _sdpa_arguments(node: fx.Node) -> dict:
    values = dict(zip(_SDPA_PARAMS, node.args))
    values.update(node.kwargs)
    return {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
            "enable_gqa": False, **values}


def _explicit_sdpa(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """Insert before `node` the explicit computation of its scaled dot-product attention."""
    a = _sdpa_arguments(node)
    stack = dict(node.meta.get("nn_module_stack") or {})
    created = []

    def add(op: str, target, args: tuple, kwargs: dict | None = None) -> fx.Node:  # noqa: ANN001
        new = graph.create_node(op, target, args, kwargs or {})
        new.meta["nn_module_stack"] = dict(stack)
        created.append(new)
        return new

    query, key, value = a["query"], a["key"], a["value"]
    with graph.inserting_before(node):
        if a["enable_gqa"] is not False:
            key = add("call_function", repeat_kv_heads, (key, query))
            value = add("call_function", repeat_kv_heads, (value, query))
        key_t = add("call_method", "transpose", (key, -2, -1))
        scores = add("call_function", torch.matmul, (query, key_t))
        scale = a["scale"]
        if scale is None:
            scale = add("call_function", default_scale, (query,))
        scores = add("call_function", operator.mul, (scores, scale))
        if a["attn_mask"] is not None or a["is_causal"] is not False:
            bias = add("call_function", sdpa_bias, (scores, a["attn_mask"], a["is_causal"]))
            scores = add("call_function", operator.add, (scores, bias))
        probs = add("call_function", torch.softmax, (scores,), {"dim": -1})
        return add("call_function", torch.matmul, (probs, value))


def decompose_sdpa(gm: fx.GraphModule) -> int:
    """Rewrite every `F.scaled_dot_product_attention` call of `gm` into explicit nodes
    (dropout left out: inference); returns how many were rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _SDPA_TARGETS:
            node.replace_all_uses_with(_explicit_sdpa(gm.graph, node))
            gm.graph.erase_node(node)
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
        logger.info("wrote %d scaled_dot_product_attention calls as explicit matmul and softmax",
                    count)
    return count


# --------------------------------------------------------------------------------------------
# nn.MultiheadAttention


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A Linear layer holding exact copies of `weight` and `bias`."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class ExplicitMultiheadAttention(nn.Module):
    """What `nn.MultiheadAttention` computes in eval mode, written so torch.fx traces into it:
    q/k/v projections as `nn.Linear` layers (`q_proj`, `k_proj`, `v_proj`), the original
    `out_proj`, Q·K^T and attention·V as `torch.matmul`, the softmax as `torch.softmax`.
    Takes the same arguments and returns the same (output, weights) pair."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        reason = unsupported_reason(attention)
        if reason:
            raise ValueError(f"cannot write this nn.MultiheadAttention explicitly: {reason}")
        embed = attention.embed_dim
        bias = attention.in_proj_bias
        if attention._qkv_same_embed_dim:
            weights = attention.in_proj_weight.detach().split(embed)
        else:
            weights = (attention.q_proj_weight.detach(), attention.k_proj_weight.detach(),
                       attention.v_proj_weight.detach())
        biases = bias.detach().split(embed) if bias is not None else (None,) * 3
        self.q_proj, self.k_proj, self.v_proj = (_linear(w, b) for w, b in zip(weights, biases))
        self.out_proj = attention.out_proj
        self.num_heads = attention.num_heads
        self.batch_first = attention.batch_first
        self.scale = 1.0 / math.sqrt(attention.head_dim)

    def _heads(self, x: Tensor) -> Tensor:
        """(N, L, E) -> (N, H, L, E / H)."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
        need_weights: bool = True, attn_mask: Tensor | None = None,
        average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        if attn_mask is not None or key_padding_mask is not None or is_causal:
            scores = scores + mha_bias(scores, attn_mask, key_padding_mask, is_causal)
        probs = torch.softmax(scores, dim=-1)
        out = self.out_proj(torch.matmul(probs, v).transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, probs.mean(dim=1) if average_attn_weights else probs


def unsupported_reason(attention: nn.MultiheadAttention) -> str | None:
    """Why `attention` cannot be written explicitly (None when it can)."""
    if attention.bias_k is not None:
        return "add_bias_kv=True is not supported"
    if attention.add_zero_attn:
        return "add_zero_attn=True is not supported"
    return None


def _outputs_equal(got: object, expected: object) -> bool:
    try:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, equal_nan=True)
    except (AssertionError, TypeError, ValueError):
        return False
    return True


@torch.no_grad()
def explicit_multihead_attention(model: nn.Module, example_inputs: tuple,
                                 keep: Callable[[str], bool] = lambda name: False) -> list[str]:
    """Swap, in place, each `nn.MultiheadAttention` of `model` (except those `keep` names, and
    those with add_bias_kv or add_zero_attn, which stay whole) for an
    `ExplicitMultiheadAttention`; returns the names swapped. When the model's output on
    `example_inputs` then differs (an unbatched call, say), every swap is undone."""
    targets = {name: module for name, module in model.named_modules()
               if isinstance(module, nn.MultiheadAttention) and not keep(name)}
    for name, module in list(targets.items()):
        reason = unsupported_reason(module)
        if reason:
            logger.info("%s stays one opaque node (%s): its attention matmuls stay in float",
                        name, reason)
            del targets[name]
    if not targets:
        return []
    expected = model(*example_inputs)
    for name, module in targets.items():
        model.set_submodule(name, ExplicitMultiheadAttention(module))
    try:
        same = _outputs_equal(model(*example_inputs), expected)
    except Exception:  # noqa: BLE001 - an input layout the explicit form does not take
        same = False
    if not same:
        for name, module in targets.items():
            model.set_submodule(name, module)
        logger.warning("writing the nn.MultiheadAttention modules explicitly changes the model's "
                       "output; they stay opaque, their attention matmuls in float")
        return []
    return list(targets)
