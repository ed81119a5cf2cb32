"""Memory report of one client training step (SPEC section 6).

For a configuration (model, norm, density, SAP) at the recipe's batch size
and input size, the report gives an analytic estimate and a measurement side
by side: weights (+ masks), gradients, optimizer state, saved activations per
layer and in total, and on CUDA the measured peak of one step. The paper's
figure is model size (sparse weights) + activation memory. A reference
configuration (same model with BatchNorm and no SAP, what FedAvg/FedDST
clients train) gives the reduction.

memory.json schema "fedmef-memory/1":
  {"schema", "device", "measured_on", "precision": "fp32" | "bf16",
   "kernels": "triton" | "torch" (fused GPU kernels or PyTorch ops measured),
   "batch_size", "input_shape", "num_classes",
   "configurations": [{"name", "arch", "norm", "width", "density", "sap": {"enabled",
       "gamma", "selection"}, "momentum", "parameters",
       "architecture": the description of the model measured (fedmef_toolkit.architecture; for a
           run, the model that trained, e.g. a converted network from model.init),
       "analytic": {"weights", "gradients", "optimizer", "activations", "total"},
       "measured": {"activations", "weight_derived_saved", "per_layer": {layer: bytes},
                    "cuda_peak_step": bytes | null, "cuda_step_increase": bytes | null},
       "paper_figure": bytes}],
   "reduction_vs_reference": {"paper_figure", "activations", "cuda_peak_step"}}
All sizes are bytes; reductions are fractions (0.285 = 28.5% less).
"""

from __future__ import annotations

import copy
import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..kernels import use_triton
from ..layers import ScaledReLU
from ..architecture import build_from_description, describe, registry_description
from ..sap import enable_sap
from ..sap.packing import keep_count
from ..sparse.masks import attach_masks, init_masks, prunable_modules
from .measure import cuda_step_peak, saved_tensor_bytes

SCHEMA = "fedmef-memory/1"


@dataclass
class MemoryConfig:
    name: str
    arch: str
    norm: str
    width: float = 1.0
    density: float = 1.0
    sap_enabled: bool = False
    gamma: float = 0.0
    selection: str = "per_sample"
    momentum: float = 0.0
    distribution: str = "erk"
    # a ready model (masks and SAP attached, e.g. the one a run trains) instead of the registry one
    builder: Callable[[], nn.Module] | None = None
    description: dict | None = None

    def build(self, num_classes: int, image_size: int, seed: int = 0) -> nn.Module:
        if self.builder is not None:
            return self.builder()
        self.description = registry_description({"name": self.arch, "num_classes": num_classes, "norm": self.norm,
                                                 "width": self.width, "image_size": image_size})
        model = build_from_description(self.description)
        if self.density < 1.0:
            attach_masks(model, init_masks(model, self.density, self.distribution, "random", seed))
        if self.sap_enabled:
            enable_sap(model, self.gamma, self.selection)
        return model


def weight_bytes(model: nn.Module) -> int:
    """Parameters as a device stores them: masked weights as values + a bitmask."""
    masked = {id(m.weight): m.weight_mask for m in prunable_modules(model).values()
              if getattr(m, "weight_mask", None) is not None}
    total = 0
    for p in model.parameters():
        mask = masked.get(id(p))
        if mask is None:
            total += p.numel() * p.element_size()
        else:
            total += int(mask.sum()) * p.element_size() + (mask.numel() + 7) // 8
    return total


def analytic_activation_bytes(model: nn.Module, x: torch.Tensor, elem_bytes: int = 4) -> dict[str, int]:
    """What each layer keeps for backward by its formula (no cross-layer sharing counted):
    conv/linear: its input (dense, or kept values + 1 bit an entry under SAP);
    BatchNorm: its input; ReLU6: its input; mask-saving ReLU: 1 bit an entry;
    ReLU whose output is the next layer's input: 0 (shared storage)."""
    per_layer: dict[str, int] = {}
    hooks = []

    def record(name, module):
        def hook(mod, inputs, output):
            inp = inputs[0]
            n = inp.numel()
            sap = getattr(mod, "sap", None)
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                if sap is not None and sap.gamma > 0:
                    rows = inp.shape[0] if sap.per_sample else 1
                    kept = keep_count(n // rows, sap.gamma) * rows
                    size = kept * elem_bytes + (n + 7) // 8
                else:
                    size = n * elem_bytes
            elif isinstance(mod, nn.BatchNorm2d):
                size = n * elem_bytes
            elif isinstance(mod, nn.ReLU6):
                size = n * elem_bytes
            elif isinstance(mod, ScaledReLU):
                size = (n + 7) // 8 if mod.save_mask else (n * elem_bytes if mod.max_value is not None else 0)
            else:
                return
            per_layer[name] = per_layer.get(name, 0) + size
        return hook

    for name, mod in model.named_modules():
        hooks.append(mod.register_forward_hook(record(name, mod)))
    model.train()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return per_layer


def measure_config(cfg: MemoryConfig, batch_size: int, image_size: int, num_classes: int, device: torch.device,
                   autocast_dtype=None, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = cfg.build(num_classes, image_size, seed).to(device)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    n_params = sum(p.numel() for p in model.parameters())
    masks = [m.weight_mask for m in prunable_modules(model).values() if getattr(m, "weight_mask", None) is not None]
    if masks:  # the density the model really has (its masks), not the recipe's target
        cfg.density = round(sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks), 4)
    elem = 2 if autocast_dtype is not None else 4
    weights = weight_bytes(model)
    grads = n_params * 4  # PyTorch keeps dense fp32 gradients, masked or not
    optim = n_params * 4 if cfg.momentum > 0 else 0
    peak = None
    if device.type == "cuda":  # first, so nothing from the other measurements is still allocated
        gc.collect()
        torch.cuda.empty_cache()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=cfg.momentum)
        peak = cuda_step_peak(model, x, y, opt, autocast_dtype)
        model.zero_grad(set_to_none=True)
        del opt
    act_analytic = sum(analytic_activation_bytes(copy.deepcopy(model), x, elem).values())
    saved = saved_tensor_bytes(model, x, y, autocast_dtype)
    return {
        "name": cfg.name, "arch": cfg.arch, "norm": cfg.norm, "width": cfg.width, "density": cfg.density,
        "sap": {"enabled": cfg.sap_enabled, "gamma": cfg.gamma, "selection": cfg.selection},
        "momentum": cfg.momentum, "parameters": n_params, "architecture": cfg.description,
        "analytic": {"weights": weights, "gradients": grads, "optimizer": optim, "activations": act_analytic,
                     "total": weights + grads + optim + act_analytic},
        "measured": {"activations": saved["activations"], "weight_derived_saved": saved["weight_derived"],
                     "per_layer": saved["per_layer"],
                     "cuda_peak_step": None if peak is None else peak["peak"],
                     "cuda_step_increase": None if peak is None else peak["step_increase"]},
        "paper_figure": weights + saved["activations"],
    }


def _reduction(new, ref):
    return None if not new or not ref else round(1.0 - new / ref, 4)


def build_report(configs: list[MemoryConfig], batch_size: int, image_size: int, num_classes: int,
                 device: torch.device, autocast_dtype=None) -> dict:
    """configs[0] is the subject, configs[-1] the reference."""
    rows = [measure_config(c, batch_size, image_size, num_classes, device, autocast_dtype) for c in configs]
    subject, ref = rows[0], rows[-1]
    return {
        "schema": SCHEMA, "device": str(device), "measured_on": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "precision": "bf16" if autocast_dtype else "fp32",
        "kernels": "triton" if use_triton(torch.empty(0, device=device)) else "torch",
        "batch_size": batch_size, "input_shape": [3, image_size, image_size], "num_classes": num_classes,
        "configurations": rows,
        "reduction_vs_reference": {
            "paper_figure": _reduction(subject["paper_figure"], ref["paper_figure"]),
            "activations": _reduction(subject["measured"]["activations"], ref["measured"]["activations"]),
            "cuda_peak_step": _reduction(subject["measured"]["cuda_peak_step"], ref["measured"]["cuda_peak_step"]),
        },
    }


def _at_most_density(build: Callable[[], nn.Module], density: float, distribution: str,
                     seed: int) -> Callable[[], nn.Module]:
    """`build`, with masks at `density` where its model is denser: PruneFL and FedTiny hold
    all-ones masks until their server-side preparation before round 1 prunes the model, and a
    report made before then would measure the dense model instead of what clients train."""
    def built() -> nn.Module:
        model = build()
        masks = [m.weight_mask for m in prunable_modules(model).values() if getattr(m, "weight_mask", None) is not None]
        if masks and sum(int(m.sum()) for m in masks) > density * sum(m.numel() for m in masks) * 1.01:
            attach_masks(model, {k: v.to(masks[0].device) for k, v in
                                 init_masks(model, density, distribution, "random", seed).items()})
        return model

    return built


def _label_norm(desc: dict) -> str:
    return desc["kwargs"].get("norm", "bn") if desc["kind"] == "registry" else "nsconv"


def configs_for_recipe(recipe, num_classes: int, image_size: int, subject: Callable[[], nn.Module] | None = None,
                       description: dict | None = None) -> list[MemoryConfig]:
    """[the model the recipe trains, the reference (same architecture with BatchNorm, no SAP)].
    The subject is built like the simulator builds it (`fedmef_toolkit.assembly`: model.init,
    NSConv settings, the method's masks with sparsity.distribution, SAP) unless `subject`
    gives it (a run's own model); `description` is then its architecture."""
    from ..architecture import build_source

    m, meth = recipe.model, recipe.method
    if subject is None:
        from ..assembly import build_model, prepare_for_training

        built = build_model(m, num_classes, image_size)
        prepare_for_training(built.model, recipe)
        description, ready = built.description, built.model
        subject = lambda: copy.deepcopy(ready)  # noqa: E731
    from ..fl.strategies import method_info

    density = meth.sparsity.density if method_info(meth.name).sparse else 1.0
    if density < 1.0:
        subject = _at_most_density(subject, density, meth.sparsity.distribution, recipe.seed)
    width = description["kwargs"].get("width", 1.0) if description["kind"] == "registry" else 1.0
    subj = MemoryConfig("this recipe", describe(description), _label_norm(description), width, density,
                        meth.sap.enabled, meth.sap.gamma, meth.sap.selection, recipe.fl.momentum,
                        meth.sparsity.distribution, builder=subject, description=description)
    if description["kind"] == "registry":
        kw = description["kwargs"]
        ref_desc = registry_description({k: kw[k] for k in ("name", "num_classes", "width", "image_size") if k in kw}
                                        | {"norm": "bn"})
        ref_build = lambda: build_from_description(ref_desc)  # noqa: E731
    elif description.get("source") is not None:  # a converted model: its BatchNorm original
        src = description["source"]
        ref_desc = {"kind": "bn source", "source": src}
        ref_build = lambda: build_source(src)  # noqa: E731
    else:
        ref_desc, ref_build = None, None
    def reference():
        model = ref_build() if ref_build else copy.deepcopy(subject()).cpu()
        if density < 1.0:
            attach_masks(model, init_masks(model, density, meth.sparsity.distribution, "random", recipe.seed))
        return model
    ref_label = describe(ref_desc) if ref_desc and ref_desc["kind"] == "registry" else \
        (f"{src['source']} {src['name']}" if ref_desc else subj.arch)
    ref = MemoryConfig("reference: BN, no SAP", ref_label, "bn", width, density, False, 0.0, "per_sample",
                       recipe.fl.momentum, meth.sparsity.distribution, builder=reference, description=ref_desc)
    return [subj, ref]


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def render_table(report: dict, console) -> None:
    """Quantities down, configurations across: fits 80 columns with any model name."""
    from rich import box
    from rich.table import Table

    rows = report["configurations"]
    console.print(f"memory of one client step, batch {report['batch_size']}, input "
                  f"{'x'.join(map(str, report['input_shape']))}, {report['precision']}, measured on "
                  f"{report['measured_on']}", highlight=False)
    for i, r in enumerate(rows):
        sap = f"SAP {r['sap']['gamma']:g}" if r["sap"]["enabled"] else "no SAP"
        console.print(f"  ({i + 1}) {r['name']}: {r['arch']}, density {r['density']:g}, {sap}, "
                      f"{r['parameters']:,} params", highlight=False)
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("MiB")
    for i in range(len(rows)):
        table.add_column(f"({i + 1})", justify="right")
    lines = [("weights (+masks)", lambda r: r["analytic"]["weights"]),
             ("gradients", lambda r: r["analytic"]["gradients"]),
             ("optimizer state", lambda r: r["analytic"]["optimizer"]),
             ("activations, formula", lambda r: r["analytic"]["activations"]),
             ("activations, measured", lambda r: r["measured"]["activations"]),
             ("weight copies saved", lambda r: r["measured"]["weight_derived_saved"]),
             ("paper figure", lambda r: r["paper_figure"])]
    if any(r["measured"]["cuda_peak_step"] is not None for r in rows):
        lines.append(("CUDA peak of a step", lambda r: r["measured"]["cuda_peak_step"]))
    for label, get in lines:
        table.add_row(label, *[mib(get(r)) for r in rows])
    console.print(table)
    console.print("formula: per layer; measured: saved-tensor hooks, unique storages, parameters excluded; "
                  "weight copies: weight-shaped tensors saved (e.g. NSConv's standardised weight); "
                  "paper figure: weights + measured activations", highlight=False)
    red = report["reduction_vs_reference"]
    parts = [f"{k.replace('_', ' ')} {v * 100:.1f}% less" for k, v in red.items() if v is not None]
    console.print("(1) vs reference: " + ", ".join(parts), highlight=False)


def write_chart(report: dict, path: Path) -> bool:
    """Stacked bar chart per configuration; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["configurations"]
    names = [r["name"] for r in rows]
    parts = {
        "weights (+masks)": [r["analytic"]["weights"] for r in rows],
        "gradients": [r["analytic"]["gradients"] for r in rows],
        "optimizer state": [r["analytic"]["optimizer"] for r in rows],
        "saved activations (measured)": [r["measured"]["activations"] for r in rows],
    }
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rows), 4.2))
    bottom = [0.0] * len(rows)
    for label, vals in parts.items():
        mibs = [v / 2**20 for v in vals]
        ax.bar(names, mibs, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, mibs)]
    ax.set_ylabel("MiB")
    ax.set_title(f"one client step, batch {report['batch_size']}")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: dict, out_dir: Path, console=None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    from ..storage import write_text_atomic

    from ..rundir import MEMORY_JSON, MEMORY_PNG

    write_text_atomic(out_dir / MEMORY_JSON, json.dumps(report, indent=1))
    write_chart(report, out_dir / MEMORY_PNG)
    if console is not None:
        render_table(report, console)


def report_for_recipe(recipe, num_classes: int, image_size: int, device: torch.device,
                      subject: Callable[[], nn.Module] | None = None, description: dict | None = None) -> dict:
    dtype = torch.bfloat16 if recipe.precision == "bf16" and device.type == "cuda" else None
    configs = configs_for_recipe(recipe, num_classes, image_size, subject, description)
    return build_report(configs, recipe.fl.batch_size, image_size, num_classes, device, dtype)


def write_report_for_simulator(sim, quiet: bool = False) -> dict:
    """The report of the model the simulator trains (a copy of it: masks, SAP, calibrated gains)."""
    model = sim.model
    report = report_for_recipe(sim.recipe, sim.data.num_classes, sim.data.image_size, sim.device,
                               subject=lambda: copy.deepcopy(model), description=sim.arch_desc)
    write_report(report, sim.run_dir, None if quiet else sim.console)
    return report
