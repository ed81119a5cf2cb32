"""Model registry: `get_model(name, num_classes, norm=..., ...)` like torchvision's.

Builders are registered where they are defined or here, with `register_model`
(usable as a decorator), and take keyword-only arguments
``num_classes, width, image_size, policy``.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .blocks import DEFAULT_ALPHA, NormPolicy
from .cnn import CNN4
from .mobilenetv2 import MobileNetV2
from .resnet import NarrowResNet, ResNet18

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, builder: Callable[..., nn.Module] | None = None):
    """Register `builder` under `name`; without a builder, a decorator that does so."""
    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return add if builder is None else add(builder)


register_model("resnet18", ResNet18)
register_model("resnet_narrow", NarrowResNet)  # the FedMef authors' 16/32/64 CIFAR ResNet
register_model("mobilenetv2", MobileNetV2)
register_model("cnn4", CNN4)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model(name: str, num_classes: int = 10, *, norm: str = "bn", width: float = 1.0, image_size: int = 32,
              nsconv_stats: str = "active", nsconv_unbiased: bool = False, nsconv_eps: float = 1e-4,
              nsconv_alpha: float = DEFAULT_ALPHA, nsconv_center_depthwise: bool = False, nsconv_center_head: bool = False) -> nn.Module:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model '{name}'; available: {', '.join(list_models())}")
    policy = NormPolicy(norm, nsconv_stats, nsconv_unbiased, nsconv_eps, nsconv_alpha, nsconv_center_depthwise,
                        nsconv_center_head)
    return _REGISTRY[name](num_classes=num_classes, width=width, image_size=image_size, policy=policy)


def model_kwargs_from_spec(spec, num_classes: int, image_size: int) -> dict:
    """The registry arguments a recipe's model section stands for (stored in exports)."""
    return {
        "name": spec.arch, "num_classes": num_classes, "norm": spec.norm, "width": spec.width,
        "image_size": image_size, "nsconv_stats": spec.nsconv.stats, "nsconv_unbiased": spec.nsconv.unbiased,
        "nsconv_eps": spec.nsconv.eps, "nsconv_alpha": spec.nsconv.alpha,
        "nsconv_center_depthwise": spec.nsconv.center_depthwise, "nsconv_center_head": spec.nsconv.center_head,
    }


def build_from_kwargs(kwargs: dict) -> nn.Module:
    kwargs = dict(kwargs)
    return get_model(kwargs.pop("name"), **kwargs)
