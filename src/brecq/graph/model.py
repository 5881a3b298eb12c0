"""`QuantizedModel`, what `prepare` returns, and its reconstruction `Unit`s."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from ..quant import state
from ..quant.modules import QuantizedWeights
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from ..text import units_table


@dataclass(frozen=True)
class Unit:
    """One reconstruction unit: a callable module and the quantizers it owns."""

    name: str
    kind: str
    module: nn.Module
    layers: tuple[str, ...]
    act_quantizers: tuple[str, ...]


def weight_label(layer: str, weight_name: str) -> str:
    """Name of a layer's weight quantizer: the layer's name for its `weight`, else
    `layer.weight_name` (`attn.in_proj_weight`)."""
    return layer if weight_name == "weight" else f"{layer}.{weight_name}"


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
            weight_label(name, weight_name): quantizer
            for name, layer in self.layers.items()
            for weight_name, _, quantizer in layer.weight_quantizers()
        }

    def layer_bits(self, name: str) -> int:
        """Weight bits of the layer `name` (a key of `layers`)."""
        return next(q.bits for _, _, q in self.layers[name].weight_quantizers())

    def swap_weight_quantizer(self, name: str, quantizer: WeightQuantizer) -> WeightQuantizer:
        """Quantize the weight `name` (a key of `weight_quantizers`) with `quantizer` from now
        on; returns the quantizer it replaces."""
        if "weight" in getattr(self.layers.get(name), "quantizer_attributes", {}):
            return self.layers[name].replace_weight_quantizer("weight", quantizer)
        for layer_name, layer in self.layers.items():
            for weight_name, _, _ in layer.weight_quantizers():
                if weight_label(layer_name, weight_name) == name:
                    return layer.replace_weight_quantizer(weight_name, quantizer)
        raise KeyError(f"{name!r} is not a quantized weight of this model")

    @contextmanager
    def weight_quantizers_swapped(self, quantizers: Mapping[str, WeightQuantizer]
                                  ) -> Iterator[None]:
        """Quantize the weights named (keys of `weight_quantizers`) with the given quantizers
        inside; the previous ones are back on exit."""
        replaced: list[tuple[str, WeightQuantizer]] = []
        try:
            for name, quantizer in quantizers.items():
                replaced.append((name, self.swap_weight_quantizer(name, quantizer)))
            yield
        finally:
            for name, previous in reversed(replaced):
                self.swap_weight_quantizer(name, previous)

    @contextmanager
    def quantization(self, *, weights: bool = True, acts: bool = True) -> Iterator[None]:
        """Run with weight and/or activation quantization switched on or off."""
        with state.quantization(self.network, weights=weights, acts=acts):
            yield

    def describe(self) -> str:
        """A printable table of the units: kind, layers, parameters, weight and activation bits."""
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
                "weight_bits": {n: self.layer_bits(n) for n in unit.layers},
                "act_quantizers": {n: self.act_quantizers[n].bits for n in unit.act_quantizers},
                "params": params,
            })
        return rows
