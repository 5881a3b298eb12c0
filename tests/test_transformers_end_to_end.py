"""Transformers fully quantized, end to end, on the models the issue names (random weights, tiny
configurations): timm ViT (fused attention on), timm DeiT, timm Swin, torchvision ViT and a
Hugging Face BERT encoder.

For each: (a) every Linear and both inputs of every attention matmul are quantized, counted
against the number of attention layers, the softmax output with a log2 quantizer below 8 bits; (b) at W8A8
the output stays close to float; (c) a short QDrop reconstruction (LayerNorm
reparameterization on, the default) keeps it finite and close; (d) the ONNX QDQ export runs in
onnxruntime and agrees with the fake-quantized PyTorch model. (e) `brecq info` lists the kinds.
"""

from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from brecq import BrecqConfig, quantize
from brecq.graph.placement import MATMUL_INPUT, SOFTMAX_OUTPUT, is_matmul, moves_values
from brecq.graph.prepare import prepare
from brecq.quant.modules import QuantLayer
from brecq.quant.quantizers import ActQuantizer, Log2Quantizer

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

# Few samples and iterations: the point is that every stage runs on these models, not accuracy.
FAST = dict(calib_size=16, batch_size=8, act_init_samples=8, device="cpu")
W8A8 = dict(weight_bits=8, act_bits=8, **FAST)
# Every layer at 4 bits (none kept at 8 as a first or last layer): the default softmax quantizer
# is log2 there.
W4A4_ALL = dict(weight_bits=4, act_bits=4, first_last_bits=None, **FAST)


def _tokens_like_trained(*tokens: nn.Parameter) -> None:
    """timm and torchvision start the class (and distillation) token at or near zero and the
    position embedding small. With random weights the class token then stays far below the patch
    tokens on the residual stream: on its 8-bit grid it rounds to almost nothing, and the head,
    which reads only the class token, reads rounding noise. Trained tokens are on the patch
    tokens' scale; so are these."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for token in tokens:
            token.normal_(0, 1, generator=generator)


def _head_like_trained(*heads: nn.Linear) -> None:
    """Classifier heads start at zero (all outputs 0, nothing to compare): random weights."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for head in heads:
            head.weight.normal_(0, head.in_features ** -0.5, generator=generator)


def timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                              num_classes=10).eval()
    assert model.blocks[0].attn.fused_attn  # F.scaled_dot_product_attention, decomposed
    _tokens_like_trained(model.cls_token, model.pos_embed)
    _head_like_trained(model.head)
    return model


def timm_deit() -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=48, depth=2,
                                       num_heads=3, num_classes=10).eval()
    _tokens_like_trained(model.cls_token, model.dist_token, model.pos_embed)
    _head_like_trained(model.head, model.head_dist)
    return model


def timm_swin() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=24,
                            depths=(1, 1), num_heads=(2, 2), num_classes=10).eval()
    _head_like_trained(model.head.fc)  # no class token: the head pools every token
    return model


def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10).eval()
    _tokens_like_trained(model.class_token, model.encoder.pos_embedding)
    _head_like_trained(model.heads.head)
    return model


class SentenceEncoder(nn.Module):
    """A BERT encoder taking token ids and attention mask stacked in one tensor (N, 2, L): the
    one input `quantize` and the ONNX export take."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bert(x[:, 0], attention_mask=x[:, 1]).last_hidden_state


def hf_bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    return SentenceEncoder(transformers.BertModel(config)).eval()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _sentences(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n, 7), generator=generator)
    mask = torch.ones(n, 7, dtype=torch.long)
    mask[1::2, 5:] = 0  # padded sentences (every batch has some: the layers are traced with a mask)
    return torch.stack([ids, mask], 1)


# name: (builder, inputs, attention layers, Linear layers after prepare)
MODELS = {
    # 2 x (qkv, proj, fc1, fc2) + head
    "timm_vit": (timm_vit, _images, 2, 9),
    # ... + the distillation head
    "timm_deit": (timm_deit, _images, 2, 10),
    # 2 x (qkv, proj, fc1, fc2) + the patch merging reduction + head
    "timm_swin": (timm_swin, _images, 2, 10),
    # 2 x (q, k, v, out_proj of the explicit attention, mlp.0, mlp.3) + head
    "torchvision_vit": (torchvision_vit, _images, 2, 13),
    # 2 x (query, key, value, attention output, intermediate, output) + pooler
    "hf_bert": (hf_bert, _sentences, 2, 13),
}


def _graphs(qmodel) -> list[fx.GraphModule]:
    """Every traced graph of the prepared model (one, or one per child prepared on its own)."""
    return [m for m in qmodel.network.modules() if isinstance(m, fx.GraphModule)]


def _quantizer_of(gm: fx.GraphModule, value: object) -> ActQuantizer | None:
    """The activation quantizer whose output `value` is, through ops that only move values."""
    while isinstance(value, fx.Node):
        if value.op == "call_module" and isinstance(gm.get_submodule(value.target), ActQuantizer):
            return gm.get_submodule(value.target)
        if not moves_values(value, gm):
            return None
        value = next((a for a in value.all_input_nodes if a.op != "get_attr"), None)
    return None


def _matmul_operand_quantizers(qmodel) -> list[list[ActQuantizer | None]]:
    return [[_quantizer_of(gm, a) for a in node.args[:2]]
            for gm in _graphs(qmodel) for node in gm.graph.nodes if is_matmul(node)]


def _linear_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_linear_and_every_attention_matmul_input_is_quantized(name):
    build, inputs, attention, linears = MODELS[name]
    model = build()
    qmodel = prepare(model, BrecqConfig(**W4A4_ALL), (inputs(2, seed=0),))
    quantized_linears = {n for n, layer in qmodel.layers.items()
                         if isinstance(layer, QuantLayer) and isinstance(layer.layer, nn.Linear)}
    assert len(quantized_linears) == linears
    assert _linear_names(model) <= set(qmodel.layers)
    # No Linear is left in float anywhere in the prepared network.
    wrapped = {id(layer.layer) for layer in qmodel.layers.values() if isinstance(layer, QuantLayer)}
    assert all(id(m) in wrapped for m in qmodel.network.modules() if type(m) is nn.Linear)

    operands = _matmul_operand_quantizers(qmodel)
    assert len(operands) == 2 * attention  # Q.K^T and probabilities.V per attention layer
    assert all(q is not None for pair in operands for q in pair)
    # Q, K^T and V: "matmul input"; the probabilities: quantized at the softmax, log2 grid.
    kinds = Counter(q.kind for q in qmodel.act_quantizers.values())
    assert kinds[MATMUL_INPUT] == 3 * attention and kinds[SOFTMAX_OUTPUT] == attention
    probabilities = [pair[0] for pair in operands[1::2]]
    assert all(isinstance(q, Log2Quantizer) and q.kind == SOFTMAX_OUTPUT for q in probabilities)
    # At 8 bits the default takes the uniform grid (log2's sqrt(2) steps would be the coarser).
    at_8_bits = prepare(model, BrecqConfig(**W8A8), (inputs(2, seed=0),))
    probabilities = [pair[0] for pair in _matmul_operand_quantizers(at_8_bits)[1::2]]
    assert probabilities and all(type(q) is ActQuantizer for q in probabilities)
    assert len({id(q) for pair in operands for q in pair}) == 4 * attention
    assert kinds["layernorm output"] >= attention and kinds["gelu output"] == attention


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("name", list(MODELS))
def test_w8a8_is_close_to_float_and_the_onnx_export_agrees(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from brecq.export import export_onnx

    build, inputs, _, _ = MODELS[name]
    model, calib, test = build(), inputs(16, seed=0), inputs(16, seed=1)
    qmodel, _ = quantize(model, calib, BrecqConfig(method="rtn", **W8A8))
    qmodel.eval()
    with torch.no_grad():
        ref, out = model(test), qmodel(test)
    assert _relative_error(out, ref) < 0.1
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99

    path = export_onnx(qmodel, tmp_path / f"{name}.onnx", test[:1])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = torch.from_numpy(session.run(None, {"input": test.numpy()})[0])
    # Uniform quantizers are bit-exact; the log2 softmax is float computation in ONNX and may
    # land a probability on the neighbouring power of two, which moves a few outputs slightly.
    assert _relative_error(exported, out) < 0.02


@pytest.mark.parametrize("name", list(MODELS))
def test_a_short_qdrop_reconstruction_stays_close(name):
    build, inputs, attention, _ = MODELS[name]
    model, calib, test = build(), inputs(16, seed=0), inputs(16, seed=1)
    config = BrecqConfig(method="qdrop", iters_w=3, iters_a=3, **W8A8)
    assert config.layernorm_reparam
    qmodel, report = quantize(model, calib, config)
    # Units are transformer blocks (or their attention and MLP halves): one attention at most.
    matmuls = [sum(is_matmul(n) for n in u.module.graph.nodes) for u in qmodel.units]
    assert sum(matmuls) == 2 * attention and max(matmuls) == 2
    assert len(report.units) == len(qmodel.units) >= attention
    with torch.no_grad():
        ref, out = model(test), qmodel.eval()(test)
    assert torch.isfinite(out).all()
    assert _relative_error(out, ref) < 0.1


def test_info_lists_every_quantized_tensor_by_kind(capsys):
    from brecq.cli import main

    assert main(["info", "--model", f"{__file__}:timm_swin", "--input-size", "3,32,32",
                 "--layers", "--a-bits", "4"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("Quantized activations by"))
    counts = dict(entry.rsplit(" ", 1) for entry in line.split(": ", 1)[1].split(", "))
    assert counts["matmul input"] == "6" and counts["softmax output"] == "2"
    assert counts["gelu output"] == "2" and int(counts["layernorm output"]) >= 4
    assert "layers.0.blocks.0.attn.softmax" in out and "4 bits log2" in out
