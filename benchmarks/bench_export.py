"""Sparse export: file size against the dense safetensors file, and export/load time (CPU).

    python benchmarks/bench_export.py
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedmef_toolkit.architecture import registry_description
from fedmef_toolkit.export.api import export_model, load_model
from fedmef_toolkit.models import get_model
from fedmef_toolkit.sparse.masks import MASK_SUFFIX, attach_masks, init_masks


def main():
    print("| model | norm | density | dense file MiB | sparse file MiB | ratio | export s | load_model s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for arch in ("resnet18", "mobilenetv2"):
            for density in (0.05, 0.1, 0.2, 0.5):
                norm = "nsconv"
                kwargs = {"name": arch, "num_classes": 10, "norm": norm}
                model = get_model(**kwargs)
                attach_masks(model, init_masks(model, density, "erk", "random", seed=0))
                state = model.state_dict()
                run = tmp / f"{arch}_{density}"
                run.mkdir()
                save_file({k: v.contiguous() for k, v in state.items()}, str(run / "model.safetensors"),
                          metadata={"fedmef_arch": json.dumps(registry_description(kwargs))})
                dense = tmp / "dense.safetensors"
                save_file({k: v.contiguous() for k, v in state.items() if not k.endswith(MASK_SUFFIX)}, str(dense))
                out = tmp / "sparse.safetensors"
                t0 = time.perf_counter()
                export_model(run, out)
                t1 = time.perf_counter()
                loaded = load_model(out)
                t2 = time.perf_counter()
                x = torch.randn(2, 3, 32, 32)
                model.eval()
                with torch.no_grad():
                    assert torch.equal(loaded(x), model(x))
                d, s = dense.stat().st_size, out.stat().st_size
                print(f"| {arch} | {norm} | {density} | {d / 2**20:.2f} | {s / 2**20:.2f} | {s / d:.3f} | "
                      f"{t1 - t0:.3f} | {t2 - t1:.3f} |")


if __name__ == "__main__":
    main()
