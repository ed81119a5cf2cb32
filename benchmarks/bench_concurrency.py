"""Which mechanism can train a round's clients together fast on one GPU? (issue 10)

Two measurements, one process, bf16 autocast, batch 64, CIFAR-sized inputs:

1. Whole training steps (forward, backward, SGD) of K independent client
   models, each captured once in a CUDA graph, replayed one after another on
   one stream vs each on its own CUDA stream (concurrent kernels).
2. One 3x3 conv layer of K clients: K separate convs vs one grouped conv
   (groups=K, what `fl.engine: batched` does), NCHW vs channels-last.

    python benchmarks/bench_concurrency.py                  # GPU only
    python benchmarks/bench_concurrency.py --archs resnet18,resnet_narrow --clients 1,2,4,8
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


def captured_step(arch: str, norm: str, sap: float, batch: int, stream: torch.cuda.Stream):
    """A client model whose whole SGD step is one CUDA graph; returns replay()."""
    model = get_model(arch, 10, norm=norm).cuda()
    attach_masks(model, {k: v.cuda() for k, v in init_masks(model, 0.1, "erk", "random", 0).items()})
    apply_masks(model)
    if sap:
        enable_sap(model, sap)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

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


def time_replays(graphs, streams, concurrent: bool, reps: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        for g, s in zip(graphs, streams):
            if concurrent:
                with torch.cuda.stream(s):
                    g.replay()
            else:
                g.replay()
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="resnet18,resnet_narrow")
    ap.add_argument("--norm", default="nsconv")
    ap.add_argument("--sap", type=float, default=0.5, help="SAP gamma (0: off)")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("| model | clients | one stream samples/s | K streams samples/s | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for arch in args.archs.split(","):
        kmax = max(int(k) for k in args.clients.split(","))
        streams = [torch.cuda.Stream() for _ in range(kmax)]
        graphs = [captured_step(arch, args.norm, args.sap, args.batch, s) for s in streams]
        for k in (int(v) for v in args.clients.split(",")):
            seq = time_replays(graphs[:k], streams[:k], False, args.reps)
            con = time_replays(graphs[:k], streams[:k], True, args.reps)
            n = k * args.reps * args.batch
            print(f"| {arch} | {k} | {n / seq:,.0f} | {n / con:,.0f} | {seq / con:.2f}x |", flush=True)
        del graphs
        torch.cuda.empty_cache()
    print("\n| conv 3x3, K=10 clients | ms separate NCHW | grouped NCHW | separate NHWC | grouped NHWC |")
    print("|---|---:|---:|---:|---:|")
    for ch, size in ((64, 32), (128, 16), (256, 8), (512, 4)):
        r = conv_micro(10, ch, size, args.batch)
        print(f"| {ch} ch, {size}x{size} | {r['separate-nchw']:.2f} | {r['grouped-nchw']:.2f} | "
              f"{r['separate-nhwc']:.2f} | {r['grouped-nhwc']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
