"""A model whose layers hold the weights of several clients, stacked along the channels.

`stack_model(model, capacity)` returns a copy of `model` in which every conv,
linear and BatchNorm layer holds `capacity` clients' tensors, each with a
leading client dimension (`weight` of shape ``(clients, *shape)``), and every
activation between layers carries the clients side by side in the channels:
client c owns channels ``[c*C, (c+1)*C)`` of a ``(B, clients*C, H, W)`` tensor.
Then

* a conv is one grouped conv (``groups * clients`` groups: client c's filters
  see only client c's channels),
* BatchNorm is BatchNorm over ``clients*C`` channels (a client's statistics
  come from its own samples only),
* NSConv standardises per output channel, so ``clients*O`` channels
  standardise exactly as ``O`` did, with the same fused kernel,
* a linear layer is a batched matmul (a grouped 1x1 conv with SAP),
* elementwise layers, pooling, residual additions and flattening
  ``(B, clients*C, 1, 1)`` need nothing: they never mix channels.

This is what `torch.func.vmap` would do with convolutions (its batching rule
for batched weights is this grouped conv), without needing batching rules for
the custom autograd functions (NSConv's standardisation, SAP's packing conv,
the mask-saving ReLU) or for their Triton kernels: those see ordinary tensors.

The number of clients of a call is read from the weights, so the same model
trains any subset of its clients through `torch.func.functional_call` with
sliced tensors. Parameter and buffer names are those of the original model.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import NSConv2d, ScaledReLU
from ..layers.nsconv import response_to_ones, standardize_weight
from ..sap.functions import SAPConfig, sap_conv2d
from ..sparse.masks import MASK_SUFFIX

#: layers without parameters that never mix channels: they run unchanged on stacked clients
CHANNEL_AGNOSTIC = (ScaledReLU, nn.ReLU, nn.ReLU6, nn.Identity, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d,
                    nn.Flatten, nn.Sequential, nn.ModuleList)


def _stacked(t: torch.Tensor | None, capacity: int) -> torch.Tensor | None:
    if t is None:
        return None
    return t.detach().unsqueeze(0).repeat(capacity, *([1] * t.dim())).contiguous()


def _sap_for(cfg: SAPConfig | None, clients: int) -> SAPConfig | None:
    return None if cfg is None else dataclasses.replace(cfg, clients=clients)


class StackedConv2d(nn.Module):
    """Conv2d / NSConv2d (with or without SAP and a mask) for stacked clients."""

    def __init__(self, conv: nn.Conv2d, capacity: int):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode '{conv.padding_mode}' is not supported for stacked clients")
        self.out_channels = conv.out_channels
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.nsconv = isinstance(conv, NSConv2d)
        self.stats, self.unbiased, self.eps = (conv.stats, conv.unbiased, conv.eps) if self.nsconv else (None, False, 0.0)
        self.center, self.input_mean = (conv.center, conv.input_mean) if self.nsconv else (True, 0.0)
        self.sap: SAPConfig | None = getattr(conv, "sap", None)
        self.weight = nn.Parameter(_stacked(conv.weight, capacity))
        self.bias = None if conv.bias is None else nn.Parameter(_stacked(conv.bias, capacity))
        if self.nsconv:
            self.gain = nn.Parameter(_stacked(conv.gain, capacity))
        mask = getattr(conv, MASK_SUFFIX, None)
        self.register_buffer(MASK_SUFFIX, _stacked(mask, capacity))

    def _weight(self, weight, gain, mask) -> torch.Tensor:
        """The (clients * O, C / groups, kh, kw) weight of the grouped conv."""
        w = weight.flatten(0, 1)
        if not self.nsconv:
            return w
        m = None if mask is None else mask.flatten(0, 1)
        return standardize_weight(w, gain.flatten(), m, self.stats, self.unbiased, self.eps, self.center)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clients = self.weight.shape[0]
        weight, gain, mask = self.weight, getattr(self, "gain", None), getattr(self, MASK_SUFFIX)
        w = self._weight(weight, gain, mask)
        bias = None if self.bias is None else self.bias.flatten()
        groups = self.groups * clients
        if self.sap is not None and self.training and torch.is_grad_enabled():
            # The tensors are captured here: under functional_call the module's attributes
            # are restored before backward recomputes the standardised weight.
            recompute = (lambda: self._weight(weight, gain, mask)) if self.nsconv else None
            y = sap_conv2d(x, w, bias, self.stride, self.padding, self.dilation, groups,
                           _sap_for(self.sap, clients), recompute_weight=recompute)
        else:
            y = F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, groups)
        if self.input_mean:
            y = y - self.input_mean * response_to_ones(x, w, self.stride, self.padding, self.dilation, groups)
        return y


class StackedLinear(nn.Module):
    """Linear (with or without SAP and a mask) for stacked clients: the input's last
    dimension holds the clients' features side by side."""

    def __init__(self, linear: nn.Linear, capacity: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.sap: SAPConfig | None = getattr(linear, "sap", None)
        self.weight = nn.Parameter(_stacked(linear.weight, capacity))
        self.bias = None if linear.bias is None else nn.Parameter(_stacked(linear.bias, capacity))
        self.register_buffer(MASK_SUFFIX, _stacked(getattr(linear, MASK_SUFFIX, None), capacity))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clients = self.weight.shape[0]
        lead = x.shape[:-1]
        if self.sap is not None and self.training and torch.is_grad_enabled():
            # a grouped 1x1 conv: SAP's packing conv selects per (sample, client)
            x4 = x.reshape(-1, clients * self.in_features, 1, 1)
            w4 = self.weight.reshape(clients * self.out_features, self.in_features, 1, 1)
            bias = None if self.bias is None else self.bias.flatten()
            y = sap_conv2d(x4, w4, bias, 1, 0, 1, clients, _sap_for(self.sap, clients))
            return y.reshape(*lead, clients * self.out_features)
        xs = x.reshape(-1, clients, self.in_features).transpose(0, 1)  # (clients, N, in)
        if self.bias is None:
            y = torch.bmm(xs, self.weight.transpose(1, 2))
        else:
            y = torch.baddbmm(self.bias.unsqueeze(1), xs, self.weight.transpose(1, 2))
        return y.transpose(0, 1).reshape(*lead, clients * self.out_features)


class StackedBatchNorm2d(nn.Module):
    """BatchNorm2d for stacked clients: per-client affine parameters and running statistics."""

    def __init__(self, bn: nn.BatchNorm2d, capacity: int):
        super().__init__()
        if not bn.track_running_stats or bn.momentum is None:
            raise ValueError("BatchNorm without running statistics or with cumulative averaging (momentum=None) "
                             "is not supported for stacked clients")
        self.eps, self.momentum, self.affine = bn.eps, bn.momentum, bn.affine
        self.weight = nn.Parameter(_stacked(bn.weight, capacity)) if bn.affine else None
        self.bias = nn.Parameter(_stacked(bn.bias, capacity)) if bn.affine else None
        self.register_buffer("running_mean", _stacked(bn.running_mean, capacity))
        self.register_buffer("running_var", _stacked(bn.running_var, capacity))
        self.register_buffer("num_batches_tracked", _stacked(bn.num_batches_tracked, capacity))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        # flatten() of a contiguous slice is a view: F.batch_norm updates the statistics in place
        return F.batch_norm(x, self.running_mean.flatten(), self.running_var.flatten(),
                            None if self.weight is None else self.weight.flatten(),
                            None if self.bias is None else self.bias.flatten(),
                            self.training, self.momentum, self.eps)


def _stacked_layer(module: nn.Module, capacity: int) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        return StackedConv2d(module, capacity)
    if isinstance(module, nn.Linear):
        return StackedLinear(module, capacity)
    if isinstance(module, nn.BatchNorm2d):
        return StackedBatchNorm2d(module, capacity)
    raise ValueError(f"layer {type(module).__name__} is not supported for stacked clients")


def unsupported_layers(model: nn.Module) -> list[str]:
    """Layers `stack_model` cannot stack, as 'name (Type)'."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                out.append(f"{name} ({type(module).__name__}, padding_mode={module.padding_mode})")
            elif isinstance(module, nn.BatchNorm2d) and (not module.track_running_stats or module.momentum is None):
                out.append(f"{name} (BatchNorm2d without running statistics or with momentum=None)")
            continue
        own_state = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if own_state or (not isinstance(module, CHANNEL_AGNOSTIC) and not list(module.children())):
            out.append(f"{name or '(model)'} ({type(module).__name__})")
    return out


def stack_model(model: nn.Module, capacity: int) -> nn.Module:
    """A copy of `model` for `capacity` stacked clients (see the module docstring); every
    client starts with `model`'s tensors."""
    bad = unsupported_layers(model)
    if bad:
        raise ValueError(f"cannot stack clients of this model: {', '.join(bad[:3])}")
    stacked = copy.deepcopy(model)
    for name, module in list(stacked.named_modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            parent_name, _, child = name.rpartition(".")
            parent = stacked.get_submodule(parent_name) if parent_name else stacked
            setattr(parent, child, _stacked_layer(module, capacity))
    return stacked


def stack_inputs(xs: list[torch.Tensor]) -> torch.Tensor:
    """Clients' (B, C, ...) batches as one (B, clients * C, ...) tensor."""
    return torch.stack(xs, dim=1).flatten(1, 2)


def per_client_cross_entropy(logits: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each client: logits (B, clients * classes), labels (clients, B)
    -> (clients,)."""
    clients, b = ys.shape
    per_sample = F.cross_entropy(logits.reshape(b, clients, -1).permute(0, 2, 1), ys.t(), reduction="none")
    return per_sample.mean(dim=0)


@torch.no_grad()
def stacking_problem(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why clients of `model` cannot be stacked, or None. Besides the layer check, runs the
    model's own forward on two stacked clients with different weights and inputs (eval
    mode: nothing changes) against each client alone: a forward that mixes channels
    (concatenation, reshapes over channels) shows up here, not as silently wrong training.
    The check runs on a float64 CPU copy: it is about structure, and on a GPU TF32 rounding
    through a deep network would exceed any tolerance tight enough to catch a mix-up."""
    bad = unsupported_layers(model)
    if bad:
        return f"layers that cannot be stacked: {', '.join(bad[:3])}"
    model = copy.deepcopy(model).to("cpu", torch.float64)
    x = x[:2].to("cpu", torch.float64)
    was_training = model.training
    try:
        stacked = stack_model(model, 2).eval()
        gen = torch.Generator(device="cpu").manual_seed(0)
        for t in stacked.state_dict(keep_vars=True).values():
            if t.is_floating_point():  # client 1: other weights (a mix-up must show)
                t[1].mul_(1.0 + 0.5 * torch.rand(t[1].shape, generator=gen).to(t.device))
        other = copy.deepcopy(model).eval()
        other.load_state_dict({n: t[1] for n, t in stacked.state_dict().items()})
        x1 = x.flip(0) + 0.25
        y = stacked(stack_inputs([x, x1]))
        ref = torch.stack([model.eval()(x), other(x1)], dim=1).flatten(1)
    except (RuntimeError, ValueError) as e:
        return f"stacked forward failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    finally:
        model.train(was_training)
    if y.shape != ref.shape or not torch.allclose(y, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()) + 1e-5):
        return "the model's forward mixes channels (stacked clients give other outputs than each alone)"
    return None
