"""The typed configuration."""

import pytest

from brecq import BrecqConfig, ConfigError


def test_json_round_trip_preserves_every_field(tmp_path):
    config = BrecqConfig(weight_bits=2, act_bits=4, method="qdrop", granularity="layer",
                         layer_bits={"fc": 8}, unit_names=("layer1.0",), loss="fisher")
    path = tmp_path / "c.json"
    config.to_json(path)
    assert BrecqConfig.from_json(path) == config
    assert BrecqConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("bits", [1, 9, 0, 3.5, True])
def test_bits_out_of_range_are_refused_with_the_allowed_range(bits):
    with pytest.raises(ConfigError, match="from 2 to 8"):
        BrecqConfig(weight_bits=bits)
    with pytest.raises(ConfigError, match="from 2 to 8"):
        BrecqConfig(act_bits=bits)


@pytest.mark.parametrize(
    "changes",
    [{"method": "gptq"}, {"granularity": "tile"}, {"loss": "l1"}, {"iters_w": -1},
     {"batch_size": 0}, {"warmup": 1.0}, {"drop_prob": 1.5}, {"layer_bits": {"fc": 12}},
     {"integer_bias": 1}, {"channels_last": "yes"}],
)
def test_invalid_values_raise_config_error(changes):
    with pytest.raises(ConfigError):
        BrecqConfig(**changes)


def test_unknown_json_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="wbits"):
        BrecqConfig.from_dict({"wbits": 4})


def test_config_is_frozen():
    config = BrecqConfig()
    with pytest.raises(AttributeError):
        config.weight_bits = 3  # type: ignore[misc]


def test_weight_only_label_and_method_default_lr():
    assert BrecqConfig(weight_bits=2, act_bits=None).label == "W2A32"
    assert BrecqConfig(method="qdrop").effective_act_lr == pytest.approx(4e-5)
    assert BrecqConfig(method="brecq").effective_act_lr == pytest.approx(4e-4)


def test_unavailable_device_is_a_clear_config_error():
    import torch

    from brecq.runtime import resolve_device

    with pytest.raises(ConfigError, match="not a valid torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="use --device cpu"):
            resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"
