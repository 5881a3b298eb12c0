"""Typed, validated options of the mixed-precision search, and budget parsing.

`SearchConfig` is a frozen dataclass like `BrecqConfig`; its field metadata builds the
`brecq search-bits` flags. The model, data and quantizer settings (first/last-layer bits,
activation bits, scale search, seed, device, ...) come from `BrecqConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import MAX_BITS, MIN_BITS, check_bits, check_choices, flag_field
from ..errors import ConfigError

SENSITIVITY_ROUNDINGS = ("nearest", "adaround")
SENSITIVITY_METRICS = ("fisher", "mse")

# Byte multiples a size budget may use (SI and binary).
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
               "gib": 2**30}
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


@dataclass(frozen=True)
class Budget:
    """A budget as given: `mean_bits` (uniform-equivalent bits) or an absolute `amount`."""

    text: str
    mean_bits: float | None = None
    amount: int | None = None  # bits of weight storage, or BitOPs

    def resolve(self, uniform: Any) -> int:
        """The budget as an integer; `uniform(bits)` gives the total of uniform `bits`."""
        if self.amount is not None:
            return self.amount
        low, high = math.floor(self.mean_bits), math.ceil(self.mean_bits)
        # Linear between the two uniform totals around a fractional bit width (2.5bit).
        frac = self.mean_bits - low
        return int(math.floor(uniform(low) + frac * (uniform(high) - uniform(low)) + 1e-9))


def _mean_bits(text: str, what: str, example: str) -> Budget | None:
    match = re.fullmatch(_NUMBER + r"\s*bits?", text.strip().lower())
    if match is None:
        return None
    bits = float(match.group(1))
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"{what} {text!r} is outside {MIN_BITS}-{MAX_BITS} bits per weight: use "
                          f"e.g. {example}")
    return Budget(text, mean_bits=bits)


def parse_size_budget(text: str) -> Budget:
    """'3bit' / '2.5bit' (the weight size of uniform bits), or bytes: '0.1MB', '64KiB', '5000B'."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("size budget is empty: use e.g. 3bit, 2.5bit or 0.1MB")
    found = _mean_bits(text, "size budget", "3bit or 2.5bit")
    if found is not None:
        return found
    match = re.fullmatch(_NUMBER + r"\s*([kmg]i?b|b)", text.strip().lower())
    if match is None:
        raise ConfigError(
            f"size budget {text!r} is not understood: use mean bits per weight (3bit, 2.5bit) "
            "or a weight size in bytes (0.1MB, 64KiB, 5000B)"
        )
    amount = int(float(match.group(1)) * _BYTE_UNITS[match.group(2)] * 8)
    if amount <= 0:
        raise ConfigError(f"size budget {text!r} is not positive: use e.g. 0.1MB")
    return Budget(text, amount=amount)


def parse_bitops_budget(text: str) -> Budget:
    """'3bit' (the BitOPs of uniform 3-bit weights) or a count: '1.5G', '300M', '123456'."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("BitOPs budget is empty: use e.g. 3bit or 2.5G")
    found = _mean_bits(text, "BitOPs budget", "3bit")
    if found is not None:
        return found
    match = re.fullmatch(_NUMBER + r"\s*([kmgt]?)", text.strip().lower())
    if match is None:
        raise ConfigError(f"BitOPs budget {text!r} is not understood: use 3bit (the BitOPs of "
                          "uniform 3-bit weights) or a count such as 2.5G or 300M")
    amount = int(float(match.group(1)) * _COUNT_UNITS[match.group(2)])
    if amount <= 0:
        raise ConfigError(f"BitOPs budget {text!r} is not positive: use e.g. 2.5G")
    return Budget(text, amount=amount)


@dataclass(frozen=True)
class SearchConfig:
    """What the mixed-precision search measures and how it searches."""

    size_budget: str = flag_field(
        "3bit", "--size-budget", "weight size limit: mean bits (3bit, 2.5bit: the size of "
        "uniform bits with the first/last-layer rule) or bytes (0.1MB, 64KiB)",
        metavar="BUDGET",
    )
    bitops_budget: str | None = flag_field(
        None, "--bitops-budget", "optional BitOPs limit (weight bits x activation bits x"
        " MACs per image): 3bit (that of uniform 3-bit weights) or a count (2.5G)",
        metavar="BUDGET",
    )
    candidates: tuple[int, ...] = flag_field(
        (2, 3, 4, 8), "--candidates", "candidate weight bit widths of each layer",
    )
    search_first_last: bool = flag_field(
        True, "--search-first-last", "let the search choose the first/last layers' bits too"
        " (else they keep --first-last-bits)",
    )
    max_combinations: int = flag_field(
        64, "--max-combinations", "candidate assignments measured per unit; above it"
        " only assignments whose layers are at most one candidate apart",
    )
    rounding: str = flag_field(
        "nearest", "--sensitivity-rounding", "rounding before measuring a unit's error: nearest"
        " (after the Lp scale search) or a short adaround", choices=SENSITIVITY_ROUNDINGS,
    )
    rounding_iters: int = flag_field(
        100, "--sensitivity-iters", "AdaRound iterations per candidate (adaround only)",
    )
    metric: str = flag_field(
        "fisher", "--sensitivity-metric", "fisher: output error weighted by the squared"
        " gradient of the loss (comparable across units); mse: plain output error",
        choices=SENSITIVITY_METRICS,
    )
    samples: int = flag_field(
        512, "--sensitivity-samples", "calibration samples used to measure sensitivity",
    )
    population: int = flag_field(64, "--population", "GA population size")
    generations: int = flag_field(150, "--generations", "GA generations")
    mutation: float | None = flag_field(
        None, "--mutation", "GA per-gene mutation probability; none: 1 / units",
    )

    def __post_init__(self) -> None:
        parse_size_budget(self.size_budget)
        if self.bitops_budget is not None:
            parse_bitops_budget(self.bitops_budget)
        if isinstance(self.candidates, (str, int)) or not self.candidates:
            raise ConfigError(f"candidates={self.candidates!r} must list bit widths, e.g. 2,3,4,8")
        for bits in self.candidates:
            check_bits(bits, "candidate bits")
        object.__setattr__(self, "candidates", tuple(sorted(set(self.candidates))))
        check_choices(self)
        for name, low in (("max_combinations", 1), ("rounding_iters", 0), ("samples", 1),
                          ("population", 2), ("generations", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}={value!r} must be an integer >= {low}")
        if self.mutation is not None and not 0 <= self.mutation <= 1:
            raise ConfigError(f"mutation={self.mutation!r} must be a probability in [0, 1]")

    def replace(self, **changes: Any) -> SearchConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["candidates"] = list(self.candidates)
        return out


def read_bits_file(path: str | Path) -> dict[str, int]:
    """Per-layer weight bits from a bits.json (`{"bits": {"layer": 4, ...}}`), validated."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"bits file {file} does not exist: pass the bits.json written by "
                          "`brecq search-bits --out DIR`")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"bits file {file} is not readable JSON ({exc}): fix or regenerate it "
                          "with `brecq search-bits`") from None
    bits = data.get("bits") if isinstance(data, dict) else None
    if not isinstance(bits, dict) or not bits:
        raise ConfigError(f"bits file {file} has no \"bits\" object: write "
                          "{\"bits\": {\"layer.name\": 4, ...}}")
    for name, value in bits.items():
        check_bits(value, f"bits file {file}: layer {name!r}")
    return dict(bits)
