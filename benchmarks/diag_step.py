"""Where does a training step's peak memory and time go? (GPU diagnostic)

Prints memory_allocated after each module's forward and backward for one
step, the module at the peak, and the top CUDA kernels by time.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from fedmef_toolkit.memory.report import MemoryConfig


def trace(cfg: MemoryConfig, batch=64):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = cfg.build(10, 32).to(dev)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    events = []
    hooks = []
    for name, m in model.named_modules():
        if name and not list(m.children()):
            hooks.append(m.register_forward_hook(lambda m, i, o, n=name: events.append(("F " + n, torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()))))
            hooks.append(m.register_full_backward_hook(lambda m, gi, go, n=name: events.append(("B " + n, torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()))))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = F.cross_entropy(model(x), y)
    events.append(("loss", torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()))
    loss.backward()
    events.append(("backward done", torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()))
    opt.step()
    for h in hooks:
        h.remove()
    print(f"\n== {cfg.name}: base {base / 2**20:.1f} MiB, peak {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    prev_peak = 0
    for name, alloc, peak in events:
        if peak > prev_peak + 20 * 2**20 or name in ("loss", "backward done"):
            print(f"  {name:40s} alloc {alloc / 2**20:8.1f}  peak so far {peak / 2**20:8.1f}")
            prev_peak = peak
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    arch = sys.argv[1] if len(sys.argv) > 1 else "resnet18"
    for cfg in [MemoryConfig("(a) BN", arch, "bn", density=0.1),
                MemoryConfig("(b) NSConv", arch, "nsconv", density=0.1),
                MemoryConfig("(d) NSConv+SAP 0.9", arch, "nsconv", density=0.1, sap_enabled=True, gamma=0.9)]:
        trace(cfg)
