"""Save -> load round trips, artifact errors, and ONNX QDQ export run by onnxruntime."""

import json

import pytest
import torch
from torch import nn

from brecq import BrecqConfig, ModelError, load_quantized, quantize, save_quantized
from brecq.export import read_model_info
from brecq.export.artifact import pack_codes, unpack_codes
from brecq.models import cifar_resnet20

TINY = dict(iters_w=5, iters_a=5, calib_size=16, batch_size=8, act_init_samples=8, device="cpu")


def _tiny_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 10),
    ).eval()


@pytest.fixture(scope="module")
def tiny_w4a4():
    torch.manual_seed(0)
    model = _tiny_model()
    x = torch.randn(32, 3, 8, 8)
    config = BrecqConfig(weight_bits=4, act_bits=4, first_last_bits=None, **TINY)
    qmodel, _ = quantize(model, x[:16], config)
    return model, qmodel.eval(), config, x


def _learned_codes_differ_from_nearest(qmodel) -> bool:
    for q, w in ((q, w) for layer in qmodel.layers.values() for _, w, q in layer.weight_quantizers()):
        nearest = torch.clamp(torch.round(w / q.scale) + q.zero_point, q.qmin, q.qmax)
        if q.learned and not torch.equal(q.int_weight(w), nearest):
            return True
    return False


@pytest.mark.parametrize("pack", [False, True])
def test_round_trip_is_bit_exact_with_learned_rounding(tiny_w4a4, tmp_path, pack):
    model, qmodel, config, x = tiny_w4a4
    assert _learned_codes_differ_from_nearest(qmodel)  # AdaRound moved some codes
    save_quantized(qmodel, tmp_path, config=config, model_info={"name": "tiny"},
                   example_input=x[:2], pack=pack)
    loaded = load_quantized(_tiny_model(), tmp_path)  # float weights of a fresh model: unused
    with torch.no_grad():
        assert torch.equal(qmodel(x), loaded(x))
    info = read_model_info(tmp_path)
    assert info["name"] == "tiny" and info["input_shape"] == [2, 3, 8, 8]
    assert {m["bits"] for m in info["quantized_weights"]} == {4}
    assert all(m["packed"] == pack for m in info["quantized_weights"])
    # A4 where layers read; the pooling input (no layer reads it) is 8-bit under the onnxruntime
    # placement.
    assert {m["qmax"] for m in info["act_quantizers"]} == {15, 255}
    assert info["size"]["artifact_bytes"] == (tmp_path / "quantized.safetensors").stat().st_size


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack(bits):
    codes = torch.randint(0, 2**bits, (37,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == {2: 10, 3: 19, 4: 19, 8: 37}[bits]
    assert torch.equal(unpack_codes(packed, bits, 37), codes)


def test_resnet20_round_trip_packed_2_and_4_bit(tmp_path):
    model = cifar_resnet20().eval()
    x = torch.randn(16, 3, 32, 32)
    # 2-bit layers, 4-bit first/last layers: one run covers both packings.
    config = BrecqConfig(weight_bits=2, act_bits=4, first_last_bits=4, **TINY)
    qmodel, _ = quantize(model, x, config)
    qmodel.eval()
    with torch.no_grad():
        expected = qmodel(x[:4])
    for pack in (True, False):
        out = tmp_path / f"pack{pack}"
        save_quantized(qmodel, out, config=config, example_input=x[:1], pack=pack)
        loaded = load_quantized(cifar_resnet20(), out)
        with torch.no_grad():
            assert torch.equal(expected, loaded(x[:4]))
        info = read_model_info(out)
        assert {m["bits"] for m in info["quantized_weights"]} == {2, 4}
        size = info["size"]
        assert size["artifact_bytes"] < size["float32_bytes"] / (6 if pack else 3)


def test_truncated_artifact_raises(tiny_w4a4, tmp_path):
    model, qmodel, config, x = tiny_w4a4
    save_quantized(qmodel, tmp_path, config=config, example_input=x[:2])
    path = tmp_path / "quantized.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelError, match="corrupted or truncated"):
        load_quantized(model, tmp_path)


def test_missing_and_unknown_version_raise(tiny_w4a4, tmp_path):
    model, qmodel, config, x = tiny_w4a4
    with pytest.raises(ModelError, match="does not exist"):
        load_quantized(model, tmp_path / "nope")
    save_quantized(qmodel, tmp_path, config=config, example_input=x[:2])
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelError, match="config.json is missing"):
        load_quantized(model, tmp_path)
    info = json.loads((tmp_path / "model.json").read_text())
    info["format_version"] = 99
    (tmp_path / "model.json").write_text(json.dumps(info))
    with pytest.raises(ModelError, match="format version 99"):
        read_model_info(tmp_path)


def _drop_first_code_tensor(tensors: dict) -> None:
    del tensors[next(k for k in tensors if k.endswith("/codes"))]


def _shorten_first_code_tensor(tensors: dict) -> None:
    key = next(k for k in tensors if k.endswith("/codes"))
    tensors[key] = tensors[key][:-1].clone()


@pytest.mark.parametrize("corrupt,message", [
    (_drop_first_code_tensor, "has no tensor .* does not belong to its model.json"),
    (_shorten_first_code_tensor, "does not match .* codes, not"),
])
def test_weights_file_not_matching_model_json_raises(tiny_w4a4, tmp_path, corrupt, message):
    from safetensors.torch import load_file, save_file

    model, qmodel, config, x = tiny_w4a4
    save_quantized(qmodel, tmp_path, config=config, example_input=x[:2])
    path = tmp_path / "quantized.safetensors"
    tensors = load_file(str(path))
    corrupt(tensors)
    save_file(tensors, str(path))
    with pytest.raises(ModelError, match=message):
        load_quantized(model, tmp_path)


def test_model_json_not_json_raises(tiny_w4a4, tmp_path):
    model, qmodel, config, x = tiny_w4a4
    save_quantized(qmodel, tmp_path, config=config, example_input=x[:2])
    (tmp_path / "model.json").write_text('{"format": "brecq-quantized", ')
    with pytest.raises(ModelError, match="model.json is not valid JSON"):
        load_quantized(model, tmp_path)


def test_mismatched_model_raises(tiny_w4a4, tmp_path):
    model, qmodel, config, x = tiny_w4a4
    save_quantized(qmodel, tmp_path, config=config, example_input=x[:2])
    wider = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 10),
    ).eval()
    with pytest.raises(ModelError, match="does not match"):
        load_quantized(wider, tmp_path)
    with pytest.raises(ModelError, match="does not"):
        load_quantized(cifar_resnet20(), tmp_path)  # input shape does not even fit


# ------------------------------------------------------------------------------------ ONNX


@pytest.mark.parametrize("weight_bits,act_bits,opset", [(4, 8, 17), (8, 8, 17), (4, 4, 17), (4, 8, 21)])
def test_onnx_qdq_matches_pytorch(tmp_path, weight_bits, act_bits, opset):
    np = pytest.importorskip("numpy")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from brecq.export import export_onnx

    torch.manual_seed(0)
    model = _tiny_model()
    config = BrecqConfig(weight_bits=weight_bits, act_bits=act_bits, first_last_bits=None, **TINY)
    qmodel, _ = quantize(model, torch.randn(16, 3, 8, 8), config)
    path = export_onnx(qmodel.eval(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), opset=opset)
    x = torch.randn(500, 3, 8, 8)
    with torch.no_grad():
        ref = qmodel(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": x.numpy()})[0]
    # Quantization and the int32 biases are bit-exact; elements near a rounding boundary may
    # flip by one step because onnxruntime accumulates and requantizes in another order.
    rel = np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.median(rel) <= 1e-3
    assert np.abs(out - ref).max() <= 5e-2 * np.abs(ref).max()
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99
    print(f"W{weight_bits}A{act_bits} opset {opset}: max |diff| {np.abs(out - ref).max():.3g}, "
          f"median rel L2 {np.median(rel):.2e}, p99 {np.quantile(rel, 0.99):.2e}, argmax "
          f"agreement {(out.argmax(1) == ref.argmax(1)).mean():.4f}")


def test_act_clip_makes_a4_codes_exact():
    """An A4 quantizer inside uint8 storage: Clip + Q/DQ reproduce PyTorch's values exactly."""
    from brecq.export.onnx_qdq import _ActQDQ
    from brecq.quant.quantizers import ActQuantizer

    q = ActQuantizer(4)
    q.calibrate(torch.randn(1000))
    qdq = _ActQDQ(q)
    assert qdq.clip is not None and qdq.zero_point.dtype == torch.uint8
    x = torch.linspace(-10, 10, 10001)
    lo, hi = qdq.clip
    # What ONNX computes: saturate(round(clip(x) / s) + zp) to 0..255, then dequantize.
    codes = torch.clamp(torch.round(x.clamp(lo, hi) / qdq.scale) + int(qdq.zero_point), 0, 255)
    assert codes.min() == 0 and codes.max() == 15
    assert torch.equal((codes - int(qdq.zero_point)) * qdq.scale, q(x))


def test_save_without_example_input_uses_the_prepared_shape(tmp_path):
    from brecq.demo import DemoResNet

    model = DemoResNet().eval()
    calib = torch.randn(16, 1, 28, 28)
    config = BrecqConfig(weight_bits=2, act_bits=4, iters_w=5, iters_a=5, calib_size=16,
                         batch_size=8, act_init_samples=8, device="cpu")
    qmodel, _ = quantize(model, calib, config)
    save_quantized(qmodel, tmp_path / "art", config=config)
    loaded = load_quantized(DemoResNet().eval(), tmp_path / "art")
    with torch.no_grad():
        assert torch.equal(loaded(calib), qmodel(calib))


@pytest.mark.parametrize("backend,integer_biases", [("none", 2), ("onnxruntime", 3)])
def test_onnx_holds_integer_biases_as_int32_codes_equal_to_pytorch(tmp_path, backend, integer_biases):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from brecq.export import export_onnx

    torch.manual_seed(0)
    qmodel, _ = quantize(_tiny_model(), torch.randn(16, 3, 8, 8),
                         BrecqConfig(weight_bits=4, act_bits=8, first_last_bits=None,
                                     backend=backend, **TINY))
    path = export_onnx(qmodel.eval(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    dq_by_output = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    exported = []
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2:
            if node.input[2] in inits:  # backend none: the first conv reads the float image
                assert inits[node.input[2]].dtype.name == "float32"
                continue
            dq = dq_by_output[node.input[2]]
            codes, step = inits[dq.input[0]], inits[dq.input[1]]
            assert codes.dtype.name == "int32"
            exported.append(torch.from_numpy(codes.astype("float32") * step))
    expected = [layer.bias_quantizer(layer.bias, layer.weight_quantizer).detach()
                for layer in qmodel.layers.values() if layer.bias_quantizer is not None]
    # Backend none: the second conv and the linear layer; onnxruntime quantizes the input too.
    assert len(exported) == len(expected) == integer_biases
    for got, want in zip(exported, expected):
        assert torch.equal(got, want)


def test_artifact_without_backend_field_loads_with_the_research_placement(tmp_path):
    """Artifacts saved before `backend` existed used layer-input quantizers only."""
    torch.manual_seed(0)
    config = BrecqConfig(weight_bits=4, act_bits=8, backend="none", **TINY)
    x = torch.randn(16, 3, 8, 8)
    qmodel, _ = quantize(_tiny_model(), x, config)
    save_quantized(qmodel, tmp_path / "old", config=config, example_input=x[:1])
    saved = json.loads((tmp_path / "old" / "config.json").read_text())
    del saved["backend"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    loaded = load_quantized(_tiny_model(), tmp_path / "old")
    assert sorted(loaded.act_quantizers) == sorted(qmodel.act_quantizers)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
