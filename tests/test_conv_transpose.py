"""Transposed convolutions are quantized per output channel (weight [in, out / groups, *k]),
fold a following BatchNorm, reconstruct, save and load bit-exactly, and export to ONNX."""

import pytest
import torch
from torch import nn

from brecq import BrecqConfig, load_quantized, prepare, quantize, save_quantized
from brecq.graph.fold_bn import fold_into
from brecq.quant import primitives as P
from brecq.quant.modules import QuantLayer
from brecq.quant.quantizers import ActQuantizer, BiasQuantizer, WeightQuantizer
from test_any_model import _trained_like_batchnorms

TINY = dict(iters_w=2, iters_a=2, calib_size=8, batch_size=4, act_init_samples=4, device="cpu",
            scale_search="minmax")


class _Decoder(nn.Module):
    """Conv -> grouped ConvTranspose2d -> BN -> ReLU -> ConvTranspose2d -> global pool -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 12, 3, stride=2, padding=1, output_padding=1, groups=4)
        self.bn = nn.BatchNorm2d(12)
        self.up2 = nn.ConvTranspose2d(12, 6, 2, stride=2)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.up(torch.relu(self.conv(x)))))
        return self.head(torch.relu(self.up2(y)).mean((2, 3)))


def _decoder() -> _Decoder:
    torch.manual_seed(0)
    model = _Decoder()
    _trained_like_batchnorms(model.bn)
    return model.eval()


def _hand_channel_range(weight: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max per output channel of a transposed convolution's weight, one loop each."""
    cin, cout_per_group = weight.shape[:2]
    rows = cin // groups
    lo, hi = [], []
    for g in range(groups):
        for j in range(cout_per_group):
            values = weight[g * rows:(g + 1) * rows, j]
            lo.append(values.min())
            hi.append(values.max())
    return torch.stack(lo), torch.stack(hi)


@pytest.mark.parametrize("groups", [1, 4])
def test_per_channel_scales_are_per_output_channel(groups):
    layer = nn.ConvTranspose2d(8, 12, 3, groups=groups)
    with torch.no_grad():  # output channels with very different ranges
        layer.weight.mul_(torch.arange(1, 12 // groups + 1).reshape(1, -1, 1, 1))
    quantizer = WeightQuantizer(4, channel_axis=1, groups=groups)
    quantizer.calibrate(layer.weight, method="minmax")
    lo, hi = _hand_channel_range(layer.weight.detach(), groups)
    scale, zero_point = P.scale_from_range(lo, hi, quantizer.qmin, quantizer.qmax, False)
    torch.testing.assert_close(quantizer.channel_scale(), scale)
    # Each weight element is quantized with its own output channel's scale and zero point.
    out_major = P.output_major(layer.weight.detach(), groups)
    expected = P.fake_quant(out_major, scale.reshape(-1, 1, 1, 1),
                            zero_point.reshape(-1, 1, 1, 1), quantizer.qmin, quantizer.qmax)
    torch.testing.assert_close(P.output_major(quantizer(layer.weight), groups), expected)


def test_output_major_matches_the_grouped_convolution():
    """The rearranged weight is the weight of the convolution each output channel computes."""
    layer = nn.ConvTranspose2d(8, 12, 3, groups=4, bias=False)
    out_major = P.output_major(layer.weight.detach(), 4)
    x = torch.randn(2, 8, 5, 5)
    for o in range(12):
        g = o // 3
        alone = nn.functional.conv_transpose2d(
            x[:, g * 2:(g + 1) * 2], out_major[o].unsqueeze(1))
        torch.testing.assert_close(layer(x)[:, o:o + 1], alone)


@pytest.mark.parametrize("cls,shape", [(nn.ConvTranspose1d, (2, 8, 9)),
                                       (nn.ConvTranspose2d, (2, 8, 7, 7)),
                                       (nn.ConvTranspose3d, (2, 8, 4, 4, 4))])
def test_eight_bit_transposed_convolution_stays_close_to_float(cls, shape):
    torch.manual_seed(0)
    layer = cls(8, 12, 3, stride=2, padding=1, groups=4).eval()
    quantized = QuantLayer(layer, WeightQuantizer(8, channel_axis=1, groups=4))
    quantized.weight_quantizer.calibrate(layer.weight.detach())
    x = torch.randn(*shape)
    with torch.no_grad():
        ref, out = layer(x), quantized(x)
        size = [s * 2 for s in shape[2:]]  # output_size picks the output padding
        assert quantized(x, size).shape == layer(x, size).shape
        torch.testing.assert_close(quantized(x, size), layer(x, size), atol=0.02, rtol=0.0)
    assert (out - ref).abs().max() <= 0.01 * ref.abs().max()


def test_integer_bias_step_is_per_output_channel():
    layer = nn.ConvTranspose2d(8, 12, 3, groups=4)
    quantizer = WeightQuantizer(8, channel_axis=1, groups=4)
    quantizer.calibrate(layer.weight.detach())
    act = ActQuantizer(8)
    act.set_scale(torch.tensor(0.5), torch.tensor(0.0))
    step = BiasQuantizer(act).step(quantizer)
    assert step.shape == (12,)
    torch.testing.assert_close(step, 0.5 * P.search_scale(
        P.output_major(layer.weight.detach(), 4), 8)[0].reshape(-1))


@pytest.mark.parametrize("groups", [1, 4])
def test_batchnorm_folds_into_a_transposed_convolution(groups):
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(8, 12, 3, stride=2, groups=groups).eval()
    bn = _trained_like_batchnorms(nn.BatchNorm2d(12), seed=2)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        ref = bn(layer(x))
        fold_into(layer, bn)
        torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_decoder_is_fully_quantized_with_its_batchnorm_folded():
    model = _decoder()
    x = torch.randn(4, 3, 8, 8)
    qmodel = prepare(model, BrecqConfig(weight_bits=8, act_bits=8, **TINY), (x,))
    assert set(qmodel.layers) == {"conv", "up", "up2", "head"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.network.modules())
    with torch.no_grad(), qmodel.quantization(weights=False, acts=False):
        torch.testing.assert_close(qmodel(x), model(x), atol=1e-5, rtol=1e-5)


def test_reconstruction_lowers_the_loss_of_a_transposed_convolution_unit():
    model = _decoder()
    config = BrecqConfig(weight_bits=3, act_bits=None, first_last_bits=None, granularity="layer",
                         iters_w=200, weight_lr=0.05, calib_size=16, batch_size=8, device="cpu")
    qmodel, report = quantize(model, torch.randn(16, 3, 8, 8), config)
    unit = next(u for u in report.units if u.name == "up" and u.phase == "weights")
    assert unit.loss_after < unit.loss_before
    layer = qmodel.layers["up"]
    quantizer = layer.weight_quantizer
    nearest = torch.clamp(torch.round(layer.weight / quantizer.scale) + quantizer.zero_point,
                          quantizer.qmin, quantizer.qmax)
    assert quantizer.learned and not torch.equal(quantizer.int_weight(layer.weight), nearest)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = _decoder()
    x = torch.randn(16, 3, 8, 8)
    config = BrecqConfig(weight_bits=4, act_bits=8, first_last_bits=None, **TINY)
    qmodel, _ = quantize(model, x, config)
    save_quantized(qmodel.eval(), tmp_path, config=config, example_input=x[:2], pack=True)
    loaded = load_quantized(_decoder(), tmp_path)
    with torch.no_grad():
        assert torch.equal(qmodel(x), loaded(x))


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    np = pytest.importorskip("numpy")
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from brecq.export import export_onnx

    model = _decoder()
    config = BrecqConfig(weight_bits=4, act_bits=8, first_last_bits=None, **TINY)
    qmodel, _ = quantize(model, torch.randn(16, 3, 8, 8), config)
    path = export_onnx(qmodel.eval(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    graph = onnx.load(str(path)).graph
    axes = [a.i for n in graph.node if n.op_type == "DequantizeLinear" for a in n.attribute
            if a.name == "axis"]
    assert 1 in axes  # the ungrouped transposed convolution's weight, per output channel
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        ref = qmodel(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": x.numpy()})[0]
    assert np.abs(out - ref).max() <= 5e-2 * np.abs(ref).max()
