"""Model registry, checkpoint loading, preprocessing and the bundled CIFAR ResNets."""

import sys
import types
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

from brecq.errors import ConfigError, ModelError
from brecq.models import (
    Preprocessing,
    build_model,
    cifar_resnet20,
    load_checkpoint,
    parse_model_name,
    resolve_preprocessing,
)
from brecq.models.cifar_resnet import PadShortcut

SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "cifar10"


def test_cifar_resnet20_parameter_names_and_shapes():
    model = cifar_resnet20()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["conv1.weight"] == (16, 3, 3, 3)
    assert shapes["layer1.0.conv1.weight"] == (16, 16, 3, 3)
    assert shapes["layer2.0.conv1.weight"] == (32, 16, 3, 3)
    assert shapes["layer2.2.conv2.weight"] == (32, 32, 3, 3)
    assert shapes["layer3.0.conv1.weight"] == (64, 32, 3, 3)
    assert shapes["layer3.2.bn2.running_var"] == (64,)
    assert shapes["linear.weight"] == (10, 64)
    assert shapes["linear.bias"] == (10,)
    params = dict(model.named_parameters())
    assert len(params) == 1 + 2 + 9 * 2 * 3 + 2  # conv1, bn1, 9 blocks x (2 conv + 2x2 bn), fc
    assert not any("shortcut" in k for k in model.state_dict())
    assert sum(p.numel() for p in params.values()) == 269_722


def test_pad_shortcut_subsamples_and_zero_pads_channels():
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(8)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_cifar_resnet20_traces_with_fx():
    model = cifar_resnet20().eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(traced(x), model(x))
    assert model(x).shape == (2, 10)


@pytest.mark.parametrize("depth", [20, 56])
def test_shared_pretrained_checkpoint_loads_strictly(depth):
    path = SHARED_WEIGHTS / f"resnet{depth}.pt"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared CIFAR-10 weights are a developer resource)")
    model, prep = build_model(f"cifar_resnet{depth}", weights=path)
    assert not model.training
    assert prep == Preprocessing(None, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture
def saved_state(tmp_path):
    model = cifar_resnet20()
    return model.state_dict(), tmp_path


@pytest.mark.parametrize("wrapper", ["plain", "state_dict", "model", "net", "module_prefix"])
def test_wrapped_and_prefixed_checkpoints_load(saved_state, wrapper):
    state, tmp = saved_state
    if wrapper == "plain":
        obj = state
    elif wrapper == "module_prefix":
        obj = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    else:
        obj = {wrapper: state, "epoch": 3, "best_acc": 91.0}
    path = tmp / "ckpt.pth"
    torch.save(obj, path)
    model, _ = build_model("cifar_resnet20", weights=str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_checkpoint_without_num_batches_tracked_loads(saved_state):
    state, tmp = saved_state
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp / "c.pt")
    load_checkpoint(cifar_resnet20(), tmp / "c.pt")


def test_mismatched_checkpoint_names_keys_and_shapes(saved_state):
    state, tmp = saved_state
    state = dict(state)
    state["linear.weight"] = torch.zeros(100, 64)
    state["extra.weight"] = torch.zeros(3)
    del state["layer3.2.conv2.weight"]
    torch.save(state, tmp / "bad.pt")
    with pytest.raises(ModelError) as err:
        build_model("cifar_resnet20", weights=tmp / "bad.pt")
    msg = str(err.value)
    assert "does not match" in msg and "bad.pt" in msg
    assert "layer3.2.conv2.weight" in msg and "extra.weight" in msg
    assert "linear.weight (100, 64) vs (10, 64)" in msg
    assert "\n" not in msg


def test_other_depth_checkpoint_is_a_mismatch(saved_state):
    state, tmp = saved_state
    torch.save(state, tmp / "r20.pt")
    with pytest.raises(ModelError, match="missing keys: layer1.3"):
        build_model("cifar_resnet32", weights=tmp / "r20.pt")


def test_missing_and_unreadable_checkpoint_files(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelError, match="nope.pt does not exist"):
        build_model("cifar_resnet20", weights=missing)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pt could not be read"):
        build_model("cifar_resnet20", weights=junk)
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(ModelError, match="no tensors"):
        build_model("cifar_resnet20", weights=tmp_path / "meta.pt")


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelError) as err:
        build_model("resnet19")
    msg = str(err.value)
    assert "did you mean" in msg and "resnet18" in msg and "module:callable" in msg
    with pytest.raises(ModelError, match="cifar_resnet20"):
        build_model("cifar_resnet2")


def test_parse_model_name_kinds():
    assert parse_model_name("resnet18").kind == "torchvision"
    assert parse_model_name("cifar_resnet56").kind == "bundled"
    assert parse_model_name("timm:resnet50").kind == "timm"
    assert parse_model_name("pkg.mod:make").kind == "callable"


def test_torchvision_model_builds_without_weights():
    model, prep = build_model("resnet18")
    assert isinstance(model, nn.Module) and not model.training
    assert model.fc.out_features == 1000
    assert (prep.resize, prep.crop, prep.interpolation) == (256, 224, "bilinear")
    assert prep.mean == (0.485, 0.456, 0.406)
    small, _ = build_model("resnet18", num_classes=7)
    assert small.fc.out_features == 7


def test_bundled_model_rejects_pretrained_and_double_weights(tmp_path):
    with pytest.raises(ModelError, match="--weights"):
        build_model("cifar_resnet20", pretrained=True)
    with pytest.raises(ModelError, match="choose one"):
        build_model("resnet18", weights=tmp_path / "x.pt", pretrained=True)


def _write_user_module(tmp_path, name):
    (tmp_path / f"{name}.py").write_text(
        "import torch.nn as nn\n"
        "def make(num_classes=3):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(4, num_classes))\n"
        "def not_a_model():\n"
        "    return 42\n"
    )


def test_module_callable_model(tmp_path, monkeypatch):
    _write_user_module(tmp_path, "brecq_test_usermod")
    monkeypatch.syspath_prepend(str(tmp_path))
    model, prep = build_model("brecq_test_usermod:make")
    assert prep is None
    assert model(torch.randn(2, 4)).shape == (2, 3)
    model, _ = build_model("brecq_test_usermod:make", num_classes=5)
    assert model(torch.randn(2, 4)).shape == (2, 5)
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        build_model("brecq_test_usermod:not_a_model")
    with pytest.raises(ModelError, match="has no attribute"):
        build_model("brecq_test_usermod:missing")
    with pytest.raises(ModelError, match="cannot import module"):
        build_model("brecq_no_such_module_xyz:make")


def test_module_callable_from_file_path_and_cwd(tmp_path, monkeypatch):
    _write_user_module(tmp_path, "brecq_test_filemod")
    model, _ = build_model(f"{tmp_path / 'brecq_test_filemod.py'}:make")
    assert model(torch.randn(1, 4)).shape == (1, 3)
    _write_user_module(tmp_path, "brecq_test_cwdmod")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    model, _ = build_model("brecq_test_cwdmod:make")
    assert model(torch.randn(1, 4)).shape == (1, 3)


def test_timm_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(ModelError, match="pip install timm"):
        build_model("timm:resnet18")


def test_timm_model_and_data_config_with_a_stub(monkeypatch):
    calls = {}

    def create_model(name, pretrained=False, **kwargs):
        calls.update(name=name, pretrained=pretrained, **kwargs)
        return nn.Linear(2, 2)

    def resolve_data_config(args, model=None):
        return {
            "input_size": (3, 288, 288),
            "interpolation": "bicubic",
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            "crop_pct": 0.9,
        }

    timm = types.ModuleType("timm")
    timm.create_model = create_model
    timm.list_models = lambda: ["resnet18"]
    timm.data = types.ModuleType("timm.data")
    timm.data.resolve_data_config = resolve_data_config
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.data", timm.data)
    model, prep = build_model("timm:resnet18", pretrained=True)
    assert calls == {"name": "resnet18", "pretrained": True}
    assert prep == Preprocessing(320, 288, (0.5,) * 3, (0.5,) * 3, "bicubic")


def test_preprocessing_transform_and_overrides():
    from PIL import Image

    prep = Preprocessing(resize=40, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    img = Image.new("RGB", (50, 60), color=(255, 0, 128))
    x = prep.to_transform()(img)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[0], torch.full((32, 32), 2.0))
    assert torch.allclose(x[1], torch.full((32, 32), -2.0))
    over = prep.replace(resize=0, crop=16)
    assert over.resize is None and over.crop == 16 and over.mean == prep.mean
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    gray = Preprocessing(None, 28, (0.1307,), (0.3081,))
    assert gray.to_transform()(Image.new("RGB", (28, 28))).shape == (1, 28, 28)


def test_preprocessing_validation_and_resolution():
    with pytest.raises(ConfigError, match="std"):
        Preprocessing(None, 32, (0.5, 0.5), (0.5,))
    with pytest.raises(ConfigError, match="positive"):
        Preprocessing(None, 32, (0.5,), (0.0,))
    with pytest.raises(ConfigError, match="crop"):
        Preprocessing(None, 0, (0.5,), (0.5,))
    with pytest.raises(ConfigError, match="--crop, --mean and --std"):
        resolve_preprocessing(None, crop=32)
    prep = resolve_preprocessing(None, crop=32, mean=[0.5], std=[0.2])
    assert prep == Preprocessing(None, 32, (0.5,), (0.2,))
    assert resolve_preprocessing(prep, resize=36).resize == 36
