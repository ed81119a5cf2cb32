"""Simulator speed per recipe: sequential vs batched engine (clients on CUDA streams,
fl/streams.py), fp32 vs bf16, in one process.

For each recipe x engine x precision it builds the simulator (paper protocol of
the shipped recipes unless overridden), runs `--rounds` rounds of training
(no evaluation, no checkpoints) and prints samples/s over the rounds after the
first (the first pays for warm-up and CUDA-graph capture), seconds per round,
the peak GPU memory of those rounds (allocated, and reserved by PyTorch's
allocator: the second includes the CUDA graphs' private pools, whose
activations are not "allocated" between replays; both above what earlier
configurations left) and the engine's status line (clients
trained at once and why, whole-step CUDA graph replays). The "vs sequential"
column is what `fl.engine: auto` should follow (fl/engine.py AUTO_ON_CUDA). A table at the end; `--json` writes everything.

    # on a GPU (about 5-8 minutes with the defaults; real CIFAR-10 archive or folder):
    python benchmarks/bench_engine.py --data-root /path/to/cifar10 --json bench_engine.json
    # quick check on the CPU (small synthetic data, one local epoch, two clients):
    python benchmarks/bench_engine.py --device cpu --synthetic-samples 2000 --set fl.local_epochs=1 \\
        --set fl.clients_per_round=4 --recipes quickstart.yaml,fedmef_resnet18_cifar10.yaml --set model.width=0.25

Without --data-root the recipes' data set is replaced by synthetic 32x32 images
(same shapes and client sizes as CIFAR-10's 50,000 training images). Mask
adjustment rounds (every `delta_t` = 10 rounds) are not among the first few;
`--rounds 11` includes one. `--max-seconds` stops starting new configurations
once that much time has passed (the rest are listed as skipped).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import fedmef_toolkit.fl.simulator as simulator_module
from fedmef_toolkit.fl.simulator import Simulator
from fedmef_toolkit.recipe import load_recipe

DEFAULT_RECIPES = "resnet18_cifar10.yaml,feddst_resnet18_cifar10.yaml,fedmef_resnet18_cifar10.yaml"


def cached_load_data():
    """Every configuration reads the same data set: decode or generate it once per process."""
    real, cache = simulator_module.load_data, {}

    def load(spec, split, seed):
        key = (json.dumps(spec.__dict__, default=str, sort_keys=True), split, seed)
        if key not in cache:
            cache[key] = real(spec, split, seed)
        return cache[key]

    simulator_module.load_data = load


def build(recipe_name: str, engine: str, precision: str, args, out_dir: Path) -> Simulator:
    sets = [f"device={args.device}", f"fl.engine={engine}", f"precision={precision}", "eval.every=1000000",
            f"output.dir={out_dir}", "output.memory_report=false"]
    if args.data_root:
        sets.append(f"data.root={args.data_root}")
    else:
        sets += ["data.dataset=synthetic", "data.root=null", f"data.synthetic.num_samples={args.synthetic_samples}",
                 "data.synthetic.image_size=32", "data.synthetic.num_classes=10"]
    if args.batched_clients:
        sets.append(f"fl.batched_clients={args.batched_clients}")
    recipe = load_recipe(recipe_name, sets + list(args.set))
    needed = args.rounds + bool(args.profile) + bool(args.host_profile)  # profiled rounds come after the timed ones
    if recipe.fl.rounds <= needed:
        recipe = load_recipe(recipe_name, sets + list(args.set) + [f"fl.rounds={needed + 1}"])
    return Simulator(recipe, out_dir / f"{recipe.name}-{engine}-{precision}", show_progress=False)


def profiled_round(sim: Simulator, t: int, path: Path) -> dict:
    """Round t under torch.profiler: where its wall time goes (host vs GPU), written to `path`:
    the GPU's busy time (kernels, merged over streams) against the round's wall time, then the
    operators with the most GPU time and with the most host time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if sim.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        row = sim.run_round(t)
    # device-side events: kernels, memcpy and memset (this script marks no record_function ranges,
    # whose GPU-side annotation spans would count idle time as busy)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type.name == "CUDA")
    busy, end = 0, None
    for a, b in spans:  # the union of kernel intervals (streams overlap)
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    path.parent.mkdir(parents=True, exist_ok=True)
    head = (f"round {t}: wall {row['time_s']:.3f} s under the profiler, GPU busy {busy / 1e6:.3f} s "
            f"({busy / 1e6 / max(row['time_s'], 1e-9):.0%}), {len(spans)} GPU events\n")
    avg = prof.key_averages()
    device_key = "self_device_time_total" if hasattr(avg[0], "self_device_time_total") else "self_cuda_time_total"
    path.write_text(head + "\nby GPU time\n" + avg.table(sort_by=device_key if spans else "self_cpu_time_total",
                                                           row_limit=25)
                    + "\nby host time\n" + avg.table(sort_by="self_cpu_time_total", row_limit=25))
    print("  profile: " + head.strip(), flush=True)
    return row


def host_profiled_round(sim: Simulator, t: int, path: Path) -> dict:
    """Round t under cProfile (Python functions only, no GPU tracing): where the host spends
    the round, written to `path` (the 30 functions with the most cumulative time)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    row = sim.run_round(t)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
    buf.write("\n")
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"round {t}: wall {row['time_s']:.3f} s under cProfile\n" + buf.getvalue())
    print(f"  host profile: round {t}, wall {row['time_s']:.3f} s under cProfile -> {path}", flush=True)
    return row


def measure(recipe_name: str, engine: str, precision: str, args, out_dir: Path) -> dict:
    # what earlier configurations left (PyTorch keeps a cuBLAS workspace per stream used) is not
    # this one's: its peaks are counted above it
    resident = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    resident_reserved = torch.cuda.memory_reserved() if torch.cuda.is_available() else 0
    if resident > 2**26:
        print(f"  note: {resident / 2**30:.2f} GiB still allocated from earlier configurations", flush=True)
    sim = build(recipe_name, engine, precision, args, out_dir)
    cuda = sim.device.type == "cuda"
    times, samples = [], []
    for t in range(1, args.rounds + 1):
        if cuda and t == 2:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(sim.device)
        row = sim.run_round(t)  # synchronises at its end on CUDA
        times.append(row["time_s"])
        samples.append(row["samples"])
        print(f"  round {t}: {row['samples']} samples in {row['time_s']:.2f} s ({row['samples_per_s']:.0f}/s), "
              f"loss {row['train_loss']:.3f}", flush=True)
    label = f"{Path(recipe_name).stem}-{engine}-{precision}.txt"
    if args.profile:  # one more round, under the profiler and not among the timed ones
        profiled_round(sim, args.rounds + 1, Path(args.profile) / label)
    if args.host_profile:
        host_profiled_round(sim, args.rounds + 1 + bool(args.profile), Path(args.host_profile) / label)
    timed = slice(1, None) if args.rounds > 1 else slice(0, None)
    out = {"recipe": recipe_name, "engine": sim.engine_name, "precision": precision,
           "samples_per_s": sum(samples[timed]) / max(sum(times[timed]), 1e-9),
           "s_per_round": sum(times[timed]) / len(times[timed]), "first_round_s": times[0],
           "peak_gib": (torch.cuda.max_memory_allocated(sim.device) - resident) / 2**30 if cuda else None,
           "peak_reserved_gib": (torch.cuda.max_memory_reserved(sim.device) - resident_reserved) / 2**30 if cuda else None,
           "status": sim.engine.status(), "reason": sim.engine_reason,
           "method": sim.recipe.method.name, "arch": f"{sim.recipe.model.arch}/{sim.recipe.model.norm}",
           "clients_per_round": sim.recipe.fl.clients_per_round, "local_epochs": sim.recipe.fl.local_epochs}
    del sim
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--recipes", default=DEFAULT_RECIPES, help="comma-separated bundled recipe names or files")
    ap.add_argument("--engines", default="sequential,batched")
    ap.add_argument("--precisions", default="fp32,bf16", help="bf16 is skipped on the CPU")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per configuration (the first is not timed)")
    ap.add_argument("--data-root", help="CIFAR-10 folder or archive; without it synthetic images")
    ap.add_argument("--synthetic-samples", type=int, default=55556, help="synthetic images (10%% held out)")
    ap.add_argument("--batched-clients", type=int, default=0, help="fl.batched_clients (0: from free memory)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    ap.add_argument("--max-seconds", type=float, default=540.0, help="start no configuration after this")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--host-profile", metavar="DIR", help="cProfile one more round after the timed ones: DIR/<recipe>-<engine>-<precision>.txt")
    ap.add_argument("--profile", metavar="DIR", help="profile one more round after the timed ones (torch.profiler): DIR/<recipe>-<engine>-<precision>.txt")
    args = ap.parse_args()
    cached_load_data()
    start = time.perf_counter()
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"{device_name}, torch {torch.__version__}, python {sys.version.split()[0]}", flush=True)
    precisions = [p for p in args.precisions.split(",") if p == "fp32" or args.device.startswith("cuda")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes.split(","):
            for precision in precisions:
                for engine in args.engines.split(","):
                    label = f"{recipe} {engine} {precision}"
                    if time.perf_counter() - start > args.max_seconds:
                        print(f"skipped (time): {label}", flush=True)
                        rows.append({"recipe": recipe, "engine": engine, "precision": precision, "error": "skipped"})
                        continue
                    print(f"{label}:", flush=True)
                    try:
                        rows.append(measure(recipe, engine, precision, args, Path(tmp)))
                        print(f"  {rows[-1]['status']} ({rows[-1]['reason']})", flush=True)
                    except Exception as e:  # noqa: BLE001 - one failed configuration must not end the run
                        traceback.print_exc(limit=3)
                        rows.append({"recipe": recipe, "engine": engine, "precision": precision,
                                     "error": f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"})
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
    print(f"\n{device_name}, rounds 2-{args.rounds} timed, {time.perf_counter() - start:.0f} s in all")
    print("| recipe | precision | engine | samples/s | s/round | vs sequential | peak GiB allocated / reserved | notes |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['recipe']} | {r['precision']} | {r['engine']} | - | - | - | - | {r['error']} |")
            continue
        base = next((b for b in rows if b.get("engine") == "sequential" and "error" not in b
                     and (b["recipe"], b["precision"]) == (r["recipe"], r["precision"])), None)
        speedup = f"{r['samples_per_s'] / base['samples_per_s']:.2f}x" if base else "-"
        peak = f"{r['peak_gib']:.2f} / {r['peak_reserved_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"| {r['recipe']} | {r['precision']} | {r['engine']} | {r['samples_per_s']:,.0f} | {r['s_per_round']:.2f} "
              f"| {speedup} | {peak} | {r['status']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "torch": torch.__version__, "args": vars(args),
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
