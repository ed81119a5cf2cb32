"""Which mechanism can train a round's clients together fast on one GPU? (issue 10)

Four measurements, one process, bf16 autocast, batch 64, CIFAR-sized inputs:

1. Whole training steps (forward, backward, SGD) of K independent client
   models, each captured once in a CUDA graph, replayed one after another on
   one stream vs each on its own CUDA stream (concurrent kernels), with the
   host's time to issue one replay, and with one host thread per stream.
2. One 3x3 conv layer of K clients: K separate convs vs one grouped conv
   (groups=K), NCHW vs channels-last.
3. The ceiling of a stacked engine: K clients' ResNet18s as one network of
   grouped convolutions (`StackedResNet18`: weight-standardised, masked at
   density 0.1, residual branches scaled by 0.2, a grouped classifier), its
   whole SGD step for all K clients in one CUDA graph, NCHW vs channels-last.
   No SAP: what it would cost there is part 1's SAP-vs-no-SAP difference.
4. The bound of any engine that trains K clients together: ONE model's whole
   step at batch K x 64 (each of `--archs`), captured in one CUDA graph. K
   clients' steps do the same arithmetic on different weights, so no client
   batching (grouped convs, vmap, streams) can beat one model on the
   concatenated batch. The plain dense BatchNorm model (the cheapest) and the
   FedMef model (NSConv, masks at density 0.1, SAP).

    python benchmarks/bench_concurrency.py                  # GPU only; parts 1, 3, 2
    python benchmarks/bench_concurrency.py --archs resnet18,resnet_narrow --clients 1,2,4,8
    python benchmarks/bench_concurrency.py --parts 4 --clients 1,10,40   # the bound alone
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from profile_step import timed  # run as a script: benchmarks/ is on sys.path

from fedmef_toolkit.models import get_model
from fedmef_toolkit.sap import enable_sap
from fedmef_toolkit.sap.packing import sync_free_packing
from fedmef_toolkit.sparse.masks import apply_masks, attach_masks, init_masks


def model_step(arch: str, norm: str, sap: float, batch: int, density: float = 0.1, channels_last: bool = False):
    """(step, optimizer): one SGD step (forward under bf16 autocast, backward, plain SGD update,
    no zero_grad) of a fresh 10-class model on a fixed random batch; NSConv masks at `density`
    (ERK), SAP at gamma `sap` (0: off)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = get_model(arch, 10, norm=norm).cuda().to(memory_format=fmt)
    if density < 1:
        attach_masks(model, {k: v.cuda() for k, v in init_masks(model, density, "erk", "random", 0).items()})
        apply_masks(model)
    if sap:
        enable_sap(model, sap)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch, 3, 32, 32, device="cuda").to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    return step, opt


def captured_step(arch: str, norm: str, sap: float, batch: int, stream: torch.cuda.Stream,
                  density: float = 0.1, channels_last: bool = False):
    """A client model whose whole SGD step is one CUDA graph (returned; replay() runs the step)."""
    return capture(*model_step(arch, norm, sap, batch, density, channels_last), stream)


def capture(step, opt: torch.optim.Optimizer, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
    """`step` (forward, backward, opt.step()) warmed up on `stream`, then captured as one graph."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with sync_free_packing(), torch.cuda.graph(graph, stream=stream):
        step()
    return graph


class StackedConv(torch.nn.Module):
    """K clients' convs as one grouped conv; each output channel's weight masked and
    standardised (mean 0, variance 1/fan-in, times a gain), as NSConv does per client."""

    def __init__(self, k: int, cin: int, cout: int, size: int, stride: int = 1, density: float = 0.1):
        super().__init__()
        self.k, self.stride, self.pad = k, stride, size // 2
        self.weight = torch.nn.Parameter(torch.randn(k * cout, cin, size, size))
        self.gain = torch.nn.Parameter(torch.ones(k * cout, 1, 1, 1))
        self.register_buffer("mask", (torch.rand_like(self.weight) < density).float())
        self.fan_in = cin * size * size

    def forward(self, x):
        w = self.weight * self.mask
        mean, var = w.mean((1, 2, 3), keepdim=True), w.var((1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) * torch.rsqrt(var * self.fan_in + 1e-4) * self.gain
        return F.conv2d(x, w.to(x.dtype), None, self.stride, self.pad, groups=self.k)


class StackedResNet18(torch.nn.Module):
    """K CIFAR ResNet18s side by side: input (B, K*3, H, W) -> logits (B, K, classes)."""

    def __init__(self, k: int, classes: int = 10, alpha: float = 0.2):
        super().__init__()
        self.k, self.alpha, self.classes = k, alpha, classes
        self.stem = StackedConv(k, 3, 64, 3)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
            short = StackedConv(k, cin, cout, 1, stride) if (stride, cin) != (1, cout) else None
            blocks.append(torch.nn.ModuleList([StackedConv(k, cin, cout, 3, stride), StackedConv(k, cout, cout, 3),
                                               short or torch.nn.Identity()]))
            cin = cout
        self.blocks = torch.nn.ModuleList(blocks)
        self.head = torch.nn.Parameter(torch.randn(k * classes, 512, 1, 1) * 512 ** -0.5)

    def forward(self, x):
        h = self.stem(x)
        for conv1, conv2, short in self.blocks:
            h = short(h) + self.alpha * conv2(F.relu(conv1(F.relu(h))))
        pooled = F.adaptive_avg_pool2d(F.relu(h), 1)
        return F.conv2d(pooled, self.head.to(pooled.dtype), groups=self.k).view(x.shape[0], self.k, self.classes)


def stacked_step(k: int, batch: int, channels_last: bool, stream: torch.cuda.Stream, device="cuda"):
    """StackedResNet18's SGD step for K clients (their losses summed), captured as one CUDA graph
    (on a CUDA device; elsewhere the step function itself, for checking shapes)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = StackedResNet18(k).to(device).to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch, 3 * k, 32, 32, device=device).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch, k), device=device)

    def step():
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, cache_enabled=False):
            logits = model(x).float()
        F.cross_entropy(logits.reshape(-1, model.classes), y.reshape(-1), reduction="sum").div(batch).backward()
        opt.step()

    return step if device == "cpu" else capture(step, opt, stream)


def time_replays(graphs, streams, concurrent: bool, reps: int, host: list | None = None) -> float:
    """Seconds for `reps` replays of every graph (one after another, or each on its stream);
    `host` gets the seconds the host took to issue them (before waiting for the GPU)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        for g, s in zip(graphs, streams):
            if concurrent:
                with torch.cuda.stream(s):
                    g.replay()
            else:
                g.replay()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    if host is not None:
        host.append(issued - t0)
    return time.perf_counter() - t0


def time_threaded_replays(graphs, streams, reps: int) -> float:
    """As time_replays(concurrent=True), but each stream's replays issued by its own host
    thread (CUDAGraph.replay releases the GIL): does issuing graphs limit the streams?"""
    import threading

    def worker(g, s):
        with torch.cuda.stream(s):
            for _ in range(reps):
                g.replay()

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=gs) for gs in zip(graphs, streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def conv_micro(k: int, channels: int, size: int, batch: int, reps: int = 50) -> dict:
    res = {}
    for layout in ("nchw", "nhwc"):
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        xs = [torch.randn(batch, channels, size, size, device="cuda", dtype=torch.bfloat16).to(memory_format=fmt)
              .requires_grad_() for _ in range(k)]
        ws = [torch.randn(channels, channels, 3, 3, device="cuda", dtype=torch.bfloat16).to(memory_format=fmt)
              .requires_grad_() for _ in range(k)]
        xg = torch.cat([x.detach() for x in xs], 1).to(memory_format=fmt).requires_grad_()
        wg = torch.cat([w.detach() for w in ws], 0).to(memory_format=fmt).requires_grad_()

        def separate():
            for x, w in zip(xs, ws):
                F.conv2d(x, w, padding=1).sum().backward()

        def grouped():
            F.conv2d(xg, wg, padding=1, groups=k).sum().backward()

        for name, fn in (("separate", separate), ("grouped", grouped)):
            res[f"{name}-{layout}"] = timed(fn, n=reps, warmup=3) * 1e3
    return res


def rates_by_layout(make, samples: int, stream: torch.cuda.Stream, reps: int) -> list[float]:
    """samples/s of the graph `make(channels_last)` builds (`samples` per replay), NCHW then
    channels-last; each graph is freed before the next is built."""
    rates = []
    for channels_last in (False, True):
        graph = make(channels_last)
        rates.append(samples * reps / time_replays([graph], [stream], False, reps))
        del graph
        torch.cuda.empty_cache()
    return rates


def part_streams(args) -> None:
    print("| model | clients | one stream samples/s | K streams samples/s | speed-up | host ms per replay "
          "| K streams, K host threads samples/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for arch in args.archs.split(","):
        kmax = max(args.k)
        streams = [torch.cuda.Stream() for _ in range(kmax)]
        graphs = [captured_step(arch, args.norm, args.sap, args.batch, s) for s in streams]
        for k in args.k:
            seq = time_replays(graphs[:k], streams[:k], False, args.reps)
            host = []
            con = time_replays(graphs[:k], streams[:k], True, args.reps, host)
            thr = time_threaded_replays(graphs[:k], streams[:k], args.reps)
            n = k * args.reps * args.batch
            print(f"| {arch} | {k} | {n / seq:,.0f} | {n / con:,.0f} | {seq / con:.2f}x | "
                  f"{host[0] * 1e3 / (k * args.reps):.3f} | {n / thr:,.0f} |", flush=True)
        del graphs
        torch.cuda.empty_cache()


def part_stacked(args) -> None:
    print("\n| stacked ResNet18 (one graph, grouped convs, no SAP) | clients | samples/s NCHW | samples/s channels-last |")
    print("|---|---:|---:|---:|")
    stream = torch.cuda.Stream()
    for k in args.k:
        rates = rates_by_layout(lambda cl: stacked_step(k, args.batch, cl, stream), k * args.batch, stream, args.reps)
        print(f"| resnet18 | {k} | {rates[0]:,.0f} | {rates[1]:,.0f} |", flush=True)


def part_conv(args) -> None:
    print("\n| conv 3x3, K=10 clients | ms separate NCHW | grouped NCHW | separate NHWC | grouped NHWC |")
    print("|---|---:|---:|---:|---:|")
    for ch, size in ((64, 32), (128, 16), (256, 8), (512, 4)):
        r = conv_micro(10, ch, size, args.batch)
        print(f"| {ch} ch, {size}x{size} | {r['separate-nchw']:.2f} | {r['grouped-nchw']:.2f} | "
              f"{r['separate-nhwc']:.2f} | {r['grouped-nhwc']:.2f} |", flush=True)


def part_bound(args) -> None:
    print("\n| one model at batch K x 64 (the bound of batching K clients) | K | batch | samples/s NCHW "
          "| samples/s channels-last |")
    print("|---|---:|---:|---:|---:|")
    stream = torch.cuda.Stream()
    for arch in args.archs.split(","):
        for label, norm, sap, density in (("BatchNorm, dense", "bn", 0.0, 1.0),
                                          (f"NSConv, density 0.1, SAP {args.sap:g}" if args.sap else
                                           "NSConv, density 0.1, no SAP", "nsconv", args.sap, 0.1)):
            for k in args.k:
                rates = rates_by_layout(lambda cl: captured_step(arch, norm, sap, k * args.batch, stream, density, cl),
                                        k * args.batch, stream, args.reps)
                print(f"| {arch}, {label} | {k} | {k * args.batch} | {rates[0]:,.0f} | {rates[1]:,.0f} |", flush=True)


PARTS = {1: part_streams, 2: part_conv, 3: part_stacked, 4: part_bound}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="resnet18,resnet_narrow")
    ap.add_argument("--norm", default="nsconv")
    ap.add_argument("--sap", type=float, default=0.5, help="SAP gamma (0: off)")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--parts", default="1,3,2", help="which measurements (1-4, see above), in this order")
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",")]
    bad = [p for p in parts if not p.isdigit() or int(p) not in PARTS]
    if bad:
        ap.error(f"--parts: {', '.join(bad)} is not one of {', '.join(map(str, PARTS))}")
    args.k = [int(v) for v in args.clients.split(",")]
    if not torch.cuda.is_available():
        raise SystemExit("bench_concurrency.py: needs a CUDA GPU (it times CUDA graphs and streams)")
    torch.backends.cudnn.benchmark = True
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for part in parts:
        PARTS[int(part)](args)


if __name__ == "__main__":
    main()
