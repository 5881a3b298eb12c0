"""Transformers prepared with their attention as explicit graph nodes: Q·K^T and attention·V as
matmul nodes and the softmax as a node, outside any opaque module, in float equal to the model."""

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from brecq import BrecqConfig, load_quantized, prepare, quantize, save_quantized
from brecq.graph.attention import (
    ExplicitMultiheadAttention,
    decompose_sdpa,
    explicit_multihead_attention,
)
from brecq.graph.model import QuantizedModel
from brecq.graph.placement import is_matmul, is_softmax

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

TINY = dict(iters_w=2, iters_a=2, calib_size=8, batch_size=4, act_init_samples=4, device="cpu",
            scale_search="minmax", method="rtn")


def _attention_nodes(gm: fx.GraphModule) -> tuple[int, int]:
    """(matmul nodes, softmax nodes) of `gm`; fails on an SDPA call or an opaque attention."""
    assert not any(n.op == "call_function" and n.target is F.scaled_dot_product_attention
                   for n in gm.graph.nodes)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in gm.modules())
    return (sum(is_matmul(n) for n in gm.graph.nodes),
            sum(is_softmax(n, gm) for n in gm.graph.nodes))


def _check_model(model: nn.Module, x: torch.Tensor, attention_layers: int, blocks: list[str]):
    model.eval()
    with torch.no_grad():
        ref = model(x)
    qmodel = prepare(model, BrecqConfig(weight_bits=8, act_bits=8, **TINY), (x,))
    assert qmodel.traced and isinstance(qmodel.network, fx.GraphModule)
    assert _attention_nodes(qmodel.network) == (2 * attention_layers, attention_layers)
    with torch.no_grad(), qmodel.quantization(weights=False, acts=False):
        torch.testing.assert_close(qmodel(x), ref, atol=1e-5, rtol=1e-5)
    assert [u.name for u in qmodel.units if u.kind == "block"] == blocks
    quantized, _ = quantize(model, x, BrecqConfig(weight_bits=8, act_bits=8, **TINY))
    with torch.no_grad():
        out = quantized(x)
    assert ((out - ref).norm() / ref.norm()).item() < 0.1
    return qmodel


def _random_head(head: nn.Linear) -> None:
    """Classifier heads start at zero in timm/torchvision: give them weights to compare by."""
    with torch.no_grad():
        head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))


def _trained_like_tokens(*tokens: nn.Parameter) -> None:
    """timm and torchvision start the class token at (near) zero and the position embedding
    small, far below the patch tokens: on the residual's 8-bit grid the class token vanishes and
    the head reads noise. Trained tokens are on the patch tokens' scale."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for token in tokens:
            token.normal_(0, 1, generator=generator)


def test_timm_vit_with_fused_attention_is_decomposed():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_classes=10)
    assert model.blocks[0].attn.fused_attn
    _random_head(model.head)
    _trained_like_tokens(model.cls_token, model.pos_embed)
    _check_model(model, torch.randn(8, 3, 32, 32), 2, ["blocks.0", "blocks.1"])


def test_timm_deit_distilled_is_decomposed():
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                       num_heads=2, num_classes=10)
    _random_head(model.head)
    _random_head(model.head_dist)
    _trained_like_tokens(model.cls_token, model.dist_token, model.pos_embed)
    _check_model(model, torch.randn(8, 3, 32, 32), 2, ["blocks.0", "blocks.1", "head..head_dist"])


def test_timm_swin_window_attention_is_explicit():
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=24,
                            depths=(1, 1), num_heads=(2, 2), num_classes=10)
    _random_head(model.head.fc)
    # The second stage has one block: its unit is the stage's block list, after the downsample.
    _check_model(model, torch.randn(8, 3, 32, 32), 2, ["layers.0", "layers.1.blocks"])


def test_timm_swin_fused_shifted_window_attention_with_its_mask_is_decomposed():
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=24,
                            depths=(2,), num_heads=(2,), num_classes=10).eval()
    for block in model.layers[0].blocks:
        block.attn.fused_attn = True  # scaled_dot_product_attention, with the shift mask
    assert model.layers[0].blocks[1].attn_mask is not None
    x = torch.randn(2, 3, 32, 32)
    qmodel = prepare(model, BrecqConfig(weight_bits=8, act_bits=8, **TINY), (x,))
    assert _attention_nodes(qmodel.network) == (4, 2)
    with torch.no_grad(), qmodel.quantization(weights=False, acts=False):
        torch.testing.assert_close(qmodel(x), model(x), atol=1e-5, rtol=1e-5)


def test_torchvision_vit_multihead_attention_is_written_explicitly():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10)
    _random_head(model.heads.head)
    _trained_like_tokens(model.class_token, model.encoder.pos_embedding)
    qmodel = _check_model(model, torch.randn(8, 3, 32, 32), 2,
                          [f"encoder.layers.encoder_layer_{i}" for i in range(2)])
    assert {"encoder.layers.encoder_layer_0.self_attention.q_proj",
            "encoder.layers.encoder_layer_0.self_attention.out_proj"} <= set(qmodel.layers)


class _UserAttention(nn.Module):
    def __init__(self, batch_first: bool, kdim: int | None = None, vdim: int | None = None):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=vdim)
        self.key = nn.Linear(8, kdim or 8)
        self.value = nn.Linear(8, vdim or 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        seq = x if self.batch_first else x.transpose(0, 1)
        out, _ = self.attn(seq, self.key(seq), self.value(seq), need_weights=False)
        return self.head(out if self.batch_first else out.transpose(0, 1))


@pytest.mark.parametrize(("batch_first", "kdim", "vdim"),
                         [(True, None, None), (False, None, None), (True, 4, 6), (False, 4, 6)])
def test_user_multihead_attention_is_written_explicitly(batch_first, kdim, vdim):
    torch.manual_seed(0)
    # No module holds the key/value Linears and the attention: the graph piece is the block.
    qmodel = _check_model(_UserAttention(batch_first, kdim, vdim), torch.randn(8, 5, 8), 1,
                          ["key..attn.v_proj"])
    assert qmodel.units[0].layers == ("key", "value", "attn.q_proj", "attn.k_proj", "attn.v_proj")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_explicit_multihead_attention_equals_the_original_with_masks(batch_first, mask_dtype):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=4, vdim=6).eval()
    explicit = ExplicitMultiheadAttention(attention)
    n, length, source = 3, 5, 7
    q = torch.randn(n, length, 8)
    k, v = torch.randn(n, source, 4), torch.randn(n, source, 6)
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    padding = torch.zeros(n, source, dtype=torch.bool)
    padding[1, -2:] = True
    mask = torch.rand(length, source) < 0.3
    mask[:, 0] = False  # every query sees at least one key
    if mask_dtype is not torch.bool:
        padding = padding.float().masked_fill(padding, -1e4)
        mask = torch.randn(length, source)
    with torch.no_grad():
        for kwargs in ({}, {"key_padding_mask": padding, "attn_mask": mask},
                       {"attn_mask": mask, "average_attn_weights": False}):
            expected = attention(q, k, v, **kwargs)
            torch.testing.assert_close(explicit(q, k, v, **kwargs), expected, atol=1e-5,
                                       rtol=1e-5)
    for name, parameter in attention.named_parameters():
        if name.startswith("out_proj"):
            assert explicit.get_parameter(name) is parameter
    assert torch.equal(explicit.k_proj.weight, attention.k_proj_weight)


def test_multihead_attention_with_bias_kv_stays_whole():
    model = nn.Sequential(nn.Linear(8, 8))
    model.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner.attn(x, x, x)[0]

    net = Net().eval()
    assert explicit_multihead_attention(net, (torch.randn(2, 5, 8),)) == []
    assert isinstance(net.inner.attn, nn.MultiheadAttention)


def test_multihead_attention_kept_in_float_stays_whole():
    model = _UserAttention(True).eval()
    qmodel = prepare(model, BrecqConfig(weight_bits=8, act_bits=8, float_layers=("attn",),
                                        **TINY), (torch.randn(2, 5, 8),))
    assert isinstance(qmodel.network.get_submodule("attn"), nn.MultiheadAttention)


class _Sdpa(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kwargs)


@pytest.mark.parametrize(("mask", "kwargs"), [
    ("none", {}), ("bool", {}), ("float", {}), ("none", {"is_causal": True}),
    ("float", {"scale": 0.3}), ("none", {"enable_gqa": True}),
])
def test_decomposed_sdpa_equals_torch(mask, kwargs):
    torch.manual_seed(0)
    heads_kv = 1 if kwargs.get("enable_gqa") else 2
    q, k, v = torch.randn(3, 2, 5, 4), torch.randn(3, heads_kv, 5, 4), torch.randn(3, heads_kv, 5, 4)
    masks = {"none": None, "bool": torch.rand(3, 1, 5, 5) < 0.7, "float": torch.randn(5, 5)}
    if mask == "bool":
        masks["bool"][..., 0] = True
    model = _Sdpa(**kwargs)
    gm = fx.symbolic_trace(model, concrete_args={"mask": None} if mask == "none" else None)
    assert decompose_sdpa(gm) == 1
    assert _attention_nodes(gm) == (2, 1)
    expected = model(q, k, v, masks[mask])
    torch.testing.assert_close(gm(q, k, v, masks[mask]), expected, atol=1e-5, rtol=1e-5)


def _tiny_bert(attention="eager"):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    # eager: matmul and softmax in the model's code; sdpa (the default): decomposed on the graph
    config._attn_implementation = attention
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _bert_inputs():
    ids = torch.randint(0, 100, (8, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(8, 7, dtype=torch.long)
    mask[1::2, 5:] = 0  # padded sentences: the layers get an additive mask
    return ids, mask


class _SentenceEncoder(nn.Module):
    """Token ids and attention mask stacked in one tensor (N, 2, L), as quantize() takes one."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, x):
        return self.bert(x[:, 0], attention_mask=x[:, 1]).last_hidden_state


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_hugging_face_bert_layers_are_traced_with_attention_explicit(attention):
    bert = _tiny_bert(attention)
    ids, mask = _bert_inputs()
    with torch.no_grad():
        ref = bert(ids, attention_mask=mask)
    qmodel = prepare(bert, BrecqConfig(weight_bits=8, act_bits=8, **TINY), (ids, mask))
    # BertModel's own forward (mask building) runs as written; each encoder layer is a graph.
    graphs = {name: m.network for name, m in qmodel.network.named_modules()
              if isinstance(m, QuantizedModel)}
    assert [name for name, g in graphs.items() if _attention_nodes(g) == (2, 1)] == [
        "encoder.layer.0.prepared", "encoder.layer.1.prepared"]
    with torch.no_grad(), qmodel.quantization(weights=False, acts=False):
        out = qmodel(ids, attention_mask=mask)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=1e-5)
    # The attention (with its residual and LayerNorm) and the feed-forward part of each layer.
    # sdpa passes the layers a boolean mask, a side tensor that leaves BertAttention a module
    # between two cuts; eager passes a float mask, live beside the hidden states: a graph piece.
    layer = "encoder.layer.{}.".format
    attention_unit = {"sdpa": "{0}attention",
                      "eager": "{0}attention.self.query..{0}attention.output.dense"}[attention]
    assert [u.name for u in qmodel.units] == [
        name for i in range(2) for name in (
            attention_unit.format(layer(i)),
            f"{layer(i)}intermediate.dense..{layer(i)}output.dense")] + ["pooler.dense"]


def test_hugging_face_bert_inside_a_wrapper_is_quantized_with_padding_masks(tmp_path):
    model = _SentenceEncoder(_tiny_bert()).eval()
    x = torch.stack(_bert_inputs(), 1)
    with torch.no_grad():
        ref = model(x)
    config = BrecqConfig(weight_bits=8, act_bits=8, **{**TINY, "method": "qdrop"})
    qmodel, _ = quantize(model, x, config)
    assert len([u for u in qmodel.units if "attention" in u.name]) == 2
    with torch.no_grad():
        out = qmodel(x)
        assert ((out - ref).norm() / ref.norm()).item() < 0.05
        with qmodel.quantization(weights=False, acts=False):
            torch.testing.assert_close(qmodel(x), ref, atol=1e-5, rtol=1e-5)
    save_quantized(qmodel, tmp_path, config=config, example_input=x)
    # Token ids, and padded ones (an unpadded example would trace the layers without a mask).
    loaded = load_quantized(_SentenceEncoder(_tiny_bert()).eval(), tmp_path, example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_unpacked_shapes_trace_with_example_values():
    from brecq.graph.tracing import CallArguments, trace

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x, scale=None, double=False):
            y = self.proj(x).view(*x.shape[:-1], 2, -1)  # fx alone cannot unpack a shape
            y = y if scale is None else y * scale
            return 2 * y if double else y

    model = Heads().eval()
    x = torch.randn(2, 5, 8)
    with pytest.raises(Exception, match="iterated|len"):
        trace(model)
    call = CallArguments.of(model, (x,), {"scale": None, "double": True})
    gm, leaves = trace(model, call=call)
    assert not leaves
    assert [n.op for n in gm.graph.nodes].count("placeholder") == 1  # fixed values are no inputs
    assert [n.op for n in gm.graph.nodes].count("get_attr") == 0  # nor the example's own run
    bigger = torch.randn(3, 4, 8)  # the sizes stay symbolic, only the rank is fixed
    torch.testing.assert_close(gm(bigger), model(bigger, double=True))
    with pytest.raises(ValueError, match="non-tensor arguments"):
        call.select((bigger,), {"double": False})
    with pytest.raises(ValueError, match="scale \\(fixed when traced\\)"):
        call.select((bigger,), {"scale": torch.ones(()), "double": True})


def test_conditions_on_shapes_trace_and_conditions_on_values_do_not():
    from brecq.graph.tracing import CallArguments, trace

    class Branches(nn.Module):
        def __init__(self, on_values):
            super().__init__()
            self.on_values = on_values
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            if x.shape[1] > 1:  # a shape: decided by the example
                x = self.proj(x)
            if self.on_values and x.sum().item() > -1e30:  # a value: not traceable
                x = x * 2
            return x

    x = torch.randn(2, 5, 8)
    shapes = Branches(on_values=False).eval()
    gm, _ = trace(shapes, call=CallArguments.of(shapes, (x,), {}))
    torch.testing.assert_close(gm(x), shapes(x))
    values = Branches(on_values=True).eval()
    with pytest.raises(Exception, match="control flow"):
        trace(values, call=CallArguments.of(values, (x,), {}))


def test_hugging_face_bert_encoder_layers_as_units_by_name():
    bert = _tiny_bert("sdpa")
    ids, _ = _bert_inputs()
    layers = ("encoder.layer.0", "encoder.layer.1")
    qmodel, _ = quantize(bert, ids, BrecqConfig(weight_bits=8, act_bits=8, unit_names=layers,
                                                **{**TINY, "method": "qdrop"}))
    assert [(u.name, len(u.layers)) for u in qmodel.units] == [
        ("encoder.layer.0", 6), ("encoder.layer.1", 6), ("pooler.dense", 1)]
    with torch.no_grad():
        ref = bert(ids).last_hidden_state
        out = qmodel(ids).last_hidden_state
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
