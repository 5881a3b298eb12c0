"""Block discovery from the graph on real architectures, and reconstruction of every unit."""

import logging

import pytest
import torch
import torchvision
from torch import nn

from brecq import BrecqConfig, ConfigError, prepare, quantize
from brecq.models.cifar_resnet import cifar_resnet20
from brecq.quant.modules import QuantLayer, QuantMultiheadAttention
from brecq.quant.quantizers import WeightQuantizer

# Min-max scales skip the Lp search, whose cost on ResNet-50 dominates tests that do not need it.
TINY = dict(iters_w=2, iters_a=2, calib_size=8, batch_size=4, act_init_samples=4, device="cpu",
            scale_search="minmax")


def _units(model, shape=(2, 3, 32, 32), **config):
    config.setdefault("scale_search", "minmax")
    q = prepare(model.eval(), BrecqConfig(**config), (torch.randn(*shape),))
    return q, {u.name: u for u in q.units}


@pytest.mark.parametrize(
    "builder, blocks, singles",
    [
        (torchvision.models.resnet18, [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)],
         ["conv1", "fc"]),
        (torchvision.models.resnet50,
         [f"layer{s}.{b}" for s, n in zip(range(1, 5), (3, 4, 6, 3)) for b in range(n)],
         ["conv1", "fc"]),
        (torchvision.models.mobilenet_v2, [f"features.{i}" for i in range(1, 18)],
         ["features.0.0", "features.18.0", "classifier.1"]),
        (torchvision.models.mnasnet1_0,
         [f"layers.{s}.{b}" for s, n in zip(range(8, 13), (3, 3, 3, 2, 4)) for b in range(n)]
         + ["layers.13"],
         ["layers.0", "layers.3", "layers.6", "layers.14", "classifier.1"]),
        (torchvision.models.regnet_x_400mf, ["trunk_output.block2.block2-0",
                                             "trunk_output.block4.block4-11"], ["stem.0", "fc"]),
        (cifar_resnet20, [f"layer{s}.{b}" for s in range(1, 4) for b in range(3)],
         ["conv1", "linear"]),
    ],
    ids=["resnet18", "resnet50", "mobilenet_v2", "mnasnet1_0", "regnet_x_400mf", "resnet20"],
)
def test_blocks_are_the_residual_blocks_and_inverted_residuals(builder, blocks, singles):
    q, units = _units(builder(), weight_bits=4, act_bits=4)
    for name in blocks:
        assert units[name].kind == "block", name
        assert len(units[name].layers) >= 2
    for name in singles:
        assert units[name].kind == "layer" and units[name].layers == (name,)
    # Every quantized layer belongs to exactly one unit.
    owned = [layer for u in q.units for layer in u.layers]
    assert sorted(owned) == sorted(q.layers)


@pytest.mark.parametrize(
    "builder", [torchvision.models.resnet18, torchvision.models.resnet50,
                torchvision.models.mobilenet_v2, torchvision.models.mnasnet1_0,
                torchvision.models.regnet_x_400mf, cifar_resnet20],
    ids=["resnet18", "resnet50", "mobilenet_v2", "mnasnet1_0", "regnet_x_400mf", "resnet20"],
)
def test_every_unit_reconstructs_without_error(builder):
    model = builder().eval()
    calib = torch.randn(8, 3, 32, 32)
    qmodel, report = quantize(model, calib, BrecqConfig(weight_bits=4, act_bits=4, method="brecq", **TINY))
    phases = {(u.name, u.phase) for u in report.units}
    for unit in qmodel.units:
        assert (unit.name, "weights") in phases and (unit.name, "activations") in phases
    out = qmodel(calib)
    assert torch.isfinite(out).all() and out.shape == model(calib).shape


def test_vision_transformer_gets_one_unit_per_encoder_block_and_every_linear_quantized():
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    ).eval()
    q, units = _units(vit, weight_bits=4, act_bits=8)
    for i in range(2):
        block = units[f"encoder.layers.encoder_layer_{i}"]
        # the attention's q/k/v/output projections (written explicitly), mlp.0, mlp.3
        assert block.kind == "block" and len(block.layers) == 6
    assert not any(isinstance(layer, QuantMultiheadAttention) for layer in q.layers.values())
    quantized_linears = {name for name, layer in q.layers.items()
                         if isinstance(layer, QuantLayer) and isinstance(layer.layer, nn.Linear)}
    all_linears = {n for n, m in vit.named_modules() if isinstance(m, nn.Linear)}
    projections = {f"{n}.{p}_proj" for n, m in vit.named_modules()
                   if isinstance(m, nn.MultiheadAttention) for p in "qkv"}
    assert all_linears | projections == quantized_linears
    calib = torch.randn(8, 3, 32, 32)
    qmodel, _ = quantize(vit, calib, BrecqConfig(weight_bits=4, act_bits=8, **TINY))
    assert torch.isfinite(qmodel(calib)).all()


def test_granularities_nest_layer_block_stage_net():
    model = cifar_resnet20()
    counts = {}
    for granularity in ("layer", "block", "stage", "net"):
        q, units = _units(model, granularity=granularity)
        counts[granularity] = len(q.units)
        assert sorted(layer for u in q.units for layer in u.layers) == sorted(q.layers)
    assert counts == {"layer": 20, "block": 11, "stage": 5, "net": 1}
    _, stages = _units(model, granularity="stage")
    assert {"layer1", "layer2", "layer3"} <= set(stages)


def test_unit_names_and_predicate_override_discovery():
    model = cifar_resnet20()
    _, units = _units(model, unit_names=("layer1", "layer2.0"))
    assert units["layer1"].kind == "block" and len(units["layer1"].layers) == 6
    assert "layer2.0" in units and "layer2.1" in units  # the rest is still discovered
    q = prepare(model.eval(), BrecqConfig(), (torch.randn(2, 3, 32, 32),),
                unit_predicate=lambda name: name in ("layer3",))
    assert len({u.name: u for u in q.units}["layer3"].layers) == 6
    with pytest.raises(ConfigError, match="not a module"):
        _units(model, unit_names=("layer9",))


def test_first_and_last_layers_are_found_by_graph_and_kept_at_8_bits():
    q, units = _units(cifar_resnet20(), weight_bits=2, act_bits=4)
    assert q.first_layers == ("conv1",) and q.last_layers == ("linear",)
    bits = q.weight_quantizers
    assert bits["conv1"].bits == 8 and bits["linear"].bits == 8 and bits["layer1.0.conv1"].bits == 2
    rows = {r["name"]: r for r in q.describe_rows()}
    # 8-bit: the network input, conv1's output, what only linear reads on (the pooling input,
    # linear's input) and the 9 second-conv outputs, which only the residual adds read (int8
    # there); the 9 block inputs and 9 first-conv outputs, read by convs, are 4-bit.
    assert set(rows["conv1"]["act_quantizers"].values()) == {8}
    assert set(rows["layer3.2"]["act_quantizers"].values()) == {4, 8}
    assert sorted(q.act_quantizers[n].bits for n in q.act_quantizers).count(8) == 13
    research, _ = _units(cifar_resnet20(), weight_bits=2, act_bits=4, backend="none")
    assert [q.bits for q in research.act_quantizers.values()].count(8) == 2  # input stays float


def test_per_layer_overrides_and_disabling_first_last():
    q, _ = _units(cifar_resnet20(), weight_bits=2, first_last_bits=None,
                  layer_bits={"layer3.2.conv2": 4})
    bits = {n: w.bits for n, w in q.weight_quantizers.items()}
    assert bits["conv1"] == 2 and bits["linear"] == 2 and bits["layer3.2.conv2"] == 4
    with pytest.raises(ConfigError, match="layer3.2.conv2"):
        _units(cifar_resnet20(), layer_bits={"layer3.2.conv3": 4})


def test_residual_add_sees_the_same_quantized_tensor_as_the_next_conv():
    q, _ = _units(cifar_resnet20(), act_bits=4)
    graph = q.network.graph
    quantizer_nodes = [n for n in graph.nodes if "brecq_act_quantizer" in n.meta]
    for node in quantizer_nodes:
        producer = node.args[0]
        # Nothing but the quantizer (and the model output) reads the raw producer.
        assert all(u is node or u.op == "output" for u in producer.users)
    output = next(n for n in graph.nodes if n.op == "output")
    assert "brecq_act_quantizer" not in output.args[0].meta  # the output is never quantized


def test_quantize_leaves_the_callers_model_untouched():
    model = cifar_resnet20().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize(model, torch.randn(8, 3, 32, 32), BrecqConfig(weight_bits=2, act_bits=4, **TINY))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.Sequential(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1)),
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > -1e30:  # data-dependent control flow: torch.fx cannot trace this
            x = self.stem(x)
        x = self.stage(x)
        return self.head(x.mean((2, 3)))


def test_untraceable_model_falls_back_to_module_tree_with_a_warning(caplog):
    model = _Untraceable().eval()
    calib = torch.randn(8, 3, 16, 16)
    with caplog.at_level(logging.WARNING):
        qmodel, report = quantize(model, calib, BrecqConfig(weight_bits=4, act_bits=8, **TINY))
    assert "falling back to the module tree" in caplog.text
    assert not qmodel.traced
    names = [u.name for u in qmodel.units]
    assert "stage.0" in names and "stage.1" in names and "head" in names
    with torch.no_grad(), qmodel.quantization(weights=False, acts=False):
        assert torch.allclose(qmodel(calib), model(calib), atol=1e-4)  # BN folded exactly
    assert qmodel.first_layers == ("stem.0",) and qmodel.last_layers == ("head",)
    # Layers after the stem read quantized inputs there too: their biases go on the int32 grid.
    rounded = {n for n, layer in qmodel.layers.items() if layer.bias_quantizer is not None}
    assert rounded == set(qmodel.layers) - {"stem.0"}


class _ProjectedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        y = self.fc(x)
        return self.attn(y, y, y)[0]


def test_weight_quantizers_are_swapped_by_name_and_restored():
    config = BrecqConfig(weight_bits=4, act_bits=None, first_last_bits=None, scale_search="minmax")
    qmodel = prepare(_ProjectedAttention(), config, (torch.randn(2, 5, 8),))
    before = dict(qmodel.weight_quantizers)
    # The attention is written explicitly: its projections are Linear layers of their own.
    assert set(before) == {"fc", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"}
    swapped = {"fc": WeightQuantizer(8), "attn.out_proj": WeightQuantizer(6)}
    with qmodel.weight_quantizers_swapped(swapped):
        assert qmodel.weight_quantizers == {**before, **swapped}
        assert qmodel.layer_bits("fc") == 8 and qmodel.layer_bits("attn.q_proj") == 4
        assert qmodel.layer_bits("attn.out_proj") == 6
    assert qmodel.weight_quantizers == before
    with pytest.raises(KeyError, match="'attn' is not a quantized weight"):
        qmodel.swap_weight_quantizer("attn", WeightQuantizer(8))


def test_loaded_codes_round_back_to_themselves_and_drop_learned_rounding():
    weight = torch.randn(6, 5)
    learned = WeightQuantizer(3)
    learned.calibrate(weight, "minmax")
    learned.begin_adaround(weight)
    codes = learned.int_weight(weight)
    loaded = WeightQuantizer(3)
    dequantized = loaded.load_codes(codes, learned.scale, learned.zero_point)
    assert not loaded.learned
    assert torch.equal(loaded.int_weight(dequantized), codes)
