"""How far SAP's packing kernels are from the GPU's memory bandwidth (issue 10).

Records the (rows, entries per row) of every `pack_rows` call in one FedMef
model forward (NSConv, SAP) at the given batch, then times on those shapes
(random normal values, CUDA events, median of `--reps`): each radix
histogram pass, the count kernel, the whole `pack_rows`, and a plain copy
of the same tensor (`x.clone()`: reads and writes every byte once, the
bandwidth reference). Eager launches: the small shapes' times are mostly
launch overhead, which a CUDA graph removes.

    python benchmarks/bench_sap_select.py [--arch resnet18] [--batch 640] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton

from fedmef_toolkit.kernels import packing
from fedmef_toolkit.models import get_model
from fedmef_toolkit.sap import enable_sap


def recorded_shapes(arch: str, batch: int, gamma: float) -> list[tuple[int, int, int]]:
    """(rows, entries per row, k) of each pack_rows call in one forward of a channels-last bf16 model."""
    model = get_model(arch, 10, norm="nsconv").cuda().to(memory_format=torch.channels_last)
    enable_sap(model, gamma)
    model.train()
    shapes, original = [], packing.pack_rows

    def spy(rows, k):
        shapes.append((rows.shape[0], rows.shape[1], k))
        return original(rows, k)

    packing.pack_rows = spy
    try:
        x = torch.randn(batch, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)
    finally:
        packing.pack_rows = original
    return shapes


def timed(fn, reps: int) -> float:
    """Median microseconds of fn() over reps runs (CUDA events), after two warm-up runs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def kernel_times(r: int, n: int, k: int, reps: int, dtype: torch.dtype) -> dict[str, float]:
    x = torch.randn(r, n, device="cuda", dtype=dtype)
    kb = packing.key_bits(x.dtype)
    passes = (kb + 7) // 8
    chunks = triton.cdiv(n, packing.CHUNK)
    hist = torch.zeros((r, passes, 256), dtype=torch.int32, device="cuda")
    out = {"copy": timed(lambda: x.clone(), reps)}
    for p in range(passes):
        out[f"hist pass {p}"] = timed(lambda: packing._radix_hist[(r, chunks)](
            x, hist, n, k, PASS=p, PASSES=passes, KEY_BITS=kb, CHUNK=packing.CHUNK), reps)
    counts = torch.empty((2, r, chunks), dtype=torch.int32, device="cuda")
    out["count"] = timed(lambda: packing._count_chunk[(r, chunks)](
        x, hist, counts[0], counts[1], n, k, chunks, PASSES=passes, KEY_BITS=kb, CHUNK=packing.CHUNK), reps)
    out["pack_rows"] = timed(lambda: packing.pack_rows(x, k), reps)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batch", type=int, default=640)
    ap.add_argument("--gamma", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_sap_select.py: needs a CUDA GPU (the kernels it times run on one)")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    shapes = recorded_shapes(args.arch, args.batch, args.gamma)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {args.arch}, batch {args.batch}, {args.dtype}, "
          f"{len(shapes)} pack_rows calls per forward; microseconds per call (median of {args.reps})")
    totals: dict[str, float] = {}
    cache: dict[tuple, dict[str, float]] = {}
    for shape in shapes:
        if shape not in cache:
            cache[shape] = kernel_times(*shape, args.reps, dtype)
        t = cache[shape]
        for key, v in t.items():
            totals[key] = totals.get(key, 0.0) + v
    keys = list(next(iter(cache.values())))
    print("| rows x entries (k) | calls | " + " | ".join(keys) + " |")
    print("|---|---:|" + "---:|" * len(keys))
    for shape, t in cache.items():
        r, n, k = shape
        print(f"| {r} x {n} ({k}) | {shapes.count(shape)} | " + " | ".join(f"{t[key]:.1f}" for key in keys) + " |")
    print("| total per forward | | " + " | ".join(f"{totals[key]:.0f}" for key in keys) + " |")
    t = totals["pack_rows"]
    print(f"pack_rows per forward: {t / 1e3:.2f} ms, {t / totals['copy']:.1f}x a copy of the same tensors")


if __name__ == "__main__":
    main()
