"""The evaluation transform a model expects, as plain data.

`Preprocessing` is what `build_model` returns next to the model: resize (shorter side), center
crop, normalization statistics and the resize interpolation. It can be printed, stored in JSON,
overridden field by field from the command line, and turned into a torchvision transform.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def _floats(values: Sequence[Any] | float, what: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = (values,)
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{what}={values!r} is not a list of numbers: give one value per channel, "
            "e.g. 0.485,0.456,0.406"
        ) from None
    if not out or not all(math.isfinite(v) for v in out):
        raise ConfigError(f"{what}={values!r} is empty or not finite: give one number per channel")
    return out


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation transform: [Resize(resize)] -> CenterCrop(crop) -> ToTensor -> Normalize.

    `resize` is the length of the shorter image side after resizing, or None for no resize.
    `mean`/`std` have one value per channel (1 value means a grayscale model).
    """

    resize: int | None
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        mean = _floats(self.mean, "mean")
        std = _floats(self.std, "std")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if len(mean) != len(std):
            raise ConfigError(
                f"mean has {len(mean)} values but std has {len(std)}: give one of each per channel"
            )
        if any(s <= 0 for s in std):
            raise ConfigError(f"std={std} has a value <= 0: every std must be positive")
        if isinstance(self.crop, bool) or not isinstance(self.crop, int) or self.crop <= 0:
            raise ConfigError(f"crop={self.crop!r} is not a positive integer: e.g. crop=224")
        if self.resize is not None and (
            isinstance(self.resize, bool) or not isinstance(self.resize, int) or self.resize <= 0
        ):
            raise ConfigError(
                f"resize={self.resize!r} is not a positive integer: e.g. resize=256, "
                "or None for no resize"
            )
        interp = str(self.interpolation).lower()
        if interp not in INTERPOLATIONS:
            raise ConfigError(
                f"interpolation={self.interpolation!r} is unknown: use one of "
                f"{', '.join(INTERPOLATIONS)}"
            )
        object.__setattr__(self, "interpolation", interp)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def replace(self, **changes: Any) -> Preprocessing:
        """A copy with the given fields overridden; None keeps a field. `resize=0` turns it off."""
        given = {name: value for name, value in changes.items() if value is not None}
        if "resize" in given:
            given["resize"] = given["resize"] or None
        return dataclasses.replace(self, **given)

    def to_dict(self) -> dict[str, Any]:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            resize=data.get("resize"),
            crop=data["crop"],
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=data.get("interpolation", "bilinear"),
        )

    def to_transform(self) -> Any:
        """A torchvision transform taking a PIL image to a normalized [C, H, W] float tensor."""
        from torchvision import transforms as T

        mode = T.InterpolationMode(self.interpolation)
        steps: list[Any] = []
        if self.channels == 1:
            steps.append(T.Grayscale(num_output_channels=1))
        if self.resize is not None:
            steps.append(T.Resize(self.resize, interpolation=mode))
        steps += [
            T.CenterCrop(self.crop),
            T.ToTensor(),
            T.Normalize(list(self.mean), list(self.std)),
        ]
        return T.Compose(steps)

    def __str__(self) -> str:
        resize = "none" if self.resize is None else str(self.resize)
        mean = ",".join(f"{v:g}" for v in self.mean)
        std = ",".join(f"{v:g}" for v in self.std)
        return f"resize={resize} ({self.interpolation}) crop={self.crop} mean=({mean}) std=({std})"


def resolve_preprocessing(
    base: Preprocessing | None,
    resize: int | None = None,
    crop: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
) -> Preprocessing:
    """Apply explicit (e.g. command-line) values over the model's default preprocessing.

    None keeps the model's value; `resize=0` means no resize. When the model has no known
    preprocessing (`base is None`, e.g. a `module:callable` model), crop, mean and std must all
    be given.
    """
    if base is not None:
        return base.replace(resize=resize, crop=crop, mean=mean, std=std,
                            interpolation=interpolation)
    missing = [n for n, v in (("crop", crop), ("mean", mean), ("std", std)) if v is None]
    if missing:
        raise ConfigError(
            f"the model has no known input preprocessing and {', '.join(missing)} "
            "was not given: pass --crop, --mean and --std (and --resize if images need it)"
        )
    return Preprocessing(
        resize=resize or None,
        crop=crop,  # type: ignore[arg-type]
        mean=tuple(mean),  # type: ignore[arg-type]
        std=tuple(std),  # type: ignore[arg-type]
        interpolation=interpolation or "bilinear",
    )
