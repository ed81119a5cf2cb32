"""The batched engine: a round's clients train together, as one computation per step.

Mechanism: clients stacked along the channels (fl/stacked.py). Each client's
weights, gradients, momentum and masks are slices of stacked tensors with a
leading client dimension; one forward/backward of the stacked model is a
step of every client (grouped convolutions, batched matmuls), and one
stacked SGD update applies each client's own learning rate, mask and
adaptive clipping. Chosen over `torch.func.vmap` + `functional_call`: for
convolutions vmap's batching rule is the same grouped convolution, but vmap
needs vmap rules (setup_context-style autograd functions) for NSConv's
standardisation, SAP's packing conv and the mask-saving ReLU, and cannot run
their Triton kernels or SAP's data-dependent packing; stacked layers call
the same functions and kernels on ordinary tensors, so one implementation of
every layer serves both engines.

What differs between clients keeps working, step for step as in the
sequential engine (`ClientTrainer.train`):

* every client draws its batches, augmentation and SAP selection from its
  own `client_generator`, in the same order;
* clients are sorted by their number of local steps, so the clients still
  training at a step are a prefix of the stack: a finished client is left out
  of the computation and its tensors stop changing;
* a client's short last batch of an epoch cannot share a call with full
  batches (BatchNorm statistics are per batch): each step runs one call per
  batch size, on the slices (or, when not contiguous, a gathered copy,
  written back) of the clients with that size;
* the strategy's plan hooks (`begin`, `at_step`, `step_lr`, `extra_loss`,
  `finish`) see a per-client module whose parameters and buffers alias that
  client's slices: FedDST's mid-training mask change, BaE's penalty and step
  size, the growth-gradient pass and its top-k upload run unchanged, and
  what they change in place is what the stacked model trains with.

Clients that do not fit in memory at once train in groups, one after another
(`fl.batched_clients`, or estimated from free memory).
"""

from __future__ import annotations

import copy
import logging
import os

import torch
import torch.nn as nn
from torch.func import functional_call

from ..sparse.masks import MASK_SUFFIX, prunable_modules
from .agc import agc_weights, clip_units_
from .client import ClientData, ClientResult, ClientTrainer, client_generator
from .graphs import GraphedForward
from .stacked import per_client_cross_entropy, stack_inputs, stack_model

log = logging.getLogger(__name__)

#: clients trained at once on the CPU at most (the batched engine is for GPUs; this keeps tests sane)
CPU_MAX_CLIENTS = 16


class StackedClients:
    """`capacity` client replicas of a model: the stacked model, each client's momentum,
    and one module per client whose tensors alias its slices (what plans see)."""

    def __init__(self, model: nn.Module, capacity: int, *, momentum: float, weight_decay: float, agc: float):
        self.capacity = capacity
        self.model = stack_model(model, capacity)
        self.params = dict(self.model.named_parameters())
        self.buffers = dict(self.model.named_buffers())
        self.momentum, self.weight_decay, self.agc = momentum, weight_decay, agc
        self.momentum_bufs = {n: torch.zeros_like(p) for n, p in self.params.items()} if momentum else {}
        # the original model's parameter ranks decide weight decay (none on biases, gains, norms)
        shapes = {n: p.dim() for n, p in model.named_parameters()}
        self.decay = [n for n in self.params if shapes[n] > 1]
        clipped = {id(p) for p in agc_weights(model)} if agc > 0 else set()
        self.clipped = [n for n, p in model.named_parameters() if id(p) in clipped]
        self.masked = [(f"{name}.weight", f"{name}.{MASK_SUFFIX}") for name, m in prunable_modules(model).items()
                       if getattr(m, MASK_SUFFIX, None) is not None]
        self.views = [self._client_view(model, c) for c in range(capacity)]
        self.signature = _signature(model)
        self.arange = torch.arange(capacity, device=next(iter(self.params.values())).device)
        self.forward = self.model  # or its CUDA-graphed forward: see use_cuda_graphs

    def use_cuda_graphs(self, batch_size: int) -> GraphedForward:
        """Replay the forward and backward of all clients at full batches from a CUDA graph."""
        self.forward = GraphedForward(self.model, batch_size)
        return self.forward

    def index(self, idx: list[int]) -> torch.Tensor:
        """idx as a device tensor, without a host-to-device copy (that would synchronise)."""
        return torch.cat([self.arange[i:i + 1] for i in idx])

    def _client_view(self, model: nn.Module, c: int) -> nn.Module:
        view = copy.deepcopy(model)
        state = {n: t.detach()[c] for n, t in self.model.state_dict(keep_vars=True).items()}
        view.load_state_dict(state, assign=True)  # parameters and buffers now alias client c's slices
        return view

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor], clients: int) -> None:
        """Every one of the first `clients` replicas starts from `state`, with zero momentum."""
        for n, t in self.model.state_dict(keep_vars=True).items():
            t[:clients].copy_(state[n])
        for b in self.momentum_bufs.values():
            b[:clients].zero_()
        for p in self.params.values():
            p.grad = None

    # -- one step --------------------------------------------------------------
    def client_losses(self, idx: list[int], xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
        """Forward of clients `idx` (each with its batch) and their mean cross-entropies."""
        x, y = stack_inputs(xs), torch.stack(ys)
        lo, hi = idx[0], idx[-1] + 1
        if (lo, hi) == (0, self.capacity) and len(idx) == self.capacity:
            return per_client_cross_entropy(self.forward(x), y)
        if hi - lo == len(idx):  # contiguous: views, so buffer updates (BN statistics) land in place
            tensors = {n: t[lo:hi] for n, t in {**self.params, **self.buffers}.items()}
            return per_client_cross_entropy(functional_call(self.model, tensors, (x,)), y)
        at = self.index(idx)
        tensors = {n: t.index_select(0, at) for n, t in {**self.params, **self.buffers}.items()}
        losses = per_client_cross_entropy(functional_call(self.model, tensors, (x,)), y)
        with torch.no_grad():
            for n, b in self.buffers.items():
                b.index_copy_(0, at, tensors[n])
        return losses

    def add_client_grads(self, c: int, loss: torch.Tensor) -> None:
        """Add d loss / d (client c's parameters) to the stacked gradients; `loss` is a
        function of client c's module (e.g. a plan's extra loss term)."""
        named = [(n, p) for n, p in self.views[c].named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        with torch.no_grad():
            for (n, _), g in zip(named, grads):
                if g is None:
                    continue
                stacked = self.params[n]
                if stacked.grad is None:
                    stacked.grad = torch.zeros_like(stacked)
                stacked.grad[c].add_(g)

    @torch.no_grad()
    def sgd_step(self, active: int, lrs: list[float]) -> None:
        """SGD on the first `active` clients, as `apply_step_masks` + torch.optim.SGD do for
        one: masked gradients, adaptive clipping, weight decay, momentum, per-client learning
        rate, then masked weights and momentum."""
        params = {n: p[:active] for n, p in self.params.items() if p.grad is not None}
        grads = {n: self.params[n].grad[:active] for n in params}
        masked = [(w, m) for w, m in self.masked if w in params]
        if masked:
            torch._foreach_mul_([grads[w] for w, _ in masked], [self.buffers[m][:active] for _, m in masked])
        if self.agc > 0:
            for n in self.clipped:  # units are a client's output rows (its whole vector for gains, biases)
                if n in params:
                    clip_units_(params[n], grads[n], self.agc, batch_dims=1)
        decay = [n for n in self.decay if n in params]
        if self.weight_decay and decay:
            torch._foreach_add_([grads[n] for n in decay], [params[n] for n in decay], alpha=self.weight_decay)
        names = list(params)
        if self.momentum:
            bufs = [self.momentum_bufs[n][:active] for n in names]
            torch._foreach_mul_(bufs, self.momentum)
            torch._foreach_add_(bufs, [grads[n] for n in names])
            steps = bufs
        else:
            steps = [grads[n] for n in names]
        if all(lr == lrs[0] for lr in lrs):
            torch._foreach_add_([params[n] for n in names], steps, alpha=-lrs[0])
        else:
            lr = torch.tensor(lrs, dtype=torch.float32)
            if steps[0].is_cuda:  # pinned and non-blocking: no host synchronisation
                lr = lr.pin_memory()
            lr = lr.to(steps[0].device, non_blocking=True)
            for n, d in zip(names, steps):
                params[n].addcmul_(lr.view(-1, *([1] * (d.dim() - 1))).to(d.dtype), d, value=-1.0)
        if masked:
            masks = [self.buffers[m][:active] for _, m in masked]
            torch._foreach_mul_([params[w] for w, _ in masked], masks)
            if self.momentum:
                torch._foreach_mul_([self.momentum_bufs[w][:active] for w, _ in masked], masks)


def _signature(model: nn.Module) -> tuple:
    return tuple((n, tuple(t.shape), t.dtype) for n, t in model.state_dict().items())


def _same_size_runs(xs: list[torch.Tensor]) -> list[list[int]]:
    """Client indices grouped by batch size (full batches first)."""
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault(x.shape[0], []).append(i)
    return [groups[b] for b in sorted(groups, reverse=True)]


class BatchedEngine:
    """Trains a round's clients together (see the module docstring); same interface and,
    within floating-point reassociation, the same results as `SequentialEngine`."""

    def __init__(self, trainer: ClientTrainer, seed: int, max_clients: int = 0):
        self.trainer = trainer
        self.seed = seed
        self.max_clients = max_clients  # 0: as many as fit in memory
        self.stack: StackedClients | None = None
        self.group_size: int | None = None
        self.group_reason = ""
        self.graphed: GraphedForward | None = None

    # -- memory ----------------------------------------------------------------
    def clients_at_once(self, model: nn.Module, clients: int) -> int:
        """How many clients train together: `fl.batched_clients`, else what fits in memory."""
        if self.max_clients:
            self.group_reason = "fl.batched_clients"
            return min(clients, self.max_clients)
        per_client = self.client_bytes(model)
        device = self.trainer.train_x.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            fit = int(0.6 * free // per_client)
            self.group_reason = f"{free / 2**30:.1f} GiB free, about {per_client / 2**20:.0f} MiB per client"
        else:
            try:
                avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                fit = min(CPU_MAX_CLIENTS, int(0.5 * avail // per_client))
            except (ValueError, OSError, AttributeError):  # no such sysconf name (macOS, Windows)
                fit = CPU_MAX_CLIENTS
            self.group_reason = f"CPU: at most {CPU_MAX_CLIENTS}, about {per_client / 2**20:.0f} MiB per client"
        return max(1, min(clients, fit))

    def client_bytes(self, model: nn.Module) -> int:
        """Estimated memory one client adds: weights, gradients, momentum and buffers, and
        twice the activations one step saves for backward (measured; twice for workspace)."""
        from ..memory.measure import saved_tensor_bytes

        tr = self.trainer
        state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        probe = copy.deepcopy(model)
        x = tr.augment.normalize(tr.train_x[:tr.batch_size])
        y = tr.train_y[:tr.batch_size]
        dtype = torch.bfloat16 if tr.precision == "bf16" and x.is_cuda else None
        saved = saved_tensor_bytes(probe, x, y, dtype)
        return 4 * state + 2 * (saved["activations"] + saved["weight_derived"])

    def status(self) -> str:
        if self.group_size is None:
            return "batched engine"
        text = f"batched engine: {self.group_size} clients at once ({self.group_reason}); "
        g = self.graphed
        if g is None:
            return text + "CUDA graphs: off"
        if g.refused:
            return text + f"CUDA graphs: off ({g.refused})"
        return text + f"CUDA graphs: on ({g.replays} steps replayed, {g.eager_calls} eager)"

    # -- a round ---------------------------------------------------------------
    def run_round(self, t: int, global_model: nn.Module, clients: list[ClientData], make_plan) -> list[ClientResult]:
        tr = self.trainer
        steps = [tr.total_steps(c.num_samples) for c in clients]
        order = sorted(range(len(clients)), key=lambda i: -steps[i])  # longest first: the active ones are a prefix
        if self.group_size is None:
            self.group_size = self.clients_at_once(global_model, len(clients))
        size = min(self.group_size, len(clients))
        if self.stack is None or self.stack.capacity < size or self.stack.signature != _signature(global_model):
            self.stack = self.graphed = None  # free the old replicas first
            self.stack = StackedClients(global_model, size, momentum=tr.momentum, weight_decay=tr.weight_decay,
                                        agc=tr.agc)
            if tr.cuda_graphs:
                self.graphed = self.stack.use_cuda_graphs(tr.batch_size)
        results: list[ClientResult | None] = [None] * len(clients)
        state = global_model.state_dict()
        for start in range(0, len(order), size):
            group = order[start:start + size]
            for i, r in zip(group, self._train_group(t, state, [clients[i] for i in group], make_plan)):
                results[i] = r
        return results

    def _train_group(self, t: int, state: dict, clients: list[ClientData], make_plan) -> list[ClientResult]:
        tr, stack, k = self.trainer, self.stack, len(clients)
        device = tr.train_x.device
        stack.load(state, k)
        views = stack.views[:k]
        for v in views:
            v.train()
        stack.model.train()
        plans = [make_plan() for _ in clients]
        gens = [client_generator(self.seed, t, c.cid, device) for c in clients]
        totals = [tr.total_steps(c.num_samples) for c in clients]
        for plan, view, n in zip(plans, views, totals):
            plan.begin(view, n)
        streams = [tr.batches(c, g, tr.epochs) for c, g in zip(clients, gens)]
        loss_sum = torch.zeros(k, device=device)
        for step in range(max(totals, default=0)):
            active = sum(1 for n in totals if n > step)
            xs, ys, lrs = [], [], []
            for i in range(active):  # the order of draws of ClientTrainer.train
                x, y = next(streams[i])
                plans[i].at_step(step, views[i], tr, clients[i], gens[i])
                lrs.append(plans[i].step_lr(step, views[i]))
                xs.append(x)
                ys.append(y)
            for p in stack.params.values():
                p.grad = None
            if self.graphed is not None:  # capture only where no earlier step's autograd graph is alive
                self.graphed.capture_allowed = step == 0
            for idx in _same_size_runs(xs):
                with tr.autocast():
                    losses = stack.client_losses(idx, [xs[i] for i in idx], [ys[i] for i in idx])
                losses.sum().backward()
                loss_sum.index_add_(0, stack.index(idx), losses.detach().float())
            for i in range(active):
                extra = plans[i].extra_loss(views[i])
                if extra is not None:
                    stack.add_client_grads(i, extra)
            stack.sgd_step(active, lrs)
        for p in stack.params.values():
            p.grad = None
        losses = loss_sum.tolist()
        results = []
        for i, c in enumerate(clients):
            upload = plans[i].finish(views[i], tr, c, gens[i])
            client_state = {n: v.detach().clone() for n, v in views[i].state_dict().items()}
            results.append(ClientResult(c.cid, c.num_samples, client_state, losses[i] / max(1, totals[i]), totals[i],
                                        upload, plans[i].logs))
        return results
