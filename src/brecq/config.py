"""Typed, validated configuration shared by the Python API and the command line.

`BrecqConfig` is a frozen dataclass: every field is checked in `__post_init__`, and the object
round-trips through JSON (`to_dict` / `from_dict` / `to_json` / `from_json`). The CLI builds its
flags from the field metadata below, so there is exactly one list of options.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The bit-width checks are also brecq.config's (other configs and the quantizers use them).
from .config_checks import MAX_BITS as MAX_BITS
from .config_checks import MIN_BITS as MIN_BITS
from .config_checks import check_bits as check_bits
from .config_checks import check_choices as check_choices
from .config_checks import checked_fields
from .durations import duration_seconds
from .errors import ConfigError
from .methods import AUTO, DEFAULT_ROUND_LAMBDA, DEFAULT_WEIGHT_LR, METHOD_REGISTRY, Phase, auto_rule

logger = logging.getLogger(__name__)

METHODS = (AUTO, *METHOD_REGISTRY)
GRANULARITIES = ("layer", "block", "stage", "net")
LOSSES = ("mse", "fisher")
SCALE_SEARCHES = ("lp", "minmax")
WEIGHT_GRANULARITIES = ("channel", "tensor")
AUTOCASTS = ("none", "bf16", "fp16", "tf32")
# Where activation quantizers go: "onnxruntime" adds the ones its integer kernels need (network
# input, every layer output, residual add inputs/outputs, pooling and concat inputs); "none" puts
# them only on the tensors quantized layers read (the research placement of the papers).
BACKENDS = ("onnxruntime", "none")
# The quantizer of attention probabilities (softmax outputs read by a matmul): "log2" codes a
# value in [0, 1] as scale * 2^-k (RepQ-ViT, FQ-ViT), which keeps the many small
# probabilities apart; "uniform" is the affine activation quantizer every other tensor gets.
SOFTMAX_QUANTIZERS = ("auto", "log2", "uniform")


# The three layers of a config, as typed views of its flat fields: each BrecqConfig field is in
# exactly one of them (tests/test_config.py checks). The scheme and the recipe decide a run's
# result; runtime options decide only where and how fast it runs, so a resume or a cached
# sensitivity table ignores them.


@dataclass(frozen=True)
class QuantScheme:
    """What is quantized and how: bit widths, which layers, quantizer grids and placement."""

    weight_bits: int
    act_bits: int | None
    first_last_bits: int | None
    layer_bits: dict[str, int]
    act_layer_bits: dict[str, int]
    first_layers: tuple[str, ...] | None
    last_layers: tuple[str, ...] | None
    float_layers: tuple[str, ...] | None
    weight_granularity: str
    weight_symmetric: bool
    act_symmetric: bool
    backend: str
    integer_bias: bool
    quantize_matmul_inputs: bool
    softmax_quantizer: str
    quantize_residual_adds: bool
    scale_search: str
    lp_norm: float
    layernorm_reparam: bool


@dataclass(frozen=True)
class ReconRecipe:
    """How the quantization parameters are found: the method, its units, data and settings."""

    method: str
    granularity: str
    loss: str
    fisher_floor: float
    iters_w: int
    iters_a: int
    calib_size: int
    batch_size: int
    unit_names: tuple[str, ...] | None
    weight_lr: float | None
    act_lr: float | None
    round_lambda: float | None
    beta_start: float
    beta_end: float
    warmup: float
    act_loss_p: float
    drop_prob: float
    act_init_samples: int
    early_stop: float
    holdout_patience: int
    time_budget: float | None
    seed: int

    def iterations(self, phase: Phase) -> int:
        """Iterations per unit of an optimizing phase."""
        return self.iters_w if phase.learns_weights else self.iters_a

    @property
    def step_size_lr(self) -> float:
        """The activation step sizes' learning rate: the given one, else the method's default."""
        return self.act_lr if self.act_lr is not None else METHOD_REGISTRY[self.method].default_act_lr


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how fast a run goes: devices, caching, compilation, precision, distribution."""

    device: str
    cache_device: str
    cache_budget_gb: float | None
    compile: bool
    autocast: str
    channels_last: bool
    cuda_graph: bool
    dist_timeout: float


def _names(view: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(view))


# Where each field's flag appears in `--help`: a section per layer, except that --method is shown
# with the bit widths, the first things a user chooses. Fields not listed are "quantization".
FLAG_GROUPS = {
    "reconstruction": tuple(name for name in _names(ReconRecipe) if name != "method"),
    "runtime": _names(RuntimeOptions),
}


def flag_field(default: Any, flag: str, help_text: str, **extra: Any) -> Any:
    """A config dataclass field with a command-line flag: `brecq.cli.flags` builds the option
    from its metadata (`flag`, `help` and e.g. `choices`, `metavar`). A dict default is copied
    for every instance."""
    metadata = {"flag": flag, "help": help_text, **extra}
    if isinstance(default, dict):
        return field(default_factory=default.copy, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class BrecqConfig:
    """Everything that decides what a quantization run does.

    Field metadata carries the command-line flag and help text (see `brecq.cli`); `scheme`,
    `recipe` and `runtime` are typed views of the three layers the flat fields fall into.
    """

    weight_bits: int = flag_field(4, "--w-bits", "weight bit width (2-8)")
    act_bits: int | None = flag_field(
        8, "--a-bits", "activation bit width (2-8); 32 or 'none' for weight-only",
    )
    method: str = flag_field(
        "auto", "--method", "auto (QDrop when activations are below 8 bits, else BRECQ,"
        " with the settings chosen on held-out data; see AUTO_RULES) | brecq |"
        " qdrop | rtn (round-to-nearest, no reconstruction)", choices=METHODS,
    )
    granularity: str = flag_field(
        "block", "--granularity", "reconstruction unit: layer | block | stage | net",
        choices=GRANULARITIES,
    )
    loss: str = flag_field(
        "mse", "--loss", "mse, or fisher (output error weighted by squared KL gradient)",
        choices=LOSSES,
    )
    fisher_floor: float = flag_field(
        0.0, "--fisher-floor", "with --loss fisher: each output element's weight is"
        " (g^2 / mean g^2 + floor) / (1 + floor), g its KL gradient; a floor > 0"
        " keeps every element in the loss (0: pure squared gradient)",
    )
    iters_w: int = flag_field(20000, "--iters-w", "AdaRound iterations per unit")
    iters_a: int = flag_field(5000, "--iters-a", "activation step-size iterations per unit")
    calib_size: int = flag_field(1024, "--calib-size", "number of calibration samples")
    batch_size: int = flag_field(32, "--batch-size", "reconstruction batch size")
    first_last_bits: int | None = flag_field(
        8, "--first-last-bits",
        "bits of the first layer (weights, output) and last layer (weights, input);"
        " 'none' treats them like the others",
    )
    layer_bits: dict[str, int] = flag_field(
        {}, "--layer-bits", "per-layer weight bits as JSON, e.g. '{\"fc\": 8}'",
    )
    act_layer_bits: dict[str, int] = flag_field(
        {}, "--act-layer-bits",
        "per-activation-quantizer bits as JSON (names from `brecq info`)",
    )
    first_layers: tuple[str, ...] | None = flag_field(
        None, "--first-layers", "comma-separated names of the first layers (default:"
        " the layers that read the model input)",
    )
    last_layers: tuple[str, ...] | None = flag_field(
        None, "--last-layers", "comma-separated names of the last layers (default:"
        " the layers whose output reaches the model output)",
    )
    float_layers: tuple[str, ...] | None = flag_field(
        None, "--float-layers", "comma-separated names (or fnmatch patterns such as"
        " 'blocks.*.fc') of weight layers to leave in float; any other Conv/Linear"
        " that cannot be quantized stops prepare with an error",
    )
    unit_names: tuple[str, ...] | None = flag_field(
        None, "--units", "comma-separated module names to reconstruct as units"
        " (overrides automatic discovery)",
    )
    weight_granularity: str = flag_field(
        "channel", "--w-granularity", "weight scales per output channel or per tensor",
        choices=WEIGHT_GRANULARITIES,
    )
    weight_symmetric: bool = flag_field(False, "--w-symmetric", "symmetric weight quantization")
    act_symmetric: bool = flag_field(False, "--a-symmetric", "symmetric activation quantization")
    backend: str = flag_field(
        "onnxruntime", "--backend", "place activation quantizers for this deployment backend:"
        " onnxruntime (also the network input, layer outputs and residual adds,"
        " so every conv/linear runs as an int8 kernel) or none (only layer"
        " inputs, as in the BRECQ/QDrop papers)", choices=BACKENDS,
    )
    integer_bias: bool = flag_field(
        True, "--integer-bias", "add the bias of each layer that reads a quantized"
        " activation on the int32 grid (input step x weight step) that integer"
        " kernels use, so that a deployed int8 model (e.g. onnxruntime) computes"
        " what the fake-quantized one does",
    )
    quantize_matmul_inputs: bool = flag_field(
        True, "--quantize-matmul-inputs", "quantize both inputs of every matmul between two"
        " activations (attention's Q.K^T and probabilities.V) at --a-bits; the softmax"
        " output that feeds one gets --softmax-quantizer",
    )
    softmax_quantizer: str = flag_field(
        "auto", "--softmax-quantizer", "quantizer of attention probabilities: log2 (scale *"
        " 2^-k, as RepQ-ViT/FQ-ViT), uniform, or auto: log2 below 8 bits, uniform at 8 (log2"
        " keeps only a factor-of-sqrt(2) precision whatever its bits)", choices=SOFTMAX_QUANTIZERS,
    )
    quantize_residual_adds: bool = flag_field(
        False, "--quantize-residual-adds", "with --backend none: also quantize both inputs"
        " of every add of two activations (residual adds; --backend onnxruntime always does)",
    )
    scale_search: str = flag_field(
        "lp", "--scale-search", "initial scales: lp (Lp-error clip search) or minmax",
        choices=SCALE_SEARCHES,
    )
    lp_norm: float = flag_field(2.4, "--lp-norm", "p of the Lp error used by the scale search")
    layernorm_reparam: bool = flag_field(
        True, "--layernorm-reparam", "give each LayerNorm output that only Linear layers (or"
        " self-attention) read per-channel activation scales, folded into the LayerNorm"
        " affine and the Linear weights so the deployed quantizer stays per-tensor"
        " (RepQ-ViT); no effect on models without LayerNorm or without activation"
        " quantization",
    )
    weight_lr: float | None = flag_field(
        None, "--w-lr", "Adam learning rate of the rounding variables (default: 1e-3;"
        " --method auto: 3e-3 at W2 with activations below 8 bits)",
    )
    act_lr: float | None = flag_field(
        None, "--a-lr", "learning rate of activation step sizes (default: 4e-4 for"
        " brecq, 4e-5 for qdrop; --method auto: 1.6e-4 with QDrop)",
    )
    round_lambda: float | None = flag_field(
        None, "--round-lambda", "weight of the rounding regularizer (default: 0.01;"
        " --method auto: 0.03 for 2-3 bit weights with float or 8-bit activations)",
    )
    beta_start: float = flag_field(20.0, "--beta-start", "initial beta")
    beta_end: float = flag_field(2.0, "--beta-end", "final beta")
    warmup: float = flag_field(0.2, "--warmup", "fraction of iterations without regularizer")
    act_loss_p: float = flag_field(2.4, "--act-loss-p", "p of the Lp loss when learning step sizes")
    drop_prob: float = flag_field(
        0.5, "--drop-prob", "QDrop: probability of keeping an element full-precision",
    )
    act_init_samples: int = flag_field(
        256, "--act-init-samples", "samples used to initialize activation scales",
    )
    device: str = flag_field("auto", "--device", "cpu, cuda, cuda:1, mps or auto")
    cache_device: str = flag_field(
        "auto", "--cache-device", "where cached unit inputs/targets live: auto (the"
        " compute device), cpu (offload to host memory) or a device",
    )
    cache_budget_gb: float | None = flag_field(
        None, "--cache-budget-gb", "with --cache-device auto: keep cached tensors on the"
        " compute device up to this many GiB, the rest in host memory (pinned for"
        " CUDA); default: a quarter of the free device memory on CUDA, no limit"
        " elsewhere",
    )
    compile: bool = flag_field(
        False, "--compile", "torch.compile each reconstruction step (CUDA graphs on"
        " CUDA); falls back to eager if compiling fails",
    )
    autocast: str = flag_field(
        "none", "--autocast", "reduced precision while reconstructing: none, bf16, fp16,"
        " or tf32 (CUDA only); changes results slightly", choices=AUTOCASTS,
    )
    channels_last: bool = flag_field(
        False, "--channels-last", "reconstruct 4-D activations in channels-last (NHWC)"
        " layout, same math; with --autocast bf16 it sped up a ResNet-20 block"
        " 1.26x on an AMX CPU (GPUs not measured)",
    )
    cuda_graph: bool = flag_field(
        True, "--cuda-graph", "fast loop on CUDA with the unit's cache on the device:"
        " capture one reconstruction step as a CUDA graph and replay it (continues"
        " without a graph if capture fails); no effect elsewhere",
    )
    early_stop: float = flag_field(
        0.0, "--early-stop", "activation step-size passes: stop a unit when its mean"
        " loss over 500 iterations improves by less than this fraction (0: off)",
    )
    holdout_patience: int = flag_field(
        0, "--holdout-patience", "per-unit early stopping: hold out 1/16 of each unit's"
        " cached samples and end a unit's pass when their error has not improved for this"
        " many checks (20 per pass); a rounding pass then ends with a short final anneal,"
        " still hard-rounded (0: off)",
    )
    time_budget: float | None = flag_field(
        None, "--time-budget", "seconds the whole reconstruction may take (e.g. 300, 90s, 5m):"
        " every unit and pass gets the same share of its iterations that fits, measured on"
        " this machine (so the result depends on its speed); units that no longer fit keep"
        " round-to-nearest", metavar="SECONDS", parse=duration_seconds,
    )
    seed: int = flag_field(0, "--seed", "random seed")
    dist_timeout: float = flag_field(
        600.0, "--dist-timeout", "under torchrun: seconds a rank waits for the others in"
        " a collective before it gives up with an error",
    )

    def __post_init__(self) -> None:
        # Field checks live in `config_checks`; they hand back values in their canonical form
        # (seconds for a duration, tuples for name lists, plain dicts for bit maps).
        for name, value in checked_fields(self).items():
            object.__setattr__(self, name, value)

    @property
    def scheme(self) -> QuantScheme:
        return self._view(QuantScheme)

    @property
    def recipe(self) -> ReconRecipe:
        return self._view(ReconRecipe)

    @property
    def runtime(self) -> RuntimeOptions:
        return self._view(RuntimeOptions)

    def _view(self, view: type) -> Any:
        return view(**{name: getattr(self, name) for name in _names(view)})

    def result_settings(self) -> dict[str, Any]:
        """The scheme and recipe fields as in `to_dict`: everything that decides the result of a
        run, without the runtime options (a resume and the sensitivity cache compare these)."""
        kept = {*_names(QuantScheme), *_names(ReconRecipe)}
        return {name: value for name, value in self.to_dict().items() if name in kept}

    @property
    def effective_act_lr(self) -> float:
        return self.resolved().recipe.step_size_lr

    def resolved(self) -> BrecqConfig:
        """This config with a concrete method (`auto` looked up in AUTO_RULES) and every
        method-dependent setting filled in; settings given explicitly are kept."""
        method, chosen = self.method, {}
        if method == AUTO:
            rule = auto_rule(self.weight_bits, self.act_bits)
            method, chosen = rule.method, rule.settings
        values: dict[str, Any] = {"weight_lr": DEFAULT_WEIGHT_LR, "round_lambda": DEFAULT_ROUND_LAMBDA,
                                  **chosen}
        if METHOD_REGISTRY[method].learns_acts:
            values.setdefault("act_lr", METHOD_REGISTRY[method].default_act_lr)
        values.update({k: getattr(self, k) for k in values if getattr(self, k) is not None})
        return self.replace(method=method, **values)

    def method_summary(self) -> str:
        """One line saying which method and settings run, e.g. for the first printed line."""
        run = self.resolved()
        method = METHOD_REGISTRY[run.method]
        why = ""
        if self.method == AUTO:
            rule = auto_rule(self.weight_bits, self.act_bits)
            why = (" (auto: activations below 8 bits)" if rule.low_bit_acts
                   else " (auto: weights only or 8-bit activations)")
        if not method.optimizes:
            return f"{method.title}{why}, {self.label}"
        lrs = f"weight_lr {run.weight_lr:g}, round_lambda {run.round_lambda:g}"
        if self.act_bits is not None:
            lrs += f", act_lr {run.act_lr:g}"
        passes = [p for p in method.phases_run(self.act_bits is not None) if p.optimizes]
        iters = " + ".join(f"{run.recipe.iterations(p):,} {p.plan}" for p in passes)
        within = f" (at most; time budget {self.time_budget:g}s)" if self.time_budget else ""
        return f"{method.title}{why}, {self.label}: {lrs}; {iters} iterations per unit{within}"

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
