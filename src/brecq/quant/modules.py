"""Quantized stand-ins for weight layers and the activation quantization point.

`QuantLayer` wraps an existing Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear and keeps its float
weight untouched: the quantized weight is computed from it on the fly, so the float model is
always recoverable by disabling the quantizer. `QuantMultiheadAttention` does the same for the
projection weights of `nn.MultiheadAttention`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .quantizers import ActQuantizer, BiasQuantizer, WeightQuantizer

TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
QUANTIZABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, *TRANSPOSED_CONVS)
_PLAIN_FORWARDS = {cls.forward for cls in QUANTIZABLE_LAYERS}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def weight_layout(layer: nn.Module) -> dict[str, int]:
    """Where `layer`'s weight keeps its output channels, as `WeightQuantizer` arguments."""
    if isinstance(layer, TRANSPOSED_CONVS):
        return {"channel_axis": 1, "groups": layer.groups}
    return {"channel_axis": 0, "groups": 1}


def projection_weights(attention: nn.MultiheadAttention) -> tuple[str, ...]:
    """Names of the projection weights of `attention` (relative to it)."""
    if attention._qkv_same_embed_dim:
        return ("in_proj_weight", "out_proj.weight")
    return ("q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight")


class QuantizedWeights(nn.Module):
    """Base of modules whose weights are quantized; lists (name, weight, quantizer) triples."""

    # The attribute holding the quantizer of each weight that `weight_quantizers` names.
    quantizer_attributes: ClassVar[dict[str, str]] = {}

    def weight_quantizers(self) -> Iterator[tuple[str, nn.Parameter, WeightQuantizer]]:
        raise NotImplementedError

    def replace_weight_quantizer(self, weight_name: str, quantizer: WeightQuantizer
                                 ) -> WeightQuantizer:
        """Quantize the weight `weight_name` with `quantizer`; returns the one it replaces."""
        attribute = self.quantizer_attributes[weight_name]
        previous = getattr(self, attribute)
        setattr(self, attribute, quantizer)
        return previous

    @property
    def num_weight_params(self) -> int:
        return sum(w.numel() for _, w, _ in self.weight_quantizers())


class QuantLayer(QuantizedWeights):
    """A Conv, ConvTranspose or Linear layer whose weight passes through a `WeightQuantizer`."""

    quantizer_attributes: ClassVar[dict[str, str]] = {"weight": "weight_quantizer"}

    def __init__(self, layer: nn.Module, quantizer: WeightQuantizer) -> None:
        super().__init__()
        if not isinstance(layer, QUANTIZABLE_LAYERS):
            raise TypeError(f"cannot quantize {type(layer).__name__}")
        self.layer = layer
        self.weight_quantizer = quantizer
        self.bias_quantizer: nn.Module | None = None
        # Subclasses with a forward of their own (padding "same" computed per input, weight
        # standardization, ...) must run that code: only the weight it reads is replaced.
        self.custom_forward = type(layer).forward not in _PLAIN_FORWARDS

    def quantize_bias(self, input_quantizer: ActQuantizer) -> None:
        """Add the bias on the int32 grid of `input_quantizer`'s step x the weight step."""
        if self.layer.bias is not None:
            self.bias_quantizer = BiasQuantizer(input_quantizer)

    @property
    def weight(self) -> nn.Parameter:
        return self.layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.layer.bias

    def weight_quantizers(self) -> Iterator[tuple[str, nn.Parameter, WeightQuantizer]]:
        yield "weight", self.layer.weight, self.weight_quantizer

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        """`output_size`: as a transposed convolution takes it (other layers take none)."""
        weight = self.weight_quantizer(self.layer.weight)
        bias = self.layer.bias
        if self.bias_quantizer is not None:
            bias = self.bias_quantizer(bias, self.weight_quantizer)
        args = (x,) if output_size is None else (x, output_size)
        if self.custom_forward:
            replaced = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
            if torch.jit.is_tracing():  # ONNX export: the stateless API refuses jit tracing
                return _call_with_tensors(self.layer, replaced, args)
            return functional_call(self.layer, replaced, args)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, bias)
        if isinstance(self.layer, TRANSPOSED_CONVS):
            return _conv_transpose(self.layer, x, weight, bias, output_size)
        return self.layer._conv_forward(x, weight, bias)


def _conv_transpose(layer: nn.modules.conv._ConvTransposeNd, x: Tensor, weight: Tensor,
                    bias: Tensor | None, output_size: list[int] | None) -> Tensor:
    """What `layer`'s own forward computes, with the given weight and bias."""
    dims = len(layer.kernel_size)
    output_padding = layer._output_padding(
        x, output_size, layer.stride, layer.padding, layer.kernel_size, dims, layer.dilation)
    return _CONV_TRANSPOSE[dims](x, weight, bias, layer.stride, layer.padding, output_padding,
                                 layer.groups, layer.dilation)


def _call_with_tensors(layer: nn.Module, tensors: dict[str, Tensor], args: tuple) -> Tensor:
    """Run `layer` with some of its parameters replaced by the given tensors for this call."""
    saved = {name: layer._parameters[name] for name in tensors}
    try:
        layer._parameters.update(tensors)
        return layer(*args)
    finally:
        layer._parameters.update(saved)


class QuantMultiheadAttention(QuantizedWeights):
    """`nn.MultiheadAttention` with quantized projection weights: the packed input projection
    (or, with key/value sizes unlike the query's, the separate q/k/v projections) and the
    output projection. `quantizers` maps each name of `projection_weights(attention)` to its
    quantizer."""

    # The quantizer attribute of each projection weight.
    _ATTRIBUTES: ClassVar[dict[str, str]] = {
        "in_proj_weight": "in_proj_quantizer", "q_proj_weight": "q_proj_quantizer",
        "k_proj_weight": "k_proj_quantizer", "v_proj_weight": "v_proj_quantizer",
        "out_proj.weight": "out_proj_quantizer"}

    def __init__(self, attention: nn.MultiheadAttention,
                 quantizers: dict[str, WeightQuantizer]) -> None:
        super().__init__()
        names = projection_weights(attention)
        if set(quantizers) != set(names):
            raise ValueError(f"expected quantizers for {', '.join(names)}, got "
                             f"{', '.join(quantizers)}")
        self.attention = attention
        self.quantizer_attributes = {name: self._ATTRIBUTES[name] for name in names}
        for name in names:
            setattr(self, self._ATTRIBUTES[name], quantizers[name])

    def weight_quantizers(self) -> Iterator[tuple[str, nn.Parameter, WeightQuantizer]]:
        for name, attribute in self.quantizer_attributes.items():
            yield name, self.attention.get_parameter(name), getattr(self, attribute)

    def _quantized(self, name: str) -> Tensor | None:
        if name not in self.quantizer_attributes:
            return None
        weight = self.attention.get_parameter(name)
        return getattr(self, self.quantizer_attributes[name])(weight)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
        need_weights: bool = True, attn_mask: Tensor | None = None,
        average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        attn = self.attention
        if attn.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, attn.embed_dim, attn.num_heads,
            self._quantized("in_proj_weight"), attn.in_proj_bias,
            attn.bias_k, attn.bias_v, attn.add_zero_attn, attn.dropout,
            self._quantized("out_proj.weight"), attn.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=not attn._qkv_same_embed_dim,
            q_proj_weight=self._quantized("q_proj_weight"),
            k_proj_weight=self._quantized("k_proj_weight"),
            v_proj_weight=self._quantized("v_proj_weight"),
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        if attn.batch_first:
            out = out.transpose(0, 1)
        return out, weights
