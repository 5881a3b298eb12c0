"""brecq: post-training quantization of PyTorch models by block reconstruction."""

from .config import BrecqConfig
from .errors import (
    BrecqError,
    CheckpointError,
    ConfigError,
    DataError,
    ModelError,
    ReconstructionError,
)
from .export import load_quantized, save_quantized
from .graph.model import QuantizedModel, Unit
from .graph.prepare import prepare
from .recon.pipeline import quantize
from .recon.report import QuantizationReport, UnitReport

__all__ = [
    "BrecqConfig",
    "BrecqError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ModelError",
    "QuantizationReport",
    "QuantizedModel",
    "ReconstructionError",
    "Unit",
    "UnitReport",
    "load_quantized",
    "prepare",
    "quantize",
    "save_quantized",
]
__version__ = "0.1.0"
