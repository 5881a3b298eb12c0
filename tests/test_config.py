"""The typed configuration."""

import dataclasses
import typing

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


# ----------------------------------------------------------------------------- layers


def test_every_field_is_in_exactly_one_layer_with_its_type():
    from brecq.config import QuantScheme, ReconRecipe, RuntimeOptions

    layers = (QuantScheme, ReconRecipe, RuntimeOptions)
    fields = {f.name for f in dataclasses.fields(BrecqConfig)}
    owners = {name: [v.__name__ for v in layers if name in {f.name for f in dataclasses.fields(v)}]
              for name in fields}
    assert {name: o for name, o in owners.items() if len(o) != 1} == {}
    assert sum(len(dataclasses.fields(v)) for v in layers) == len(fields)  # nothing extra
    hints = typing.get_type_hints(BrecqConfig)
    for view in layers:
        assert typing.get_type_hints(view) == {f.name: hints[f.name] for f in dataclasses.fields(view)}


def test_layer_views_are_frozen_copies_of_the_flat_fields():
    config = BrecqConfig(weight_bits=3, method="qdrop", iters_w=7, compile=True, device="cpu")
    assert (config.scheme.weight_bits, config.recipe.method, config.recipe.iters_w) == (3, "qdrop", 7)
    assert (config.runtime.compile, config.runtime.device) == (True, "cpu")
    with pytest.raises(AttributeError):
        config.recipe.iters_w = 1  # type: ignore[misc]
    settings = config.result_settings()
    assert "weight_bits" in settings and "iters_w" in settings and "compile" not in settings
    assert settings == config.replace(compile=False, cuda_graph=False, cache_budget_gb=2.0,
                                      device="cuda", dist_timeout=5.0).result_settings()


def test_help_sections_follow_the_layers():
    from brecq.config import FLAG_GROUPS, ReconRecipe, RuntimeOptions

    recipe = [f.name for f in dataclasses.fields(ReconRecipe)]
    assert FLAG_GROUPS["reconstruction"] == tuple(n for n in recipe if n != "method")
    assert FLAG_GROUPS["runtime"] == tuple(f.name for f in dataclasses.fields(RuntimeOptions))


# ----------------------------------------------------------------------------- methods


def test_method_choices_come_from_the_registry():
    from brecq.config import METHODS
    from brecq.methods import AUTO, METHOD_REGISTRY

    assert METHODS == (AUTO, *METHOD_REGISTRY) == ("auto", "brecq", "qdrop", "rtn")
    assert not METHOD_REGISTRY["rtn"].optimizes
    assert BrecqConfig(method="rtn").resolved().act_lr is None  # round-to-nearest learns no steps
    assert BrecqConfig(method="rtn").effective_act_lr == 0.0


def test_phases_run_with_and_without_activation_quantizers():
    from brecq.methods import METHOD_REGISTRY

    def names(method, acts):
        return [p.name for p in METHOD_REGISTRY[method].phases_run(acts)]

    assert names("brecq", True) == ["weights", "init", "activations"]
    assert names("brecq", False) == ["weights"]
    assert names("qdrop", True) == ["init", "joint"]
    assert names("qdrop", False) == ["joint"]
    assert names("rtn", True) == ["init"] and names("rtn", False) == []


def test_one_schedule_per_phase():
    from brecq.methods import ACTIVATIONS, JOINT, WEIGHTS
    from brecq.recon.step import Schedule

    recipe = BrecqConfig(method="qdrop", iters_w=30, iters_a=20, drop_prob=0.3,
                         act_loss_p=2.4).resolved().recipe
    joint = Schedule.for_phase(recipe, JOINT)
    assert (joint.iters, joint.drop_prob, joint.loss_p, joint.act_lr) == (30, 0.3, 2.0, 4e-5)
    acts = Schedule.for_phase(recipe, ACTIVATIONS)
    assert (acts.iters, acts.drop_prob, acts.loss_p) == (20, 0.0, 2.4)
    weights = Schedule.for_phase(recipe, WEIGHTS, iters=5)
    assert (weights.iters, weights.drop_prob, weights.loss_p, weights.weight_lr) == (5, 0.0, 2.0, 1e-3)


def test_method_summary_names_the_passes():
    assert BrecqConfig(method="brecq", iters_w=10, iters_a=5).method_summary().endswith(
        "10 rounding + 5 step-size iterations per unit")
    assert BrecqConfig(method="brecq", act_bits=None, iters_w=10).method_summary().endswith(
        "; 10 rounding iterations per unit")
    assert BrecqConfig(method="qdrop", iters_w=10).method_summary().endswith(
        "10 joint iterations per unit")
    assert BrecqConfig(method="rtn").method_summary() == "round-to-nearest, W4A8"
