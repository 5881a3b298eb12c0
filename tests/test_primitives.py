"""The stateless quantization math."""

import math

import pytest
import torch

from brecq.quant import primitives as P


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(bits, symmetric):
    torch.manual_seed(0)
    w = torch.randn(16, 3, 3, 3)
    scale, zp = P.search_scale(w, bits, symmetric=symmetric, method="minmax")
    qmin, qmax = P.int_range(bits, symmetric)
    wq = P.fake_quant(w, scale, zp, qmin, qmax)
    # Values at the ends may be clipped by the rounded zero point, by at most half a step too.
    assert ((wq - w).abs() <= scale / 2 + 1e-6).all()


def test_per_channel_scales_follow_each_channel_range():
    w = torch.stack([torch.linspace(-1, 1, 50), torch.linspace(-10, 10, 50), torch.zeros(50)])
    scale, zp = P.search_scale(w, 4, method="minmax")
    assert scale.shape == (3, 1)
    assert scale[1, 0] == pytest.approx(10 * scale[0, 0].item(), rel=1e-5)


def test_zero_range_channel_gives_finite_values():
    w = torch.zeros(4, 8)
    w[0] = torch.randn(8)
    for method in ("lp", "minmax"):
        scale, zp = P.search_scale(w, 4, method=method)
        wq = P.fake_quant(w, scale, zp, *P.int_range(4, False))
        assert torch.isfinite(scale).all() and torch.isfinite(wq).all()
        assert torch.equal(wq[1:], torch.zeros(3, 8))


def test_lp_search_is_no_worse_than_minmax_in_lp_error():
    torch.manual_seed(1)
    w = torch.randn(32, 64) * torch.rand(32, 1) * 3
    w[:, 0] *= 8  # outliers make clipping worthwhile
    qmin, qmax = P.int_range(3, False)
    errors = {}
    for method in ("lp", "minmax"):
        scale, zp = P.search_scale(w, 3, method=method, p=2.4)
        errors[method] = (P.fake_quant(w, scale, zp, qmin, qmax) - w).abs().pow(2.4).sum(1)
    assert (errors["lp"] <= errors["minmax"] + 1e-5).all()
    assert errors["lp"].sum() < 0.9 * errors["minmax"].sum()


def test_lp_search_matches_a_per_channel_brute_force():
    torch.manual_seed(2)
    w = torch.randn(5, 40)
    scale, zp = P.search_scale(w, 3, method="lp", p=2.4)
    qmin, qmax = P.int_range(3, False)
    for c in range(5):  # reference: one channel at a time
        best = math.inf
        for i in range(P.NUM_CLIP_CANDIDATES):
            r = 1 - P.CLIP_STEP * i
            s, z = P.scale_from_range(w[c].min() * r, w[c].max() * r, qmin, qmax, False)
            best = min(best, float((P.fake_quant(w[c], s, z, qmin, qmax) - w[c]).abs().pow(2.4).sum()))
        got = float((P.fake_quant(w[c], scale[c], zp[c], qmin, qmax) - w[c]).abs().pow(2.4).sum())
        assert got == pytest.approx(best, rel=1e-4)


def test_round_ste_passes_gradient_straight_through():
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    P.round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_scale_receives_gradient_for_step_size_learning():
    x = torch.randn(100)
    scale = torch.tensor(0.1, requires_grad=True)
    P.fake_quant(x, scale, torch.tensor(8.0), 0, 15).pow(2).sum().backward()
    assert scale.grad is not None and scale.grad != 0


def test_adaround_starts_at_the_float_weight_and_hard_rounding_moves_at_most_one_step():
    torch.manual_seed(3)
    w = torch.randn(8, 4, 3, 3)
    scale, zp = P.search_scale(w, 4, method="minmax")
    qmin, qmax = P.int_range(4, False)
    w_floor, v = P.adaround_init(w, scale)
    soft = P.adaround_fake_quant(w_floor, P.rectified_sigmoid(v), scale, zp, qmin, qmax)
    representable = (w >= (qmin - zp) * scale) & (w <= (qmax - zp) * scale)
    assert representable.float().mean() > 0.9
    assert torch.allclose(soft[representable], w[representable], atol=1e-5)
    v_random = torch.randn_like(v) * 5
    hard = P.adaround_fake_quant(w_floor, (v_random >= 0).float(), scale, zp, qmin, qmax)
    codes = torch.round(hard / scale + zp) - zp
    nearest = P.fake_quant(w, scale, zp, qmin, qmax)
    assert ((codes - w_floor)[representable] >= 0).all()
    assert ((codes - w_floor)[representable] <= 1).all()
    # Hard rounding is never more than one step from round-to-nearest.
    assert ((hard - nearest).abs() <= scale + 1e-6).all()


def test_rectified_sigmoid_reaches_exact_zero_and_one():
    h = P.rectified_sigmoid(torch.tensor([-20.0, 0.0, 20.0]))
    assert h[0] == 0 and h[2] == 1 and 0 < h[1] < 1


def test_rounding_regularizer_is_zero_when_rounding_is_decided():
    v = torch.tensor([-20.0, 20.0, -30.0])
    assert P.rounding_regularizer(v, 2.0) == 0
    assert P.rounding_regularizer(torch.zeros(3), 2.0) == pytest.approx(3.0)


def test_beta_schedule_warms_up_then_anneals_linearly():
    total = 1000
    assert P.beta_schedule(0, total, 0.2, 20, 2) is None
    assert P.beta_schedule(199, total, 0.2, 20, 2) is None
    assert P.beta_schedule(200, total, 0.2, 20, 2) == pytest.approx(20)
    assert P.beta_schedule(600, total, 0.2, 20, 2) == pytest.approx(11)
    assert P.beta_schedule(999, total, 0.2, 20, 2) == pytest.approx(2, abs=0.05)


def test_lp_error_weights_elements():
    pred, target = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    assert P.lp_error(pred, target) == pytest.approx(3.0)  # summed over channels
    weight = torch.zeros_like(pred)
    assert P.lp_error(pred, target, weight=weight) == 0


@pytest.mark.parametrize("p", [2.0, 2.4])
@pytest.mark.parametrize("weighted", [False, True])
def test_lp_error_gradient_matches_autograd_and_keeps_the_layout(p, weighted):
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 4, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    target = torch.randn(2, 3, 4, 5, generator=gen)
    weight = torch.rand(2, 3, 4, 5, generator=gen) if weighted else None
    reference_pred = pred.clone().requires_grad_()
    err = (reference_pred - target).abs().pow(p)
    if weighted:
        err = err * weight
    reference = err.mean() * 3
    reference.backward()
    pred.requires_grad_()
    loss = P.lp_error(pred, target, p, weight)
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(pred.grad, reference_pred.grad)
    # A channels-last output gets a channels-last gradient (a mixed layout is slow downstream).
    assert pred.grad.is_contiguous(memory_format=torch.channels_last)


def test_round_bias_lands_on_the_int32_grid_and_passes_gradient():
    bias = torch.tensor([0.123456, -2.5e-3, 7.0], requires_grad=True)
    step = torch.tensor([1e-3, 1e-4, 3e-3])
    rounded = P.round_bias(bias, step)
    codes = rounded.detach() / step
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert ((rounded - bias).abs() <= step / 2 + 1e-7).all()
    assert torch.equal(P.bias_to_int(bias.detach(), step), torch.tensor([123.0, -25.0, 2333.0]))
    rounded.sum().backward()
    assert torch.equal(bias.grad, torch.ones(3))


def test_bias_codes_saturate_inside_int32():
    codes = P.bias_to_int(torch.tensor([1e12, -1e12]), torch.tensor(1e-3))
    assert torch.equal(codes.to(torch.int32).to(torch.float32), codes)  # no overflow on the cast
    assert codes[0] > 2.1e9 and codes[1] < -2.1e9


# ----------------------------------------------------------------------------- log2 quantizer


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_log2_codes_are_powers_of_two_of_the_scale_or_zero(bits):
    x = torch.softmax(torch.randn(64, 17) * 3, dim=-1)
    scale = torch.tensor(0.8)
    xq = P.log2_fake_quant(x, scale, bits)
    levels = P.log2_levels(bits)
    k = -torch.log2(xq[xq > 0] / scale)
    assert torch.allclose(k, k.round(), atol=1e-5)
    assert k.min() >= 0 and k.max() <= levels - 1
    # Rounding in the log domain: each nonzero value is within a factor sqrt(2) of its input.
    kept = (xq > 0) & (x <= scale)
    ratio = xq[kept] / x[kept]
    assert (ratio <= 2**0.5 + 1e-5).all() and (ratio >= 2**-0.5 - 1e-5).all()
    assert (xq[x > scale] == scale).all()  # clipped above


def test_log2_zero_and_tiny_values_take_the_zero_code():
    scale = torch.tensor(1.0)
    x = torch.tensor([0.0, 2.0**-20, 2.0**-14, 2.0**-13, 1.0, -0.5])
    xq = P.log2_fake_quant(x, scale, 4)  # 15 powers: 2^0 .. 2^-14, then exactly 0
    assert xq.tolist() == [0.0, 0.0, 2.0**-14, 2.0**-13, 1.0, 0.0]


def test_log2_gradients_pass_straight_through_and_reach_the_scale():
    x = torch.tensor([0.3, 0.05, 2.0], requires_grad=True)
    scale = torch.tensor(1.0, requires_grad=True)
    xq = P.log2_fake_quant(x, scale, 4)
    xq.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # inside the range straight through, clipped: none
    v = x.detach().clamp(max=1.0)
    expected = (xq.detach() / scale.detach() - v).sum()  # LSQ: Q(v) - v, and 1 for the clipped
    assert scale.grad.item() == pytest.approx(expected.item() + 1.0, abs=1e-6)
    assert torch.isfinite(P.log2_fake_quant(torch.zeros(3, requires_grad=True), scale, 4)).all()


def test_log2_scale_search_beats_the_maximum_in_lp_error():
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(256, 32) * 2, dim=-1)
    best = P.search_log2_scale(x, 4, method="lp")
    top = P.search_log2_scale(x, 4, method="minmax")
    assert top == x.max()
    err = lambda s: (P.log2_fake_quant(x, s, 4) - x).abs().pow(2.4).sum()  # noqa: E731
    assert err(best) <= err(top)
    assert 0.2 * x.max() <= best <= x.max()


@pytest.mark.parametrize("with_keep", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_lsq_fake_quant_matches_autograd_through_fake_quant(with_keep, symmetric):
    """Values and gradients of the fused version against plain autograd (QDrop: `where`), with
    codes landing exactly on the range ends and outside it."""
    torch.manual_seed(0)
    qmin, qmax = P.int_range(4, symmetric)
    x = torch.randn(4, 3, 8, 8) * 3
    x[0, 0, 0, :3] = torch.tensor([qmin, qmax, 0.0]) * 0.37  # codes exactly on the range ends
    zero_point = torch.tensor(0.0 if symmetric else 3.0)
    keep = (torch.rand(x.shape) < 0.5).float() if with_keep else None
    grad = torch.randn(x.shape)
    results = []
    for fused in (True, False):
        scale = torch.tensor(0.37, requires_grad=True)
        xi = x.clone().requires_grad_()
        if fused:
            out = P.lsq_fake_quant(xi, scale, zero_point, qmin, qmax, keep)
        else:
            out = P.fake_quant(xi, scale, zero_point, qmin, qmax)
            out = out if keep is None else torch.where(keep.bool(), xi, out)
        out.backward(grad)
        results.append((out.detach(), xi.grad, scale.grad))
    (out, gx, gs), (ref_out, ref_gx, ref_gs) = results
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, ref_gx)
    torch.testing.assert_close(gs, ref_gs, rtol=1e-4, atol=1e-4)
    assert gx.eq(0).any() and gx.ne(0).any()  # both clipped and passed elements were exercised


def test_lsq_fake_quant_without_gradients_gives_the_same_values():
    x = torch.randn(2, 5, 7)
    scale, zero_point = torch.tensor(0.2), torch.tensor(0.0)
    with torch.no_grad():
        plain = P.lsq_fake_quant(x, scale, zero_point, -8, 7)
    torch.testing.assert_close(plain, P.fake_quant(x, scale, zero_point, -8, 7), rtol=0, atol=1e-6)


@pytest.mark.parametrize("prob", [0.5, 0.3, 1.0])
def test_keep_mask_is_zero_one_with_the_asked_probability_and_seeded(prob):
    like = torch.empty(64, 33, 17)
    mask = P.keep_mask(like, prob, torch.Generator().manual_seed(1))
    assert mask.shape == like.shape and mask.dtype == like.dtype
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert abs(mask.mean().item() - prob) < 0.01
    again = P.keep_mask(like, prob, torch.Generator().manual_seed(1))
    other = P.keep_mask(like, prob, torch.Generator().manual_seed(2))
    assert torch.equal(mask, again)
    assert prob == 1.0 or not torch.equal(mask, other)
    # Neighbouring elements are independent (no pattern from packing several into one word).
    if prob < 1:
        flat = mask.reshape(-1)
        both = (flat[:-1] * flat[1:]).mean().item()
        assert abs(both - prob * prob) < 0.01
