"""The batched engine: a round's clients train together on one GPU, each on its own CUDA stream.

Mechanism, chosen by measurement (issue 10, benchmarks/bench_concurrency.py,
docs/benchmarks.md): K worker copies of the model, each with its own whole
local step captured in a CUDA graph on its own stream (fl/stepgraph.py).
Steps are issued round-robin over the clients in training: client i's step s
is issued on stream i, host side included (its plan hooks, augmentation and
the copy into the graph's input buffers), then client i+1's step s, and so
on. While the host issues one client's step, the GPU runs the others'
graphs: one graph replay of a small-batch step leaves most of an H100/H200
idle, K of them on K streams fill it (measured 1.72x for ResNet18 at K=8 and
2.8x for a narrow ResNet, against the same graphs on one stream). Stacking
the clients' weights along the channels as grouped convolutions (the
previous mechanism) ran at 0.66-0.79x of the sequential engine and was
removed.

Each client runs exactly the code of the sequential engine
(`ClientTrainer.start` -> `LocalTraining.step` -> `finish`) with its own
generator (`client_generator(seed, t, cid, device)`), worker model, momentum
and graph: results are the sequential engine's (bitwise on the CPU; on a GPU within
fp32 rounding, as cuDNN may choose other kernels on other streams). A client with fewer steps
simply stops; its worker takes the next waiting client, so at most K clients
train at once (`fl.batched_clients`, or as many as fit in free GPU memory).

On the CPU there are no streams: the same round-robin runs in host order, so
the CPU tests check the interleaving against the sequential engine.

Stream ordering: workers wait for the default stream at the start of a round
(the global model and the data were written there) and the default stream
waits for every worker at the end (aggregation reads the results there).
Everything a client allocates is allocated on its own stream; results freed
after aggregation can only be reused by work a worker issues after its
next round-start wait, which orders it after that aggregation.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn as nn

from .client import CHUNK_STEPS, ClientData, ClientResult, ClientTrainer, client_generator, read_losses
from .stepgraph import GraphedStep

#: clients trained at once on the CPU at most (the engine is for GPUs; on the CPU it interleaves
#: clients for nothing but the same results, so a few keep tests quick)
CPU_MAX_CLIENTS = 4


@dataclass
class Worker:
    """A model replica with its own local step (and graph) and, on CUDA, its own stream."""

    model: nn.Module
    step: GraphedStep
    stream: torch.cuda.Stream | None

    def issuing(self):
        """Everything inside is issued on this worker's stream."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()


def client_bytes(trainer: ClientTrainer, model: nn.Module) -> int:
    """Estimated memory one more client at once needs: weights, gradients, momentum and
    buffers, twice the activations a step saves for backward (its graph's pool; twice
    for workspace), and four times a chunk of augmented batches (`ClientTrainer.batches`:
    the chunk and its temporaries while it is augmented)."""
    from ..memory.measure import saved_tensor_bytes

    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    probe = trainer.worker_copy(model)  # as a worker will train it
    x = trainer.augment.normalize(trainer.train_x[:trainer.batch_size])
    y = trainer.train_y[:trainer.batch_size]
    dtype = torch.bfloat16 if trainer.precision == "bf16" and x.is_cuda else None
    saved = saved_tensor_bytes(probe, x, y, dtype)
    chunk = 4 * CHUNK_STEPS * x.numel() * x.element_size()  # x: one normalised batch
    return 4 * state + 2 * (saved["activations"] + saved["weight_derived"]) + chunk


def clients_at_once(trainer: ClientTrainer, model: nn.Module, max_clients: int) -> tuple[int, str]:
    """(at most how many clients train at once, why): `fl.batched_clients` (max_clients) if set,
    else what fits in 60% of free GPU memory (at most CPU_MAX_CLIENTS on the CPU). A limit, not
    a round's count: rounds that sample fewer clients (PruneFL's one-client preparation) use fewer."""
    if max_clients:
        return max(1, max_clients), "fl.batched_clients"
    per_client = client_bytes(trainer, model)
    device = trainer.train_x.device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        fit = int(0.6 * free // per_client)
        reason = f"{free / 2**30:.1f} GiB free, about {per_client / 2**20:.0f} MiB per client"
    else:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            fit = min(CPU_MAX_CLIENTS, int(0.5 * avail // per_client))
        except (ValueError, OSError, AttributeError):  # no such sysconf name (macOS, Windows)
            fit = CPU_MAX_CLIENTS
        reason = f"CPU: at most {CPU_MAX_CLIENTS}, no streams"
    return max(1, fit), reason


def _signature(model: nn.Module) -> tuple:
    return tuple((n, tuple(t.shape), t.dtype) for n, t in model.state_dict().items())


class StreamsEngine:
    """Trains a round's clients together, K at a time, one CUDA stream each (see the module
    docstring); same interface and the same results as `SequentialEngine`."""

    def __init__(self, trainer: ClientTrainer, seed: int, max_clients: int = 0):
        self.trainer = trainer
        self.seed = seed
        self.max_clients = max_clients  # 0: as many as fit in memory
        self.capacity: int | None = None
        self.capacity_reason = ""
        self.workers: list[Worker] = []
        self._signature = None

    def _ensure_workers(self, model: nn.Module, clients: int) -> list[Worker]:
        """The workers for a round of `clients` clients: at most `capacity`, decided (from the
        memory a client of this model needs) once per model."""
        signature = _signature(model)
        if signature != self._signature:
            self.workers = []  # a different model: new replicas (and graphs), a new limit
            self._signature = signature
            self.capacity, self.capacity_reason = clients_at_once(self.trainer, model, self.max_clients)
        count = min(self.capacity, clients)
        device = self.trainer.train_x.device
        while len(self.workers) < count:
            replica = self.trainer.worker_copy(model)
            stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            self.workers.append(Worker(replica, self.trainer.new_step(replica, stream), stream))
        return self.workers[:count]

    def run_round(self, t: int, global_model: nn.Module, clients: list[ClientData], make_plan) -> list[ClientResult]:
        tr = self.trainer
        device = tr.train_x.device
        workers = self._ensure_workers(global_model, len(clients))
        state = global_model.state_dict()
        ambient = torch.cuda.current_stream(device) if device.type == "cuda" else None
        for w in workers:
            if w.stream is not None:
                w.stream.wait_stream(ambient)
        waiting = deque(enumerate(clients))
        free = deque(workers)
        running = []  # (index in clients, worker, LocalTraining)
        results: list[ClientResult | None] = [None] * len(clients)
        while waiting or running:
            while waiting and free:  # clients in their order, as the sequential engine takes them
                i, client = waiting.popleft()
                w = free.popleft()
                with w.issuing():
                    w.model.load_state_dict(state)
                    gen = client_generator(self.seed, t, client.cid, device)
                    running.append((i, w, tr.start(w.model, client, make_plan(), gen, step=w.step)))
            still = []
            for i, w, run in running:  # one step of every client in training
                with w.issuing():
                    if run.step():
                        still.append((i, w, run))
                    else:
                        results[i] = run.finish(read_loss=False)  # no host sync mid-round
                        free.append(w)
            running = still
        for w in workers:
            if w.stream is not None:
                ambient.wait_stream(w.stream)
        read_losses(results)
        return results

    def status(self) -> str:
        if self.capacity is None:
            return "batched engine (CUDA streams)"
        steps = [w.step for w in self.workers]
        refused = next((s.refused for s in steps if s.refused), None)
        if not self.trainer.cuda_graphs:
            graphs = "CUDA graphs: off"
        elif refused:
            graphs = f"CUDA graphs: off ({refused})"
        else:
            graphs = (f"CUDA graphs: on (whole steps: {sum(s.replays for s in steps)} replayed, "
                      f"{sum(s.eager_steps for s in steps)} eager)")
        return f"batched engine (CUDA streams): up to {self.capacity} clients at once ({self.capacity_reason}); {graphs}"
