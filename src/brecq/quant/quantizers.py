"""Weight and activation quantizer modules.

Each quantizer owns its scale and zero point and changes state only through its own methods
(`calibrate`, `begin_adaround`, `set_soft`, `harden`, `enable`, ...); model-wide switches in
`brecq.quant.state` call these methods inside context managers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..config import check_bits
from . import primitives as P

Sampler = Callable[[Tensor], Tensor]


class WeightQuantizer(nn.Module):
    """Per-channel or per-tensor affine weight quantizer with optional AdaRound rounding.

    Rounding is round-to-nearest until `begin_adaround` creates the rounding variable `alpha`;
    then it is soft (`h(alpha)`, differentiable) or hard (`alpha >= 0`) as `set_soft` chooses.

    Channels are output channels: dimension 0 of the weight (`channel_axis=0`: Conv, Linear) or,
    with `channel_axis=1`, dimension 1 of each of the `groups` blocks of dimension 0 (transposed
    convolutions, weight [in, out / groups, *k]). Scales always broadcast against the weight.
    """

    def __init__(self, bits: int, *, symmetric: bool = False, per_channel: bool = True,
                 channel_axis: int = 0, groups: int = 1) -> None:
        super().__init__()
        if channel_axis not in (0, 1):
            raise ValueError(f"channel_axis must be 0 or 1, got {channel_axis}")
        self.bits = check_bits(bits, "weight bits")
        self.symmetric = symmetric
        self.per_channel = per_channel
        self.channel_axis = channel_axis
        self.groups = groups
        self.qmin, self.qmax = P.int_range(bits, symmetric)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("w_floor", None)
        self.alpha: nn.Parameter | None = None
        self.soft = False
        self.enabled = True

    def extra_repr(self) -> str:
        kind = "channel" if self.per_channel else "tensor"
        rounding = "nearest" if self.alpha is None else ("soft" if self.soft else "learned")
        return f"bits={self.bits}, symmetric={self.symmetric}, per_{kind}, rounding={rounding}"

    @torch.no_grad()
    def calibrate(self, weight: Tensor, method: str = "lp", p: float = 2.4) -> None:
        """Initialize scale and zero point from the float weight."""
        transposed = self.channel_axis == 1
        rows = P.output_major(weight, self.groups) if transposed else weight
        scale, zero_point = P.search_scale(
            rows, self.bits, symmetric=self.symmetric, per_channel=self.per_channel,
            method=method, p=p,
        )
        if transposed and self.per_channel:
            scale, zero_point = (P.transposed_broadcast(v, weight.shape, self.groups)
                                 for v in (scale, zero_point))
        self.scale = scale.to(weight.dtype)
        self.zero_point = zero_point.to(weight.dtype)

    @torch.no_grad()
    def begin_adaround(self, weight: Tensor) -> nn.Parameter:
        """Create the rounding variable, starting where soft rounding reproduces `weight`."""
        w_floor, v = P.adaround_init(weight, self.scale)
        self.w_floor = w_floor
        self.alpha = nn.Parameter(v)
        self.soft = True
        return self.alpha

    @torch.no_grad()
    def load_codes(self, codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        """Take saved integer codes (whole numbers in [qmin, qmax]) with their scale and zero
        point, rounding to nearest from now on (any learned rounding is dropped). Returns the
        float weight `(codes - zero_point) * scale`, which this quantizer maps back to exactly
        `codes`."""
        self.alpha = None
        self.w_floor = None
        self.soft = False
        self.scale = scale.clone()
        self.zero_point = zero_point.clone()
        return (codes.to(scale.dtype) - self.zero_point) * self.scale

    def set_soft(self, soft: bool) -> None:
        if soft and self.alpha is None:
            raise RuntimeError("soft rounding needs begin_adaround() first")
        self.soft = soft

    def enable(self, enabled: bool) -> None:
        self.enabled = enabled

    def channel_scale(self) -> Tensor:
        """The scale per output channel (one value for a per-tensor scale)."""
        scale = self.scale.detach()
        if scale.numel() == 1:
            return scale.reshape(())
        if self.channel_axis == 0:
            return scale.reshape(-1)
        # [1, out, 1, ...] with one group, else each group's output channels repeated per row.
        rows = scale.reshape(self.groups, -1, scale.shape[1])
        return rows[:, 0].reshape(-1)

    @property
    def learned(self) -> bool:
        return self.alpha is not None

    def rounding_offset(self) -> Tensor:
        assert self.alpha is not None
        if self.soft:
            return P.rectified_sigmoid(self.alpha)
        return (self.alpha >= 0).to(self.alpha.dtype)

    def regularizer(self, beta: float) -> Tensor:
        assert self.alpha is not None
        return P.rounding_regularizer(self.alpha, beta)

    def int_weight(self, weight: Tensor) -> Tensor:
        """Integer codes of the quantized weight (whole numbers in [qmin, qmax])."""
        if self.alpha is None:
            return P.quantize_to_int(weight, self.scale, self.zero_point, self.qmin, self.qmax)
        hard = (self.alpha >= 0).to(weight.dtype)
        return torch.clamp(self.w_floor + hard + self.zero_point, self.qmin, self.qmax)

    def forward(self, weight: Tensor) -> Tensor:
        if not self.enabled:
            return weight
        if self.alpha is None:
            return P.fake_quant(weight, self.scale, self.zero_point, self.qmin, self.qmax)
        return P.adaround_fake_quant(
            self.w_floor, self.rounding_offset(), self.scale, self.zero_point, self.qmin, self.qmax
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Learned rounding and per-channel scales change tensor shapes; adopt the saved ones.
        device = self.scale.device
        for name in ("scale", "zero_point", "w_floor"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=device))
        alpha_key = prefix + "alpha"
        if alpha_key in state_dict and self.alpha is None:
            self.alpha = nn.Parameter(torch.empty_like(state_dict[alpha_key], device=device))
            self.soft = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer with a learnable step size (LSQ).

    Its scale is initialized by `calibrate` or, inside a `calibrating` context, from the first
    tensor it sees. With a drop probability set (QDrop), each element keeps its float value with
    that probability.
    """

    def __init__(self, bits: int, *, symmetric: bool = False, kind: str = "activation") -> None:
        super().__init__()
        self.bits = check_bits(bits, "activation bits")
        self.symmetric = symmetric
        # What the quantized tensor is ("linear input", "softmax output", ...), for reports.
        self.kind = kind
        self.qmin, self.qmax = P.int_range(bits, symmetric)
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled = True
        self.drop_prob = 0.0
        self.drop_generator: torch.Generator | None = None
        self._calibration: tuple[str, float, Sampler | None] | None = None
        # Host-side mirror of `initialized`: reading the buffer in forward would synchronize
        # with the device on every reconstruction iteration.
        self._ready = False

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, kind={self.kind!r}"

    @torch.no_grad()
    def calibrate(self, x: Tensor, method: str = "lp", p: float = 2.4,
                  sampler: Sampler | None = None) -> None:
        """Initialize scale and zero point from a sample of the tensor this quantizer sees.

        `sampler` maps the flattened tensor to the elements the scale search runs on (default:
        `search_sample`); a distributed run passes one that gathers them from every rank.
        """
        sample = x.detach().reshape(-1).float()
        if not torch.isfinite(sample).all():
            raise FloatingPointError("activation contains NaN or inf; check the input data")
        self.set_scale(*self._search((sampler or search_sample)(sample), method, p))

    def _search(self, sample: Tensor, method: str, p: float) -> tuple[Tensor, Tensor]:
        """Initial scale and zero point for the sampled elements."""
        return P.search_scale(sample, self.bits, symmetric=self.symmetric, per_channel=False,
                              method=method, p=p)

    def fake_quant(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """`x` on this quantizer's grid, except where the float mask `keep` is 1 (QDrop)."""
        return P.lsq_fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax, keep)

    @torch.no_grad()
    def set_scale(self, scale: Tensor, zero_point: Tensor) -> None:
        """Take the given step size and zero point (single values) as initialized."""
        self.scale.copy_(scale.reshape(()))
        self.zero_point.copy_(zero_point.reshape(()))
        self.initialized.fill_(True)
        self._ready = True

    def begin_calibration(self, method: str, p: float, sampler: Sampler | None = None) -> None:
        self._calibration = (method, p, sampler)

    def end_calibration(self) -> None:
        self._calibration = None

    def enable(self, enabled: bool) -> None:
        self.enabled = enabled

    def set_drop(self, prob: float, generator: torch.Generator | None = None) -> None:
        """Keep each element's float value with probability `prob`, drawn from `generator`."""
        self.drop_prob = prob
        self.drop_generator = generator

    @property
    def ready(self) -> bool:
        """Whether the step size is initialized (read without a device synchronization)."""
        return self._ready

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if not self._ready:
            if self._calibration is None:
                raise RuntimeError(
                    "activation quantizer used before its scale was initialized: run it inside "
                    "brecq.quant.state.calibrating(...) or call calibrate() first"
                )
            self.calibrate(x, *self._calibration)
        keep = P.keep_mask(x, self.drop_prob, self.drop_generator) if self.drop_prob > 0 else None
        return self.fake_quant(x, keep)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)


class Log2Quantizer(ActQuantizer):
    """Log2 quantizer for values in [0, 1] such as attention probabilities (RepQ-ViT, FQ-ViT):
    `scale * 2^-k`, k a whole number, and exactly 0 for the last code (see
    `primitives.log2_fake_quant`). Everything else is the `ActQuantizer`'s: the scale is
    searched on the first tensor (`calibrating`) or by `calibrate`, learned as a step size
    (LSQ), dropped per element by QDrop; the zero point stays 0."""

    def __init__(self, bits: int, *, kind: str = "softmax output") -> None:
        super().__init__(bits, symmetric=False, kind=kind)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, log2, kind={self.kind!r}"

    def _search(self, sample: Tensor, method: str, p: float) -> tuple[Tensor, Tensor]:
        scale = P.search_log2_scale(sample, self.bits, method=method, p=p)
        return scale, torch.zeros_like(scale)

    def fake_quant(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        xq = P.log2_fake_quant(x, self.scale, self.bits)
        return xq if keep is None else torch.lerp(xq, x, keep)


# Above this many elements the Lp search runs on an evenly strided subsample; min/max come from it
# too, which is what the Lp search shrinks anyway.
_MAX_SEARCH_ELEMENTS = 1 << 18


def search_stride(numel: int) -> int:
    """Stride of the evenly strided subsample the scale search takes of `numel` elements."""
    return 1 if numel <= _MAX_SEARCH_ELEMENTS else numel // _MAX_SEARCH_ELEMENTS + 1


def search_sample(flat: Tensor, gather: Callable[[Tensor], Tensor] = lambda t: t,
                  offset: int = 0, total: int | None = None) -> Tensor:
    """The elements of `flat` that the activation scale search runs on.

    `flat` may be one part of a longer tensor (`total` elements, this part starting at
    `offset`) whose parts `gather` concatenates (across ranks): the sample is then that of the
    whole, and only the strided subsample and the extremes of each part travel.
    """
    stride = search_stride(flat.numel() if total is None else total)
    if stride == 1:
        return gather(flat)
    strided = gather(flat[(-offset) % stride :: stride])
    extremes = gather(torch.stack([flat.min(), flat.max()]))
    # Keep the true extremes so the largest candidate range still covers the data.
    return torch.cat([strided, extremes.min().reshape(1), extremes.max().reshape(1)])


class BiasQuantizer(nn.Module):
    """Puts a layer's bias on the int32 grid that integer kernels accumulate in.

    The grid step is the product of the layer's input step (the `ActQuantizer` that feeds the
    layer) and its weight step, per output channel. Rounding applies while both quantizers are
    on, so the fake-quantized layer adds the bias exactly as an int8 kernel (onnxruntime's
    QLinearConv, TFLite, ...) does. It holds no state of its own: the input quantizer is a plain
    reference, not a submodule, so that it is not registered (and saved) twice.
    """

    def __init__(self, input_quantizer: ActQuantizer) -> None:
        super().__init__()
        object.__setattr__(self, "input_quantizer", input_quantizer)

    def step(self, weight_quantizer: WeightQuantizer) -> Tensor:
        """Grid step per output channel (or one value for a per-tensor weight scale)."""
        return self.input_quantizer.scale.detach() * weight_quantizer.channel_scale()

    def active(self, weight_quantizer: WeightQuantizer) -> bool:
        source = self.input_quantizer
        return weight_quantizer.enabled and source.enabled and source.ready

    def forward(self, bias: Tensor, weight_quantizer: WeightQuantizer) -> Tensor:
        if not self.active(weight_quantizer):
            return bias
        return P.round_bias(bias, self.step(weight_quantizer).to(bias.dtype))
