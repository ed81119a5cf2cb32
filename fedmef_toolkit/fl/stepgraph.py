"""Whole client steps (forward to SGD update) replayed from one CUDA graph.

At the batch sizes federated clients use, a training step is bound by the
CPU launching kernels, not by the GPU running them. Replaying only the
model's forward and backward from a graph (the former fl/graphs.py) left the rest of the
step eager: the loss, BaE's penalty, masking the gradients, adaptive
gradient clipping (about six kernels per weight), the two-group SGD update
and re-masking. On an H200 that held the FedMef recipe at 3,500 samples/s
while its graphed forward and backward alone ran at 14,000.

`GraphedStep` therefore captures one complete local step as one graph:

    forward (under the trainer's autocast) -> cross-entropy (+ the plan's
    extra loss) -> gradients (torch.autograd.grad) -> + the plan's weight
    penalty's gradient (BaE, closed form) -> gradient masks -> AGC -> weight
    decay (dim > 1 only) -> momentum -> update with the step's learning rate
    -> weight and momentum masks -> running loss sum.

The same Python function (`GraphedStep._step`) is what the graph records and
what runs eagerly, on every device: the CPU (tests) and CUDA steps that
cannot replay run exactly the captured code. What changes from step to step
lives in tensors the graph reads, so it needs no new capture:

* the batch: copied into static input buffers (augmentation stays eager: it
  draws from the client's own torch.Generator);
* the learning rate: a 0-dim tensor filled before each step (a kernel, no
  host sync), so BaE's per-step step size replays too;
* "first step of the client": momentum is buf = started * m * buf + grad,
  with `started` a tensor that is 0 at a client's first step and 1 after,
  which is torch.optim.SGD's buf = grad at the first step, m * buf + grad later;
* masks changed in place (FedDST's mid-training change), and BaE's targets
  and lam (`ClientPlan.penalty()`, written in place by the strategy: 0 in
  rounds that do not extrude), so a run captures each worker's step once,
  not again around every adjustment round.

The gradients are the graph's own (returned by torch.autograd.grad, never
written to .grad): eager passes between steps that use .grad, such as the
growth-gradient pass (`ClientTrainer.effective_weight_grads`), cannot
overwrite them, so steps after such a pass replay as before.

A graph bakes in tensor addresses and Python-side decisions. It is replayed
only when these are what they were at capture, else the step runs eagerly:

* the batch shape and dtype and the autocast dtype;
* the data_ptrs of every parameter and buffer, the plan's extra loss (its
  function and `ClientPlan.graph_key()`) and its penalty's tensors. When
  these change the graph is dropped and captured again at the next client's
  first step: only there is no autograd graph of an earlier step alive.

A client's short last batch (its size is rarely a multiple of the batch size)
would break the first rule: at five local epochs 90 of a FedMef round's 770
steps ran eagerly for it (H200, paper protocol). Where no layer mixes the
samples of a batch (`batch_mixing_layer` finds no BatchNorm, no instance norm
with running statistics, no dropout, no SAP selecting over the batch) on a CUDA device,
a short batch is padded with zeros to the full size and the loss weights each
sample by whether it is real: loss = sum(w_i * ce_i) / n_real. The padded
samples contribute exactly nothing, the real ones give the short batch's
gradient (up to float rounding), and the step replays. Such a model computes
the weighted loss at every step, so eager and replayed steps stay one
function, and so does the same model with CUDA graphs off (turning graphs off
changes no number). BatchNorm models (whose batch statistics padding would
change) keep running their short batches eagerly. The CPU does not pad: there
it would only add work.

Before capturing, the step runs once eagerly with CUDA's sync debugging set
to "error" (and SAP's sync-free packing, as during capture): a step that
synchronises the host, which a graph cannot contain, stays eager with the
reason logged instead of breaking a capture midway. That warm-up is a real
SGD step, so parameters, buffers (BatchNorm statistics), momentum, the
first-step flag and the loss sum are saved before it and restored after:
the step it stood in for is then replayed from the graph, and training is
exactly what eager training gives.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import layout
from ..sap.functions import SAPConfig, autocast_dtype
from ..sap.packing import sync_free_packing
from ..sparse.masks import prunable_modules
from .agc import adaptive_clip_, agc_weights
from .plan import ClientPlan

log = logging.getLogger(__name__)


def batch_mixing_layer(model: nn.Module) -> nn.Module | None:
    """None when no layer of `model` mixes the samples of a training batch, else the first
    layer that does (BatchNorm; instance norm with running statistics, which average over the
    batch; dropout, whose draws depend on the batch size; SAP selecting over the whole batch).
    Where none does, a batch padded with zero-weight samples trains the real samples as the
    unpadded batch does. Layers outside this list are trusted: a registered model with its own
    batch-coupled layer must not be trained with `pad_short_batches`."""
    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
            return module
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
            return module
        sap = getattr(module, "sap", None)
        if isinstance(sap, SAPConfig) and not sap.per_sample:
            return module
    return None


def masked_weights(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, mask) of every prunable layer that has a mask."""
    return [(m.weight, m.weight_mask) for m in prunable_modules(model).values()
            if getattr(m, "weight_mask", None) is not None]


class GraphedStep:
    """One client's local SGD step on `model`: replayed from a CUDA graph where it can be,
    run eagerly (the same function) otherwise. See the module docstring.

    Per client: `begin(plan)`, then `step(x, y, lr)` per batch; `loss_sum` holds the sum of
    the task losses. Momentum buffers are state of this object (torch.optim.SGD semantics:
    dampening 0, no Nesterov, weight decay on tensors of dim > 1 only).

    `pad_short_batches`: pad batches smaller than `batch_size` with zero-weight samples so
    that they replay too (see the module docstring); None: on a CUDA device whenever the
    model's samples are independent (`batch_mixing_layer`), CUDA graphs on or off (so the
    graphs change no number); off on the CPU, where padding would only add work."""

    def __init__(self, model: nn.Module, *, batch_size: int, momentum: float, weight_decay: float, agc: float,
                 autocast, cuda_graphs: bool, stream: torch.cuda.Stream | None = None,
                 pad_short_batches: bool | None = None):
        self.model = model
        self.batch_size = batch_size
        self.momentum, self.weight_decay, self.agc = momentum, weight_decay, agc
        self.autocast = autocast  # () -> context manager: the trainer's autocast
        self.device = next(model.parameters()).device
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.stream = stream  # where the graph is captured (None: a private side stream)
        # every batch in the model's layout, padded or not, replayed or eager: SAP keeps the first
        # of equal entries in memory order, so the layout must not change from step to step
        # (any: a conv with one input channel or a 1x1 kernel is both layouts at once)
        channels_last = any(layout.is_channels_last(p) for p in model.parameters() if p.dim() == 4)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.plan = ClientPlan(0.0)
        self.loss_sum = torch.zeros((), device=self.device)
        mixing = batch_mixing_layer(model)
        if pad_short_batches and mixing is not None:
            raise ValueError(f"pad_short_batches: {type(mixing).__name__} mixes the samples of a batch, so "
                             "padding would change the real samples' step")
        if pad_short_batches is None:
            self.pads = mixing is None and self.device.type == "cuda"
        else:
            self.pads = pad_short_batches
        self._count = torch.zeros((), device=self.device)  # real samples in the batch (padded steps)
        self._count_value = 0  # what `_count` holds: it is written only when the batch size changes
        self.refused: str | None = None  # why steps run eagerly, once decided
        self.replays = self.eager_steps = self.captures = 0
        self.eager_why: dict[str, int] = {}  # why steps ran eagerly, with CUDA graphs on
        self._bound_key = None
        self._penalized: list[tuple[torch.Tensor, int | None]] = []  # the penalty's weights, in its order
        self.binds = 0  # how often the step's tensors were collected anew (each drops the graph)
        self._find_tensors()
        self.params: tuple = ()  # the trainable parameters, in the model's order
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_key = None
        self._first_step = True

    # -- per client ---------------------------------------------------------------
    def begin(self, plan: ClientPlan) -> None:
        """A new client: its plan, zero momentum with first-step semantics, loss sum 0.
        Call after `plan.begin` (which may create the tensors its extra loss reads)."""
        self.plan = plan
        self._first_step = True
        self._find_tensors()
        self._bind()
        with torch.no_grad():
            self.loss_sum.zero_()
            self.started.zero_()
            if self.bufs:
                torch._foreach_zero_(self.bufs)

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float | torch.Tensor) -> None:
        """One local step on batch (x, y) at learning rate `lr`."""
        first, self._first_step = self._first_step, False
        self._bind()
        if self.pads:
            n = x.shape[0]
            if 0 < n < self.batch_size:
                # zeros to the full size (so that the graph replays), weighted out of the loss; also
                # where no graph replays (graphs off or refused), so that graphs change no number
                x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
                y = torch.cat([y, y.new_zeros(self.batch_size - n)])
            if n != self._count_value:  # full batches leave it as it is: no kernel per step
                self._count.fill_(n)
                self._count_value = n
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)  # no copy where it already is
        if isinstance(lr, torch.Tensor):  # computed on the device (BaE's step size): no host sync
            self.lr.copy_(lr)
        else:
            self.lr.fill_(lr)
        if self._replayable(x, y, first):
            self._static_x.copy_(x)
            self._static_y.copy_(y)
            self._graph.replay()
            self.replays += 1
        else:
            self._step(x, y)
            self.eager_steps += 1
            if self.cuda_graphs and self.refused is None:
                why = "short batches" if x.shape[0] != self.batch_size else "graph inputs changed within a client"
                self.eager_why[why] = self.eager_why.get(why, 0) + 1

    # -- the step: captured, or run eagerly ------------------------------------------------
    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.autocast():
            logits = self.model(x)
            if self.pads:  # the mean over the real samples (the first `_count`; the rest are padding)
                real = torch.arange(x.shape[0], device=x.device) < self._count
                loss = (F.cross_entropy(logits, y, reduction="none") * real).sum() / self._count
            else:
                loss = F.cross_entropy(logits, y)
        extra = self.plan.extra_loss(self.model)
        total = loss if extra is None else loss + extra
        grads = list(torch.autograd.grad(total, self.params, allow_unused=True))
        with torch.no_grad():
            if self._penalized:
                self.plan.penalty().add_grad_([w for w, _ in self._penalized],
                                              [None if i is None else grads[i] for _, i in self._penalized])
            self._update(grads)
            self.loss_sum.add_(loss.detach().float())
            self.started.fill_(1.0)

    def _update(self, grads: list[torch.Tensor | None]) -> None:
        """Masked gradients, AGC on them, then torch.optim.SGD's update with the lr tensor,
        then masked weights and momentum. A parameter without a gradient is left alone, as
        torch.optim.SGD leaves it (which parameters get one is a property of the model)."""
        params = self.params
        masked = [(i, m) for i, m in zip(self._masked, self.masks) if grads[i] is not None]
        if masked:
            torch._foreach_mul_([grads[i] for i, _ in masked], [m for _, m in masked])
        clipped = [i for i in self._clipped if grads[i] is not None]
        if clipped:
            adaptive_clip_([params[i] for i in clipped], self.agc, grads=[grads[i] for i in clipped])
        decay = [i for i in self._decay if grads[i] is not None]
        if self.weight_decay and decay:
            torch._foreach_add_([grads[i] for i in decay], [params[i] for i in decay], alpha=self.weight_decay)
        used = [i for i, g in enumerate(grads) if g is not None]
        if self.momentum:
            bufs = [self.bufs[i] for i in used]
            torch._foreach_mul_(bufs, self.started * self.momentum)  # 0 at the first step: buf = grad
            torch._foreach_add_(bufs, [grads[i] for i in used])
            steps = bufs
        else:
            steps = [grads[i] for i in used]
        torch._foreach_sub_([params[i] for i in used], torch._foreach_mul(steps, self.lr))
        if masked:
            masks = [m for _, m in masked]
            torch._foreach_mul_([params[i] for i, _ in masked], masks)
            if self.momentum:
                torch._foreach_mul_([self.bufs[i] for i, _ in masked], masks)

    # -- what the step reads ------------------------------------------------------------
    def _find_tensors(self) -> None:
        """Each module's registered parameters and buffers (the dicts themselves, so a tensor
        registered anew under a name is seen): reading these per step costs a fifth of
        model.parameters() + model.buffers() (26 vs 145 us for ResNet18 on the 2-core CPU).
        Refreshed at each client's start, where a change in the modules themselves is seen."""
        self._tensor_dicts = [d for m in self.model.modules() for d in (m._parameters, m._buffers)]

    def _binding_key(self) -> tuple:
        ptrs = tuple(t.data_ptr() for d in self._tensor_dicts for t in d.values() if t is not None)
        penalty = self.plan.penalty()
        return ptrs, type(self.plan).extra_loss, self.plan.graph_key(), penalty and penalty.graph_key()

    def _bind(self) -> None:
        """(Re)collect the tensors the step works on when any of them changed; a graph that
        read the old ones is dropped."""
        key = self._binding_key()
        if key == self._bound_key:
            return
        self._graph = self._graph_key = None
        params = tuple(p for p in self.model.parameters() if p.requires_grad)
        if tuple(map(id, params)) != tuple(map(id, self.params)):
            dtype = params[0].dtype
            self.lr = torch.zeros((), device=self.device, dtype=dtype)  # the step's learning rate
            self.started = torch.zeros((), device=self.device, dtype=dtype)  # 0: a client's first step
            self.bufs = [torch.zeros_like(p) for p in params] if self.momentum else []
        self.params = params
        index = {id(p): i for i, p in enumerate(params)}
        self._decay = [i for i, p in enumerate(params) if p.dim() > 1]
        pairs = [(w, m) for w, m in masked_weights(self.model) if id(w) in index]
        self._masked = [index[id(w)] for w, _ in pairs]
        self.masks = [m for _, m in pairs]
        self._clipped = [index[id(p)] for p in agc_weights(self.model) if id(p) in index] if self.agc > 0 else []
        penalty, modules = self.plan.penalty(), prunable_modules(self.model)
        # every penalised weight (its norm counts), with its index into params (None: not trained)
        self._penalized = [(modules[n].weight, index.get(id(modules[n].weight)))
                           for n in (penalty.masks if penalty is not None else ())]
        self.binds += 1
        self._bound_key = key

    # -- replay and capture ----------------------------------------------------------------
    def _replayable(self, x: torch.Tensor, y: torch.Tensor, first: bool) -> bool:
        if not self.cuda_graphs or self.refused is not None or x.shape[0] != self.batch_size:
            return False
        with self.autocast():
            dtype = autocast_dtype(self.device.type)
        key = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype, dtype)
        if self._graph is None or key != self._graph_key:
            if not first:  # only a client's first step has no earlier autograd graph alive
                return False
            self._capture(x, y, key)
        return self._graph is not None

    def _state(self) -> list[torch.Tensor]:
        """Everything a step changes."""
        return [*self.model.parameters(), *self.model.buffers(), *self.bufs, self.started, self.loss_sum]

    def _capture(self, x: torch.Tensor, y: torch.Tensor, key: tuple) -> None:
        self._graph = None  # frees the old graph's memory pool before capturing anew
        self._static_x, self._static_y = x.detach().clone(), y.detach().clone()
        saved = [t.detach().clone() for t in self._state()]
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        ambient = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(ambient)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(self.stream):
                reason = self._host_sync_in_step()
                if reason is None:
                    try:
                        with sync_free_packing(), torch.cuda.graph(graph, stream=self.stream):
                            self._step(self._static_x, self._static_y)
                    except (RuntimeError, AssertionError) as e:
                        reason = f"capture failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        finally:
            ambient.wait_stream(self.stream)
            with torch.no_grad():  # the warm-up step must leave nothing behind
                for t, s in zip(self._state(), saved):
                    t.copy_(s)
        if reason is not None:
            self.refused = reason
            log.warning("CUDA graphs off for this run: %s", reason)
            return
        self._graph, self._graph_key = graph, key
        self.captures += 1

    def _host_sync_in_step(self) -> str | None:
        """Run the step once eagerly with host syncs turned into errors."""
        torch.cuda.synchronize(self.device)
        previous = torch.cuda.get_sync_debug_mode()
        try:
            with sync_free_packing():
                torch.cuda.set_sync_debug_mode("error")
                self._step(self._static_x, self._static_y)
        except RuntimeError as e:
            return f"the step synchronises with the host ({str(e).splitlines()[0][:120]})"
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return None

    def status(self) -> str:
        """One line for the run log."""
        if not self.cuda_graphs:
            return "CUDA graphs: off"
        if self.refused:
            return f"CUDA graphs: off ({self.refused})"
        why = ", ".join(f"{k}: {v}" for k, v in self.eager_why.items())
        return (f"CUDA graphs: on (whole steps: {self.replays} replayed, {self.eager_steps} eager"
                f"{f' ({why})' if why else ''}; "
                f"{self.captures} captures)")
