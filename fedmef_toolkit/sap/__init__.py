"""Scaled activation pruning: enable it on a model, layer by layer.

`enable_sap(model, gamma, selection)` makes every conv (NSConv included) and
linear layer save only its top-(1-gamma) input for backward, and every ReLU
save a 1-bit mask instead of its dense output, so no dense copy of a layer
input stays alive. Plain nn.Conv2d / nn.Linear / nn.ReLU(6) modules are
switched to SAP subclasses in place (same parameters, same state_dict keys).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import NSConv2d, ScaledReLU
from .functions import SAPConfig, sap_conv2d, sap_linear


class SAPConv2d(nn.Conv2d):
    sap: SAPConfig | None = None

    def forward(self, x):
        if self.sap is not None and self.training and torch.is_grad_enabled():
            return sap_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups, self.sap)
        return super().forward(x)


class SAPLinear(nn.Linear):
    sap: SAPConfig | None = None

    def forward(self, x):
        if self.sap is not None and self.training and torch.is_grad_enabled():
            return sap_linear(x, self.weight, self.bias, self.sap)
        return F.linear(x, self.weight, self.bias)


def _relu_replacement(module: nn.Module) -> ScaledReLU:
    act = ScaledReLU(gain=1.0, max_value=6.0 if isinstance(module, nn.ReLU6) else None)
    act.save_mask = True
    return act


def enable_sap(model: nn.Module, gamma: float, selection: str = "per_sample") -> nn.Module:
    cfg = SAPConfig(gamma=gamma, per_sample=selection == "per_sample")
    for name, module in list(model.named_modules()):
        if isinstance(module, NSConv2d):
            module.sap = cfg
        elif isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise ValueError(f"SAP supports zero padding only ({name})")
            module.__class__ = SAPConv2d
            module.sap = cfg
        elif isinstance(module, nn.Linear):
            module.__class__ = SAPLinear
            module.sap = cfg
        elif isinstance(module, ScaledReLU):
            module.save_mask = True
        elif isinstance(module, (nn.ReLU, nn.ReLU6)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _relu_replacement(module))
    return model


def disable_sap(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if hasattr(module, "sap"):
            module.sap = None
        if isinstance(module, ScaledReLU):
            module.save_mask = False
    return model
