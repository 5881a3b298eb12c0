"""Reconstruction units found from the model's torch.fx graph.

The graph's nodes, in execution order, are cut where exactly one value is live: such a cut point
separates the network into pieces that take one tensor and give one tensor. Side tensors do not
count: integer or boolean tensors with the batch dimension (an attention mask computed once
from the input and read by every layer, token indices) are no activations, and a unit takes
them as extra inputs. A *block* is the
smallest module of the model whose nodes form a contiguous run between two cut points and hold
at least two weight layers (a residual block, an inverted residual, a transformer layer); where
the graph has such a piece without a module of its own, the piece itself is a block. Layers
outside every block are units alone. Nodes without weights (activations, pooling, activation
quantizers) join the unit before them, so a block's output quantizer belongs to the block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.fx as fx

from ..errors import ConfigError

UnitPredicate = Callable[[str], bool]

# Node meta key: True for a side tensor (set where the graph is run on example inputs).
SIDE_TENSOR = "brecq_side_tensor"


@dataclass(frozen=True)
class UnitPlan:
    """A contiguous run of graph nodes reconstructed together."""

    name: str
    kind: str  # "layer", "block", "stage" or "net"
    start: int  # first node position (inclusive)
    end: int  # last node position (inclusive)
    layers: tuple[str, ...]  # weight layers inside, in execution order


def _module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [value[0] if isinstance(value, tuple) else str(key) for key, value in stack.items()]


class GraphIndex:
    """Execution-ordered nodes of a graph with their liveness and module membership."""

    def __init__(self, graph: fx.Graph, layer_targets: set[str],
                 inner_layers: dict[str, tuple[str, ...]] | None = None) -> None:
        # A module fx could not trace through is one node holding several weight layers.
        self.inner_layers = inner_layers or {}
        layer_targets = set(layer_targets) | set(self.inner_layers)
        self.nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
        self.position = {n: i for i, n in enumerate(self.nodes)}
        count = len(self.nodes)
        # live[i]: values defined at or before position i and used after it (cut "after i");
        # index 0 stands for the cut before the first node, so live has count + 1 entries.
        diff = [0] * (count + 2)
        for node in graph.nodes:
            if node.op in ("output", "get_attr") or node.meta.get(SIDE_TENSOR, False):
                continue
            defined = -1 if node.op == "placeholder" else self.position[node]
            uses = [count if u.op == "output" else self.position[u] for u in node.users]
            last = max(uses, default=defined)
            if last > defined:
                diff[defined + 1] += 1
                diff[last + 1] -= 1
        self.live = []
        running = 0
        for i in range(count + 1):
            running += diff[i]
            self.live.append(running)
        self.layer_positions = [
            i for i, n in enumerate(self.nodes) if n.op == "call_module" and n.target in layer_targets
        ]
        self.module_span: dict[str, tuple[int, int, int]] = {}
        for i, node in enumerate(self.nodes):
            for path in _module_paths(node):
                lo, hi, seen = self.module_span.get(path, (i, i, 0))
                self.module_span[path] = (min(lo, i), max(hi, i), seen + 1)

    def single_cut_before(self, position: int) -> bool:
        return self.live[position] == 1

    def single_cut_after(self, position: int) -> bool:
        return self.live[position + 1] == 1

    def read_after(self, start: int, end: int) -> bool:
        """Whether a later node or the graph output reads a value of nodes[start..end]."""
        return any(user.op == "output" or self.position.get(user, -1) > end
                   for node in self.nodes[start : end + 1] for user in node.users)

    def layers_in(self, start: int, end: int) -> tuple[str, ...]:
        """Weight layers called in nodes[start..end], each once (in order of first call)."""
        return tuple(dict.fromkeys(
            name for i in self.layer_positions if start <= i <= end
            for name in self.inner_layers.get(self.nodes[i].target, (self.nodes[i].target,))
        ))

    def cuttable_modules(self) -> dict[str, tuple[int, int]]:
        """Modules whose nodes are contiguous and start and end at single-tensor cut points."""
        out = {}
        for path, (lo, hi, seen) in self.module_span.items():
            if seen == hi - lo + 1 and self.single_cut_before(lo) and self.single_cut_after(hi):
                out[path] = (lo, hi)
        return out

    def module_ranges(self, names: Sequence[str]) -> dict[str, tuple[int, int]]:
        out = {}
        for name in names:
            if name not in self.module_span:
                known = ", ".join(sorted(self.module_span)[:10])
                raise ConfigError(
                    f"unit {name!r} is not a module the model calls: use names as in "
                    f"model.named_modules() (for example {known})"
                )
            lo, hi, seen = self.module_span[name]
            if seen != hi - lo + 1:
                raise ConfigError(
                    f"unit {name!r} does not run as one contiguous piece of the graph: "
                    "choose an enclosing module"
                )
            out[name] = (lo, hi)
        return out


def _minimal_blocks(index: GraphIndex) -> dict[str, tuple[int, int]]:
    """Smallest cuttable modules with >= 2 layers; outermost name among equal layer sets."""
    candidates = {}
    for path, (lo, hi) in index.cuttable_modules().items():
        layers = frozenset(index.layers_in(lo, hi))
        if len(layers) >= 2:
            candidates[path] = (lo, hi, layers)
    blocks: dict[frozenset, tuple[str, int, int]] = {}
    for path, (lo, hi, layers) in candidates.items():
        if any(other < layers for _, _, other in candidates.values()):
            continue
        best = blocks.get(layers)
        if best is None or (hi - lo, -len(path)) > (best[2] - best[1], -len(best[0])):
            blocks[layers] = (path, lo, hi)
    return {path: (lo, hi) for path, lo, hi in blocks.values()}


def _stages(index: GraphIndex, blocks: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Smallest cuttable modules that contain two or more blocks."""
    candidates = {}
    for path, (lo, hi) in index.cuttable_modules().items():
        inside = [b for b, (blo, bhi) in blocks.items() if lo <= blo and bhi <= hi]
        if len(inside) >= 2:
            candidates[path] = (lo, hi)
    return {
        path: (lo, hi)
        for path, (lo, hi) in candidates.items()
        if not any(
            (olo, ohi) != (lo, hi) and lo <= olo and ohi <= hi for olo, ohi in candidates.values()
        )
    }


def _fill(
    index: GraphIndex, chosen: dict[str, tuple[int, int]], kind: str
) -> list[UnitPlan]:
    """Turn chosen ranges into units and cover every other node (graph pieces, lone layers)."""
    count = len(index.nodes)
    owner: list[str | None] = [None] * count
    for name, (lo, hi) in chosen.items():
        for i in range(lo, hi + 1):
            owner[i] = name
    units: list[UnitPlan] = []
    leading: int | None = None  # weightless nodes before the first unit join that unit
    i = 0
    while i < count:
        name = owner[i]
        if name is not None:
            unit_kind, end = kind, chosen[name][1]
        else:
            # An uncovered piece runs to the next single-tensor cut or the next chosen range.
            end = i
            while end + 1 < count and owner[end + 1] is None and not index.single_cut_after(end):
                end += 1
            layers = index.layers_in(i, end)
            if len(layers) == 1:
                name, unit_kind = layers[0], "layer"
            elif layers:
                name, unit_kind = f"{layers[0]}..{layers[-1]}", "block"
        if name is None:
            if units:
                last = units[-1]
                units[-1] = UnitPlan(last.name, last.kind, last.start, end, last.layers)
            elif leading is None:
                leading = i
        else:
            start = i if leading is None else leading
            leading = None
            units.append(UnitPlan(name, unit_kind, start, end, index.layers_in(start, end)))
        i = end + 1
    return units


def _layer_units(index: GraphIndex) -> list[UnitPlan]:
    positions = index.layer_positions
    units = []
    for k, pos in enumerate(positions):
        start = 0 if k == 0 else pos
        end = positions[k + 1] - 1 if k + 1 < len(positions) else len(index.nodes) - 1
        name = index.nodes[pos].target
        units.append(UnitPlan(name, "layer", start, end, index.layers_in(pos, pos)))
    return units


def _merge_shared_layers(index: GraphIndex, units: list[UnitPlan]) -> list[UnitPlan]:
    """Join the units from the first to the last that call the same weight layer (a module
    called several times) into one: its one weight quantizer learns its rounding once, against
    every call, while each call keeps the activation quantizers of its own call site."""
    merged: list[UnitPlan] = []
    for unit in units:
        shared = [k for k, earlier in enumerate(merged) if set(earlier.layers) & set(unit.layers)]
        if not shared:
            merged.append(unit)
            continue
        first = merged[shared[0]]
        layers = index.layers_in(first.start, unit.end)
        name, kind = ((layers[0], "layer") if len(layers) == 1
                      else (f"{layers[0]}..{layers[-1]}", "block"))
        merged[shared[0]:] = [UnitPlan(name, kind, first.start, unit.end, layers)]
    return merged


def _merge_unread(index: GraphIndex, units: list[UnitPlan]) -> list[UnitPlan]:
    """Join a unit whose values nothing after it reads (a BERT pooler when a wrapper returns
    only the hidden states) to the unit before it: it has no output to be reconstructed
    against, and its layers are quantized in that unit's pass."""
    merged: list[UnitPlan] = []
    for unit in units:
        if merged and not index.read_after(unit.start, unit.end):
            last = merged[-1]
            merged[-1] = UnitPlan(last.name, last.kind, last.start, unit.end,
                                  index.layers_in(last.start, unit.end))
        else:
            merged.append(unit)
    return merged


def plan_units(
    graph: fx.Graph,
    layer_targets: set[str],
    granularity: str = "block",
    unit_names: Sequence[str] | None = None,
    unit_predicate: UnitPredicate | None = None,
    inner_layers: dict[str, tuple[str, ...]] | None = None,
) -> list[UnitPlan]:
    """Reconstruction units of `graph` in execution order, covering every node.

    `inner_layers` maps a module called as one node (not traced into) to the weight layers it holds.
    """
    index = GraphIndex(graph, layer_targets, inner_layers)
    units = _merge_shared_layers(index, _plan(index, granularity, unit_names, unit_predicate))
    return _merge_unread(index, units)


def _plan(index: GraphIndex, granularity: str, unit_names: Sequence[str] | None,
          unit_predicate: UnitPredicate | None) -> list[UnitPlan]:
    """The units of `index` as the granularity or the named modules choose them."""
    if not index.layer_positions:
        raise ConfigError("the model has no Conv or Linear layer to quantize")
    if unit_names is not None or unit_predicate is not None:
        names = list(unit_names or [])
        if unit_predicate is not None:
            names += [p for p in index.module_span if unit_predicate(p) and p not in names]
        ranges = index.module_ranges(names)
        # Keep the outermost of nested choices; discovered blocks fill in around them.
        chosen = {
            n: r for n, r in ranges.items()
            if not any(o != n and ro[0] <= r[0] and r[1] <= ro[1] for o, ro in ranges.items())
        }
        for name, (lo, hi) in _minimal_blocks(index).items():
            if all(hi < clo or lo > chi for clo, chi in chosen.values()):
                chosen[name] = (lo, hi)
        return _fill(index, chosen, "block")
    if granularity == "layer":
        return _layer_units(index)
    if granularity == "net":
        count = len(index.nodes)
        return [UnitPlan("net", "net", 0, count - 1, index.layers_in(0, count - 1))]
    blocks = _minimal_blocks(index)
    if granularity == "block":
        return _fill(index, blocks, "block")
    if granularity == "stage":
        stages = _stages(index, blocks)
        outside = {
            b: r for b, r in blocks.items()
            if not any(lo <= r[0] and r[1] <= hi for lo, hi in stages.values())
        }
        units = _fill(index, {**stages, **outside}, "stage")
        return [
            UnitPlan(u.name, "block", u.start, u.end, u.layers) if u.name in outside else u
            for u in units
        ]
    raise ConfigError(f"granularity {granularity!r} is unknown: use layer, block, stage or net")
