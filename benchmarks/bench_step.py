"""Memory and speed of one client training step, per configuration (issue: SAP).

For ResNet18 and MobileNetV2 at 32x32, batch 64, density 0.1:
  (a) BN, no SAP   (b) NSConv, no SAP   (c) NSConv + SAP gamma 0.5   (d) NSConv + SAP gamma 0.9
prints saved-activation bytes (saved-tensor hooks), peak step memory (CUDA)
and training samples/s; writes a JSON file with everything.

    python benchmarks/bench_step.py [--device cuda] [--bf16] [--out step.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from fedmef_toolkit.fl.plan import ClientPlan
from fedmef_toolkit.fl.stepgraph import GraphedStep
from fedmef_toolkit.memory.report import MemoryConfig, measure_config


def make_step(cfg: MemoryConfig, batch: int, device, dtype=None, graphs: bool = False, momentum=None):
    """(step(i), GraphedStep): one masked SGD client step on the i-th of four fixed random
    batches, as the simulator runs it (fl/stepgraph.py); with `graphs`, the whole step is
    replayed from a CUDA graph."""
    torch.manual_seed(0)
    model = cfg.build(10, 32).to(device).train()
    stepper = GraphedStep(model, batch_size=batch, momentum=cfg.momentum if momentum is None else momentum,
                          weight_decay=0.0, agc=0.0, cuda_graphs=graphs,
                          autocast=lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None,
                                                          cache_enabled=False))
    stepper.begin(ClientPlan(0.01))
    xs = torch.randn(4, batch, 3, 32, 32, device=device)
    ys = torch.randint(0, 10, (4, batch), device=device)

    def step(i=0):
        stepper.step(xs[i % 4], ys[i % 4], 0.01)
    return step, stepper


def samples_per_s(cfg: MemoryConfig, batch: int, device, dtype, steps: int, graphs: bool = False) -> float:
    """Training samples/s of the client step (see make_step)."""
    step, stepper = make_step(cfg, batch, device, dtype, graphs)
    for i in range(5):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if graphs and stepper.refused:
        raise RuntimeError(f"{cfg.name}: {stepper.refused}")
    return steps * batch / (time.perf_counter() - t0)


def configs_for(arch: str) -> list[MemoryConfig]:
    return [
        MemoryConfig("(a) BN, no SAP", arch, "bn", density=0.1),
        MemoryConfig("(b) NSConv, no SAP", arch, "nsconv", density=0.1),
        MemoryConfig("(c) NSConv+SAP 0.5", arch, "nsconv", density=0.1, sap_enabled=True, gamma=0.5),
        MemoryConfig("(d) NSConv+SAP 0.9", arch, "nsconv", density=0.1, sap_enabled=True, gamma=0.9),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--archs", default="resnet18,mobilenetv2")
    ap.add_argument("--out", default="bench_step.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else None
    if args.one:  # child process: one configuration, JSON on stdout
        arch, idx = args.one.split(":")
        cfg = configs_for(arch)[int(idx)]
        r = measure_config(cfg, args.batch, 32, 10, device, dtype)
        r["samples_per_s"] = samples_per_s(cfg, args.batch, device, dtype, args.steps)
        if device.type == "cuda":
            r["samples_per_s_graphs"] = samples_per_s(cfg, args.batch, device, dtype, args.steps, graphs=True)
        print(json.dumps(r))
        return
    rows = []
    for arch in args.archs.split(","):
        for idx in range(len(configs_for(arch))):
            # a fresh process per configuration: absolute peaks then include nothing left by another
            cmd = [sys.executable, __file__, "--one", f"{arch}:{idx}", "--device", args.device, "--batch",
                   str(args.batch), "--steps", str(args.steps)] + (["--bf16"] if args.bf16 else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{device_name}, batch {args.batch}, 32x32, density 0.1, {'bf16' if dtype else 'fp32'}")
    print("| model | config | saved act. MiB | vs (a) | peak step MiB | vs (a) | step increase MiB | vs (a) "
          "| samples/s eager | samples/s CUDA graphs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arch in args.archs.split(","):
        group = [r for r in rows if r["arch"] == arch]
        base = group[0]
        for r in group:
            act, bact = r["measured"]["activations"], base["measured"]["activations"]
            peak, bpeak = r["measured"]["cuda_peak_step"], base["measured"]["cuda_peak_step"]
            inc, binc = r["measured"]["cuda_step_increase"], base["measured"]["cuda_step_increase"]
            cells = ["-"] * 4 if peak is None else [f"{peak / 2**20:.1f}", f"{peak / bpeak:.2f}x", f"{inc / 2**20:.1f}",
                                                   f"{inc / binc:.2f}x"]
            print(f"| {arch} | {r['name']} | {act / 2**20:.1f} | {act / bact:.2f}x | " + " | ".join(cells)
                  + f" | {r['samples_per_s']:.0f} | {r.get('samples_per_s_graphs', float('nan')):.0f} |")
    with open(args.out, "w") as f:
        json.dump({"device": device_name, "precision": "bf16" if dtype else "fp32", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
