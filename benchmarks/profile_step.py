"""Where does a client step's time go? (GPU diagnostic for the SAP/NSConv overhead)

For each configuration: wall time per step, GPU busy time per step (sum of
kernel durations), kernels per step, and the ops with the most CPU and GPU
time; then micro-benchmarks of the pieces (top-k selection, packing, weight
standardisation) at ResNet18's layer shapes, and the same step replayed from
CUDA graphs as the simulator does (fl/stepgraph.py).

    python benchmarks/profile_step.py [--arch resnet18] [--out profile.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_step import make_step  # run as a script: benchmarks/ is on sys.path
from fedmef_toolkit.memory.report import MemoryConfig
from fedmef_toolkit.sap.packing import pack_activation, unpack_activation


def timed(fn, n=30, warmup=5) -> float:
    """Seconds per call, synchronised."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def profile_config(cfg: MemoryConfig, batch: int, dev) -> dict:
    step, _ = make_step(cfg, batch, dev, momentum=0.9)
    wall = timed(step)
    # CPU time to enqueue one step (no sync inside): near `wall` means launch/CPU-bound
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    enqueue = time.perf_counter() - t0
    torch.cuda.synchronize()
    n = 5
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels) / n if kernels and hasattr(kernels[0], "device_time") else \
        sum(e.cuda_time for e in kernels) / n
    out = {"name": cfg.name, "wall_ms": wall * 1e3, "enqueue_ms": enqueue * 1e3, "gpu_busy_ms": gpu_us / 1e3,
           "kernels_per_step": len(kernels) / n, "samples_per_s": batch / wall}
    print(f"\n== {cfg.name}: wall {out['wall_ms']:.2f} ms/step, enqueue {out['enqueue_ms']:.2f} ms, "
          f"GPU busy {out['gpu_busy_ms']:.2f} ms, {out['kernels_per_step']:.0f} kernels/step, "
          f"{out['samples_per_s']:.0f} samples/s")
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=50))
    print(ka.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=50))
    # the same step replayed from a CUDA graph (fl/stepgraph.py)
    gstep, _ = make_step(cfg, batch, dev, graphs=True, momentum=0.9)
    out["graph_wall_ms"] = timed(gstep) * 1e3
    print(f"   CUDA graphs: {out['graph_wall_ms']:.2f} ms/step = {batch / out['graph_wall_ms'] * 1e3:.0f} samples/s")
    return out


def micro(dev) -> list[dict]:
    rows = []
    for c, hw in [(64, 32), (128, 16), (256, 8), (512, 4)]:
        x = torch.randn(64, c, hw, hw, device=dev).relu_()
        flat = x.reshape(64, -1)
        for keep in (0.5, 0.1):
            k = int(keep * flat.shape[1])
            r = {"shape": list(x.shape), "keep": keep}
            r["topk_unsorted_us"] = timed(lambda: torch.topk(flat.abs(), k, dim=1, sorted=False)) * 1e6
            r["kthvalue_us"] = timed(lambda: torch.kthvalue(flat.abs(), flat.shape[1] - k + 1, dim=1)) * 1e6
            r["sort_us"] = timed(lambda: torch.sort(flat.abs(), dim=1)) * 1e6
            r["pack_us"] = timed(lambda: pack_activation(x, 1 - keep, True)) * 1e6
            bits, vals = pack_activation(x, 1 - keep, True)
            r["unpack_us"] = timed(lambda: unpack_activation(bits, vals, x.shape)) * 1e6
            r["relu_us"] = timed(lambda: torch.relu(x)) * 1e6
            rows.append(r)
            print(" ".join(f"{a}={b:.1f}" if isinstance(b, float) else f"{a}={b}" for a, b in r.items()))
    # weight standardisation forward+backward at ResNet18's conv shapes, eager vs torch.compile
    from fedmef_toolkit.layers.nsconv import standardize_weight
    shapes = [(64, 64, 3, 3), (128, 128, 3, 3), (256, 256, 3, 3), (512, 512, 3, 3)]
    for shp in shapes:
        w = torch.randn(shp, device=dev, requires_grad=True)
        gvec = torch.ones(shp[0], device=dev, requires_grad=True)
        m = (torch.rand(shp, device=dev) < 0.1).float()

        def fb(fn=standardize_weight):
            fn(w, gvec, m).sum().backward()
        r = {"std_shape": list(shp), "eager_fwd_bwd_us": timed(fb) * 1e6}
        try:
            from fedmef_toolkit.layers.nsconv import standardize_weight_reference
            comp = torch.compile(standardize_weight_reference, dynamic=False)
            r["compiled_fwd_bwd_us"] = timed(lambda: fb(comp)) * 1e6
        except Exception as e:  # noqa: BLE001
            r["compile_error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(r)
        print(r)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="profile.json")
    ap.add_argument("--micro", action="store_true", help="also time the pieces alone (CPU-bound: launch costs)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(dev), torch.__version__)
    res = {"device": torch.cuda.get_device_name(dev), "configs": [], "micro": []}
    for cfg in [MemoryConfig("(a) BN", args.arch, "bn", density=0.1),
                MemoryConfig("(b) NSConv", args.arch, "nsconv", density=0.1),
                MemoryConfig("(c) NSConv+SAP 0.5", args.arch, "nsconv", density=0.1, sap_enabled=True, gamma=0.5),
                MemoryConfig("(d) NSConv+SAP 0.9", args.arch, "nsconv", density=0.1, sap_enabled=True, gamma=0.9)]:
        res["configs"].append(profile_config(cfg, args.batch, dev))
    if args.micro:
        res["micro"] = micro(dev)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
