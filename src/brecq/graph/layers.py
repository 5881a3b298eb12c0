"""What the traced and the module-tree preparation share: which weight layers are quantized and
with how many bits, the quantizers they get, and checking every layer name the config gives."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Collection, Iterable

from torch import Tensor, nn

from ..config import BrecqConfig
from ..errors import ConfigError
from ..quant.modules import (
    QUANTIZABLE_LAYERS,
    QuantizedWeights,
    QuantLayer,
    QuantMultiheadAttention,
    projection_weights,
    weight_layout,
)
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from .placement import BACKEND_NONE

# Modules whose weights are quantized.
WEIGHT_LAYERS = (*QUANTIZABLE_LAYERS, nn.MultiheadAttention)


def check_names(requested: Iterable[str] | None, known: Collection[str], what: str,
                kind: str = "quantized layer", patterns: bool = False) -> None:
    """Fail on the first name in `requested` (the config field `what`) that is not in `known`
    (with `patterns`, an fnmatch pattern that matches none of them)."""
    for name in requested or ():
        if name in known or (patterns and any(fnmatch.fnmatchcase(k, name) for k in known)):
            continue
        close = difflib.get_close_matches(name, list(known), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"{what} names {name!r}, which is not a {kind} of this model{hint}; "
            "run `brecq info` to list the names"
        )


def check_float_layers(config: BrecqConfig, modules: dict[str, nn.Module]) -> None:
    """Every `float_layers` name or pattern must name a weight layer of the model."""
    weight_layers = [n for n, m in modules.items() if n and isinstance(m, WEIGHT_LAYERS)]
    check_names(config.float_layers, weight_layers, "float_layers", kind="weight layer",
                patterns=True)


def is_float_layer(name: str, config: BrecqConfig) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in config.float_layers or ())


def is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, WEIGHT_LAYERS)


def input_kind(layer: nn.Module) -> str:
    """The kind of a tensor `layer` (quantized or not) reads, for reports: "linear input",
    "conv input" or "attention input"."""
    layer = getattr(layer, "layer", layer)  # a QuantLayer's or InputQuantized's float layer
    if isinstance(layer, (nn.MultiheadAttention, QuantMultiheadAttention)):
        return "attention input"
    return "linear input" if isinstance(layer, nn.Linear) else "conv input"


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def calibrated_weight_quantizer(config: BrecqConfig, bits: int, weight: Tensor,
                                channel_axis: int = 0, groups: int = 1) -> WeightQuantizer:
    """A weight quantizer of `bits` as `config` describes it, its scale searched for `weight`
    (whose output channels `channel_axis` and `groups` locate, as `WeightQuantizer` takes them)."""
    # onnxruntime's fast integer kernels take int8 weights with zero point 0: 8-bit weights are
    # symmetric for it; narrower affine codes minus their zero point fit int8 at export anyway.
    symmetric = config.weight_symmetric or (config.backend != BACKEND_NONE and bits == 8)
    quantizer = WeightQuantizer(
        bits, symmetric=symmetric,
        per_channel=config.weight_granularity == "channel", channel_axis=channel_axis,
        groups=groups,
    )
    quantizer.calibrate(weight.detach(), config.scale_search, config.lp_norm)
    return quantizer


class InputQuantized(nn.Module):
    """Quantize a layer's activation input right before the layer (where no graph shows the
    tensor's producer: inside untraced modules, and on the module-tree fallback)."""

    def __init__(self, layer: QuantizedWeights, input_quantizer: ActQuantizer) -> None:
        super().__init__()
        self.layer = layer
        self.input_quantizer = input_quantizer

    def forward(self, x: Tensor, *args, **kwargs):  # noqa: ANN002, ANN003
        if isinstance(self.layer, QuantMultiheadAttention):
            args = tuple(self.input_quantizer(a) for a in args[:2]) + tuple(args[2:])
        return self.layer(self.input_quantizer(x), *args, **kwargs)


class LayerBits:
    """The layers one preparation quantizes, which are first and last, and the bits of each.

    Built once per path (traced graph, module tree) from the layers it found, after checking the
    layer names the config gives (`layer_bits`, `first_layers`, `last_layers`) against them, so
    both paths accept and refuse the same names with the same errors.
    """

    def __init__(self, config: BrecqConfig, names: Collection[str],
                 found_first: Iterable[str], found_last: Iterable[str]) -> None:
        check_names(config.layer_bits, names, "layer_bits")
        check_names(config.first_layers, names, "first_layers")
        check_names(config.last_layers, names, "last_layers")
        self.config = config
        self.first = tuple(config.first_layers if config.first_layers is not None else found_first)
        self.last = tuple(config.last_layers if config.last_layers is not None else found_last)
        self._special = set(self.first) | set(self.last)

    def check_act_names(self, known: Collection[str]) -> None:
        """`act_layer_bits` must name activation quantizers among `known` (with activation
        quantization on: without it the names are not known)."""
        if self.config.act_bits is not None:
            check_names(self.config.act_layer_bits, known, "act_layer_bits")

    def weight_bits(self, name: str) -> int:
        config = self.config
        if name in config.layer_bits:
            return config.layer_bits[name]
        if config.first_last_bits is not None and name in self._special:
            return config.first_last_bits
        return config.weight_bits

    def act_bits(self, name: str, *, alias: str | None = None, read_by_layers: bool = True,
                 beside_first_or_last: bool = False) -> int:
        """Bits of the activation quantizer `name` (`alias`: another name `act_layer_bits` may
        give it). `read_by_layers`: whether layers multiply the tensor (`act_bits` is their
        width; a tensor only the backend needs quantized, a residual add input say, is stored
        and added in int8 there anyway). `beside_first_or_last`: whether it feeds a last layer
        or is the output of first ones (`first_last_bits`)."""
        config = self.config
        assert config.act_bits is not None
        bits = config.act_bits if read_by_layers else max(config.act_bits, 8)
        if config.first_last_bits is not None and beside_first_or_last:
            bits = config.first_last_bits
        if name in config.act_layer_bits:
            return config.act_layer_bits[name]
        return config.act_layer_bits.get(alias, bits) if alias is not None else bits

    def input_act_bits(self, name: str) -> int | None:
        """Bits of a quantizer on the input of layer `name`, or None for a float input (no
        activation quantization, or a first layer: it reads the model input as given)."""
        if self.config.act_bits is None or name in self.first:
            return None
        return self.act_bits(name, beside_first_or_last=name in self.last)

    def quantized_layer(self, name: str, module: nn.Module) -> QuantizedWeights:
        """`module` (the layer `name`) with its weights quantized at their bits."""
        config, bits = self.config, self.weight_bits(name)
        if isinstance(module, nn.MultiheadAttention):
            return QuantMultiheadAttention(module, {
                name: calibrated_weight_quantizer(config, bits, module.get_parameter(name))
                for name in projection_weights(module)})
        return QuantLayer(module, calibrated_weight_quantizer(config, bits, module.weight,
                                                              **weight_layout(module)))

    def quantize_at_input(self, root: nn.Module, name: str, layers: dict[str, QuantizedWeights],
                          act_quantizers: dict[str, ActQuantizer]) -> None:
        """Quantize the layer `name` of `root` in place, its activation input right at the layer
        (named after the layer in `act_quantizers`)."""
        layer = self.quantized_layer(name, root.get_submodule(name))
        layers[name] = layer
        bits = self.input_act_bits(name)
        if bits is None:
            set_submodule(root, name, layer)
            return
        wrapped = InputQuantized(layer, ActQuantizer(bits, symmetric=self.config.act_symmetric,
                                                     kind=input_kind(layer)))
        if self.config.integer_bias and isinstance(layer, QuantLayer):
            layer.quantize_bias(wrapped.input_quantizer)
        act_quantizers[name] = wrapped.input_quantizer
        set_submodule(root, name, wrapped)
