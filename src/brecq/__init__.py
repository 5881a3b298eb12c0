"""brecq: post-training quantization of PyTorch models by block reconstruction."""

from .config import BrecqConfig
from .errors import BrecqError, ConfigError, DataError, ModelError
from .graph.prepare import QuantizedModel, Unit, prepare
from .recon.pipeline import QuantizationReport, UnitReport, quantize

__all__ = [
    "BrecqConfig",
    "BrecqError",
    "ConfigError",
    "DataError",
    "ModelError",
    "QuantizationReport",
    "QuantizedModel",
    "Unit",
    "UnitReport",
    "prepare",
    "quantize",
]
__version__ = "0.1.0"
