"""Summarise run directories: final accuracy, adjustment drops, samples/s, memory.

    python benchmarks/summarize_runs.py RUN_DIR [RUN_DIR ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def summarize(run_dir: Path) -> dict:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evals = [r for r in rows if "eval_acc" in r]
    adj = [r for r in rows if r.get("adjusted")]
    drops = [r["acc_before_adjust"] - r["acc_after_adjust"] for r in adj]
    sps = [r["samples_per_s"] for r in rows[1:]] or [r["samples_per_s"] for r in rows]
    low = [(r["low_norm_start"], r["low_norm_end"]) for r in rows if "low_norm_start" in r and "low_norm_end" in r]
    return {
        "run": run_dir.name, "rounds": len(rows),
        "final_acc": evals[-1]["eval_acc"] if evals else None,
        "best_acc": max((r["eval_acc"] for r in evals), default=None),
        "adjustments": len(adj), "mean_adjust_drop": statistics.mean(drops) if drops else None,
        "adjust_drops": drops,
        "low_norm_start_end": low,
        "median_samples_per_s": statistics.median(sps) if sps else None,
        "cuda_max_mem_mib": max((r.get("cuda_max_mem_mib", 0) for r in rows), default=None),
        "cpu_max_rss_mib": max((r.get("cpu_max_rss_mib", 0) for r in rows), default=None),
        "acc_curve": [(r["round"], r["eval_acc"]) for r in evals],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json")
    args = ap.parse_args()
    out = []
    for d in args.runs:
        if (d / "metrics.jsonl").exists():
            out.append(summarize(d))
    print("| run | rounds | final acc | best acc | adjustments | mean drop | samples/s | CUDA MiB | CPU RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in out:
        f = lambda v, p=4: "-" if v is None else f"{v:.{p}f}"
        print(f"| {s['run']} | {s['rounds']} | {f(s['final_acc'])} | {f(s['best_acc'])} | {s['adjustments']} | "
              f"{f(s['mean_adjust_drop'])} | {f(s['median_samples_per_s'], 0)} | {s['cuda_max_mem_mib']} | "
              f"{s['cpu_max_rss_mib']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
