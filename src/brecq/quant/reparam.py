"""Per-channel activation scales folded into the producer's affine and the consumers' weights.

The outputs of a LayerNorm vary hugely from channel to channel (RepQ-ViT, Li et al. ICCV 2023):
one per-tensor scale wastes most of the grid on the few wide channels. A per-channel quantizer
fits them, but integer kernels want one scale per tensor. The per-channel quantizer is made a
per-tensor one by an exact change of variables, derived here.

Let X be the LayerNorm output, X_c = g_c n_c + b_c for the normalized input n, and let channel
c be quantized with scale s_c and integer zero point z_c that map its calibrated range
[lo_c, hi_c] onto the grid: s_c = (hi_c - lo_c) / (qmax - qmin), z_c = round(qmin - lo_c / s_c).

    q_c = clamp(round(X_c / s_c) + z_c, qmin, qmax),    X^_c = (q_c - z_c) s_c.

Choose one scale s~ = mean_c(s_c) and one integer zero point z~ (the mean of the z_c, rounded
and clipped to the grid; 0 for a symmetric grid), and per channel the ratio r1_c = s_c / s~
and the integer shift r2_c = z_c - z~. The new output

    X~_c = X_c / r1_c + r2_c s~

gives X~_c / s~ = X_c / s_c + r2_c, and since r2_c is an integer it passes through the rounding:
round(X~_c / s~) + z~ = round(X_c / s_c) + z_c. The per-tensor quantizer (s~, z~) on X~ thus
produces exactly the codes q_c of the per-channel quantizer on X (up to float rounding of X~),
and its dequantized value is the same change of variables of X^_c: X~^_c = X^_c / r1_c + r2_c s~.

X~ is still a LayerNorm output: X~_c = (g_c / r1_c) n_c + (b_c / r1_c + r2_c s~), so the
LayerNorm gets the weight g / r1 and bias b / r1 + r2 s~. A Linear that read X,
Y = W X + bias, reads X = r1 (X~ - r2 s~) instead:

    Y = (W diag(r1)) X~ + (bias - W diag(r1) r2 s~),

so its weight columns are multiplied by r1 and its bias loses W' (r2 s~). Float outputs are
unchanged; the quantized model quantizes the LayerNorm output per tensor, as deployed, with the
codes of a per-channel quantizer. Every channel of X~ spans the same range
s~ [qmin - z~, qmax - z~] (up to rounding of z_c), which contains zero: a channel far from zero
is moved onto it too, so no channel wastes grid, and the single scale that the quantized model
calibrates on X~ fits every channel.

A consumer without a bias cannot absorb the shift: `without_shift` keeps only the ratios
(r2 = 0), which still equalizes the channels' widths, not their offsets.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .primitives import int_range

# Channels narrower than this fraction of the widest are quantized as if that wide.
MIN_RELATIVE_WIDTH = 1e-3
_EPS = 1e-8


class ChannelReparam(NamedTuple):
    """The change of variables X~ = X / ratio + shift * scale of one activation's channels.

    `ratio` (r1) and `shift` (r2, whole numbers) have one entry per channel; `scale` (s~) and
    `zero_point` (z~) are the 0-d per-tensor quantization parameters that stand for the
    per-channel ones on X~.
    """

    ratio: Tensor
    shift: Tensor
    scale: Tensor
    zero_point: Tensor

    def without_shift(self) -> ChannelReparam:
        """Only the ratios (for consumers that have no bias to absorb the shift)."""
        return self._replace(shift=torch.zeros_like(self.shift))

    @property
    def offset(self) -> Tensor:
        """r2 s~: what each channel of X~ is moved by, in the units of X~."""
        return self.shift * self.scale


def per_channel_params(channel_min: Tensor, channel_max: Tensor, bits: int,
                       symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point per channel that map each channel's observed range onto the
    whole `bits`-bit grid.

    Unlike a stored quantizer's, the range need not contain zero (the zero point may lie outside
    the grid): the zero point only becomes the shift r2. A channel narrower than
    `MIN_RELATIVE_WIDTH` of the widest is widened to that, so that constant channels do not get
    ratios near zero (and shifts that cancel them only in exact arithmetic).
    """
    qmin, qmax = int_range(bits, symmetric)
    low, high = channel_min.float(), channel_max.float()
    width = (high - low).clamp_min(0.0)
    width = torch.maximum(width, width.max() * MIN_RELATIVE_WIDTH).clamp_min(_EPS)
    scales = width / (qmax - qmin)
    return scales, torch.round(qmin - low / scales)


def layernorm_reparam_factors(channel_min: Tensor, channel_max: Tensor, bits: int,
                              symmetric: bool = False) -> ChannelReparam:
    """The change of variables that makes a per-tensor quantizer equal to the per-channel one
    of `per_channel_params` on the ranges [channel_min, channel_max] (one entry per channel).

    The per-tensor zero point is the channels' mean, on the grid (0 for a symmetric quantizer),
    so that zero stays inside the common range s~ [qmin - z~, qmax - z~] of the new channels.
    """
    if channel_min.dim() != 1 or channel_min.shape != channel_max.shape:
        raise ValueError(f"channel_min and channel_max must be 1-D and of one shape, got "
                         f"{tuple(channel_min.shape)} and {tuple(channel_max.shape)}")
    qmin, qmax = int_range(bits, symmetric)
    scales, zero_points = per_channel_params(channel_min, channel_max, bits, symmetric)
    scale = scales.mean()
    zero_point = (torch.zeros_like(scale) if symmetric
                  else zero_points.mean().round().clamp(qmin, qmax))
    return ChannelReparam(scales / scale, zero_points - zero_point, scale, zero_point)


def reparam_affine(weight: Tensor, bias: Tensor, factors: ChannelReparam) -> tuple[Tensor, Tensor]:
    """The producer's per-channel affine (g, b) that outputs X~: (g / r1, b / r1 + r2 s~)."""
    ratio = factors.ratio.to(weight)
    return weight / ratio, bias / ratio + factors.offset.to(bias)


def reparam_linear_input(weight: Tensor, bias: Tensor | None,
                         factors: ChannelReparam) -> tuple[Tensor, Tensor | None]:
    """A Linear's (weight [out, in], bias [out]) that reads X~ and computes what it did from X:
    weight columns times r1, bias minus W' r2 s~. A Linear without bias takes no shift."""
    new_weight = weight * factors.ratio.to(weight)
    if bias is None:
        if bool(factors.shift.any()):
            raise ValueError("a Linear without bias cannot absorb a zero-point shift: use "
                             "factors.without_shift() for its producer")
        return new_weight, None
    return new_weight, bias - new_weight @ factors.offset.to(weight)
