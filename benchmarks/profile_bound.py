"""Where one model's training step spends its GPU time at the batch of K clients together.

K clients' steps are the arithmetic of one model on a batch of K x 64, so one model's step at
that batch bounds any engine that batches clients (`bench_concurrency.py --parts 4` times it from
a CUDA graph). This script profiles that step eagerly (torch.profiler, CUDA kernels only): GPU
time per step, the samples/s it allows, kernels per step and the kernels that take the most
time, for the FedMef model (NSConv, ERK density 0.1, SAP 0.5), the same without SAP and a dense
BatchNorm model, all channels-last and bf16. The update is plain torch.optim.SGD: the client
step's AGC, gradient masks and BaE term (a few multi-tensor kernels) are not in it.

    python benchmarks/profile_bound.py [--arch resnet18] [--batch 640] [--top 22]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench_concurrency import model_step  # run as a script: benchmarks/ is on sys.path

CONFIGS = [("NSConv, density 0.1, SAP 0.5", "nsconv", 0.5, 0.1), ("NSConv, density 0.1, no SAP", "nsconv", 0.0, 0.1),
           ("BatchNorm, dense", "bn", 0.0, 1.0)]


def eager_step(arch: str, norm: str, sap: float, density: float, batch: int):
    """The model step of `bench_concurrency.model_step`, channels-last, run eagerly (zero_grad first)."""
    step, opt = model_step(arch, norm, sap, batch, density, channels_last=True)

    def run():
        opt.zero_grad(set_to_none=True)
        step()
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batch", type=int, default=640, help="K x 64 for K clients together")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after 5 warm-up steps)")
    ap.add_argument("--top", type=int, default=22, help="kernels listed per configuration")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {args.arch}, batch {args.batch}, "
          "bf16, channels-last")
    for label, norm, sap, density in CONFIGS:
        step = eager_step(args.arch, norm, sap, density, args.batch)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.device_time for e in kernels) / args.steps  # microseconds per step
        print(f"\n== {label}: GPU {total / 1e3:.2f} ms/step ({args.batch / (total / 1e6):,.0f} samples/s if the GPU "
              f"never idled), {len(kernels) / args.steps:.0f} kernels/step")
        by_name: dict[str, tuple[float, int]] = {}
        for e in kernels:
            t, c = by_name.get(e.name[:90], (0.0, 0))
            by_name[e.name[:90]] = (t + e.device_time / args.steps, c + 1)
        for name, (t, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:args.top]:
            print(f"{t / 1e3:8.3f} ms {100 * t / total:5.1f}% x{c // args.steps:4d}  {name}")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("profile_bound.py: needs a CUDA GPU")
    main()
