"""Export a quantized model as an ONNX QDQ graph (QuantizeLinear / DequantizeLinear pairs).

Weights become integer initializers followed by a DequantizeLinear (per output channel: axis 0,
axis 1 for a transposed convolution; or per tensor). A grouped transposed convolution's weight
(output channels along two axes) stays a float constant of exactly its dequantized values.
Weights of fewer than 8 bits are stored as int8 codes on their own grid (affine codes minus
their zero point, zero point 0), which onnxruntime runs in its u8s8 integer kernels at int8
speed with low-bit accuracy; with `opset >= 21`, weights of at most 4 bits are stored as
int4/uint4 instead (smaller files). Learned (AdaRound) rounding is exported through its integer
codes, so the graph dequantizes exactly the weights PyTorch uses.

Every activation quantizer becomes a per-tensor QuantizeLinear -> DequantizeLinear pair with
uint8 storage (affine, codes 0..2^b-1) or int8 storage (symmetric, -2^(b-1)..2^(b-1)-1).
onnxruntime has no kernels for e.g. 4-bit activations and QuantizeLinear always saturates to
the full storage range (0..255 for uint8), so for an activation quantizer narrower than its
storage a Clip to [(qmin - zp) * scale, (qmax - zp) * scale] precedes the QuantizeLinear. Both
ends are exact multiples of the scale, so clipping the float value and then rounding gives the
same code as PyTorch's round-then-clamp: the QDQ graph reproduces the fake-quantized values
of an A4 quantizer (codes 0..15 inside a uint8) element by element. Quantization itself is
bit-exact (both round half to even and compute x / scale). A log2 quantizer (attention
probabilities, `softmax_quantizer="log2"`) has no QuantizeLinear form: it stays its float
computation, scale * 2^-round(-log2(x / scale)), whose codes agree with PyTorch's except where
onnxruntime's log lands on the other side of a rounding boundary by a float rounding error.

Biases of layers that read a quantized activation are, with `integer_bias` (the default), on
the int32 grid in_scale * weight_scale in PyTorch already, and are exported as int32 codes
behind a DequantizeLinear with that step: the form onnxruntime's integer kernels (QLinearConv)
take as they are. With `integer_bias` off they stay float, and onnxruntime's QDQ optimizer
(from its basic level up) rounds the bias of each Conv between a DequantizeLinear input and a
QuantizeLinear output to that grid itself: that moves each such bias by up to half of a step,
carries some activations across a rounding boundary, and makes onnxruntime's default session
disagree with PyTorch on about 0.6% of CIFAR-10 images (benchmarks/export_check.py).

The graph is produced by the TorchScript-based exporter (`torch.onnx.export(dynamo=False)`)
from a copy of the network whose quantizers are replaced by modules that emit the QDQ nodes.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ModelError
from ..fileio import atomic_write_bytes
from ..graph.model import QuantizedModel
from ..quant import primitives as P
from ..quant.modules import QuantizedWeights
from ..quant.quantizers import ActQuantizer, BiasQuantizer, Log2Quantizer, WeightQuantizer

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# The TorchScript exporter knows opsets up to this one; higher opsets are declared afterwards
# (opset 21 only extends QuantizeLinear/DequantizeLinear and a few others with new types).
_MAX_EXPORTER_OPSET = 20
_INT4_OPSET = 21


class _QDQ(torch.autograd.Function):
    """Fake quantization that the ONNX exporter writes as [Clip ->] QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, clip):  # noqa: ANN001, ANN205
        shape = [1] * x.dim()
        if axis is not None:
            shape[axis] = -1
        s = scale.reshape(shape) if axis is not None else scale
        z = zero_point.to(x.dtype).reshape(shape) if axis is not None else zero_point.to(x.dtype)
        q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
        return (q - z) * s

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax, axis, clip):  # noqa: ANN001, ANN205
        if clip is not None:
            lo = g.op("Constant", value_t=torch.tensor(clip[0], dtype=torch.float32))
            hi = g.op("Constant", value_t=torch.tensor(clip[1], dtype=torch.float32))
            x = g.op("Clip", x, lo, hi)
        kwargs = {"axis_i": axis} if axis is not None else {}
        q = g.op("QuantizeLinear", x, scale, zero_point, **kwargs)
        return g.op("DequantizeLinear", q, scale, zero_point, **kwargs)


def example_input(shape: tuple[int, ...] | list[int]) -> Tensor:
    """A batch-1 input of the saved input shape to trace with; values from a private generator,
    so exporting leaves the caller's random state alone."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, *[int(s) for s in shape[1:]], generator=generator)


def _storage_dtype(qmin: int) -> torch.dtype:
    return torch.int8 if qmin < 0 else torch.uint8


class _WeightQDQ(nn.Module):
    """Stands in for a WeightQuantizer: QDQ of the (already dequantized) weight.

    With `signed_codes`, an affine weight of fewer than 8 bits is written as its codes minus
    the zero point (within -(2^b - 1) .. 2^b - 1, so int8 for b <= 7) with zero point 0: the
    same values, in the int8 form onnxruntime's fast u8s8 integer kernels take.
    """

    def __init__(self, quantizer: WeightQuantizer, signed_codes: bool = True) -> None:
        super().__init__()
        self.qmin, self.qmax = quantizer.qmin, quantizer.qmax
        self.per_channel = quantizer.scale.dim() > 0 and quantizer.scale.numel() > 1
        self.axis = quantizer.channel_axis if self.per_channel else None
        zero_point = quantizer.zero_point.detach().reshape(-1 if self.per_channel else ())
        if signed_codes and self.qmin >= 0 and quantizer.bits < 8:
            self.qmin, self.qmax = -128, 127
            zero_point = torch.zeros_like(zero_point)
        self.register_buffer("scale", quantizer.scale.detach().reshape(-1 if self.per_channel else ())
                             .float().clone())
        self.register_buffer("zero_point", zero_point.to(_storage_dtype(self.qmin)).clone())

    def forward(self, weight: Tensor) -> Tensor:
        return _QDQ.apply(weight, self.scale, self.zero_point, self.qmin, self.qmax, self.axis,
                          None)


class _ActQDQ(nn.Module):
    """Stands in for an ActQuantizer: per-tensor [Clip ->] QDQ."""

    def __init__(self, quantizer: ActQuantizer) -> None:
        super().__init__()
        self.qmin, self.qmax = quantizer.qmin, quantizer.qmax
        scale = quantizer.scale.detach().reshape(()).float().clone()
        zp = int(quantizer.zero_point.item())
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.tensor(zp, dtype=_storage_dtype(self.qmin)))
        info = torch.iinfo(_storage_dtype(self.qmin))
        self.clip: tuple[float, float] | None = None
        if (self.qmin, self.qmax) != (info.min, info.max):
            # Exact multiples of the scale (float32 products, as PyTorch computes them).
            lo = float((torch.tensor(float(self.qmin - zp)) * scale).item())
            hi = float((torch.tensor(float(self.qmax - zp)) * scale).item())
            self.clip = (lo, hi)

    def forward(self, x: Tensor) -> Tensor:
        return _QDQ.apply(x, self.scale, self.zero_point, self.qmin, self.qmax, None, self.clip)


class _BiasDQFunction(torch.autograd.Function):
    """int32 bias codes times their step; exported as one DequantizeLinear."""

    @staticmethod
    def forward(ctx, codes, step, axis):  # noqa: ANN001, ANN205
        return codes.to(step.dtype) * step

    @staticmethod
    def symbolic(g, codes, step, axis):  # noqa: ANN001, ANN205
        kwargs = {"axis_i": axis} if axis is not None else {}
        return g.op("DequantizeLinear", codes, step, **kwargs)


class _BiasDQ(nn.Module):
    """Stands in for a BiasQuantizer: the rounded bias as int32 codes and their step."""

    def __init__(self, codes: Tensor, step: Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int32))
        self.register_buffer("step", step.float())

    def forward(self, bias: Tensor, weight_quantizer: nn.Module) -> Tensor:
        return _BiasDQFunction.apply(self.codes, self.step, 0 if self.step.dim() else None)


def _replace_child(parent: nn.Module, child: nn.Module, new: nn.Module) -> None:
    for name, module in parent.named_children():
        if module is child:
            setattr(parent, name, new)
            return
    raise ModelError(f"quantizer not found among the children of {type(parent).__name__}")


@torch.no_grad()
def qdq_network(qmodel: QuantizedModel, *, int4_weights: bool = False) -> nn.Module:
    """A CPU copy of the network with its quantizers replaced by QDQ-emitting modules.

    Each quantized weight is set to its dequantized value, so the copy computes what `qmodel`
    computes (with weight and activation quantization on) and exports as a QDQ graph. Affine
    weights of fewer than 8 bits get signed int8 codes (see `_WeightQDQ`), except, with
    `int4_weights`, those of at most 4 bits, which keep their unsigned codes for uint4 storage.
    """
    if not isinstance(qmodel, QuantizedModel):
        raise ModelError(f"export needs a QuantizedModel, got {type(qmodel).__name__}")
    net = copy.deepcopy(qmodel.network).cpu().eval()
    for owner in [m for m in net.modules() if isinstance(m, QuantizedWeights)]:
        bias_quantizer = getattr(owner, "bias_quantizer", None)
        if isinstance(bias_quantizer, BiasQuantizer):
            # Before the activation quantizers are swapped out: the step reads the input's scale.
            if not bias_quantizer.active(owner.weight_quantizer):
                raise ModelError("a layer's input quantizer has no scale yet: export the model "
                                 "returned by brecq.quantize or load_quantized")
            step = bias_quantizer.step(owner.weight_quantizer).float()
            codes = P.bias_to_int(owner.bias.detach().float(), step)
            owner.bias_quantizer = _BiasDQ(codes, step)
        for _, weight, quantizer in list(owner.weight_quantizers()):
            codes = quantizer.int_weight(weight)
            weight.copy_((codes - quantizer.zero_point) * quantizer.scale)
            if quantizer.channel_axis == 1 and quantizer.groups > 1 and quantizer.per_channel:
                # A grouped transposed convolution's output channels lie along two weight
                # dimensions, which no per-axis DequantizeLinear describes: the weight stays a
                # float constant holding exactly the dequantized values.
                _replace_child(owner, quantizer, nn.Identity())
                continue
            signed = not (int4_weights and quantizer.bits <= 4)
            _replace_child(owner, quantizer, _WeightQDQ(quantizer, signed_codes=signed))
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ActQuantizer):
                if not bool(child.initialized):
                    raise ModelError(f"activation quantizer {name!r} has no scale yet: export "
                                     "the model returned by brecq.quantize or load_quantized")
                if isinstance(child, Log2Quantizer):
                    # No QuantizeLinear codes powers of two: the copy keeps computing
                    # scale * 2^-k in float (Log, Round, Pow, Where nodes in the graph).
                    child.set_drop(0.0)
                    continue
                setattr(parent, name, _ActQDQ(child))
    for part in net.modules():
        if isinstance(part, QuantizedModel):
            # A part traced on its own (the model's forward is not traceable) runs its graph,
            # whose quantizers were just swapped, not the unit graphs made for reconstruction.
            object.__setattr__(part, "_runner", None)
    if isinstance(net, torch.fx.GraphModule):
        net.recompile()
    return net


def _fold_weight_quantize(model, int4: bool) -> int:  # noqa: ANN001
    """Replace QuantizeLinear of constant weights by integer initializers; returns the count."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    # The exporter shares equal constants (e.g. all-zero zero points) through Identity nodes.
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    folded, drop_nodes = 0, []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or not all(i in inits for i in node.input[:3]):
            continue
        w = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zp_init = inits[node.input[2]]
        zp = numpy_helper.to_array(zp_init)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.ndim:
            shape[axis] = -1
        info = np.iinfo(zp.dtype)
        codes = np.clip(np.rint(w / scale.reshape(shape)) + zp.reshape(shape).astype(np.float32),
                        info.min, info.max).astype(zp.dtype)
        qname = node.output[0]
        if int4 and codes.min() >= (-8 if info.min < 0 else 0) and codes.max() <= (7 if info.min < 0 else 15):
            dtype = TensorProto.INT4 if info.min < 0 else TensorProto.UINT4
            q_init = helper.make_tensor(qname + "_int4", dtype, codes.shape, codes.flatten().tolist())
            z_init = helper.make_tensor(zp_init.name + "_int4", dtype, zp.shape, zp.flatten().tolist())
            for consumer in model.graph.node:
                if consumer.op_type == "DequantizeLinear" and consumer.input[0] == qname:
                    consumer.input[0] = q_init.name
                    consumer.input[2] = z_init.name
            model.graph.initializer.extend([q_init, z_init])
        else:
            q_init = numpy_helper.from_array(codes, qname + "_quantized")
            for consumer in model.graph.node:
                for k, name in enumerate(consumer.input):
                    if name == qname:
                        consumer.input[k] = q_init.name
            model.graph.initializer.append(q_init)
        drop_nodes.append(node)
        folded += 1
    for node in drop_nodes:
        model.graph.node.remove(node)
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    for init in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(init)
    return folded


def export_onnx(
    qmodel: QuantizedModel,
    path: str | os.PathLike[str],
    example_input: Tensor,
    opset: int = DEFAULT_OPSET,
    *,
    dynamic_batch: bool = True,
    input_name: str = "input",
) -> Path:
    """Write `qmodel` as a QDQ ONNX model to `path` and return the path.

    `example_input` fixes every dimension except the batch (dynamic unless `dynamic_batch` is
    False). `opset` must be at least 13 (per-channel QuantizeLinear); with `opset >= 21`,
    weights of at most 4 bits are stored as int4/uint4 (needs onnxruntime >= 1.18).
    """
    import onnx

    if opset < 13:
        raise ModelError(f"opset {opset} has no per-channel QuantizeLinear: use opset 13 or newer")
    net = qdq_network(qmodel, int4_weights=opset >= _INT4_OPSET)
    example = example_input.detach().cpu()
    with torch.no_grad():
        sample_out = net(example)
    single = isinstance(sample_out, Tensor)
    output_names = ["output"] if single else None
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {input_name: {0: "batch"}}
        if single:
            dynamic_axes["output"] = {0: "batch"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                net, (example,), buffer, dynamo=False,
                opset_version=min(opset, _MAX_EXPORTER_OPSET),
                input_names=[input_name], output_names=output_names, dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        except Exception as exc:  # noqa: BLE001 - exporter failures come in many types
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(
                f"ONNX export of {type(qmodel.network).__name__} failed ({reason[:200]}): the model "
                "uses an operation the ONNX exporter does not support"
            ) from exc
    model = onnx.load_from_string(buffer.getvalue())
    folded = _fold_weight_quantize(model, int4=opset >= _INT4_OPSET)
    if opset > _MAX_EXPORTER_OPSET:
        for entry in model.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = opset
    model.producer_name = "brecq"
    onnx.checker.check_model(model)
    out = Path(path).expanduser()
    data = model.SerializeToString()
    atomic_write_bytes(out, data)
    logger.info("exported QDQ ONNX model to %s (opset %d, %d quantized weights, %.1f KiB)",
                out, opset, folded, len(data) / 1024)
    return out
