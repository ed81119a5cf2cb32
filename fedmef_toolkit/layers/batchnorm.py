"""BatchNorm whose batch statistics can come from the first rows of a batch only.

A client's short last batch per epoch is padded to the full batch size so that its step
replays from the same kind of CUDA graph as the others (fl/stepgraph.py). Padding changes
nothing for layers that treat samples independently, but BatchNorm's batch mean and
variance would include the padding. `RealRowsBatchNorm2d` is an `nn.BatchNorm2d` (same
parameters, buffers and state_dict keys) that, while its `RealRows` is active, takes the
statistics, and the running-statistics update, over the first `count` rows: exactly what
BatchNorm computes on the unpadded short batch (up to float rounding). The padded rows'
outputs are finite and, as the loss weights them 0, get no gradient, so they change no
gradient either. `count` lives on the device, so one captured graph serves every short size.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


class RealRows:
    """How many leading rows of the batch are real (`count`, a 0-dim float tensor on the
    device), shared by a model's `RealRowsBatchNorm2d` layers; they use it only inside
    `padded()`."""

    def __init__(self, device):
        self.count = torch.zeros((), device=device)
        self.active = False

    @contextlib.contextmanager
    def padded(self, on: bool = True):
        """Within: the layers take their statistics over the first `count` rows (if `on`)."""
        previous, self.active = self.active, on
        try:
            yield
        finally:
            self.active = previous


class RealRowsBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` that, in training while `real_rows` is active, normalises with the
    statistics of the first `real_rows.count` rows (see the module docstring)."""

    real_rows: RealRows | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.real_rows is not None and self.real_rows.active):
            return super().forward(x)
        return self._real_rows_forward(x, self.real_rows.count)

    def _real_rows_forward(self, x: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        # statistics in fp32 at least, as BatchNorm keeps them for 16-bit inputs (bf16 autocast)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        real = (torch.arange(x.shape[0], device=x.device) < count).to(xf.dtype).view(-1, 1, 1, 1)
        n = count.to(xf.dtype) * (x.shape[2] * x.shape[3])  # values per channel among the real rows
        mean = (xf * real).sum((0, 2, 3)) / n
        centred = xf - mean.view(shape)
        var = (centred * real).square().sum((0, 2, 3)) / n  # biased: what normalises
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(mean * m)
                self.running_var.mul_(1 - m).add_(var * (n / (n - 1)) * m)  # unbiased, as BatchNorm's
        return y.to(x.dtype)

    @classmethod
    def of(cls, bn: nn.BatchNorm2d, rows: RealRows) -> RealRowsBatchNorm2d:
        """The same layer (its very parameters and buffers, not copies) reading `rows`."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
        new._parameters.update(bn._parameters)
        new._buffers.update(bn._buffers)
        new.train(bn.training)
        new.real_rows = rows
        return new


def maskable(bn: nn.Module) -> bool:
    """A plain BatchNorm2d whose real-rows form is exact and sync-free: a fixed momentum (a
    cumulative average reads the batch count on the host) and running statistics tracked."""
    return type(bn) is nn.BatchNorm2d and bn.momentum is not None and bn.track_running_stats


def use_real_rows(model: nn.Module) -> RealRows | None:
    """Replaces (in place) each plain BatchNorm2d of `model` that `maskable` accepts by the
    `RealRowsBatchNorm2d` form of the same layer, all reading one `RealRows` (returned; None
    where the model has no such layer). Parameters, buffers and state_dict keys are unchanged."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if maskable(child)]
    if not targets:
        return None
    rows = RealRows(next(model.parameters()).device)
    for parent, name, child in targets:
        setattr(parent, name, RealRowsBatchNorm2d.of(child, rows))
    return rows


def real_rows_of(model: nn.Module) -> RealRows | None:
    """The `RealRows` that `model`'s RealRowsBatchNorm2d layers read (None: it has none)."""
    found = {id(m.real_rows): m.real_rows for m in model.modules()
             if isinstance(m, RealRowsBatchNorm2d) and m.real_rows is not None}
    if len(found) > 1:
        raise ValueError("the model's RealRowsBatchNorm2d layers read different RealRows")
    return next(iter(found.values()), None)
