"""Stateless quantization math: integer ranges, fake quantization (uniform and log2), scale search,
AdaRound.

Scales and zero points broadcast against the tensor they quantize; per-channel scales have the
shape [C, 1, 1, ...] for a weight of shape [C, ...]. Nothing here loops over channels in Python.

Transposed convolutions store their weight as [in, out / groups, *kernel]: their output channels
are spread over dimension 1 of each of the `groups` blocks of dimension 0. `output_major` lays
such a weight out as [out, in / groups, *kernel] (a Conv weight's layout) for the per-channel
scale search, and `transposed_broadcast` turns the resulting per-output-channel values back into
a shape that broadcasts against the stored weight.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# AdaRound's rectified sigmoid stretch (Nagel et al. 2020): h(V) reaches exactly 0 and 1.
ZETA = 1.1
GAMMA = -0.1

# Scale search grid: candidate clip ranges shrink the observed range by 1% steps, as in BRECQ.
NUM_CLIP_CANDIDATES = 80
CLIP_STEP = 0.01
# Elements per chunk when evaluating many clip candidates at once (bounds temporary memory).
_SEARCH_CHUNK_ELEMENTS = 1 << 24
_EPS = 1e-8


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a `bits`-bit quantizer: unsigned for affine, signed for symmetric."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest with a straight-through gradient. The value is exactly `x.round()`
    (adding `x - x` rather than `round(x) - x` to `x`), so whether a code on the end of a clamp
    range gets a gradient (torch's clamp gradient excludes the ends) never hangs on an ulp."""
    return x.round() + (x - x.detach())


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Quantize and dequantize `x`; gradients flow to `x` (STE) and to `scale` (LSQ)."""
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def _uniform_forward(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                     keep: Tensor | None, with_grads: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """`fake_quant` of `x` (then `x` itself where `keep` is 1) and, with `with_grads`, the
    derivatives of the output by `x` (0 or 1) and by `scale` (LSQ), element by element.

    Only arithmetic, no `torch.where` nor boolean tensors: on the CPU those run several times
    slower than a multiply (measured on AVX-512: where 3.4 ms, multiply 0.09 ms for 0.5M floats).
    """
    v = x / scale
    codes = torch.round(v).add_(zero_point)  # before clamping: whole numbers
    code = codes.clamp(qmin, qmax).sub_(zero_point)  # q - zero_point
    out = code * scale
    if keep is not None:
        out = torch.lerp(out, x, keep)  # exact for a 0/1 weight: out, or x
    if not with_grads:
        return out, None, None
    # 1 where qmin < codes < qmax, else 0: the clamp's gradient test (range ends excluded).
    inside = 1 - (codes - codes.clamp(qmin + 1, qmax - 1)).abs_().clamp_(max=1)
    by_scale = code - v * inside  # d out / d scale: round(v) - v inside the range, the clamped code outside
    by_x = inside
    if keep is not None:
        by_scale = by_scale * (1 - keep)
        by_x = torch.maximum(inside, keep)
    return out, by_x, by_scale


class _UniformFakeQuant(torch.autograd.Function):
    """`lsq_fake_quant` with its gradients from two saved tensors instead of autograd's graph
    of a dozen elementwise operations."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,  # noqa: ANN001
                keep: Tensor | None) -> Tensor:
        out, by_x, by_scale = _uniform_forward(x, scale, zero_point, qmin, qmax, keep, True)
        ctx.save_for_backward(by_x, by_scale)
        ctx.scale_shape, ctx.scale_dtype = scale.shape, scale.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        by_x, by_scale = ctx.saved_tensors
        grad_x = grad * by_x if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad.float() * by_scale.float()).sum()
            grad_scale = grad_scale.reshape(ctx.scale_shape).to(ctx.scale_dtype)
        return grad_x, grad_scale, None, None, None, None


def lsq_fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                   keep: Tensor | None = None) -> Tensor:
    """`fake_quant` with a per-tensor `scale` (one element): the same values and gradients as
    autograd through it, faster. With v = x / scale and codes round(v) + zero_point strictly
    inside (qmin, qmax): straight through to `x`, round(v) - v to `scale` (LSQ); on or beyond
    the range ends: none to `x`, the clamped code to `scale`. Where the float mask `keep` is 1 the
    element passes unquantized (QDrop), its gradient to `x` only."""
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return _UniformFakeQuant.apply(x, scale, zero_point, qmin, qmax, keep)
    return _uniform_forward(x, scale, zero_point, qmin, qmax, keep, False)[0]


# Elements per random 64-bit word in `keep_mask`: bytes when the probability is a multiple of
# 1/256 (QDrop's 0.5 is), else 16-bit words (probability resolution 1/65536).
_MASK_WORDS = {8: torch.uint8, 16: torch.int16}


# Eager even inside a compiled step: traced, the draw would come from the compiler's own random
# stream instead of `generator`, and a seeded run would not repeat.
@torch.compiler.disable
def keep_mask(like: Tensor, prob: float, generator: torch.Generator | None = None) -> Tensor:
    """QDrop's mask: a tensor shaped and typed like `like`, 1 with probability `prob` (that
    element keeps its float value), else 0; drawn from `generator`.

    On the CPU, torch draws one serial Mersenne-Twister number per element of `rand_like`, which
    cost more than a ResNet-20 block's convolutions in a reconstruction step; so there the mask
    comes from 64 random bits per 8 (or 4) elements. Elsewhere, `rand_like`.
    """
    if like.device.type != "cpu":
        return (torch.rand_like(like, generator=generator) < prob).to(like.dtype)
    bits = 8 if float(prob * 256).is_integer() else 16
    count = like.numel()
    words = torch.empty(-(-count * bits // 64), dtype=torch.int64)
    words.random_(-(2**63), None, generator=generator)  # all 64 bits random
    values = words.view(_MASK_WORDS[bits])[:count].float()  # uniform over the type's range
    low = 0 if bits == 8 else -(2**15)
    threshold = low + round(prob * 2**bits)
    # 1 where value < threshold (whole numbers), without a boolean tensor.
    mask = (threshold - values).clamp_(0, 1)
    return mask.reshape(like.shape).to(like.dtype)


def quantize_to_int(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer codes of `x` (as a float tensor of whole numbers)."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


# Largest float32 magnitude below 2^31: bias codes clamped to it convert to int32 without overflow.
_INT32_LIMIT = 2**31 - 128


def bias_to_int(bias: Tensor, step: Tensor) -> Tensor:
    """int32 codes (as whole floats) of `bias` on the grid `step` = input step x weight step.

    Integer kernels add the bias to their int32 accumulator, whose unit is that product.
    """
    return torch.clamp(torch.round(bias / step), -_INT32_LIMIT, _INT32_LIMIT)


def round_bias(bias: Tensor, step: Tensor) -> Tensor:
    """`bias` as an integer kernel adds it: on the int32 grid `step` (gradient passes straight)."""
    return bias + (bias_to_int(bias.detach(), step) * step - bias).detach()


def scale_from_range(
    lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map the clip range [lo, hi] onto [qmin, qmax].

    The range always contains zero so that zero is exactly representable; a zero-width range
    gets a tiny positive scale instead of dividing by zero.
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp_min(_EPS)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(_EPS)
    zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point


def _per_row(x: Tensor, per_channel: bool) -> Tensor:
    return x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)


def _as_broadcast(values: Tensor, like: Tensor, per_channel: bool) -> Tensor:
    if per_channel:
        return values.reshape(like.shape[0], *([1] * (like.dim() - 1)))
    return values.reshape(())


def output_major(weight: Tensor, groups: int) -> Tensor:
    """A transposed convolution's weight [in, out / groups, *k] as [out, in / groups, *k]."""
    cin, cout_per_group, *kernel = weight.shape
    blocks = weight.reshape(groups, cin // groups, cout_per_group, *kernel)
    return blocks.transpose(1, 2).reshape(groups * cout_per_group, cin // groups, *kernel)


def transposed_broadcast(values: Tensor, weight_shape: torch.Size | tuple[int, ...],
                         groups: int) -> Tensor:
    """Per-output-channel `values` (out elements) shaped to broadcast against a transposed
    convolution's weight of `weight_shape`: [1, out, 1, ...] with one group; with several,
    [in, out / groups, 1, ...], each row repeating the values of its group's output channels."""
    cin, cout_per_group, *kernel = weight_shape
    ones = [1] * len(kernel)
    if groups == 1:
        return values.reshape(1, cout_per_group, *ones)
    per_group = values.reshape(groups, 1, cout_per_group)
    return per_group.expand(groups, cin // groups, cout_per_group).reshape(cin, cout_per_group, *ones)


def search_scale(
    x: Tensor,
    bits: int,
    *,
    symmetric: bool = False,
    per_channel: bool = True,
    method: str = "lp",
    p: float = 2.4,
) -> tuple[Tensor, Tensor]:
    """Initial scale and zero point for quantizing `x`.

    `method="minmax"` uses the observed range. `method="lp"` shrinks the range in 1% steps
    (80 candidates) and keeps, per channel, the one with the smallest sum |x - Q(x)|^p; all
    channels and a chunk of candidates are evaluated in one tensor expression.
    Returns tensors that broadcast against `x` (shape [C, 1, ...] per channel, [] per tensor).
    """
    if method not in ("lp", "minmax"):
        raise ValueError(f"unknown scale search method {method!r}: use 'lp' or 'minmax'")
    qmin, qmax = int_range(bits, symmetric)
    rows = _per_row(x.detach().float(), per_channel)
    lo = rows.amin(dim=1)
    hi = rows.amax(dim=1)
    if method == "minmax":
        scale, zero_point = scale_from_range(lo, hi, qmin, qmax, symmetric)
        return _as_broadcast(scale, x, per_channel), _as_broadcast(zero_point, x, per_channel)

    ratios = 1.0 - CLIP_STEP * torch.arange(NUM_CLIP_CANDIDATES, device=rows.device)
    chunk = max(1, _SEARCH_CHUNK_ELEMENTS // max(1, rows.numel()))
    best_err = torch.full_like(lo, math.inf)
    best_ratio = torch.ones_like(lo)
    for start in range(0, NUM_CLIP_CANDIDATES, chunk):
        r = ratios[start : start + chunk].reshape(-1, 1)  # [R, 1]
        scale, zero_point = scale_from_range(lo * r, hi * r, qmin, qmax, symmetric)  # [R, C]
        xq = fake_quant(rows.unsqueeze(0), scale.unsqueeze(-1), zero_point.unsqueeze(-1), qmin, qmax)
        err = (xq - rows.unsqueeze(0)).abs().pow(p).sum(dim=-1)  # [R, C]
        chunk_err, chunk_idx = err.min(dim=0)
        better = chunk_err < best_err
        best_err = torch.where(better, chunk_err, best_err)
        best_ratio = torch.where(better, r.squeeze(1)[chunk_idx], best_ratio)
    scale, zero_point = scale_from_range(lo * best_ratio, hi * best_ratio, qmin, qmax, symmetric)
    return _as_broadcast(scale, x, per_channel), _as_broadcast(zero_point, x, per_channel)


def log2_levels(bits: int) -> int:
    """Number of powers of two a `bits`-bit log2 quantizer codes: 2^0 .. 2^-(levels - 1); its
    last code (2^bits - 1) stands for exactly 0."""
    return 2**bits - 1


def log2_fake_quant(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Log2 quantization of values in [0, scale] (softmax outputs), as RepQ-ViT / FQ-ViT do it:
    x -> scale * 2^-k with k = round(-log2(x / scale)), a whole number in [0, levels - 1].

    With `bits` bits there are 2^bits codes: 2^bits - 1 powers of two and exactly 0 (the last
    code), which takes every x whose k would exceed the range (x = 0 included), so an attention
    probability that vanishes stays 0. Values above `scale` clip to it; negative ones give 0.
    Gradients, as LSQ for the uniform grid: straight through to `x` inside [0, scale], none
    above; to `scale`, Q(v) - v inside (v = x / scale) and 1 above.
    """
    v = torch.clamp(x / scale, 0.0, 1.0)
    with torch.no_grad():
        levels = log2_levels(bits)
        k = torch.round(-torch.log2(v))  # +inf for v == 0: lands in the zero code
        powers = torch.pow(2.0, -torch.clamp(k, 0, levels - 1)).to(v.dtype)
        q = torch.where(k > levels - 1, torch.zeros_like(v), powers)
    return scale * (v + (q - v).detach())


def search_log2_scale(x: Tensor, bits: int, method: str = "lp", p: float = 2.4) -> Tensor:
    """Initial scale of a log2 quantizer for the values `x` (any shape, >= 0): the largest
    value (`minmax`), or the candidate among the largest value shrunk in 1% steps (80 of them,
    as `search_scale`) with the smallest sum |x - Q(x)|^p (`lp`). Returns a single value."""
    if method not in ("lp", "minmax"):
        raise ValueError(f"unknown scale search method {method!r}: use 'lp' or 'minmax'")
    flat = x.detach().float().reshape(-1)
    hi = flat.amax().clamp_min(_EPS)
    if method == "minmax":
        return hi
    ratios = 1.0 - CLIP_STEP * torch.arange(NUM_CLIP_CANDIDATES, device=flat.device)
    chunk = max(1, _SEARCH_CHUNK_ELEMENTS // max(1, flat.numel()))
    errors = []
    for start in range(0, NUM_CLIP_CANDIDATES, chunk):
        scale = (hi * ratios[start : start + chunk]).reshape(-1, 1)  # [R, 1]
        xq = log2_fake_quant(flat.unsqueeze(0), scale, bits)
        errors.append((xq - flat.unsqueeze(0)).abs().pow(p).sum(dim=-1))
    return hi * ratios[torch.cat(errors).argmin()]


def rectified_sigmoid(v: Tensor) -> Tensor:
    """AdaRound's h(V): a sigmoid stretched to (GAMMA, ZETA) and clipped to [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def adaround_init(w: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Floor of w/scale and the rounding variable V with h(V) equal to the fractional part."""
    scaled = w / scale
    w_floor = torch.floor(scaled)
    frac = (scaled - w_floor).clamp(0.0, 1.0)
    # Invert h on its unclipped part; fractions at the ends map to finite, saturating values.
    ratio = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    v = torch.log(ratio / (1 - ratio))
    return w_floor, v


def adaround_fake_quant(
    w_floor: Tensor, h: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int
) -> Tensor:
    """Dequantized weight with rounding offset `h` in [0, 1] added to floor(w/scale)."""
    q = torch.clamp(w_floor + h + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def rounding_regularizer(v: Tensor, beta: float) -> Tensor:
    """sum(1 - |2h(V) - 1|^beta): pushes every h(V) towards 0 or 1 as beta decreases."""
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


def beta_schedule(step: int, total: int, warmup: float, start: float, end: float) -> float | None:
    """Annealed beta at `step`, or None during the warm-up (regularizer off)."""
    warm_steps = int(warmup * total)
    if step < warm_steps:
        return None
    progress = (step - warm_steps) / max(1, total - warm_steps)
    return end + (start - end) * max(0.0, 1.0 - progress)


class _LpError(torch.autograd.Function):
    """sum(|pred - target|^p [* weight]) * norm, with a hand-written backward.

    Autograd's own backward of the mean starts from an expanded scalar, so the gradient reaching
    `pred` is laid out contiguously whatever `pred`'s layout: with channels-last outputs every
    elementwise backward after it (a ReLU's, typically) then mixes layouts and takes a slow
    strided path on CPU (about 15x slower there). Here the gradient is computed from the saved
    difference and keeps its layout, in fewer passes over the output.
    """

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, weight: Tensor | None, p: float,
                norm: float) -> Tensor:
        diff = pred - target
        err = diff.square() if p == 2 else diff.abs().pow(p)
        if weight is not None:
            err = err * weight
        ctx.save_for_backward(diff, weight)
        ctx.p, ctx.norm = p, norm
        return err.sum() * norm

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        diff, weight = ctx.saved_tensors
        scale = grad * (ctx.p * ctx.norm)
        # d|x|^p/dx = p |x|^(p-1) sign(x); for p = 2 that is 2x.
        slope = diff if ctx.p == 2 else diff.abs().pow(ctx.p - 1) * diff.sign()
        if weight is not None:
            slope = slope * weight
        return slope * scale, None, None, None, None


def lp_error(pred: Tensor, target: Tensor, p: float = 2.0, weight: Tensor | None = None) -> Tensor:
    """Per-sample error summed over the second dimension and averaged over the rest.

    With p=2 and a 4-D conv output this is the squared error summed over channels, averaged over
    batch and positions, which fixes the balance against the rounding regularizer's lambda.
    The target and weight get no gradient.
    """
    channels = pred.shape[1] if pred.dim() > 1 else 1
    norm = channels / max(1, pred.numel())
    return _LpError.apply(pred, target.detach(), None if weight is None else weight.detach(),
                          float(p), norm)
