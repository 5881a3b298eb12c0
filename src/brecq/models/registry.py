"""Build a model from a name, load a local checkpoint, and report its input preprocessing.

Accepted names:

- a torchvision classification model (`resnet18`, `mobilenet_v2`, `regnet_x_3_2gf`, ...);
- `timm:NAME` for a timm model (needs `pip install timm`);
- a bundled model: `cifar_resnet20`, `cifar_resnet32`, `cifar_resnet44`, `cifar_resnet56`;
- `module:callable`, `package.module:callable` or `path/to/file.py:callable` for your own model:
  the module is imported and the callable is called with no arguments (or with
  `num_classes=` when given) and must return an `nn.Module`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..fileio import damage_of
from . import cifar_resnet
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

logger = logging.getLogger(__name__)

BUNDLED_MODELS: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet20": cifar_resnet.cifar_resnet20,
    "cifar_resnet32": cifar_resnet.cifar_resnet32,
    "cifar_resnet44": cifar_resnet.cifar_resnet44,
    "cifar_resnet56": cifar_resnet.cifar_resnet56,
}

CIFAR_PREPROCESSING = Preprocessing(
    resize=None, crop=32, mean=cifar_resnet.CIFAR_MEAN, std=cifar_resnet.CIFAR_STD
)
IMAGENET_PREPROCESSING = Preprocessing(
    resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear"
)

# Keys under which training scripts commonly nest the state dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
_FORMS = (
    "a torchvision model (e.g. resnet18), timm:NAME, a bundled model "
    f"({', '.join(BUNDLED_MODELS)}) or module:callable"
)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name. `kind` is 'torchvision', 'timm', 'bundled' or 'callable'."""

    kind: str
    target: str
    name: str


def _torchvision_names() -> list[str]:
    import torchvision.models

    return list(torchvision.models.list_models(module=torchvision.models))


def available_models() -> dict[str, list[str]]:
    """Names accepted by `build_model`, by kind (timm only when it is installed)."""
    out = {"bundled": list(BUNDLED_MODELS), "torchvision": _torchvision_names()}
    try:
        import timm  # noqa: F401
    except ImportError:
        return out
    out["timm"] = [f"timm:{n}" for n in timm.list_models()]
    return out


def parse_model_name(name: str) -> ModelSpec:
    """Classify `name`; raise ModelError (with close matches) if it names nothing known."""
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model name {name!r} is empty: pass e.g. resnet18 or {_FORMS}")
    name = name.strip()
    if name.startswith("timm:"):
        target = name[len("timm:") :]
        if not target:
            raise ModelError(f"model name {name!r} has no timm model: use e.g. timm:resnet18")
        return ModelSpec("timm", target, name)
    if ":" in name:
        module, _, attr = name.rpartition(":")
        if not module or not attr:
            raise ModelError(
                f"model name {name!r} is not module:callable: use e.g. mymodels:build_net"
            )
        return ModelSpec("callable", name, name)
    if name in BUNDLED_MODELS:
        return ModelSpec("bundled", name, name)
    tv_names = _torchvision_names()
    if name in tv_names:
        return ModelSpec("torchvision", name, name)
    lowered = name.lower().replace("-", "_")
    if lowered != name and (lowered in tv_names or lowered in BUNDLED_MODELS):
        return parse_model_name(lowered)
    close = difflib.get_close_matches(lowered, [*BUNDLED_MODELS, *tv_names], n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ModelError(f"unknown model {name!r}: {hint}use {_FORMS}")


# ----------------------------------------------------------------------------- checkpoints


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # e.g. {'model': {'state_dict': ...}}
        if isinstance(obj, nn.Module):
            return obj.state_dict()
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), (Mapping, nn.Module)):
                obj = obj[key]
                break
        else:
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(
            f"checkpoint {path} holds no state dict (found {type(obj).__name__}): save "
            "model.state_dict() (optionally under 'state_dict', 'model' or 'net')"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(list(map(str, obj))[:5])
        raise ModelError(
            f"checkpoint {path} has no tensors at the top level (keys: {keys}): save "
            "model.state_dict() (optionally under 'state_dict', 'model' or 'net')"
        )
    return tensors


def _strip_prefix(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Drop a 'module.' (DataParallel / DDP) or '_orig_mod.' (torch.compile) prefix."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            if any(k in model_keys for k in state):
                continue
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _few(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike[str], model_name: str | None = None
) -> nn.Module:
    """Load a local checkpoint into `model` (in place, strict) and return the model.

    Accepts a plain state dict or one nested under 'state_dict', 'model_state_dict', 'model' or
    'net', with or without a DataParallel 'module.' prefix. Raises ModelError when the file is
    missing or unreadable, or when its keys or shapes do not match the model.
    """
    path = Path(path).expanduser()
    what = f"model {model_name!r}" if model_name else type(model).__name__
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise ModelError(f"checkpoint file {path} {where}: pass the path of a .pt/.pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-torch files
        damage = damage_of(path, exc)
        if damage is not None:
            raise ModelError(f"checkpoint {path} is damaged ({damage}): copy or download it "
                             "again") from exc
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"checkpoint {path} could not be read as weights ({reason[:200]}): save it with "
            "torch.save(model.state_dict(), path)"
        ) from exc
    model_state = model.state_dict()
    state = _strip_prefix(_unwrap_state_dict(obj, path), set(model_state))

    missing = [k for k in model_state if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in model_state]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in model_state.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_few(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (checkpoint vs model): {_few(shapes)}")
        raise ModelError(
            f"checkpoint {path} does not match {what} ({'; '.join(parts)}): pass a checkpoint "
            "trained for this architecture, or the right model name / num_classes"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(
            f"checkpoint {path} does not match {what} ({first[:200]}): pass a checkpoint "
            "trained for this architecture"
        ) from exc
    logger.info("loaded %d tensors from %s", len(state), path)
    return model


# ----------------------------------------------------------------------------- builders


def _tv_preprocessing(weights: Any) -> Preprocessing | None:
    """Read resize/crop/mean/std from a torchvision weights enum's eval transform."""
    try:
        t = weights.transforms()
        resize = t.resize_size
        crop = t.crop_size
        resize = resize[0] if isinstance(resize, (list, tuple)) else resize
        crop = crop[0] if isinstance(crop, (list, tuple)) else crop
        interp = getattr(t.interpolation, "value", t.interpolation)
        return Preprocessing(
            resize=int(resize) if resize else None,
            crop=int(crop),
            mean=tuple(t.mean),
            std=tuple(t.std),
            interpolation=str(interp),
        )
    except Exception:  # not an image-classification transform
        logger.debug("no usable eval transform in %s", weights, exc_info=True)
        return None


def _build_torchvision(
    name: str, pretrained: bool, num_classes: int | None
) -> tuple[nn.Module, Preprocessing]:
    import torchvision.models as tvm

    try:
        weights_enum = tvm.get_model_weights(name)
        members = list(weights_enum)
    except (ValueError, KeyError):
        weights_enum, members = None, []
    kwargs: dict[str, Any] = {}
    if pretrained:
        if weights_enum is None or not members:
            raise ModelError(
                f"torchvision has no pretrained weights for {name!r}: drop --pretrained and "
                "pass a local checkpoint with --weights"
            )
        weights = weights_enum.DEFAULT
        n_cat = len(weights.meta.get("categories") or [])
        if num_classes is not None and n_cat and num_classes != n_cat:
            raise ModelError(
                f"pretrained {name} has {n_cat} classes, not num_classes={num_classes}: drop "
                "num_classes, or load your fine-tuned checkpoint with --weights instead"
            )
        model = tvm.get_model(name, weights=weights)
        prep = _tv_preprocessing(weights)
    else:
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        model = tvm.get_model(name, weights=None, **kwargs)
        # Without downloaded weights, describe the architecture's classic recipe (the first,
        # "V1" weights: 256/224 for ResNets/MobileNets/RegNets, 342/299 for Inception).
        ref = getattr(weights_enum, "IMAGENET1K_V1", None) or (members[0] if members else None)
        prep = _tv_preprocessing(ref) if ref is not None else None
    return model, prep or IMAGENET_PREPROCESSING


def _build_timm(
    name: str, pretrained: bool, num_classes: int | None
) -> tuple[nn.Module, Preprocessing]:
    try:
        import timm
        import timm.data
    except ImportError:
        raise ModelError(
            f"model timm:{name} needs timm, which is not installed: pip install timm "
            "(or pip install 'brecq[timm]')"
        ) from None
    kwargs: dict[str, Any] = {"pretrained": pretrained}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" not in str(exc) and "Unknown model" not in repr(exc):
            raise
        close = difflib.get_close_matches(name, list(timm.list_models()), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join('timm:' + c for c in close)}? " if close else ""
        raise ModelError(
            f"unknown timm model {name!r}: {hint}see timm.list_models() for names"
        ) from None
    cfg = timm.data.resolve_data_config({}, model=model)
    size = cfg.get("input_size", (3, 224, 224))
    crop = int(size[-1])
    crop_pct = cfg.get("crop_pct") or 1.0
    resize = int(crop / crop_pct) if crop_pct < 1.0 else crop
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    interp = str(cfg.get("interpolation", "bicubic"))
    if interp not in ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"):
        interp = "bicubic"
    return model, Preprocessing(resize=resize, crop=crop, mean=mean, std=std, interpolation=interp)


def _import_callable(target: str) -> Callable[..., Any]:
    module_name, _, attr = target.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist: check the path in {target!r}")
        mod_key = f"_brecq_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(mod_key, path)
        if spec is None or spec.loader is None:
            raise ModelError(f"cannot import {path}: pass a Python source file in {target!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_key] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (
                module_name == exc.name or module_name.startswith(exc.name + ".")
            ):  # the user's module exists but one of its own imports is missing
                raise ModelError(
                    f"importing {module_name!r} for model {target!r} failed: {exc}; install "
                    "the missing package"
                ) from exc
            # Console scripts do not put the working directory on sys.path; try it once.
            cwd = os.getcwd()
            if cwd in sys.path:
                raise ModelError(
                    f"cannot import module {module_name!r} for model {target!r}: run from its "
                    "folder or add that folder to PYTHONPATH"
                ) from None
            sys.path.insert(0, cwd)
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError:
                raise ModelError(
                    f"cannot import module {module_name!r} for model {target!r}: run from its "
                    "folder or add that folder to PYTHONPATH"
                ) from None
            finally:
                if cwd in sys.path:
                    sys.path.remove(cwd)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(
                f"module {module_name!r} has no attribute {attr!r}: check the name after ':' "
                f"in {target!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"{target!r} is not callable: point to a function or class")
    return obj


def _build_callable(target: str, num_classes: int | None) -> nn.Module:
    fn = _import_callable(target)
    model = fn(num_classes=num_classes) if num_classes is not None else fn()
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"{target}() returned {type(model).__name__}, not a torch.nn.Module: make it "
            "return the model"
        )
    return model


def build_model(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
) -> tuple[nn.Module, Preprocessing | None]:
    """Build the model `name` (see the module docstring), in eval mode, on the CPU.

    `weights` is a local checkpoint loaded strictly (see `load_checkpoint`); `pretrained`
    downloads the default torchvision / timm weights instead. Returns the model and its
    evaluation `Preprocessing` (None for `module:callable` models, whose input is unknown:
    use `resolve_preprocessing` with explicit values).
    """
    spec = parse_model_name(name)
    if weights is not None and pretrained:
        raise ModelError(
            f"both weights={str(weights)!r} and pretrained=True were given for {name!r}: "
            "choose one (a local checkpoint or the downloaded weights)"
        )
    if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
        raise ModelError(f"num_classes={num_classes!r} is not a positive integer: e.g. 10")
    prep: Preprocessing | None
    if spec.kind == "torchvision":
        model, prep = _build_torchvision(spec.target, pretrained, num_classes)
    elif spec.kind == "timm":
        model, prep = _build_timm(spec.target, pretrained, num_classes)
    elif spec.kind == "bundled":
        if pretrained:
            raise ModelError(
                f"{name} has no downloadable weights: pass a local checkpoint with --weights "
                "(e.g. resnet20.pt)"
            )
        model = BUNDLED_MODELS[spec.target](num_classes=10 if num_classes is None else num_classes)
        prep = CIFAR_PREPROCESSING
    else:
        if pretrained:
            raise ModelError(
                f"{name} is your own model, which has no downloadable weights: pass a local "
                "checkpoint with --weights"
            )
        model = _build_callable(spec.target, num_classes)
        prep = None
    if weights is not None:
        load_checkpoint(model, weights, model_name=name)
    model.eval()
    logger.info(
        "built %s (%s, %.2fM parameters)",
        name,
        spec.kind,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model, prep
