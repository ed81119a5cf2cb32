"""BN vs BN-free (NSConv) accuracy with one recipe: the same data, seed, rounds and schedule.

Runs `fedmef train` once per variant (concurrently with --jobs, e.g. on one GPU)
and prints a table of final/best validation accuracy, NSConv/BN ratios and
wall time. The default is the CPU check of issue 15: ResNet18 at width 0.25,
static sparse FedAvg at density 0.1, 20 rounds of 5 clients, 1 local epoch.

    python benchmarks/bn_vs_nsconv.py --data ../shared/data/cifar10-jpeg-train.tar.xz
    python benchmarks/bn_vs_nsconv.py --data D --device cuda --arch mobilenetv2 --width 1 --clients 10 \\
        --rounds 60 --set precision=bf16 --variant b8:fl.batch_size=8 --jobs 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, sets = text.partition(":")
    return name, [s for s in sets.split(",") if s]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CIFAR-10 root or archive")
    ap.add_argument("--recipe", default="fedavg_sparse_resnet18_cifar10.yaml")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=5, help="clients per round")
    ap.add_argument("--epochs", type=int, default=1, help="local epochs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="override for every run")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:key=v,key=v  extra overrides; each variant runs with bn and with nsconv")
    ap.add_argument("--norms", default="bn,nsconv")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="runs-bn-vs-nsconv")
    args = ap.parse_args()

    out = Path(args.out)
    common = [f"data.root={args.data}", "data.dataset=cifar10", f"model.arch={args.arch}",
              f"model.width={args.width}", f"fl.rounds={args.rounds}", f"fl.clients_per_round={args.clients}",
              f"fl.local_epochs={args.epochs}", f"device={args.device}", f"seed={args.seed}",
              f"eval.every={args.rounds}", f"output.dir={out}", "output.memory_report=false",
              f"output.checkpoint_every={args.rounds}"] + args.sets
    variants = [parse_variant(v) for v in args.variant] or [("base", [])]
    jobs = []
    for vname, vsets in variants:
        for norm in args.norms.split(","):
            name = f"{args.arch}-{vname}-{norm}-s{args.seed}-{time.strftime('%H%M%S')}"
            sets = common + [f"model.norm={norm}", f"output.name={name}"] + vsets
            jobs.append((vname, norm, name, sets))

    def run(job):
        vname, norm, name, sets = job
        cmd = [sys.executable, "-m", "fedmef_toolkit.cli.main", "train", "--recipe", args.recipe, "--no-progress"]
        for s in sets:
            cmd += ["--set", s]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        metrics = out / name / "metrics.jsonl"
        rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        evals = [r["eval_acc"] for r in rows if "eval_acc" in r]
        if proc.returncode != 0:
            print(f"{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {"variant": vname, "norm": norm, "run": name, "rc": proc.returncode, "wall_s": round(wall, 1),
                "final": evals[-1] if evals else None, "best": max(evals) if evals else None,
                "rounds": rows[-1]["round"] if rows else 0}

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run, jobs))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"summary-{time.strftime('%H%M%S')}.json").write_text(json.dumps(results, indent=1))
    print(f"\n{args.arch} w{args.width} {args.rounds} rounds x {args.clients} clients x {args.epochs} ep, "
          f"{args.device}, seed {args.seed}, common: {' '.join(args.sets)}")
    print("| variant | norm | final acc | best acc | vs bn | wall s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        bn = next((x for x in results if x["variant"] == r["variant"] and x["norm"] == "bn"), None)
        ratio = (f"{r['final'] / bn['final']:.3f}" if bn and bn["final"] and r["final"] is not None else "-")
        fin = "-" if r["final"] is None else f"{r['final']:.4f}"
        best = "-" if r["best"] is None else f"{r['best']:.4f}"
        print(f"| {r['variant']} | {r['norm']} | {fin} | {best} | {ratio} | {r['wall_s']} |")


if __name__ == "__main__":
    main()
