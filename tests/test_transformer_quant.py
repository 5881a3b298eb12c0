"""Transformers fully quantized on the traced path: both inputs of every activation matmul, the
softmax output (log2 or uniform), LayerNorm and GELU outputs, residual adds on request; kinds in
`brecq info`; reconstruction and ONNX export on a tiny random-weight ViT."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brecq import BrecqConfig, quantize
from brecq.graph.placement import is_matmul, moves_values
from brecq.graph.prepare import prepare
from brecq.quant.modules import QuantLayer
from brecq.quant.quantizers import ActQuantizer, Log2Quantizer

TINY = dict(iters_w=4, iters_a=4, calib_size=16, batch_size=8, act_init_samples=8, device="cpu")


class TinyBlock(nn.Module):
    """A pre-norm transformer block written out: one qkv Linear, explicit attention matmuls."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5, dim=-1)
        x = x + self.proj(torch.matmul(attn, v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


def tiny_vit() -> nn.Module:
    """A 2-block timm ViT with explicit attention matmuls and weights of unit-scale outputs
    (timm's own init makes every branch tiny next to the residual stream)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.fused_attn = False
        model.cls_token.normal_()
        model.pos_embed.normal_()
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0, module.in_features ** -0.5)
                module.bias.normal_(0, 0.1)
    return model


def _quantized_reads(graph_module: torch.fx.GraphModule, value: torch.fx.Node) -> ActQuantizer | None:
    """The activation quantizer that `value` comes out of (through ops that move values)."""
    while True:
        if value.op == "call_module":
            module = graph_module.get_submodule(value.target)
            if isinstance(module, ActQuantizer):
                return module
        inputs = [a for a in value.all_input_nodes if a.op != "get_attr"]
        if not (moves_values(value, graph_module) and inputs):
            return None
        value = inputs[0]


def _matmul_and_linear_inputs(qmodel) -> tuple[list, list]:
    gm = qmodel.network
    matmuls, linears = [], []
    for node in gm.graph.nodes:
        if is_matmul(node):
            matmuls.append([_quantized_reads(gm, a) for a in node.args[:2]])
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), QuantLayer):
            linears.append(_quantized_reads(gm, node.args[0]))
    return matmuls, linears


@pytest.mark.parametrize("backend", ["none", "onnxruntime"])
def test_every_linear_and_both_matmul_inputs_are_quantized(backend):
    model, x = TinyBlock().eval(), torch.randn(2, 5, 32)
    qmodel = prepare(model, BrecqConfig(act_bits=4, backend=backend, first_last_bits=None), (x,))
    matmuls, linears = _matmul_and_linear_inputs(qmodel)
    assert len(matmuls) == 2 and len(linears) == 4
    assert all(q is not None for pair in matmuls for q in pair)
    assert all(q is not None for q in linears)
    # Q, K, V, probabilities: each its own quantizer at --a-bits (the first layer's rule aside).
    quantizers = [q for pair in matmuls for q in pair]
    assert len({id(q) for q in quantizers}) == 4
    assert [q.bits for q in quantizers] == [4, 4, 4, 4]
    assert isinstance(matmuls[1][0], Log2Quantizer) and matmuls[1][0].kind == "softmax output"
    assert [q.kind for q in quantizers[:2]] + [quantizers[3].kind] == ["matmul input"] * 3
    kinds = {q.kind for q in qmodel.act_quantizers.values()}
    assert {"layernorm output", "gelu output", "linear input"} <= kinds
    # With first_last_bits, Q, K and V are outputs of a first layer (qkv reads the input through
    # a LayerNorm only) and get its 8 bits, as a first Conv's output does; the probabilities too.
    first = prepare(model, BrecqConfig(act_bits=4, backend=backend), (x,))
    assert [q.bits for pair in _matmul_and_linear_inputs(first)[0] for q in pair] == [8] * 4


def test_timm_vit_counts_and_softmax_choice():
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    for choice, cls in (("log2", Log2Quantizer), ("uniform", ActQuantizer)):
        qmodel = prepare(model, BrecqConfig(backend="none", softmax_quantizer=choice), (x,))
        matmuls, linears = _matmul_and_linear_inputs(qmodel)
        # The patch embedding Conv, then 2 x (qkv, proj, fc1, fc2) and the head.
        assert len(matmuls) == 4 and len(linears) == 10
        assert all(q is not None for pair in matmuls for q in pair)
        # Every Linear reads a quantized tensor; the Conv reads the model input as given.
        assert linears[0] is None and all(q is not None for q in linears[1:])
        softmax = [pair[0] for pair in matmuls[1::2]]
        assert all(type(q) is cls and q.kind == "softmax output" for q in softmax)
    off = prepare(model, BrecqConfig(backend="none", quantize_matmul_inputs=False), (x,))
    assert len(off.act_quantizers) == len(qmodel.act_quantizers) - 8


def test_quantizers_sit_where_every_consumer_sees_them():
    """A LayerNorm or GELU output goes to its readers only through its quantizer."""
    qmodel = prepare(TinyBlock().eval(), BrecqConfig(backend="none"), (torch.randn(2, 5, 32),))
    gm = qmodel.network
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, (nn.LayerNorm, nn.GELU)):
            assert {type(gm.get_submodule(u.target)) for u in node.users
                    if u.op == "call_module"} == {ActQuantizer}
            assert all(u.op == "call_module" for u in node.users)


def test_residual_adds_are_quantized_only_when_asked_with_backend_none():
    x = torch.randn(2, 5, 32)
    plain = prepare(TinyBlock().eval(), BrecqConfig(backend="none"), (x,))
    adds = prepare(TinyBlock().eval(), BrecqConfig(backend="none", quantize_residual_adds=True), (x,))
    new = [q for name, q in adds.act_quantizers.items() if name not in plain.act_quantizers]
    assert [q.kind for q in new] == ["residual add input"] * len(new) and len(new) >= 3
    # An add is not a multiplication: 8 bits at least, as the onnxruntime placement stores it.
    assert all(q.bits == 8 for q in new)


@pytest.mark.parametrize("backend", ["none", "onnxruntime"])
@pytest.mark.parametrize("softmax", ["log2", "uniform"])
def test_outputs_close_to_float_at_8_bits(backend, softmax):
    model, x = tiny_vit(), torch.randn(16, 3, 32, 32)
    config = BrecqConfig(weight_bits=8, act_bits=8, method="rtn", backend=backend,
                         softmax_quantizer=softmax, **TINY)
    qmodel, _ = quantize(model, x, config)
    with torch.no_grad():
        cosine = F.cosine_similarity(model(x).flatten(), qmodel(x).flatten(), dim=0)
    assert cosine > 0.99


def test_qdrop_reconstruction_learns_the_log2_step_size():
    model, x = tiny_vit(), torch.randn(16, 3, 32, 32)

    def log2_scales(method: str) -> list[float]:
        config = BrecqConfig(weight_bits=4, act_bits=4, method=method, act_lr=1e-2, **TINY)
        qmodel, report = quantize(model, x, config)
        with torch.no_grad():
            assert torch.isfinite(qmodel(x)).all()
        assert len(report.units) == (0 if method == "rtn" else 4)
        return [float(q.scale.detach()) for q in qmodel.act_quantizers.values()
                if isinstance(q, Log2Quantizer)]

    searched, learned = log2_scales("rtn"), log2_scales("qdrop")
    assert len(searched) == len(learned) == 2
    assert all(s > 0 for s in learned) and searched != learned


def test_log2_quantizer_drops_like_the_others():
    q = Log2Quantizer(4)
    x = torch.softmax(torch.randn(8, 16), dim=-1)
    q.calibrate(x, "minmax", 2.4)
    assert q.scale.item() == pytest.approx(x.max().item())
    assert not torch.equal(q(x), x)
    q.set_drop(1.0, torch.Generator().manual_seed(0))
    assert torch.equal(q(x), x)  # every element keeps its float value
    q.set_drop(0.0)
    q.enable(False)
    assert torch.equal(q(x), x)


def test_info_lists_kinds(capsys):
    from brecq.cli import main

    target = f"{__file__}:tiny_vit"
    assert main(["info", "--model", target, "--input-size", "3,32,32", "--layers",
                 "--backend", "none", "--a-bits", "4"]) == 0
    out = capsys.readouterr().out
    assert "Quantized activations by kind: " in out
    assert "matmul input 6" in out and "softmax output 2" in out
    assert "layernorm output" in out and "gelu output 2" in out
    assert "blocks.0.attn.softmax" in out and "4 bits log2" in out


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    np = pytest.importorskip("numpy")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from brecq.export import export_onnx

    model, x = tiny_vit(), torch.randn(16, 3, 32, 32)
    qmodel, _ = quantize(model, x, BrecqConfig(weight_bits=4, act_bits=8, method="rtn", **TINY))
    path = export_onnx(qmodel.eval(), tmp_path / "vit.onnx", x[:1])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    test = torch.randn(32, 3, 32, 32)
    out = session.run(None, {"input": test.numpy()})[0]
    with torch.no_grad():
        ref = qmodel(test).numpy()
    rel = np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.median(rel) < 1e-3
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
    print(f"median rel {np.median(rel):.2e}, max rel {rel.max():.2e}")


def test_config_fields_round_trip_and_are_checked():
    from brecq import ConfigError

    config = BrecqConfig(softmax_quantizer="uniform", quantize_matmul_inputs=False,
                         quantize_residual_adds=True)
    assert BrecqConfig.from_json(config.to_json()) == config
    assert config.scheme.softmax_quantizer == "uniform" and config.scheme.quantize_residual_adds
    assert BrecqConfig().softmax_quantizer == "auto" and BrecqConfig().quantize_matmul_inputs
    with pytest.raises(ConfigError, match="auto, log2, uniform"):
        BrecqConfig(softmax_quantizer="log")
    with pytest.raises(ConfigError, match="true or false"):
        BrecqConfig(quantize_matmul_inputs="yes")
    from brecq.cli import build_parser, config_from_args

    args = build_parser().parse_args(["quantize", "--softmax-quantizer", "uniform",
                                      "--no-quantize-matmul-inputs", "--quantize-residual-adds"])
    assert config_from_args(args) == config


class EinsumAttention(nn.Module):
    """Attention written with einsum, bmm and an nn.Softmax module."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("bid,bjd->bij", self.q(x), self.k(x))
        return self.out(torch.bmm(self.softmax(scores), self.v(x)))


def test_einsum_bmm_and_softmax_module_are_recognized():
    qmodel = prepare(EinsumAttention().eval(), BrecqConfig(backend="none", softmax_quantizer="log2"),
                     (torch.randn(2, 6, 16),))
    kinds = sorted(q.kind for q in qmodel.act_quantizers.values())
    assert kinds == ["linear input", "matmul input", "matmul input", "matmul input", "softmax output"]
    assert sum(isinstance(q, Log2Quantizer) for q in qmodel.act_quantizers.values()) == 1


def test_saved_vit_loads_back_bit_exactly(tmp_path):
    from brecq import load_quantized, save_quantized

    model, x = tiny_vit(), torch.randn(8, 3, 32, 32)
    config = BrecqConfig(weight_bits=4, act_bits=4, method="rtn", softmax_quantizer="log2", **TINY)
    qmodel, _ = quantize(model, x, config)
    save_quantized(qmodel, tmp_path, config=config, example_input=x[:1])
    loaded = load_quantized(tiny_vit(), tmp_path)
    assert sum(isinstance(q, Log2Quantizer) for q in loaded.act_quantizers.values()) == 2
    with torch.no_grad():
        assert torch.equal(qmodel(x), loaded(x))


class MaskedAttention(nn.Module):
    """Attention whose scores get a mask computed from the input: -inf where a key is padding."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = x[..., 0] > 1.0  # [N, L]: a key position the queries must not see
        bias = torch.zeros_like(padding, dtype=x.dtype).masked_fill(padding, float("-inf"))
        scores = self.q(x) @ self.k(x).transpose(-2, -1) + bias[:, None, :]
        return self.out(torch.softmax(scores, dim=-1) @ self.v(x))


@pytest.mark.parametrize("backend", ["none", "onnxruntime"])
def test_attention_mask_adds_stay_float(backend):
    x = torch.randn(8, 6, 16)
    x[:, 0, 0] = 0.0  # every query sees at least one key
    config = BrecqConfig(weight_bits=8, act_bits=8, method="rtn", backend=backend,
                         quantize_residual_adds=True, **TINY)
    qmodel, _ = quantize(MaskedAttention().eval(), x, config)  # calibrating on -inf would fail
    kinds = [q.kind for q in qmodel.act_quantizers.values()]
    assert "residual add input" not in kinds and "add output" not in kinds
    assert kinds.count("matmul input") == 3 and kinds.count("softmax output") == 1
