"""Local training on one client: masked SGD driven by a strategy's ClientPlan."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import NSConv2d, layout
from ..sparse.masks import prunable_modules
from .plan import ClientPlan
from .stepgraph import GraphedStep


#: local steps whose batches are gathered and augmented together (`ClientTrainer.batches`)
CHUNK_STEPS = 16


@dataclass
class ClientData:
    """One client's share of the training set; indices point into the device-resident data."""

    cid: int
    indices: torch.Tensor  # int64 on the training device

    @property
    def num_samples(self) -> int:
        return int(self.indices.numel())


@dataclass
class ClientResult:
    """A client's update. `loss` (the mean task loss of its steps) is a float once an engine
    returns the round's results; inside an engine it may still be a 0-dim device tensor
    (`LocalTraining.finish(read_loss=False)`, then `read_losses`)."""

    cid: int
    num_samples: int
    state: dict[str, torch.Tensor]
    loss: float | torch.Tensor
    steps: int
    upload: dict = field(default_factory=dict)
    logs: dict = field(default_factory=dict)


def read_losses(results: list[ClientResult]) -> None:
    """Every result's loss to a float, with one host sync for all of them (an engine that
    interleaves clients calls this once, after the round's last step is issued)."""
    pending = [r for r in results if isinstance(r.loss, torch.Tensor)]
    if pending:
        for r, value in zip(pending, torch.stack([r.loss for r in pending]).tolist()):
            r.loss = value


class ClientTrainer:
    """Runs E local epochs of SGD for one client; the same code for every method."""

    def __init__(self, train_x, train_y, augment, *, epochs: int, batch_size: int, momentum: float,
                 weight_decay: float, precision: str = "fp32", cuda_graphs: bool = True, agc: float = 0.0,
                 channels_last: bool | None = None):
        self.train_x, self.train_y = train_x, train_y
        # channels-last (None: on CUDA): cuDNN's bf16/TF32 convolutions run in NHWC; a channels-first
        # network pays a layout conversion around each of them (11% of GPU time in a narrow ResNet's round)
        self.channels_last = layout.channels_last_for(channels_last, train_x.device)
        self.agc = agc
        self.augment = augment
        self.epochs, self.batch_size = epochs, batch_size
        self.momentum, self.weight_decay = momentum, weight_decay
        self.precision = precision
        self.cuda_graphs = cuda_graphs and train_x.is_cuda
        self.stepper: GraphedStep | None = None

    def autocast(self):
        dev = self.train_x.device.type
        if self.precision == "bf16" and dev == "cuda":
            # no weight-cast cache: CUDA graph capture does not support it, and each
            # weight is used once per forward, so the cache would save nothing
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def prepare_worker(self, model: nn.Module) -> nn.Module:
        """`model` (a worker copy that trains clients) in this trainer's memory format, in place.
        Its state_dict keeps its values (load_state_dict copies across layouts)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def worker_copy(self, model: nn.Module) -> nn.Module:
        """A copy of `model` to train clients on, in this trainer's memory format."""
        return self.prepare_worker(copy.deepcopy(model))

    def step_for(self, model: nn.Module) -> GraphedStep:
        """The local step on `model` (one per model, kept across clients: its CUDA graph is
        replayed as long as the model's tensors stay where they are; see stepgraph.py)."""
        if self.stepper is None or self.stepper.model is not model:
            self.stepper = self.new_step(model)
        return self.stepper

    def new_step(self, model: nn.Module, stream: torch.cuda.Stream | None = None) -> GraphedStep:
        """A GraphedStep for `model` with this trainer's optimiser settings; `stream`: the
        CUDA stream it is captured on (None: a private one)."""
        return GraphedStep(model, batch_size=self.batch_size, momentum=self.momentum, weight_decay=self.weight_decay,
                           agc=self.agc, autocast=self.autocast, cuda_graphs=self.cuda_graphs, stream=stream)

    def graph_status(self) -> str:
        """One line for the run log: whether client steps were replayed from CUDA graphs."""
        if self.stepper is None:
            return "CUDA graphs: on" if self.cuda_graphs else "CUDA graphs: off"
        return self.stepper.status()

    def steps_per_epoch(self, n: int) -> int:
        # A trailing batch of one sample is dropped (BatchNorm cannot train on it), in every model alike.
        full, rest = divmod(n, self.batch_size)
        return full + (1 if rest > 1 else 0)

    def total_steps(self, n: int) -> int:
        return self.epochs * self.steps_per_epoch(n)

    def batches(self, client: ClientData, gen: torch.Generator, epochs: int, steps: int | None = None):
        """The client's (augmented images, labels) batches for `epochs` epochs (only the first
        `steps` batches of each, if given). Batches are drawn, gathered and augmented
        `CHUNK_STEPS` at a time (a few kernels per chunk, not per step: at federated batch sizes
        the host issuing work is what limits a GPU; chunks bound the memory a large client
        needs) and handed out as views, one batch at a time."""
        n, b = client.num_samples, self.batch_size
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen, device=gen.device).to(client.indices.device)
            take = self.steps_per_epoch(n) if steps is None else min(steps, self.steps_per_epoch(n))
            for first in range(0, take, CHUNK_STEPS):
                count = min(CHUNK_STEPS, take - first)
                idx = client.indices[order[first * b:(first + count) * b]]
                x, y = self.augment.train(self.train_x[idx], gen), self.train_y[idx]
                if self.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                for s in range(count):
                    yield x[s * b:(s + 1) * b], y[s * b:(s + 1) * b]

    def start(self, model: nn.Module, client: ClientData, plan: ClientPlan, gen: torch.Generator,
              step: GraphedStep | None = None) -> LocalTraining:
        """One client's local training, to be run one step at a time (`train` runs it all)."""
        return LocalTraining(self, model, client, plan, gen, step or self.step_for(model))

    def train(self, model: nn.Module, client: ClientData, plan: ClientPlan, gen: torch.Generator) -> ClientResult:
        run = self.start(model, client, plan, gen)
        while run.step():
            pass
        return run.finish()

    def effective_weight_grads(self, model: nn.Module, client: ClientData, gen: torch.Generator,
                               full: bool) -> dict[str, torch.Tensor]:
        """Dense loss gradient wrt each prunable layer's effective weight.

        For plain conv/linear layers that is weight.grad (dense: pruned entries
        are zeros, not absent). For NSConv it is the gradient wrt the
        standardised weight w_hat, since the raw weight's gradient is masked
        by construction and says nothing about inactive connections.
        """
        model.train()
        modules = prunable_modules(model)
        recording = {name: m for name, m in modules.items() if isinstance(m, NSConv2d)}
        for m in recording.values():
            m.start_effective_grad()
        model.zero_grad(set_to_none=True)
        n = client.num_samples
        count = 0
        try:
            for x, y in self.batches(client, gen, 1, steps=None if full else 1):
                with self.autocast():
                    loss = F.cross_entropy(model(x), y, reduction="sum") / n
                loss.backward()
                count += x.shape[0]
        finally:  # an interrupted pass must not leave the layers recording into later steps
            effective = {name: m.stop_effective_grad() for name, m in recording.items()}
        grads = {}
        for name, m in modules.items():
            eff = effective.get(name)
            g = eff if eff is not None else m.weight.grad
            grads[name] = (g.detach().float() * (n / count)) if g is not None else torch.zeros_like(m.weight)
        model.zero_grad(set_to_none=True)
        return grads


class LocalTraining:
    """E local epochs of one client, one step per `step()` call, then `finish()`.

    Each step draws the batch (and its augmentation) from the client's generator, runs the
    plan's `at_step` and `step_lr` hooks, then the whole SGD step (`GraphedStep`: replayed
    from a CUDA graph where it can be). Split into steps so that an engine can interleave
    several clients (fl/streams.py); `ClientTrainer.train` runs them back to back."""

    def __init__(self, trainer: ClientTrainer, model: nn.Module, client: ClientData, plan: ClientPlan,
                 gen: torch.Generator, step: GraphedStep):
        self.trainer, self.model, self.client, self.plan, self.gen, self.stepper = trainer, model, client, plan, gen, step
        self.total = trainer.total_steps(client.num_samples)
        self.steps = 0
        model.train()
        plan.begin(model, self.total)
        step.begin(plan)
        self._batches = trainer.batches(client, gen, trainer.epochs)

    def step(self) -> bool:
        """Run the next local step; False (and nothing run) when all are done."""
        batch = next(self._batches, None)
        if batch is None:
            return False
        x, y = batch
        self.plan.at_step(self.steps, self.model, self.trainer, self.client, self.gen)
        self.stepper.step(x, y, self.plan.step_lr(self.steps, self.model))
        self.steps += 1
        return True

    def finish(self, *, read_loss: bool = True) -> ClientResult:
        """The plan's upload and the client's trained state (call when done). `read_loss=False`
        leaves the loss on the device: reading it waits for this client's stream, so an engine
        that interleaves clients would stall the others; it reads all of them at the end
        (`read_losses`). (On an H200 the narrow ResNet's round time did not change measurably.)"""
        upload = self.plan.finish(self.model, self.trainer, self.client, self.gen)
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        loss = self.stepper.loss_sum.detach() / max(1, self.steps)  # a new tensor: the next client zeroes the sum
        result = ClientResult(self.client.cid, self.client.num_samples, state, loss, self.steps, upload, self.plan.logs)
        if read_loss:
            read_losses([result])
        return result


def client_generator(seed: int, round_idx: int, cid: int, device: torch.device) -> torch.Generator:
    """Per (round, client) random stream: resuming at any round reproduces the same draws."""
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
    gen.manual_seed((seed * 1_000_003 + round_idx * 10_007 + cid) % (2**63 - 1))
    return gen
