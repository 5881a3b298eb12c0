"""LayerNorm output reparameterization: the math alone, the graph pass, the pipeline, artifacts."""

import copy

import pytest
import torch
from torch import nn

from brecq import BrecqConfig, ConfigError, load_quantized, quantize, save_quantized
from brecq.graph.reparam import (
    layernorm_reparameterized,
    plan_layernorm_reparam,
    reparameterize_layernorms,
)
from brecq.quant.primitives import int_range, quantize_to_int
from brecq.quant.reparam import (
    layernorm_reparam_factors,
    per_channel_params,
    reparam_affine,
    reparam_linear_input,
)

timm = pytest.importorskip("timm")


def _uneven_layernorm_output(generator, channels=24, tokens=400):
    """A LayerNorm's normalized input, its affine, and the output, with channel ranges that
    differ by up to 40x and are shifted off zero (as in real ViTs)."""
    normalized = torch.randn(tokens, channels, generator=generator)
    weight = torch.rand(channels, generator=generator) + 0.5
    weight[: channels // 4] *= 20
    bias = torch.randn(channels, generator=generator) * 2
    return normalized, weight, bias, normalized * weight + bias


# ------------------------------------------------------------------------------------ the math


@pytest.mark.parametrize("symmetric", [False, True])
def test_reparameterized_layernorm_then_linear_computes_the_same(symmetric):
    gen = torch.Generator().manual_seed(0)
    normalized, weight, bias, out = _uneven_layernorm_output(gen)
    linear_w = torch.randn(16, 24, generator=gen) / 24
    linear_b = torch.randn(16, generator=gen)
    factors = layernorm_reparam_factors(out.amin(0), out.amax(0), 4, symmetric)
    assert bool(factors.shift.any())  # channels off zero are moved onto the common range

    new_weight, new_bias = reparam_affine(weight, bias, factors)
    new_linear_w, new_linear_b = reparam_linear_input(linear_w, linear_b, factors)
    before = out @ linear_w.T + linear_b
    after = (normalized * new_weight + new_bias) @ new_linear_w.T + new_linear_b
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits,symmetric", [(8, False), (4, False), (4, True)])
def test_per_tensor_codes_of_the_new_output_are_the_per_channel_codes_of_the_old(bits, symmetric):
    gen = torch.Generator().manual_seed(1)
    normalized, weight, bias, out = _uneven_layernorm_output(gen)
    qmin, qmax = int_range(bits, symmetric)
    scales, zero_points = per_channel_params(out.amin(0), out.amax(0), bits, symmetric)
    per_channel = quantize_to_int(out, scales, zero_points, qmin, qmax)

    factors = layernorm_reparam_factors(out.amin(0), out.amax(0), bits, symmetric)
    new_weight, new_bias = reparam_affine(weight, bias, factors)
    per_tensor = quantize_to_int(normalized * new_weight + new_bias, factors.scale,
                                 factors.zero_point, qmin, qmax)
    # Equal (0 of 9,600 codes differ here); float rounding could flip a value within an ulp of
    # a rounding boundary by one step.
    assert int((per_tensor != per_channel).sum()) <= 1
    assert (per_tensor - per_channel).abs().max() <= 1
    # The codes of the per-tensor quantizer use the whole grid in every channel.
    assert bool((per_tensor.amax(0) - per_tensor.amin(0) >= 0.9 * (qmax - qmin)).all())


def test_a_linear_without_bias_needs_the_factors_without_shift():
    gen = torch.Generator().manual_seed(2)
    _, _, _, out = _uneven_layernorm_output(gen)
    factors = layernorm_reparam_factors(out.amin(0), out.amax(0), 8)
    with pytest.raises(ValueError, match="without_shift"):
        reparam_linear_input(torch.randn(4, 24), None, factors)
    weight, bias = reparam_linear_input(torch.randn(4, 24), None, factors.without_shift())
    assert bias is None and weight.shape == (4, 24)


def test_factors_refuse_ranges_of_different_shapes():
    with pytest.raises(ValueError, match="1-D"):
        layernorm_reparam_factors(torch.zeros(3), torch.ones(4), 8)


# ------------------------------------------------------------------------------------ the pass


def _tiny_vit(seed=0):
    """A random-weight timm ViT shaped like a trained one: a few LayerNorm output channels 20x
    wider (and off zero) than the rest, and the Linears that read them with 20x smaller weights
    in those columns (the float function stays well conditioned)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                              num_classes=10).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for norm, reader in ((block.norm1, block.attn.qkv), (block.norm2, block.mlp.fc1)):
                wide = torch.randperm(48, generator=gen)[:6]
                norm.bias.normal_(0.0, 0.5, generator=gen)
                norm.weight[wide] *= 20
                norm.bias[wide] *= 20
                reader.weight[:, wide] /= 20
    return model


def _images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_timm_vit_norm1_and_norm2_are_folded_and_outputs_unchanged():
    model = _tiny_vit()
    x = _images(16)
    with torch.no_grad():
        before = model(x)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    work, report = layernorm_reparameterized(model, x, 8)
    assert report.reparameterized == {
        f"blocks.{b}.{norm}": (f"blocks.{b}.{reader}",)
        for b in range(2) for norm, reader in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1"))
    }
    assert "norm" in report.skipped  # the final norm feeds the class-token selection
    assert work is not model and all(torch.equal(v, original[k])
                                     for k, v in model.state_dict().items())
    assert not torch.equal(work.blocks[0].norm1.weight, model.blocks[0].norm1.weight)
    with torch.no_grad():
        torch.testing.assert_close(work(x), before, atol=1e-4, rtol=1e-4)


def test_torchvision_vit_layernorms_before_self_attention_and_mlp_are_folded():
    import torchvision.models as tvm

    torch.manual_seed(0)
    model = _uneven(tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                          hidden_dim=32, mlp_dim=64)).eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)  # zero-initialized: outputs would be 0
    x = _images(8)
    with torch.no_grad():
        before = model(x)
    work, report = layernorm_reparameterized(model, x, 8)
    layers = "encoder.layers.encoder_layer_"
    assert report.reparameterized == {
        f"{layers}{b}.{norm}": (f"{layers}{b}.{reader}",)
        for b in range(2) for norm, reader in (("ln_1", "self_attention"), ("ln_2", "mlp.0"))
    }
    with torch.no_grad():
        torch.testing.assert_close(work(x), before, atol=1e-4, rtol=1e-4)


class _PreLN(nn.Module):
    """nn.LayerNorm modules: one read by two Linears through dropout (one without bias)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.drop = nn.Dropout(0.1)
        self.up = nn.Linear(16, 32)
        self.gate = nn.Linear(16, 32, bias=False)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        y = self.drop(self.norm(x))
        return x + self.down(self.up(y) * self.gate(y))


class _PostLN(nn.Module):
    """BERT's layout: the LayerNorm output is the next sublayer's input and its residual."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.norm1 = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 16)
        self.norm2 = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.norm1(x + self.fc1(x))
        x = self.norm2(x + self.fc2(x))
        return self.head(x)


def _uneven(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight[:3] *= 20
                module.bias.uniform_(-1, 1, generator=torch.Generator().manual_seed(3))
    return model


def test_layernorm_modules_read_through_dropout_are_folded_without_shift_for_a_biasless_reader():
    torch.manual_seed(0)
    model = _uneven(_PreLN()).train()  # dropout must not disturb the measured ranges
    reference = copy.deepcopy(model).eval()
    x = torch.randn(8, 5, 16)
    report = reparameterize_layernorms(model, x, 8)
    assert report.reparameterized == {"norm": ("up", "gate")}
    assert model.training  # left in the mode it was in
    assert model.norm.bias is not None and not torch.equal(model.norm.weight, reference.norm.weight)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), atol=1e-5, rtol=1e-5)


def test_post_layernorm_feeding_a_residual_add_is_skipped_with_the_reason():
    plan = plan_layernorm_reparam(_uneven(_PostLN()))
    assert plan.skipped == {"norm1": "its output is also read by add, which a Linear's weights"
                                     " cannot absorb"}
    # The last LayerNorm feeds only the head: that one is folded.
    assert [(c.name, c.linears) for c in plan.candidates] == [("norm2", ("head",))]


def test_hugging_face_bert_layernorms_are_never_folded():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=16)
    plan = plan_layernorm_reparam(transformers.BertModel(config).eval())
    # Post-LN: every LayerNorm output is also a residual (or the graph cannot be traced at all).
    assert plan.candidates == [] and plan.skipped


def test_shared_linear_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.fc(self.norm(x)))

    plan = plan_layernorm_reparam(Shared())
    assert plan.candidates == [] and "called more than once" in plan.skipped["norm"]


def test_ranks_fold_the_ranges_of_the_union_of_their_shards():
    model, shards = _tiny_vit(), (_images(8, seed=1), _images(8, seed=2))
    whole, _ = layernorm_reparameterized(model, torch.cat(shards), 4)
    other_rank: list[torch.Tensor] = []
    layernorm_reparameterized(model, shards[1], 4, gather=lambda t: other_rank.append(t) or t)
    # What DistContext.gather gives rank 0: its tensor, then rank 1's, concatenated.
    rank0, _ = layernorm_reparameterized(model, shards[0], 4,
                                         gather=lambda t: torch.cat([t, other_rank.pop(0)]))
    assert not other_rank
    assert all(torch.equal(a, b) for a, b in zip(rank0.state_dict().values(),
                                                  whole.state_dict().values()))


def test_a_model_without_layernorm_comes_back_unchanged():
    from brecq.models import cifar_resnet20

    model = cifar_resnet20()
    work, report = layernorm_reparameterized(model, torch.randn(2, 3, 32, 32), 4)
    assert work is model and report.reparameterized == {} and report.skipped == {}


# ------------------------------------------------------------------------------------ pipeline


def _rtn(act_bits, weight_bits, reparam, **extra):
    return BrecqConfig(weight_bits=weight_bits, act_bits=act_bits, method="rtn", calib_size=32,
                       batch_size=16, act_init_samples=32, device="cpu",
                       layernorm_reparam=reparam, **extra)


def _relative_error(qmodel, model, x):
    with torch.no_grad():
        ref = model(x)
        return float((qmodel(x) - ref).norm() / ref.norm())


# The onnxruntime placement also quantizes the residual stream; in this random ViT its first sum
# (class token + position embedding, whose class-token row the next LayerNorm scales up a lot)
# costs a relative error of about 0.3 at any bit width, which the LayerNorm outputs do not
# change: there the gain shows at 4 bits, and at 8 bits only as "smaller".
@pytest.mark.parametrize("bits,backend,at_most", [(8, "none", 0.5), (4, "none", 0.5),
                                                  (4, "onnxruntime", 0.5),
                                                  (8, "onnxruntime", 0.99)])
def test_reparameterization_lowers_the_round_to_nearest_error_of_a_vit(bits, backend, at_most):
    model = _tiny_vit()
    calib, test = _images(32, seed=1), _images(64, seed=2)
    errors = {}
    for reparam in (False, True):
        qmodel, _ = quantize(model, calib, _rtn(bits, bits, reparam, backend=backend))
        errors[reparam] = _relative_error(qmodel.eval(), model, test)
    print(f"W{bits}A{bits} {backend}: relative output error without reparameterization "
          f"{errors[False]:.4f}, with {errors[True]:.4f}")
    assert errors[True] < at_most * errors[False]


def test_save_and_load_are_bit_exact_with_reparameterized_layernorms(tmp_path):
    model = _tiny_vit()
    qmodel, _ = quantize(model, _images(32, seed=1), _rtn(8, 4, True))
    norm = qmodel.network.get_submodule("blocks.0.norm1")
    assert not torch.equal(norm.weight.detach(), model.blocks[0].norm1.weight.detach())
    save_quantized(qmodel, tmp_path, config=_rtn(8, 4, True), example_input=_images(1))
    loaded = load_quantized(_tiny_vit(), tmp_path)
    x = _images(8, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel.eval()(x))


def test_onnx_export_runs_with_reparameterized_layernorms(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from brecq.export import export_onnx

    model = _tiny_vit()
    qmodel, _ = quantize(model, _images(32, seed=1), _rtn(8, 8, True))
    path = export_onnx(qmodel.eval(), tmp_path / "vit.onnx", _images(1))
    x = _images(4, seed=3)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        ref = qmodel(x)
    assert float((out - ref).norm() / ref.norm()) < 0.05


# ------------------------------------------------------------------------------------ config


def test_config_field_defaults_on_round_trips_and_is_validated():
    assert BrecqConfig().layernorm_reparam is True
    assert "layernorm_reparam" in BrecqConfig().scheme.__dataclass_fields__
    config = BrecqConfig(layernorm_reparam=False)
    assert BrecqConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="layernorm_reparam"):
        BrecqConfig(layernorm_reparam="yes")
