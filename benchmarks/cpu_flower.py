"""Per-round time of Flower's deployment engine on localhost (CPU): SuperLink + N SuperNodes.

    python benchmarks/cpu_flower.py [--nodes 1 2] [--rounds 5] [--clients 10] [--recipe FILE]

Default recipe: synthetic data, cnn4 (tests' small recipe), 20 clients, --clients per round,
FedMef at density 0.5. Each ClientApp writes one line of timestamps per train message
(FEDMEF_FLOWER_TRACE): process start, module import, toolkit import, runtime (data, model,
trainer), training, reply; the script prints per-round times from metrics.jsonl and where each
message's time went, per SuperNode. Insecure mode: 127.0.0.1 only. Flower CLI commands are taken
from the directory of this Python (python -m pip install 'fedmef-toolkit[flower]').
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def small(out: Path, rounds: int, clients: int) -> dict:
    from conftest import small_recipe

    return small_recipe(out, **{"fl.engine": "flower", "fl.rounds": rounds, "fl.clients_per_round": clients,
                                "data.num_clients": 20, "data.synthetic.num_samples": 2000,
                                "method.name": "fedmef", "method.sparsity.density": 0.5,
                                "method.sparsity.delta_t": 2, "method.sparsity.t_end": rounds,
                                "eval.every": rounds, "output.checkpoint_every": rounds})


def run_case(n: int, recipe: dict, work: Path, isolation: str) -> dict:
    import subprocess

    from flower_deploy import Deployment, bin_of

    from fedmef_toolkit.flower.app_dir import write_app
    from fedmef_toolkit.recipe import recipe_from_dict

    case = work / f"n{n}-{isolation}"
    app = write_app(recipe_from_dict(recipe), case / "app", min_nodes=n)
    home = case / "app" / "flwr_home"
    trace, run_dir = case / "trace.jsonl", case / "run"
    path = f"{os.path.dirname(bin_of('flwr'))}{os.pathsep}{os.environ.get('PATH', '')}"
    d = Deployment(home, {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "PATH": path,
                          "FEDMEF_FLOWER_TRACE": str(trace), "PYTHONPATH": str(ROOT)})
    cfg = home / "config.toml"
    cfg.write_text(cfg.read_text().replace("127.0.0.1:9093", f"127.0.0.1:{d.port}"))
    t0 = time.time()
    try:
        d.superlink()
        d.wait_port()
        for i in range(n):
            d.supernode(f"node{i}", isolation=isolation)
        p = subprocess.run([bin_of("flwr"), "run", str(app), "fedmef-local", "--run-config",
                            f"run-dir='{run_dir}' wait-s=120 min-nodes={n}"], env=d.env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        end = time.time() + 900
        while not (run_dir / "model.safetensors").exists():
            if time.time() > end:
                raise TimeoutError(d.logs())
            time.sleep(0.2)
    finally:
        d.stop()
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    msgs = [json.loads(ln) for ln in trace.read_text().splitlines()] if trace.exists() else []
    return summarize(n, isolation, rows, msgs, time.time() - t0)


def summarize(n, isolation, rows, msgs, wall) -> dict:
    def med(key_a, key_b):
        vals = [m[key_b] - m[key_a] for m in msgs if m.get(key_a) and m.get(key_b)]
        return round(statistics.median(vals), 3) if vals else None

    per_node: dict = {}
    for m in msgs:
        per_node.setdefault(str(m["node"]), []).append(m["round"])
    later = [r["time_s"] for r in rows if r["round"] > 1]
    return {"supernodes": n, "isolation": isolation, "rounds": len(rows),
            "round_s": [r["time_s"] for r in rows],
            "round_s_after_first": round(statistics.mean(later), 3) if later else None,
            "failed": sum(len(r.get("failed_clients", {})) for r in rows),
            "processes": len({m["pid"] for m in msgs}), "messages": len(msgs),
            "messages_per_node_round": {k: [v.count(t) for t in sorted(set(v))] for k, v in per_node.items()},
            "median_s": {"process_start_to_train": med("proc_start", "enter"),
                         "toolkit_import": med("enter", "imported"), "runtime": med("imported", "runtime"),
                         "train": med("start", "trained"), "encode": med("trained", "done")},
            "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--isolation", nargs="+", default=["subprocess"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="cpu_flower-"))
    recipe = small(work, args.rounds, args.clients)
    for iso in args.isolation:
        for n in args.nodes:
            print(json.dumps(run_case(n, recipe, work, iso)), flush=True)


if __name__ == "__main__":
    main()
