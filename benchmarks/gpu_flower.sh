#!/usr/bin/env bash
# Rounds/s of the paper-protocol ResNet18/CIFAR-10 FedMef recipe on Flower's deployment engine:
# one SuperNode per GPU (2 GPUs) vs one SuperNode on one GPU (same host, SuperLink on 127.0.0.1,
# insecure: localhost only). Fits a 10-minute limit: ROUNDS timed rounds after WARM warm-up rounds.
#   bash benchmarks/gpu_flower.sh            # from the repository root, offline
# Needs: CIFAR-10 under $CIFAR (default shared/data/cifar10-jpeg-train.tar.xz) and flwr from
# carry/wheels (installed below without an index).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
ROUNDS=${ROUNDS:-6}
WARM=${WARM:-2}
CIFAR=${CIFAR:-shared/data/cifar10-jpeg-train.tar.xz}
OUT=${OUT:-${TMPDIR:-/tmp}/gpu_flower}
rm -rf "$OUT"; mkdir -p "$OUT"
if ! $PY -c "import flwr" 2>/dev/null; then
  # carry/wheels holds flwr 1.42.0 and its dependencies for Python 3.12 without ray (simulation
  # only), numpy (torch's) and uv (runtime dependency installation, disabled here): under 40 MB.
  $PY -m pip install -q --no-index --find-links carry/wheels --no-deps 'flwr==1.42.0' >"$OUT/pip.log" 2>&1
  DEPS=$($PY - <<'PYEOF'
import re
from importlib.metadata import requires
for r in requires("flwr") or []:
    name = re.split(r"[ ;<>=!~\[]", r, 1)[0]
    if "extra ==" in r or name.lower() in ("uv", "ray", "numpy"):
        continue
    print(r.split(";")[0].strip())
PYEOF
)
  $PY -m pip install -q --no-index --find-links carry/wheels $DEPS >>"$OUT/pip.log" 2>&1
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip-toolkit.log" 2>&1 || true
BIN=$(dirname "$($PY -c 'import sys; print(sys.executable)')")
# SuperExec (started by each SuperNode) polls for ClientApp tasks every 0.1 s instead of 1 s
export PATH="$BIN:$PATH" FLWR_HOME="$OUT/flwr_home" OMP_NUM_THREADS=4 FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1
export FEDMEF_FLOWER_TRACE=${FEDMEF_FLOWER_TRACE:-$OUT/trace.jsonl}  # per-client timestamps (docs/flower.md)
NGPU=$(nvidia-smi -L | wc -l)
TOTAL=$((WARM + ROUNDS))
SET=(--set fl.rounds=$TOTAL --set data.root=$CIFAR --set eval.every=$TOTAL --set output.checkpoint_every=$TOTAL)

run_case() {  # $1: label, $2: number of SuperNodes (one per GPU)
  local label=$1 n=$2
  local port=$((9300 + n)) app="$OUT/app-$n" run="$OUT/run-$n" pids=()
  fedmef flower app fedmef_resnet18_cifar10.yaml -o "$app" --min-nodes "$n" "${SET[@]}" >/dev/null
  sed -i "s/127.0.0.1:9093/127.0.0.1:$port/" "$app/flwr_home/config.toml"
  export FLWR_HOME="$app/flwr_home"
  flower-superlink --insecure --port $port --disable-runtime-dependency-installation >"$OUT/link-$n.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 60); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.5; done
  for g in $(seq 0 $((n - 1))); do
    CUDA_VISIBLE_DEVICES=$g flower-supernode --insecure --superlink 127.0.0.1:$port --port $((9400 + 10 * n + g)) \
      >"$OUT/node-$n-$g.log" 2>&1 &
    pids+=($!)
  done
  flwr run "$app" fedmef-local --run-config "run-dir='$run' min-nodes=$n" >"$OUT/flwr-run-$n.log" 2>&1
  for _ in $(seq 1200); do [ -f "$run/model.safetensors" ] && break; sleep 0.5; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  $PY - "$run" "$WARM" "$label" "$n" <<'PYEOF'
import json, sys
run, warm, label, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
try:
    rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
except OSError:
    print(f"{label}: no metrics (see logs in {run}/..)"); sys.exit(0)
timed = [r for r in rows if r["round"] > warm]
t = sum(r["time_s"] for r in timed)
fails = sum(len(r.get("failed_clients", {})) for r in rows)
print(json.dumps({"label": label, "supernodes": n, "rounds": len(timed), "time_s": round(t, 2),
                  "rounds_per_s": round(len(timed) / t, 4) if t else None, "failed_clients": fails}))
PYEOF
}

{
  run_case "1 GPU, 1 SuperNode" 1
  if [ "$NGPU" -ge 2 ]; then run_case "2 GPUs, 1 SuperNode each" 2; fi
} | tee "$OUT/results.jsonl"
$PY - "$OUT/results.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
base = next((r["rounds_per_s"] for r in rows if r["supernodes"] == 1), None)
print(f"\n{'setup':28s} {'rounds':>6s} {'time s':>8s} {'rounds/s':>9s} {'speedup':>8s} {'failed':>6s}")
for r in rows:
    sp = r["rounds_per_s"] / base if base and r["rounds_per_s"] else float("nan")
    print(f"{r['label']:28s} {r['rounds']:6d} {r['time_s']:8.2f} {r['rounds_per_s'] or 0:9.4f} {sp:7.2f}x {r['failed_clients']:6d}")
PYEOF
