"""Does one graphed forward/backward equal the eager one? (GPU diagnostic)

For several model variants: the same model, the same batch, one eager and one
graphed forward+backward; prints the largest differences in the output, the
gradients and the buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedmef_toolkit.fl.graphs import GraphedForward
from fedmef_toolkit.memory.report import MemoryConfig


def run_mode(model, mode, xs, y):
    """In a function of its own: no autograd graph of one mode is alive when the other runs
    (a live graph ties parameters' AccumulateGrad nodes to the default stream)."""
    fwd = GraphedForward(model, 8) if mode == "graphed" else model
    outs, grads = [], []
    for x in xs:
        model.zero_grad(set_to_none=True)
        out = fwd(x)
        F.cross_entropy(out, y).backward()
        outs.append(out.detach().clone())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    if mode == "graphed":
        assert fwd.refused is None, fwd.refused
    return outs, grads, {k: v.clone() for k, v in model.state_dict().items()}


def one(arch, norm, density, gamma, steps=3):
    dev = torch.device("cuda")
    cfg = MemoryConfig(f"{arch}/{norm}", arch, norm, width=0.25, density=density, sap_enabled=gamma is not None,
                       gamma=gamma or 0.0)
    torch.manual_seed(0)
    model = cfg.build(4, 16).to(dev).train()
    xs = [torch.randn(8, 3, 16, 16, device=dev) for _ in range(steps)]
    y = torch.randint(0, 4, (8,), device=dev)
    results = {}
    for mode in ("eager", "graphed"):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        results[mode] = run_mode(model, mode, xs, y)
        model.load_state_dict(state)
    e, g = results["eager"], results["graphed"]
    print(f"== {arch} {norm} density={density} gamma={gamma}")
    for i in range(steps):
        od = (e[0][i] - g[0][i]).abs().max().item()
        gd = sorted(((e[1][i][n] - g[1][i].get(n, torch.zeros_like(e[1][i][n]))).abs().max().item(), n)
                    for n in e[1][i])[-3:]
        missing = set(e[1][i]) ^ set(g[1][i])
        print(f"  step {i}: out {od:.3g}; worst grads {[(round(d, 5), n) for d, n in gd]}; grad-set diff {missing}")
    bd = sorted(((e[2][k].float() - g[2][k].float()).abs().max().item(), k) for k in e[2])[-3:]
    print(f"  buffers/params after: {bd}")


CONFIGS = [("mobilenetv2", "bn", 0.1, 0.9), ("mobilenetv2", "bn", 1.0, None), ("mobilenetv2", "bn", 0.1, None),
           ("mobilenetv2", "bn", 1.0, 0.9), ("mobilenetv2", "nsconv", 0.1, 0.9), ("resnet18", "bn", 0.1, 0.9)]

if __name__ == "__main__":
    import subprocess
    import sys

    if len(sys.argv) > 1:  # one configuration per process: a failed capture poisons the process
        try:
            one(*CONFIGS[int(sys.argv[1])])
        except Exception as exc:  # noqa: BLE001 - a diagnostic: report and go on
            print("  failed:", type(exc).__name__, str(exc).splitlines()[0][:300])
    else:
        for i in range(len(CONFIGS)):
            subprocess.run([sys.executable, __file__, str(i)])
