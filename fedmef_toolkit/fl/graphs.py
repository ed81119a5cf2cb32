"""The forward and backward of the batched engine's stacked model, replayed from CUDA graphs.

Used by the stacked mechanism of the batched engine (fl/batched.py), whose
optimizer step runs on stacked tensors; the client trainer captures its
whole step instead (fl/stepgraph.py, which says more about why).

At the batch sizes federated clients use, one training step is bound by the
CPU launching kernels, not by the GPU running them: NSConv standardises every
weight in a dozen small kernels per layer, and SAP adds a top-k and bit
packing per layer input, so a ResNet18 step launches 1,500-2,800 kernels and
the GPU idles most of the time (measured on an H200: 8 ms of GPU work in a
29 ms NSConv step). Capturing the model's forward and backward once and
replaying them removes that launch cost; here the loss, the optimizer step
and the data pipeline stay eager.

A graph bakes in the addresses of every parameter and buffer and every
Python-side decision taken while it was captured. `GraphedForward` therefore
replays only when nothing it depends on has moved, and runs the model
eagerly otherwise:

* batches of a size other than the trainer's (a client's last, short batch),
* eval mode or no-grad calls,
* passes that register Python hooks in forward (growth-gradient capture),
* a parameter or buffer that is a different tensor than at capture
  (in-place updates, such as mask changes with copy_, are fine and seen);
  the graph is captured again at the next client's first step.

Before capturing it runs one step eagerly with CUDA's sync debugging set to
"error": a model that synchronises the host (which a graph cannot contain)
is left eager, with the reason logged, instead of breaking a capture midway.
Buffers are restored after the warm-up passes, so BatchNorm statistics are
exactly what eager training would give.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..sap.functions import autocast_dtype
from ..sap.packing import sync_free_packing

log = logging.getLogger(__name__)


class _Call(nn.Module):
    """The model behind a module boundary of its own: make_graphed_callables replaces
    this wrapper's forward, never the model's, so the model stays usable eagerly."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


class GraphedForward:
    """Calls the model, or replays its captured forward (and, in backward, its backward)."""

    def __init__(self, model: nn.Module, batch_size: int, enabled: bool = True):
        self.model = model
        self.batch_size = batch_size
        self.enabled = enabled and torch.cuda.is_available()
        self.refused: str | None = None  # why this model runs eagerly, once decided
        self._graphed = None
        self._key = None
        self._addresses = None
        self.replays = 0
        self.eager_calls = 0
        # Capture only where no autograd graph of an earlier step can still be alive (its
        # AccumulateGrad nodes would tie the parameters to the default stream and break the
        # capture): the trainer allows it at the first step of each client.
        self.capture_allowed = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._replayable(x):
            self.eager_calls += 1
            return self.model(x)
        addresses = self._tensor_addresses()
        key = (tuple(x.shape), x.dtype, autocast_dtype(x.device.type))
        if self._graphed is None or key != self._key or addresses != self._addresses:
            if not self.capture_allowed:
                self.eager_calls += 1
                return self.model(x)
            self._graphed = None  # frees the old graph's memory pool before capturing anew
            self._capture(x)
            if self._graphed is None:
                self.eager_calls += 1
                return self.model(x)
            self._key, self._addresses = key, addresses
        self.replays += 1
        return self._graphed(x)

    # -- when a graph may stand in for the model --------------------------------
    def _replayable(self, x: torch.Tensor) -> bool:
        return (self.enabled and self.refused is None and x.is_cuda and x.shape[0] == self.batch_size
                and self.model.training and torch.is_grad_enabled()
                and not any(getattr(m, "capture_effective_grad", False) for m in self.model.modules()))

    def _tensor_addresses(self) -> tuple:
        return tuple(t.data_ptr() for t in self.model.parameters()) + \
            tuple(t.data_ptr() for t in self.model.buffers())

    # -- capture ---------------------------------------------------------------------
    def _capture(self, x: torch.Tensor) -> None:
        buffers = [b.detach().clone() for b in self.model.buffers()]
        try:
            reason = self._host_sync_in_step(x)
            if reason is None:
                try:
                    with sync_free_packing():
                        self._graphed = torch.cuda.make_graphed_callables(
                            _Call(self.model), (x.detach().clone(),), allow_unused_input=True)
                except (RuntimeError, AssertionError) as e:  # e.g. hooks on a module: refused before capture
                    reason = f"capture failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            if reason is not None:
                self.refused = reason
                log.warning("CUDA graphs off for this run: %s", reason)
        finally:
            with torch.no_grad():  # warm-up passes must not leave BatchNorm statistics behind
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)

    def _host_sync_in_step(self, x: torch.Tensor) -> str | None:
        """Run one forward+backward eagerly with host syncs turned into errors."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        try:
            with sync_free_packing():
                torch.cuda.set_sync_debug_mode("error")
                out = self.model(x)
                torch.autograd.grad(out, params, torch.ones_like(out), allow_unused=True)
        except RuntimeError as e:
            return f"the step synchronises with the host ({str(e).splitlines()[0][:120]})"
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return None

