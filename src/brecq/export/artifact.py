"""Save a quantized model as integer codes and load it back bit-exactly.

An artifact is a directory with three files:

- `quantized.safetensors`: each quantized weight as integer codes (offset to start at 0 and
  stored as uint8, or with `pack=True` two 3/4-bit or four 2-bit codes per byte) with its scale
  and zero point; each activation quantizer's scale and zero point; every other tensor of the
  network state dict (biases, LayerNorm, embeddings, ...) unchanged.
- `config.json`: the `BrecqConfig` the model was quantized with.
- `model.json`: format version, `input_shape` of an example input, the caller's `model_info`
  (e.g. the model `name` and `weights` path used by `brecq export`), per-weight and
  per-activation quantizer metadata and the size on disk vs the float32 parameters.

Loading rebuilds the quantized model with `prepare` and sets each quantized float weight to its
dequantized value `(code - zero_point) * scale` with round-to-nearest rounding: rounding that
value reproduces the stored code exactly, so outputs equal those of the saved model, learned
(AdaRound) rounding included.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import BrecqConfig
from ..errors import BrecqError, ModelError
from ..fileio import atomic_write_bytes, atomic_write_text
from ..graph.model import QuantizedModel
from ..graph.prepare import prepare
from ..quant.quantizers import ActQuantizer, WeightQuantizer

logger = logging.getLogger(__name__)

FORMAT_NAME = "brecq-quantized"
FORMAT_VERSION = 1
WEIGHTS_FILE = "quantized.safetensors"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.json"

_W, _A, _F = "weight/", "act/", "float/"


# --------------------------------------------------------------------------------------------
# Which tensors are what


@dataclass
class _WeightEntry:
    label: str  # name as QuantizedModel.weight_quantizers() lists it
    key: str  # state dict key of the float weight in the network
    module: str  # module path of the quantizer in the network
    weight: nn.Parameter
    quantizer: WeightQuantizer


@dataclass
class _ActEntry:
    name: str  # key in QuantizedModel.act_quantizers
    module: str
    quantizer: ActQuantizer


def _module_names(network: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, module in network.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    return names


def _entries(qmodel: QuantizedModel) -> tuple[list[_WeightEntry], list[_ActEntry], dict[str, Tensor]]:
    """Quantized weights, activation quantizers and the remaining state dict tensors."""
    network = qmodel.network
    modules = _module_names(network)
    state = network.state_dict(keep_vars=True)
    keys: dict[int, str] = {}
    for key, tensor in state.items():
        keys.setdefault(id(tensor), key)

    weights: list[_WeightEntry] = []
    for name, layer in qmodel.layers.items():
        for weight_name, weight, quantizer in layer.weight_quantizers():
            label = name if weight_name == "weight" else f"{name}.{weight_name}"
            if id(weight) not in keys or id(quantizer) not in modules:
                raise ModelError(f"layer {label!r} is not part of the quantized network: "
                                 "pass the QuantizedModel returned by brecq.quantize/prepare")
            weights.append(_WeightEntry(label, keys[id(weight)], modules[id(quantizer)],
                                        weight, quantizer))
    acts = [
        _ActEntry(name, modules[id(q)], q) for name, q in qmodel.act_quantizers.items()
    ]

    quantizer_prefixes = tuple(
        m + "." for m in [e.module for e in weights] + [e.module for e in acts]
    )
    quantized_ids = {id(e.weight) for e in weights}
    rest = {
        key: tensor for key, tensor in state.items()
        if not key.startswith(quantizer_prefixes) and id(tensor) not in quantized_ids
    }
    return weights, acts, rest


# --------------------------------------------------------------------------------------------
# Code packing


def _slot_bits(bits: int) -> int:
    """Bits each code takes in a packed byte: 2 for 2-bit codes, 4 for 3/4-bit, else 8."""
    return 2 if bits <= 2 else (4 if bits <= 4 else 8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes (uint8 values below 2**bits) into bytes, lowest bits first."""
    slot = _slot_bits(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    if slot == 8:
        return flat.clone()
    per_byte = 8 // slot
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.reshape(-1, per_byte)
    packed = torch.zeros(groups.shape[0], dtype=torch.uint8)
    for i in range(per_byte):
        packed |= groups[:, i] << (slot * i)
    return packed


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of `pack_codes`: the first `numel` codes as a flat uint8 tensor."""
    slot = _slot_bits(bits)
    if slot == 8:
        return packed.reshape(-1)[:numel]
    per_byte = 8 // slot
    mask = (1 << slot) - 1
    parts = [(packed >> (slot * i)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=1).reshape(-1)[:numel]


# --------------------------------------------------------------------------------------------
# Save


def _float_bytes(qmodel: QuantizedModel) -> int:
    """Bytes of the network's parameters stored as float32 (quantizer parameters excluded)."""
    skip = {
        id(p) for m in qmodel.network.modules() if isinstance(m, (WeightQuantizer, ActQuantizer))
        for p in m.parameters(recurse=False)
    }
    return sum(4 * p.numel() for p in qmodel.network.parameters() if id(p) not in skip)


def _quantizer_meta(q: WeightQuantizer | ActQuantizer) -> dict[str, Any]:
    return {
        "bits": q.bits,
        "symmetric": q.symmetric,
        "per_channel": bool(getattr(q, "per_channel", False)),
        "qmin": q.qmin,
        "qmax": q.qmax,
    }


def _input_shape(info: dict, example_input: Tensor | None) -> list[int] | None:
    """Shape of the example input, or [1, C, crop, crop] from recorded image preprocessing."""
    if example_input is not None:
        return list(example_input.shape)
    prep = info.get("preprocessing")
    if isinstance(prep, dict) and prep.get("crop") and prep.get("mean"):
        return [1, len(prep["mean"]), int(prep["crop"]), int(prep["crop"])]
    return None


def _weight_tensors(weights: list[_WeightEntry], pack: bool,
                    tensors: dict[str, Tensor]) -> list[dict[str, Any]]:
    """Put each quantized weight's codes, scale and zero point in `tensors`; returns their
    metadata."""
    meta = []
    for e in weights:
        q = e.quantizer
        codes = q.int_weight(e.weight.detach()).to(torch.int64) - q.qmin  # 0 .. 2**bits-1
        packed = pack and _slot_bits(q.bits) < 8
        stored = pack_codes(codes, q.bits) if packed else codes.to(torch.uint8)
        tensors[f"{_W}{e.key}/codes"] = stored.cpu().contiguous()
        tensors[f"{_W}{e.key}/scale"] = q.scale.detach().cpu().contiguous()
        tensors[f"{_W}{e.key}/zero_point"] = q.zero_point.detach().cpu().to(torch.int16)
        meta.append({
            "name": e.label, "key": e.key, "quantizer": e.module,
            "shape": list(e.weight.shape), "dtype": str(e.weight.dtype).removeprefix("torch."),
            "packed": packed, "learned_rounding": q.learned, **_quantizer_meta(q),
        })
    return meta


def _act_tensors(acts: list[_ActEntry], tensors: dict[str, Tensor]) -> list[dict[str, Any]]:
    """Put each activation quantizer's scale and zero point in `tensors`; returns their
    metadata."""
    meta = []
    for e in acts:
        q = e.quantizer
        if not bool(q.initialized):
            raise ModelError(
                f"activation quantizer {e.name!r} has no scale yet: save the model returned "
                "by brecq.quantize (its activation scales are calibrated)"
            )
        tensors[f"{_A}{e.name}/scale"] = q.scale.detach().cpu().reshape(()).clone()
        tensors[f"{_A}{e.name}/zero_point"] = q.zero_point.detach().cpu().to(torch.int16)
        meta.append({"name": e.name, "quantizer": e.module, **_quantizer_meta(q)})
    return meta


def _output_dir(out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out} exists and is not a directory: choose a directory for the artifact")
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_quantized(
    qmodel: QuantizedModel,
    out_dir: str | os.PathLike[str],
    *,
    config: BrecqConfig,
    model_info: dict | None = None,
    example_input: Tensor | None = None,
    pack: bool = False,
) -> Path:
    """Write the artifact of `qmodel` to `out_dir` (created if needed) and return its path.

    `model_info` is stored in model.json as given (JSON-serializable values; `brecq export`
    reads "name" and "weights" from it to rebuild the model). The example input shape comes
    from `model_info["input_shape"]`, `example_input` or a `model_info["preprocessing"]` dict
    with "crop" and "mean" (as `brecq quantize` records it); without any of them
    `load_quantized` needs explicit `example_inputs`. `pack=True` stores 2-bit codes four per
    byte and 3/4-bit codes two per byte (wider codes stay one per byte).
    """
    from safetensors.torch import save

    if not isinstance(qmodel, QuantizedModel):
        raise ModelError(
            f"save_quantized needs a QuantizedModel, got {type(qmodel).__name__}: pass what "
            "brecq.quantize returned"
        )
    info = dict(model_info or {})
    if "input_shape" not in info:
        shape = _input_shape(info, example_input) or qmodel.example_input_shape
        if shape is not None:
            info["input_shape"] = shape
        else:
            logger.warning("no example input shape known: load_quantized will need example_inputs=")
    out = _output_dir(out_dir)

    weights, acts, rest = _entries(qmodel)
    tensors: dict[str, Tensor] = {}
    with torch.no_grad():
        weight_meta = _weight_tensors(weights, pack, tensors)
        act_meta = _act_tensors(acts, tensors)
        for key, tensor in rest.items():
            tensors[f"{_F}{key}"] = tensor.detach().cpu().contiguous()

    weights_path = out / WEIGHTS_FILE
    atomic_write_bytes(weights_path, save(
        tensors, metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
    ))
    atomic_write_text(out / CONFIG_FILE, config.to_json() + "\n")

    artifact_bytes = weights_path.stat().st_size
    float_bytes = _float_bytes(qmodel)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **info,
        "traced": qmodel.traced,
        "weights_file": WEIGHTS_FILE,
        "quantized_weights": weight_meta,
        "act_quantizers": act_meta,
        "float_tensors": {k: list(t.shape) for k, t in rest.items()},
        "size": {
            "artifact_bytes": artifact_bytes,
            "float32_bytes": float_bytes,
            "compression": round(float_bytes / artifact_bytes, 3) if artifact_bytes else None,
        },
    }
    atomic_write_text(out / MODEL_FILE, json.dumps(meta, indent=2) + "\n")
    logger.info(
        "saved quantized model to %s: %.1f KiB on disk vs %.1f KiB float32 parameters (%.2fx smaller)",
        out, artifact_bytes / 1024, float_bytes / 1024, float_bytes / max(1, artifact_bytes),
    )
    return out


# --------------------------------------------------------------------------------------------
# Load


def _require_file(out: Path, name: str) -> Path:
    if not out.is_dir():
        where = "is a file" if out.exists() else "does not exist"
        raise ModelError(
            f"quantized model directory {out} {where}: pass the directory written by "
            "save_quantized (brecq quantize --out DIR)"
        )
    path = out / name
    if not path.is_file():
        raise ModelError(
            f"{path} is missing: {out} is not a complete brecq artifact; save it again with "
            "save_quantized"
        )
    return path


def read_model_info(out_dir: str | os.PathLike[str]) -> dict:
    """The contents of DIR/model.json, checked for format and version."""
    out = Path(out_dir).expanduser()
    path = _require_file(out, MODEL_FILE)
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}): save the artifact again") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise ModelError(f"{path} is not a brecq artifact description: save the model with "
                         "save_quantized")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelError(
            f"{out} has artifact format version {version!r}, but this brecq reads version "
            f"{FORMAT_VERSION}: save it again with this version or upgrade brecq"
        )
    return info


def _read_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise various types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"{path} is corrupted or truncated ({reason[:160]}): save the artifact again"
        ) from exc


def _get(tensors: dict[str, Tensor], key: str, path: Path) -> Tensor:
    if key not in tensors:
        raise ModelError(f"{path} has no tensor {key!r}: the file does not belong to its "
                         "model.json; save the artifact again")
    return tensors[key]


def _mismatch(out: Path, model: nn.Module, problems: list[str]) -> ModelError:
    shown = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
    return ModelError(
        f"artifact {out} does not match the {type(model).__name__} given ({shown}): pass the "
        "same model architecture the artifact was saved from"
    )


def _saved_act_name(info: dict, entry: _ActEntry) -> str:
    """The name `entry` has in the artifact: artifacts from before activation quantizers were
    named after their modules use fx node names; the quantizer's module path is the same."""
    by_module = {m.get("quantizer"): m["name"] for m in info.get("act_quantizers", [])}
    return entry.name if entry.name in by_module.values() else by_module.get(entry.module, entry.name)


def _check_layout(out: Path, model: nn.Module, info: dict, weights: list[_WeightEntry],
                  acts: list[_ActEntry], rest: dict[str, Tensor]) -> None:
    problems: list[str] = []
    saved_w = {m["key"]: m for m in info.get("quantized_weights", [])}
    have_w = {e.key: e for e in weights}
    problems += [f"no quantized layer {k}" for k in saved_w if k not in have_w]
    problems += [f"unexpected quantized layer {k}" for k in have_w if k not in saved_w]
    for key, e in have_w.items():
        m = saved_w.get(key)
        if m is None:
            continue
        if list(e.weight.shape) != m["shape"]:
            problems.append(f"{key} has shape {tuple(e.weight.shape)} vs {tuple(m['shape'])} saved")
        elif (e.quantizer.bits, e.quantizer.qmin, e.quantizer.qmax) != (m["bits"], m["qmin"], m["qmax"]):
            problems.append(f"{key} quantizes to {e.quantizer.bits} bits vs {m['bits']} saved")
    saved_a = {m["name"] for m in info.get("act_quantizers", [])}
    have_a = {_saved_act_name(info, e) for e in acts}
    problems += [f"no activation quantizer {n}" for n in sorted(saved_a - have_a)]
    problems += [f"unexpected activation quantizer {n}" for n in sorted(have_a - saved_a)]
    saved_f = info.get("float_tensors", {})
    problems += [f"no tensor {k}" for k in saved_f if k not in rest]
    problems += [f"unexpected tensor {k}" for k in rest if k not in saved_f]
    problems += [
        f"{k} has shape {tuple(t.shape)} vs {tuple(saved_f[k])} saved"
        for k, t in rest.items() if k in saved_f and list(t.shape) != saved_f[k]
    ]
    if problems:
        raise _mismatch(out, model, problems)


def _example_inputs(info: dict, out: Path) -> tuple[Tensor, ...]:
    shape = info.get("input_shape")
    if not shape:
        raise ModelError(
            f"{out / MODEL_FILE} has no input_shape: pass example_inputs= to load_quantized, or "
            "save with model_info={'input_shape': [...]} or example_input="
        )
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(*[int(s) for s in shape], generator=gen),)


def load_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    example_inputs: tuple | None = None,
) -> QuantizedModel:
    """Rebuild the quantized model saved in `out_dir` from the float `model` (left untouched).

    `model` must have the architecture the artifact was saved from (its float weights do not
    matter: every tensor comes from the artifact). Returns a `QuantizedModel` on the CPU whose
    outputs equal those of the saved model.
    """
    out = Path(out_dir).expanduser()
    info = read_model_info(out)
    config_path = _require_file(out, CONFIG_FILE)
    config = BrecqConfig.from_json(config_path)
    if "backend" not in json.loads(config_path.read_text()):
        # Artifacts written before the `backend` field existed used the research placement.
        config = config.replace(backend="none")
    weights_path = _require_file(out, WEIGHTS_FILE)
    tensors = _read_tensors(weights_path)
    if example_inputs is None:
        example_inputs = _example_inputs(info, out)
    try:
        qmodel = prepare(model, config.replace(device="cpu"), tuple(example_inputs))
    except BrecqError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"artifact {out} does not fit {type(model).__name__} (running it on an input of shape "
            f"{info.get('input_shape')} failed: {reason[:160]}): pass the model it was saved from"
        ) from exc
    qmodel = qmodel.cpu()
    weights, acts, rest = _entries(qmodel)
    _check_layout(out, model, info, weights, acts, rest)
    meta = {m["key"]: m for m in info["quantized_weights"]}

    with torch.no_grad():
        for e in weights:
            m, q = meta[e.key], e.quantizer
            stored = _get(tensors, f"{_W}{e.key}/codes", weights_path)
            numel = math.prod(m["shape"])
            codes = unpack_codes(stored, m["bits"], numel) if m["packed"] else stored.reshape(-1)
            if codes.numel() != numel:
                raise _mismatch(out, model, [f"{e.key} has {codes.numel()} codes, not {numel}"])
            scale = _get(tensors, f"{_W}{e.key}/scale", weights_path).to(e.weight.dtype)
            zero_point = _get(tensors, f"{_W}{e.key}/zero_point", weights_path).to(scale.dtype)
            ints = (codes.to(torch.int64) + m["qmin"]).reshape(e.weight.shape)
            e.weight.copy_(q.load_codes(ints, scale, zero_point))
        for e in acts:
            q = e.quantizer
            name = _saved_act_name(info, e)
            q.set_scale(_get(tensors, f"{_A}{name}/scale", weights_path),
                        _get(tensors, f"{_A}{name}/zero_point", weights_path))
        for key, tensor in rest.items():
            value = _get(tensors, f"{_F}{key}", weights_path)
            if value.shape != tensor.shape:
                raise _mismatch(out, model, [f"{key} has shape {tuple(tensor.shape)} vs "
                                             f"{tuple(value.shape)} saved"])
            tensor.copy_(value)
    logger.info("loaded quantized model from %s (%d quantized weights, %d activation quantizers)",
                out, len(weights), len(acts))
    return qmodel.eval()
