"""The reconstruction methods: one registry entry per method, the only place a method is defined.

A method is a sequence of phases, each run over all units in order: the learned rounding alone
(BRECQ's first pass, AdaRound), the activation step sizes alone (BRECQ's second pass), both at
once with random dropping of activation quantization (QDrop), and the one-off initialization of
the activation scales that comes before step sizes are learned. Round-to-nearest only
initializes. Adding a method is one more `Method` in `METHOD_REGISTRY`: the config's choices, the
`--method` flag, the plan and summary lines and the pipeline follow from it. (`--method auto`
picks one of these by the bit setting: `AUTO_RULES`.)

This module imports nothing else from brecq, so that `brecq.config` can build on it.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_WEIGHT_LR = 1e-3
DEFAULT_ROUND_LAMBDA = 0.01


@dataclass(frozen=True)
class Phase:
    """One step of a method, run over all units in order and checkpointed under `name`.

    A phase that learns nothing is the activation-scale initialization (one forward pass over the
    calibration data, not per unit).
    """

    name: str  # checkpoint and report key
    plan: str = ""  # what the plan line calls its iterations
    learns_weights: bool = False  # the rounding variables (AdaRound); iterations: iters_w
    learns_acts: bool = False  # the activation step sizes, with activations quantized; iters_a
    # QDrop: each activation element is quantized or kept float at random while learning.
    drops: bool = False

    @property
    def optimizes(self) -> bool:
        return self.learns_weights or self.learns_acts

    @property
    def needs_act_quantizers(self) -> bool:
        """Skipped on a model without activation quantizers (weight-only): nothing to do."""
        return not self.learns_weights


WEIGHTS = Phase("weights", "rounding", learns_weights=True)
INIT_ACTS = Phase("init")
ACTIVATIONS = Phase("activations", "step-size", learns_acts=True)
JOINT = Phase("joint", "joint", learns_weights=True, learns_acts=True, drops=True)


@dataclass(frozen=True)
class Method:
    name: str  # the --method value
    title: str  # as printed
    # Learning rate of the activation step sizes unless given (0 for a method that learns none).
    default_act_lr: float
    phases: tuple[Phase, ...]

    @property
    def optimizes(self) -> bool:
        return any(phase.optimizes for phase in self.phases)

    @property
    def learns_acts(self) -> bool:
        return any(phase.learns_acts for phase in self.phases)

    def phases_run(self, has_act_quantizers: bool) -> tuple[Phase, ...]:
        """The phases that run on a model with or without activation quantizers."""
        return tuple(p for p in self.phases if has_act_quantizers or not p.needs_act_quantizers)


# BRECQ learns the activation step sizes alone after the weights (4e-4 in the paper); QDrop
# learns them jointly with the rounding, more gently.
BRECQ = Method("brecq", "BRECQ", 4e-4, (WEIGHTS, INIT_ACTS, ACTIVATIONS))
QDROP = Method("qdrop", "QDrop", 4e-5, (INIT_ACTS, JOINT))
RTN = Method("rtn", "round-to-nearest", 0.0, (INIT_ACTS,))

METHOD_REGISTRY: dict[str, Method] = {m.name: m for m in (BRECQ, QDROP, RTN)}
AUTO = "auto"  # chooses a registered method and its settings by the bit setting: AUTO_RULES


@dataclass(frozen=True)
class AutoRule:
    """One row of the `--method auto` table: what runs for a bit setting, and why."""

    low_bit_acts: bool  # activations quantized below 8 bits (False: weight-only or 8-bit)
    max_weight_bits: int | None  # None: any
    method: str
    settings: dict[str, float]
    evidence: str


# `--method auto`: the first row that matches the bit setting decides the method and the settings
# that the user did not give. Evidence: the CIFAR-10 ResNet-20 benchmark (README.md, "Results";
# benchmarks/README.md), 2,000 iterations per unit, settings chosen by benchmarks/tune.py on
# held-out train images. With activations below 8 bits QDrop beat BRECQ in every measured cell;
# with weights only BRECQ is the method (QDrop's dropping has nothing to drop).
AUTO_RULES = (
    AutoRule(True, 2, QDROP.name, {"weight_lr": 3e-3, "act_lr": 1.6e-4},
             "W2A4: held-out choice (val 78.54 vs 78.17 with the QDrop defaults)"),
    AutoRule(True, None, QDROP.name, {"act_lr": 1.6e-4},
             "W4A4: held-out choice; QDrop ahead of BRECQ at W4A4, W3A3, W2A4, W2A2"),
    AutoRule(False, 3, BRECQ.name, {"round_lambda": 0.03},
             "W3A32/W2A32: held-out choice (val 81.09 / 79.64 vs 80.74 / 78.88)"),
    AutoRule(False, None, BRECQ.name, {}, "W4A32 and wider: the held-out search kept the defaults"),
)


def auto_rule(weight_bits: int, act_bits: int | None) -> AutoRule:
    """The `AUTO_RULES` row for a bit setting (act_bits None: weights only)."""
    low_bit_acts = act_bits is not None and act_bits < 8
    return next(r for r in AUTO_RULES
                if r.low_bit_acts == low_bit_acts
                and (r.max_weight_bits is None or weight_bits <= r.max_weight_bits))
