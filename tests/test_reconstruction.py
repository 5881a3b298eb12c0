"""Reconstruction on a model trained on real data, loss options, determinism, real weights."""

import pytest
import torch

from brecq import BrecqConfig, DataError, prepare, quantize
from brecq.demo import mnist_splits, pretrained_demo_model
from brecq.models.cifar_resnet import cifar_resnet20

FAST = dict(iters_w=200, iters_a=80, calib_size=256, device="cpu")


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    splits = mnist_splits()
    model = pretrained_demo_model(cache_dir=tmp_path_factory.mktemp("demo-cache"))
    return model, splits["calib"][0], splits["test"]


def _accuracy(model, test):
    images, labels = test
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item() * 100


@pytest.mark.parametrize("act_bits", [None, 4], ids=["W2A32", "W2A4"])
def test_brecq_beats_round_to_nearest_and_block_is_not_worse_than_layer(mnist, act_bits):
    model, calib, test = mnist
    fp = _accuracy(model, test)
    acc = {}
    for method, granularity in (("rtn", "block"), ("brecq", "layer"), ("brecq", "block")):
        config = BrecqConfig(weight_bits=2, act_bits=act_bits, method=method,
                             granularity=granularity, **FAST)
        qmodel, _ = quantize(model, calib, config)
        acc[method, granularity] = _accuracy(qmodel, test)
    assert acc["brecq", "block"] > acc["rtn", "block"] + 10
    assert acc["brecq", "block"] >= acc["brecq", "layer"] - 1.0
    assert acc["brecq", "block"] > fp - 4


def test_qdrop_and_fisher_loss_reconstruct_and_help(mnist):
    model, calib, test = mnist
    rtn, _ = quantize(model, calib, BrecqConfig(weight_bits=2, act_bits=4, method="rtn", **FAST))
    for extra in ({"method": "qdrop"}, {"loss": "fisher"}):
        qmodel, report = quantize(model, calib, BrecqConfig(weight_bits=2, act_bits=4,
                                                            **FAST, **extra))
        assert _accuracy(qmodel, test) > _accuracy(rtn, test) + 10, extra
        # An 8-bit first layer starts near zero loss (~3e-4 against 1-20 for the blocks), where
        # QDrop's dropped-input objective and the CPU's float kernels move it by ~1e-4 either way.
        assert all(u.loss_after <= u.loss_before * 1.05 + 1e-3 for u in report.units), extra


def test_report_lists_every_unit_with_losses_and_time(mnist):
    model, calib, _ = mnist
    qmodel, report = quantize(model, calib, BrecqConfig(weight_bits=4, act_bits=8, iters_w=20,
                                                        iters_a=10, calib_size=64, device="cpu"))
    rows = report.to_dict()["units"]
    assert [r["name"] for r in rows if r["phase"] == "weights"] == [u.name for u in qmodel.units]
    assert all(r["seconds"] > 0 and r["params"] > 0 and r["loss_before"] >= 0 for r in rows)


def test_same_seed_gives_identical_quantization_parameters():
    model = cifar_resnet20().eval()
    calib = torch.randn(16, 3, 32, 32)
    config = BrecqConfig(weight_bits=2, act_bits=4, iters_w=5, iters_a=5, calib_size=16,
                         batch_size=4, act_init_samples=8, device="cpu", method="qdrop")
    first, _ = quantize(model, calib, config)
    second, _ = quantize(model, calib, config)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other, _ = quantize(model, calib, config.replace(seed=1))
    assert not all(torch.equal(a[k], other.state_dict()[k]) for k in a)


def test_nan_in_calibration_data_is_refused_naming_the_count():
    calib = torch.randn(8, 3, 32, 32)
    calib[3, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="1 calibration sample"):
        quantize(cifar_resnet20(), calib, BrecqConfig(device="cpu"))


def test_hard_rounding_after_reconstruction_moves_weights_at_most_one_step(mnist):
    model, calib, _ = mnist
    qmodel, _ = quantize(model, calib, BrecqConfig(weight_bits=3, act_bits=None, iters_w=50,
                                                   calib_size=64, device="cpu"))
    for layer in qmodel.layers.values():
        for _, weight, quantizer in layer.weight_quantizers():
            assert quantizer.learned
            floor = torch.floor(weight / quantizer.scale)
            codes = quantizer.int_weight(weight) - quantizer.zero_point
            inside = (floor + quantizer.zero_point >= quantizer.qmin) & (
                floor + 1 + quantizer.zero_point <= quantizer.qmax)
            delta = (codes - floor)[inside]
            assert ((delta == 0) | (delta == 1)).all()


def test_resnet20_reproduces_published_accuracy_and_bn_folding_changes_no_prediction(shared_dir):
    from brecq.data import eval_loader
    from brecq.models import build_model

    model, prep = build_model("cifar_resnet20",
                              weights=str(shared_dir / "weights/cifar10/resnet20.pt"))
    loader = eval_loader(shared_dir / "data/cifar10", prep.to_transform(), batch_size=500,
                         num_workers=2)
    images, labels = zip(*loader)
    images, labels = torch.cat(images), torch.cat(labels)
    assert len(labels) == 10000
    with torch.no_grad():
        fp_pred = torch.cat([model(x).argmax(1) for x in images.split(1000)])
    assert (fp_pred == labels).float().mean().item() * 100 == pytest.approx(81.03, abs=0.005)
    folded = prepare(model, BrecqConfig(), (images[:2],))
    with torch.no_grad(), folded.quantization(weights=False, acts=False):
        folded_pred = torch.cat([folded(x).argmax(1) for x in images.split(1000)])
    assert torch.equal(folded_pred, fp_pred)


@pytest.mark.parametrize("backend,float_bias_layers", [("none", {"conv1"}), ("onnxruntime", set())])
def test_integer_bias_puts_biases_of_quantized_inputs_on_the_int32_grid(backend, float_bias_layers):
    torch.manual_seed(0)
    model = cifar_resnet20().eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.bias.data.normal_(0, 0.1)  # folded biases of a trained model are not all zero
    x = torch.randn(8, 3, 32, 32)
    config = BrecqConfig(method="rtn", weight_bits=4, act_bits=8, calib_size=8, device="cpu",
                         backend=backend)
    qmodel, _ = quantize(model, x, config)
    rounded = {n: layer for n, layer in qmodel.layers.items() if layer.bias_quantizer is not None}
    # Backend none: every layer but the first reads a quantized activation (the first reads the
    # image); onnxruntime quantizes the image too.
    assert set(qmodel.layers) - set(rounded) == float_bias_layers
    for layer in rounded.values():
        step = layer.bias_quantizer.step(layer.weight_quantizer)
        bias = layer.bias_quantizer(layer.bias, layer.weight_quantizer)
        codes = bias / step
        assert torch.allclose(codes, codes.round(), atol=1e-2)
        assert ((bias - layer.bias).abs() <= step / 2 * (1 + 1e-5)).all()
        assert not torch.equal(bias, layer.bias)
        with qmodel.quantization(weights=True, acts=False):  # no input step: float bias
            assert torch.equal(layer.bias_quantizer(layer.bias, layer.weight_quantizer), layer.bias)
    with torch.no_grad():
        on = qmodel(x)
    float_bias, _ = quantize(model, x, config.replace(integer_bias=False))
    assert all(layer.bias_quantizer is None for layer in float_bias.layers.values())
    with torch.no_grad():
        off = float_bias(x)
    # The shift is far below an activation step: outputs move, but only slightly.
    assert not torch.equal(on, off)
    assert (on - off).abs().max() < 0.05 * off.abs().max()


@pytest.mark.parametrize("floor", [0.0, 1.0])
def test_fisher_weights_have_mean_one_and_a_floor_keeps_every_element(mnist, floor):
    from brecq.recon.cache import GRAD, ActivationCache
    from brecq.recon.capture import capture_fisher, float_logits

    model, calib, _ = mnist
    data = calib[:64]
    config = BrecqConfig(weight_bits=2, act_bits=4, loss="fisher", fisher_floor=floor, **FAST)
    qmodel = prepare(model, config, (data[:2],))
    cpu = torch.device("cpu")
    cache = ActivationCache(cpu, cpu)
    capture_fisher(qmodel, qmodel.units[1], data, float_logits(qmodel, data, cpu), cpu, cache,
                   acts=False, floor=floor)
    weights = cache.get(f"{GRAD}0")
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-4)
    # The pure squared gradient leaves most elements with almost no weight; the floor does not.
    assert weights.min().item() >= floor / (1 + floor) - 1e-6
    if floor == 0:
        assert (weights < 0.1).float().mean() > 0.3


def test_negative_fisher_floor_is_refused():
    from brecq import ConfigError

    with pytest.raises(ConfigError, match="fisher_floor"):
        BrecqConfig(loss="fisher", fisher_floor=-1.0)
