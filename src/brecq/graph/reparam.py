"""LayerNorm output reparameterization (RepQ-ViT): per-channel scales, deployed per tensor.

Post-LayerNorm activations vary hugely between channels. For every LayerNorm whose output only
Linear layers read, this pass measures each output channel's range on calibration data and
folds the change of variables of `brecq.quant.reparam` into the float model: the LayerNorm's
weight and bias, and the input columns and bias of each Linear that reads the output. The float
function is unchanged; afterwards the single per-tensor quantizer that `prepare` puts on the
LayerNorm output quantizes it as a per-channel quantizer would have quantized the original.

A self-attention `nn.MultiheadAttention` (query, key and value all the LayerNorm output, as in
torchvision's ViT) counts as a Linear: its packed input projection absorbs the factors.

A LayerNorm is left alone (and the reason logged at debug level) when anything but a Linear
reads its values (a residual add in a post-LN encoder such as BERT, a matmul, a reshape or
transpose that moves the channel dimension, the model output), when a Linear reads it through
anything but dropout or identity, when a parameter involved is shared or read elsewhere, when
it has no affine weight and bias, or when it normalizes more than the last dimension. Both
`nn.LayerNorm` modules and `F.layer_norm` calls on parameters (timm's LayerNorm, traced through)
are recognized, on the graph of `graph.tracing.trace`.
"""

from __future__ import annotations

import builtins
import copy
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError
from ..quant.reparam import layernorm_reparam_factors, reparam_affine, reparam_linear_input
from .tracing import trace

logger = logging.getLogger(__name__)

_LAYER_NORM_FUNCTIONS = (F.layer_norm,)
# Consumers that read only a tensor's metadata, not its values.
_METADATA_ATTRIBUTES = ("ndim", "shape", "dtype", "device")
_METADATA_METHODS = ("dim", "size")
# Between a LayerNorm and its Linear readers: ops that pass every channel through unchanged (at
# inference; dropout is the identity there).
_PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                         nn.AlphaDropout, nn.FeatureAlphaDropout)
_PASS_THROUGH_FUNCTIONS = (F.dropout,)
_PASS_THROUGH_METHODS = ("contiguous",)


@dataclass(frozen=True)
class LayerNormCandidate:
    """A LayerNorm whose output only Linear layers read: where its affine parameters and its
    readers are (paths in the model)."""

    name: str
    weight: str
    bias: str
    channels: int
    linears: tuple[str, ...]


@dataclass
class LayerNormReparamReport:
    """Which LayerNorms were reparameterized (name -> the Linears that read them), which were
    skipped and why (name -> reason)."""

    reparameterized: dict[str, tuple[str, ...]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class LayerNormPlan:
    """What `plan_layernorm_reparam` found: the LayerNorms to reparameterize, the others with
    the reason."""

    candidates: list[LayerNormCandidate]
    skipped: dict[str, str]


# --------------------------------------------------------------------------------------------
# Finding the LayerNorms on the graph


class _GraphUses:
    """How often the graph calls each module and reads each parameter, and which parameters are
    tied to another name."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module) -> None:
        nodes = list(gm.graph.nodes)
        self.calls = Counter(str(n.target) for n in nodes if n.op == "call_module")
        self.reads = Counter(str(n.target) for n in nodes if n.op == "get_attr")
        owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        self.tied = {name for name, p in model.named_parameters(remove_duplicate=False)
                     if owners[id(p)] > 1}

    def inside_a_called_module(self, path: str) -> bool:
        """Whether a module called whole (a leaf) contains `path` and may use it."""
        return any(path.startswith(called + ".") for called in self.calls)

    def module_used_once(self, path: str) -> bool:
        """`path` is called exactly once, by no enclosing leaf, and its parameters are neither
        read directly nor tied to another name."""
        prefix = path + "."
        return (self.calls[path] == 1 and not self.inside_a_called_module(path)
                and not any(t.startswith(prefix) for t in self.reads)
                and not any(t.startswith(prefix) for t in self.tied))

    def parameter_used_once(self, path: str) -> bool:
        return (self.reads[path] == 1 and path not in self.tied
                and not self.inside_a_called_module(path))


def _layer_norm_of(node: fx.Node, modules: dict[str, nn.Module],
                   uses: _GraphUses) -> tuple[str, str, str, int] | str | None:
    """(name, weight path, bias path, channels) when `node` is a LayerNorm that could be
    reparameterized, a reason (str) when it is one that cannot, None when it is none."""
    if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.LayerNorm):
        name = str(node.target)
        norm = modules[name]
        if norm.weight is None or norm.bias is None:
            return f"{name}: no affine weight and bias to fold into"
        if not uses.module_used_once(name):
            return f"{name}: called more than once or its parameters are read elsewhere"
        shape, weight, bias = norm.normalized_shape, f"{name}.weight", f"{name}.bias"
    elif node.op == "call_function" and node.target in _LAYER_NORM_FUNCTIONS:
        args = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), node.args))
        args.update(node.kwargs)
        weight, bias = args.get("weight"), args.get("bias")
        if not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in (weight, bias)):
            return f"{node.name}: F.layer_norm without weight and bias parameters to fold into"
        only_here = len(weight.users) == len(bias.users) == 1
        weight, bias = str(weight.target), str(bias.target)
        name = weight.rpartition(".")[0] or node.name
        if not (only_here and uses.parameter_used_once(weight) and uses.parameter_used_once(bias)):
            return f"{name}: its weight or bias is shared or read elsewhere"
        shape = args.get("normalized_shape")
    else:
        return None
    if not (isinstance(shape, (tuple, list)) and len(shape) == 1 and isinstance(shape[0], int)):
        return f"{name}: normalizes over {shape!r}, not one channel dimension"
    return name, weight, bias, int(shape[0])


def _reads_metadata_only(user: fx.Node, node: fx.Node) -> bool:
    if not (user.args and user.args[0] is node):
        return False
    if user.op == "call_function" and user.target is builtins.getattr:
        return user.args[1] in _METADATA_ATTRIBUTES
    return user.op == "call_method" and user.target in _METADATA_METHODS


def _passes_through(user: fx.Node, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if not (user.args and user.args[0] is node):
        return False
    if user.op == "call_module":
        return isinstance(modules.get(str(user.target)), _PASS_THROUGH_MODULES)
    if user.op == "call_function":
        return user.target in _PASS_THROUGH_FUNCTIONS
    return user.op == "call_method" and user.target in _PASS_THROUGH_METHODS


def input_projection(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The weight [out, in] and bias that multiply a reader's input: a Linear's own, or the
    packed query/key/value projection of a self-attention `nn.MultiheadAttention`."""
    if isinstance(module, nn.MultiheadAttention):
        return module.in_proj_weight, module.in_proj_bias
    return module.weight, module.bias


def _reads_as_input_projection(user: fx.Node, node: fx.Node, module: nn.Module | None) -> bool:
    """Whether `user` multiplies `node` by the weight of `input_projection` and nothing else:
    a Linear called on it alone, or self-attention with it as query, key and value."""
    if isinstance(module, nn.Linear):
        return user.args == (node,) and not user.kwargs
    if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        rest = [*user.args[3:], *user.kwargs.values()]
        return user.args[:3] == (node,) * 3 and not any(arg is node for arg in rest)
    return False


def _linear_readers(node: fx.Node, channels: int, modules: dict[str, nn.Module],
                    uses: _GraphUses) -> tuple[str, ...] | str:
    """The Linears (or self-attention modules) that read `node`'s values (through pass-through
    ops), or why another consumer rules the reparameterization out."""
    linears: list[str] = []
    frontier = [node]
    while frontier:
        current = frontier.pop()
        for user in current.users:
            if _reads_metadata_only(user, current):
                continue
            module = modules.get(str(user.target)) if user.op == "call_module" else None
            if _reads_as_input_projection(user, current, module):
                features = input_projection(module)[0].shape[1]
                if features != channels:
                    return f"{user.target} reads {features} features, not {channels}"
                if not uses.module_used_once(str(user.target)):
                    return (f"{user.target} is called more than once or its parameters are"
                            " shared or read elsewhere")
                linears.append(str(user.target))
            elif _passes_through(user, current, modules):
                frontier.append(user)
            else:
                what = ("the model output" if user.op == "output"
                        else getattr(user.target, "__name__", str(user.target)))
                return f"its output is also read by {what}, which a Linear's weights cannot absorb"
    return tuple(dict.fromkeys(linears)) or "no Linear reads its output"


def plan_layernorm_reparam(model: nn.Module) -> LayerNormPlan:
    """The LayerNorms of `model` that can be reparameterized, and the others with reasons."""
    try:
        gm, _ = trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure: nothing to find on a graph
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return LayerNormPlan([], {"<model>": f"torch.fx cannot trace {type(model).__name__} ({reason})"})
    modules = dict(model.named_modules())
    uses = _GraphUses(gm, model)
    candidates, skipped = [], {}
    for node in gm.graph.nodes:
        found = _layer_norm_of(node, modules, uses)
        if found is None:
            continue
        if isinstance(found, str):
            name, _, reason = found.partition(": ")
            skipped[name] = reason
            continue
        name, weight, bias, channels = found
        readers = _linear_readers(node, channels, modules, uses)
        if isinstance(readers, str):
            skipped[name] = readers
        else:
            candidates.append(LayerNormCandidate(name, weight, bias, channels, readers))
    return LayerNormPlan(candidates, skipped)


# --------------------------------------------------------------------------------------------
# Measuring and folding


@torch.no_grad()
def _channel_ranges(model: nn.Module, candidates: list[LayerNormCandidate], data: Tensor,
                    batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """Per candidate, each output channel's min and max over `data`, read at the input of its
    first Linear (the LayerNorm output, dropout being the identity in eval mode)."""
    lows: list[Tensor | None] = [None] * len(candidates)
    highs: list[Tensor | None] = [None] * len(candidates)

    def observe(k: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            low, high = rows.amin(dim=0), rows.amax(dim=0)
            lows[k] = low if lows[k] is None else torch.minimum(lows[k], low)
            highs[k] = high if highs[k] is None else torch.maximum(highs[k], high)
        return hook

    handles = [model.get_submodule(c.linears[0]).register_forward_pre_hook(observe(k))
               for k, c in enumerate(candidates)]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, data.shape[0], batch_size):
            model(data[start : start + batch_size].to(device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if any(low is None for low in lows):
        raise ModelError("a Linear found on the traced graph was not called on the calibration "
                         "data: pass at least one calibration sample the model runs on")
    return list(zip(lows, highs))


@torch.no_grad()
def _fold(model: nn.Module, candidate: LayerNormCandidate, low: Tensor, high: Tensor, bits: int,
          symmetric: bool) -> None:
    factors = layernorm_reparam_factors(low, high, bits, symmetric)
    projections = [input_projection(model.get_submodule(name)) for name in candidate.linears]
    if any(bias is None for _, bias in projections):
        factors = factors.without_shift()
    weight, bias = model.get_parameter(candidate.weight), model.get_parameter(candidate.bias)
    new_weight, new_bias = reparam_affine(weight, bias, factors)
    weight.copy_(new_weight)
    bias.copy_(new_bias)
    for weight, bias in projections:
        new_weight, new_bias = reparam_linear_input(weight, bias, factors)
        weight.copy_(new_weight)
        if bias is not None:
            bias.copy_(new_bias)


def reparameterize_layernorms(
    model: nn.Module, data: Tensor, bits: int, *, symmetric: bool = False, batch_size: int = 32,
    gather: Callable[[Tensor], Tensor] | None = None, plan: LayerNormPlan | None = None,
) -> LayerNormReparamReport:
    """Fold per-channel `bits`-bit output scales of every eligible LayerNorm of `model` (changed
    in place) into its affine and the Linears that read it; the float outputs stay the same.

    Channel ranges come from `data` (samples, run in batches of `batch_size` in eval mode).
    With several ranks, `gather` concatenates a 1-D tensor of every rank (`DistContext.gather`)
    so that all ranks fold the ranges of the union of their shards.
    """
    plan = plan or plan_layernorm_reparam(model)
    report = LayerNormReparamReport(skipped=dict(plan.skipped))
    ranges = _channel_ranges(model, plan.candidates, data, batch_size) if plan.candidates else []
    for candidate, (low, high) in zip(plan.candidates, ranges):
        if gather is not None:
            low = gather(low).reshape(-1, candidate.channels).amin(dim=0)
            high = gather(high).reshape(-1, candidate.channels).amax(dim=0)
        if not bool(torch.isfinite(low).all() & torch.isfinite(high).all()):
            report.skipped[candidate.name] = "its calibrated output range is not finite"
            continue
        _fold(model, candidate, low, high, bits, symmetric)
        report.reparameterized[candidate.name] = candidate.linears
    for name, reason in report.skipped.items():
        logger.debug("LayerNorm %s is not reparameterized: %s", name, reason)
    if report.reparameterized or report.skipped:
        logger.info("LayerNorm reparameterization: %d LayerNorm output(s) get per-channel scales "
                    "folded into their Linear readers, %d left as they are",
                    len(report.reparameterized), len(report.skipped))
    return report


def layernorm_reparameterized(
    model: nn.Module, data: Tensor, bits: int, *, symmetric: bool = False, batch_size: int = 32,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> tuple[nn.Module, LayerNormReparamReport]:
    """`reparameterize_layernorms` on a copy of `model` (left untouched); `model` itself comes
    back when it has no LayerNorm to reparameterize."""
    plan = plan_layernorm_reparam(model)
    work = copy.deepcopy(model) if plan.candidates else model
    return work, reparameterize_layernorms(work, data, bits, symmetric=symmetric,
                                           batch_size=batch_size, gather=gather, plan=plan)
