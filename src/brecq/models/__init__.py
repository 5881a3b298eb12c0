"""Model registry: torchvision, timm, bundled CIFAR ResNets and `module:callable` models.

This package never imports quantization code.
"""

from .cifar_resnet import (
    CIFAR_MEAN,
    CIFAR_STD,
    CifarResNet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
)
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, resolve_preprocessing
from .registry import (
    BUNDLED_MODELS,
    ModelSpec,
    available_models,
    build_model,
    load_checkpoint,
    parse_model_name,
)

__all__ = [
    "BUNDLED_MODELS",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CifarResNet",
    "ModelSpec",
    "Preprocessing",
    "available_models",
    "build_model",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "load_checkpoint",
    "parse_model_name",
    "resolve_preprocessing",
]
