"""Save, load and deploy quantized models: safetensors artifacts and ONNX QDQ export."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import ModelError
from .artifact import FORMAT_VERSION, load_quantized, read_model_info, save_quantized

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "export_command",
    "export_onnx",
    "load_quantized",
    "read_model_info",
    "save_quantized",
]

EXPORT_FORMATS = ("onnx",)


def export_onnx(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """See `brecq.export.onnx_qdq.export_onnx` (imported lazily: it needs the onnx package)."""
    from .onnx_qdq import export_onnx as _export_onnx

    return _export_onnx(*args, **kwargs)


def export_command(
    artifact_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    fmt: str = "onnx",
    model=None,  # noqa: ANN001 - an nn.Module, or None to rebuild it from model.json
    opset: int | None = None,
) -> Path:
    """`brecq export DIR --format onnx --out FILE`: rebuild the quantized model and export it.

    Without `model`, the float model is rebuilt from model.json's "name" (and "weights", the
    checkpoint it was quantized from, if recorded) with `brecq.models.build_model`.
    """
    if fmt not in EXPORT_FORMATS:
        raise ModelError(f"export format {fmt!r} is unknown: use one of {', '.join(EXPORT_FORMATS)}")
    info = read_model_info(artifact_dir)
    if model is None:
        from ..models import build_model

        name = info.get("name")
        if not name:
            raise ModelError(
                f"{artifact_dir} does not record the model name: pass the model explicitly "
                "(command line: brecq export DIR --model NAME; Python: export_command(..., model=m))"
            )
        weights = info.get("weights")
        if weights and not Path(weights).expanduser().is_file():
            logger.warning("checkpoint %s recorded in the artifact is gone; building %s without it "
                           "(the artifact holds every tensor)", weights, name)
            weights = None
        model, _ = build_model(name, weights=weights, num_classes=info.get("num_classes"))
    qmodel = load_quantized(model, artifact_dir)
    shape = info.get("input_shape")
    if not shape:
        raise ModelError(f"{artifact_dir} has no input_shape: save with example_input= to export it")
    from .onnx_qdq import DEFAULT_OPSET, example_input
    from .onnx_qdq import export_onnx as _export_onnx

    return _export_onnx(qmodel, out_path, example_input(shape), opset=opset or DEFAULT_OPSET)
