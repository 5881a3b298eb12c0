"""Typed, validated configuration shared by the Python API and the command line.

`BrecqConfig` is a frozen dataclass: every field is checked in `__post_init__`, and the object
round-trips through JSON (`to_dict` / `from_dict` / `to_json` / `from_json`). The CLI builds its
flags from the field metadata below, so there is exactly one list of options.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

logger = logging.getLogger(__name__)

MIN_BITS = 2
MAX_BITS = 8

METHODS = ("auto", "brecq", "qdrop", "rtn")
GRANULARITIES = ("layer", "block", "stage", "net")
LOSSES = ("mse", "fisher")
SCALE_SEARCHES = ("lp", "minmax")
WEIGHT_GRANULARITIES = ("channel", "tensor")
AUTOCASTS = ("none", "bf16", "fp16", "tf32")
# Where activation quantizers go: "onnxruntime" adds the ones its integer kernels need (network
# input, every layer output, residual add inputs/outputs, pooling and concat inputs); "none" puts
# them only on the tensors quantized layers read (the research placement of the papers).
BACKENDS = ("onnxruntime", "none")

# Per-method default learning rate of the activation step sizes: BRECQ learns them alone after
# the weights (4e-4 in the paper); QDrop learns them jointly with the rounding, more gently.
DEFAULT_ACT_LR = {"brecq": 4e-4, "qdrop": 4e-5, "rtn": 0.0}
DEFAULT_WEIGHT_LR = 1e-3
DEFAULT_ROUND_LAMBDA = 0.01


@dataclass(frozen=True)
class AutoRule:
    """One row of the `--method auto` table: what runs for a bit setting, and why."""

    low_bit_acts: bool  # activations quantized below 8 bits (False: weight-only or 8-bit)
    max_weight_bits: int
    method: str
    settings: dict[str, float]
    evidence: str


# `--method auto`: the first row that matches the bit setting decides the method and the settings
# that the user did not give. Evidence: the CIFAR-10 ResNet-20 benchmark (README.md, "Results";
# benchmarks/README.md), 2,000 iterations per unit, settings chosen by benchmarks/tune.py on
# held-out train images. With activations below 8 bits QDrop beat BRECQ in every measured cell;
# with weights only BRECQ is the method (QDrop's dropping has nothing to drop).
AUTO_RULES = (
    AutoRule(True, 2, "qdrop", {"weight_lr": 3e-3, "act_lr": 1.6e-4},
             "W2A4: held-out choice (val 78.54 vs 78.17 with the QDrop defaults)"),
    AutoRule(True, MAX_BITS, "qdrop", {"act_lr": 1.6e-4},
             "W4A4: held-out choice; QDrop ahead of BRECQ at W4A4, W3A3, W2A4, W2A2"),
    AutoRule(False, 3, "brecq", {"round_lambda": 0.03},
             "W3A32/W2A32: held-out choice (val 81.09 / 79.64 vs 80.74 / 78.88)"),
    AutoRule(False, MAX_BITS, "brecq", {}, "W4A32 and wider: the held-out search kept the defaults"),
)


def auto_rule(weight_bits: int, act_bits: int | None) -> AutoRule:
    """The `AUTO_RULES` row for a bit setting (act_bits None: weights only)."""
    low_bit_acts = act_bits is not None and act_bits < 8
    return next(r for r in AUTO_RULES
                if r.low_bit_acts == low_bit_acts and weight_bits <= r.max_weight_bits)


# Where each field's flag appears in `--help`; fields not listed are "quantization" options.
FLAG_GROUPS = {
    "reconstruction": ("granularity", "loss", "fisher_floor", "iters_w", "iters_a", "calib_size",
                       "batch_size", "unit_names", "weight_lr", "act_lr", "round_lambda",
                       "beta_start", "beta_end", "warmup", "act_loss_p", "drop_prob",
                       "act_init_samples", "early_stop", "seed"),
    "runtime": ("device", "cache_device", "cache_budget_gb", "compile", "autocast",
                "channels_last", "cuda_graph", "dist_timeout"),
}


def _opt(flag: str, help_text: str, **extra: Any) -> dict[str, Any]:
    return {"flag": flag, "help": help_text, **extra}


def check_bits(bits: Any, what: str) -> int:
    """Return `bits` as an int if it is a supported bit width, else raise ConfigError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(
            f"{what}={bits!r} is not supported: use an integer from {MIN_BITS} to {MAX_BITS} bits"
        )
    return bits


@dataclass(frozen=True)
class BrecqConfig:
    """Everything that decides what a quantization run does.

    Field metadata carries the command-line flag and help text (see `brecq.cli`).
    """

    weight_bits: int = field(default=4, metadata=_opt("--w-bits", "weight bit width (2-8)"))
    act_bits: int | None = field(
        default=8,
        metadata=_opt("--a-bits", "activation bit width (2-8); 32 or 'none' for weight-only"),
    )
    method: str = field(
        default="auto",
        metadata=_opt("--method", "auto (QDrop when activations are below 8 bits, else BRECQ,"
                      " with the settings chosen on held-out data; see AUTO_RULES) | brecq |"
                      " qdrop | rtn (round-to-nearest, no reconstruction)", choices=METHODS),
    )
    granularity: str = field(
        default="block",
        metadata=_opt("--granularity", "reconstruction unit: layer | block | stage | net",
                      choices=GRANULARITIES),
    )
    loss: str = field(
        default="mse",
        metadata=_opt("--loss", "mse, or fisher (output error weighted by squared KL gradient)",
                      choices=LOSSES),
    )
    fisher_floor: float = field(
        default=0.0,
        metadata=_opt("--fisher-floor", "with --loss fisher: each output element's weight is"
                      " (g^2 / mean g^2 + floor) / (1 + floor), g its KL gradient; a floor > 0"
                      " keeps every element in the loss (0: pure squared gradient)"),
    )
    iters_w: int = field(
        default=20000, metadata=_opt("--iters-w", "AdaRound iterations per unit")
    )
    iters_a: int = field(
        default=5000, metadata=_opt("--iters-a", "activation step-size iterations per unit")
    )
    calib_size: int = field(
        default=1024, metadata=_opt("--calib-size", "number of calibration samples")
    )
    batch_size: int = field(
        default=32, metadata=_opt("--batch-size", "reconstruction batch size")
    )
    first_last_bits: int | None = field(
        default=8,
        metadata=_opt("--first-last-bits",
                      "bits of the first layer (weights, output) and last layer (weights, input);"
                      " 'none' treats them like the others"),
    )
    layer_bits: dict[str, int] = field(
        default_factory=dict,
        metadata=_opt("--layer-bits", "per-layer weight bits as JSON, e.g. '{\"fc\": 8}'"),
    )
    act_layer_bits: dict[str, int] = field(
        default_factory=dict,
        metadata=_opt("--act-layer-bits",
                      "per-activation-quantizer bits as JSON (names from `brecq info`)"),
    )
    first_layers: tuple[str, ...] | None = field(
        default=None,
        metadata=_opt("--first-layers", "comma-separated names of the first layers (default:"
                      " the layers that read the model input)"),
    )
    last_layers: tuple[str, ...] | None = field(
        default=None,
        metadata=_opt("--last-layers", "comma-separated names of the last layers (default:"
                      " the layers whose output reaches the model output)"),
    )
    float_layers: tuple[str, ...] | None = field(
        default=None,
        metadata=_opt("--float-layers", "comma-separated names (or fnmatch patterns such as"
                      " 'blocks.*.fc') of weight layers to leave in float; any other Conv/Linear"
                      " that cannot be quantized stops prepare with an error"),
    )
    unit_names: tuple[str, ...] | None = field(
        default=None,
        metadata=_opt("--units", "comma-separated module names to reconstruct as units"
                      " (overrides automatic discovery)"),
    )
    weight_granularity: str = field(
        default="channel",
        metadata=_opt("--w-granularity", "weight scales per output channel or per tensor",
                      choices=WEIGHT_GRANULARITIES),
    )
    weight_symmetric: bool = field(
        default=False, metadata=_opt("--w-symmetric", "symmetric weight quantization")
    )
    act_symmetric: bool = field(
        default=False, metadata=_opt("--a-symmetric", "symmetric activation quantization")
    )
    backend: str = field(
        default="onnxruntime",
        metadata=_opt("--backend", "place activation quantizers for this deployment backend:"
                      " onnxruntime (also the network input, layer outputs and residual adds,"
                      " so every conv/linear runs as an int8 kernel) or none (only layer"
                      " inputs, as in the BRECQ/QDrop papers)", choices=BACKENDS),
    )
    integer_bias: bool = field(
        default=True,
        metadata=_opt("--integer-bias", "add the bias of each layer that reads a quantized"
                      " activation on the int32 grid (input step x weight step) that integer"
                      " kernels use, so that a deployed int8 model (e.g. onnxruntime) computes"
                      " what the fake-quantized one does"),
    )
    scale_search: str = field(
        default="lp",
        metadata=_opt("--scale-search", "initial scales: lp (Lp-error clip search) or minmax",
                      choices=SCALE_SEARCHES),
    )
    lp_norm: float = field(
        default=2.4, metadata=_opt("--lp-norm", "p of the Lp error used by the scale search")
    )
    weight_lr: float | None = field(
        default=None,
        metadata=_opt("--w-lr", "Adam learning rate of the rounding variables (default: 1e-3;"
                      " --method auto: 3e-3 at W2 with activations below 8 bits)"),
    )
    act_lr: float | None = field(
        default=None,
        metadata=_opt("--a-lr", "learning rate of activation step sizes (default: 4e-4 for"
                      " brecq, 4e-5 for qdrop; --method auto: 1.6e-4 with QDrop)"),
    )
    round_lambda: float | None = field(
        default=None,
        metadata=_opt("--round-lambda", "weight of the rounding regularizer (default: 0.01;"
                      " --method auto: 0.03 for 2-3 bit weights with float or 8-bit activations)"),
    )
    beta_start: float = field(default=20.0, metadata=_opt("--beta-start", "initial beta"))
    beta_end: float = field(default=2.0, metadata=_opt("--beta-end", "final beta"))
    warmup: float = field(
        default=0.2, metadata=_opt("--warmup", "fraction of iterations without regularizer")
    )
    act_loss_p: float = field(
        default=2.4, metadata=_opt("--act-loss-p", "p of the Lp loss when learning step sizes")
    )
    drop_prob: float = field(
        default=0.5,
        metadata=_opt("--drop-prob", "QDrop: probability of keeping an element full-precision"),
    )
    act_init_samples: int = field(
        default=256,
        metadata=_opt("--act-init-samples", "samples used to initialize activation scales"),
    )
    device: str = field(
        default="auto", metadata=_opt("--device", "cpu, cuda, cuda:1, mps or auto")
    )
    cache_device: str = field(
        default="auto",
        metadata=_opt("--cache-device", "where cached unit inputs/targets live: auto (the"
                      " compute device), cpu (offload to host memory) or a device"),
    )
    cache_budget_gb: float | None = field(
        default=None,
        metadata=_opt("--cache-budget-gb", "with --cache-device auto: keep cached tensors on the"
                      " compute device up to this many GiB, the rest in host memory (pinned for"
                      " CUDA); default: a quarter of the free device memory on CUDA, no limit"
                      " elsewhere"),
    )
    compile: bool = field(
        default=False,
        metadata=_opt("--compile", "torch.compile each reconstruction step (CUDA graphs on"
                      " CUDA); falls back to eager if compiling fails"),
    )
    autocast: str = field(
        default="none",
        metadata=_opt("--autocast", "reduced precision while reconstructing: none, bf16, fp16,"
                      " or tf32 (CUDA only); changes results slightly", choices=AUTOCASTS),
    )
    channels_last: bool = field(
        default=False,
        metadata=_opt("--channels-last", "reconstruct 4-D activations in channels-last (NHWC)"
                      " layout, same math; with --autocast bf16 it sped up a ResNet-20 block"
                      " 1.26x on an AMX CPU (GPUs not measured)"),
    )
    cuda_graph: bool = field(
        default=True,
        metadata=_opt("--cuda-graph", "fast loop on CUDA with the unit's cache on the device:"
                      " capture one reconstruction step as a CUDA graph and replay it (continues"
                      " without a graph if capture fails); no effect elsewhere"),
    )
    early_stop: float = field(
        default=0.0,
        metadata=_opt("--early-stop", "activation step-size passes: stop a unit when its mean"
                      " loss over 500 iterations improves by less than this fraction (0: off)"),
    )
    seed: int = field(default=0, metadata=_opt("--seed", "random seed"))
    dist_timeout: float = field(
        default=600.0,
        metadata=_opt("--dist-timeout", "under torchrun: seconds a rank waits for the others in"
                      " a collective before it gives up with an error"),
    )

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "weight_bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, "act_bits")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        for name, allowed in (
            ("method", METHODS),
            ("granularity", GRANULARITIES),
            ("loss", LOSSES),
            ("scale_search", SCALE_SEARCHES),
            ("weight_granularity", WEIGHT_GRANULARITIES),
            ("autocast", AUTOCASTS),
            ("backend", BACKENDS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is unknown: choose one of {', '.join(allowed)}")
        for f in dataclasses.fields(self):
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool):
                raise ConfigError(f"{f.name}={getattr(self, f.name)!r} must be true or false")
        for name in ("iters_w", "iters_a", "act_init_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a non-negative integer")
        for name in ("calib_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        for name in ("lp_norm", "act_loss_p", "beta_start", "beta_end", "dist_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name}={value!r} must be a positive number")
        for name in ("weight_lr", "act_lr"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"{name}={value!r} must be a positive number (or None for the"
                                  " method's default)")
        if self.cache_budget_gb is not None and not self.cache_budget_gb >= 0:
            raise ConfigError(f"cache_budget_gb={self.cache_budget_gb!r} must be >= 0 (or None)")
        if not (self.fisher_floor >= 0 and math.isfinite(self.fisher_floor)):
            raise ConfigError(f"fisher_floor={self.fisher_floor!r} must be a finite number >= 0:"
                              " use e.g. 1.0, or 0 for the pure squared gradient")
        if not 0 <= self.early_stop < 1:
            raise ConfigError(f"early_stop={self.early_stop!r} must be in [0, 1): a fraction of"
                              " the loss, 0 turns early stopping off")
        if self.round_lambda is not None and not (
                isinstance(self.round_lambda, (int, float)) and self.round_lambda >= 0):
            raise ConfigError(f"round_lambda={self.round_lambda!r} must be >= 0 (or None for the"
                              " method's default)")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup={self.warmup!r} must be in [0, 1)")
        if not 0 <= self.drop_prob <= 1:
            raise ConfigError(f"drop_prob={self.drop_prob!r} must be in [0, 1]")
        for name in ("layer_bits", "act_layer_bits"):
            mapping = getattr(self, name)
            if not isinstance(mapping, dict):
                raise ConfigError(f"{name} must map layer names to bit widths, got {mapping!r}")
            for key, bits in mapping.items():
                check_bits(bits, f"{name}[{key!r}]")
            object.__setattr__(self, name, dict(mapping))
        for name in ("first_layers", "last_layers", "float_layers", "unit_names"):
            names = getattr(self, name)
            if names is not None:
                if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                    raise ConfigError(f"{name} must be a list of module names, got {names!r}")
                object.__setattr__(self, name, tuple(names))

    @property
    def effective_act_lr(self) -> float:
        run = self.resolved()
        return run.act_lr if run.act_lr is not None else DEFAULT_ACT_LR[run.method]

    def resolved(self) -> BrecqConfig:
        """This config with a concrete method (`auto` looked up in AUTO_RULES) and every
        method-dependent setting filled in; settings given explicitly are kept."""
        method, chosen = self.method, {}
        if method == "auto":
            rule = auto_rule(self.weight_bits, self.act_bits)
            method, chosen = rule.method, rule.settings
        values: dict[str, Any] = {"weight_lr": DEFAULT_WEIGHT_LR, "round_lambda": DEFAULT_ROUND_LAMBDA,
                                  **chosen}
        if method != "rtn":  # round-to-nearest learns no step sizes
            values.setdefault("act_lr", DEFAULT_ACT_LR[method])
        values.update({k: getattr(self, k) for k in values if getattr(self, k) is not None})
        return self.replace(method=method, **values)

    def method_summary(self) -> str:
        """One line saying which method and settings run, e.g. for the first printed line."""
        run = self.resolved()
        names = {"brecq": "BRECQ", "qdrop": "QDrop", "rtn": "round-to-nearest"}
        why = ""
        if self.method == "auto":
            rule = auto_rule(self.weight_bits, self.act_bits)
            why = (" (auto: activations below 8 bits)" if rule.low_bit_acts
                   else " (auto: weights only or 8-bit activations)")
        if run.method == "rtn":
            return f"{names[run.method]}{why}, {self.label}"
        lrs = f"weight_lr {run.weight_lr:g}, round_lambda {run.round_lambda:g}"
        if self.act_bits is not None:
            lrs += f", act_lr {run.act_lr:g}"
        if run.method == "qdrop":
            iters = f"{run.iters_w:,} joint iterations per unit"
        else:
            iters = f"{run.iters_w:,} rounding" + (
                f" + {run.iters_a:,} step-size" if self.act_bits is not None else "") + " iterations per unit"
        return f"{names[run.method]}{why}, {self.label}: {lrs}; {iters}"

    @property
    def label(self) -> str:
        """Short bit-width label as papers write it, e.g. W2A4 or W4A32."""
        return f"W{self.weight_bits}A{self.act_bits if self.act_bits is not None else 32}"

    def replace(self, **changes: Any) -> BrecqConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("first_layers", "last_layers", "float_layers", "unit_names"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BrecqConfig:
        if "recon_loop" in data:
            # Saved by a version where the eager speed baseline was an option (it lives in
            # benchmarks/ now); it never changed results, so it is dropped.
            logger.info("ignoring the saved config's recon_loop=%r: no longer an option",
                        data["recon_loop"])
            data = {k: v for k, v in data.items() if k != "recon_loop"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join(unknown)}: valid keys are {', '.join(sorted(known))}"
            )
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> BrecqConfig:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist: pass an existing JSON file")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON ({exc}): fix the file") from exc
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object of field names to values")
        return cls.from_dict(data)
