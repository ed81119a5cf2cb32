#!/usr/bin/env bash
# Issue 10 in one device-tool call: the batched engine (clients on CUDA streams) against the
# sequential one, one process alone on the GPU, real CIFAR-10, paper protocol of the shipped
# recipes; then a 20-round accuracy curve of both engines (narrow ResNet FedMef).
#   bash benchmarks/gpu_issue10.sh           # from the repository root; needs carry/ (wheels, archive)
#   TESTS=1 runs the CUDA and kernel tests first; CONC=1 bench_concurrency.py (streams vs stacked network; CONC_ARGS);
#   NO_CURVES=1 skips the curves; RECIPES, ROUNDS, MAX_S, PRECISIONS, ENGINE_ARGS (more bench_engine.py options)
# Results: $OUT/engine.md, $OUT/engine.json, $OUT/curves.md.
set -u
export PYTHONUNBUFFERED=1 FEDMEF_CACHE=/tmp/fedmef-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DATA=${DATA:-carry/cifar10-jpeg-train.tar.xz}
python3 -m pip install -q --no-index --find-links carry/wheels click rich pyyaml > "$OUT/install.log" 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1
if [ -n "${TESTS:-}" ]; then  # the CUDA tests first (graphs, streams, padded short batches)
  python3 -m pip install -q --no-index --find-links carry/wheels pytest >> "$OUT/install.log" 2>&1
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_cuda_graphs.py tests/test_streams.py \
    tests/test_stepgraph.py 2>&1 | tail -15 > "$OUT/tests.txt"; tail -3 "$OUT/tests.txt"
fi
if [ -n "${CONC:-}" ]; then  # streams vs a stacked (grouped-conv) network, one graph: the ceiling of each
  (cd benchmarks && timeout 300 python3 bench_concurrency.py ${CONC_ARGS:---archs resnet18 --clients 1,4,10}) 2>&1 \
    | tee "$OUT/concurrency.md" | tail -14
fi
R=/tmp/gpu10; rm -rf $R; mkdir -p $R
python3 - "$R" <<'PY'
import sys, yaml
from fedmef_toolkit.recipe import resolve_recipe_path
out = sys.argv[1]
for name, path, change in [("fedmef_mobilenetv2_cifar10", "fedmef_mobilenetv2_cinic10.yaml", {"data": {"dataset": "cifar10"}}),
                           ("fedmef_narrow_cifar10", "fedmef_resnet18_cifar10.yaml", {"model": {"arch": "resnet_narrow"}})]:
    r = yaml.safe_load(resolve_recipe_path(path)[1])
    for section, kv in change.items():
        r[section].update(kv)
    r["name"] = name
    yaml.safe_dump(r, open(f"{out}/{name}.yaml", "w"))
PY
RECIPES=${RECIPES:-resnet18_cifar10.yaml,feddst_resnet18_cifar10.yaml,fedmef_resnet18_cifar10.yaml,$R/fedmef_mobilenetv2_cifar10.yaml,$R/fedmef_narrow_cifar10.yaml}
python3 benchmarks/bench_engine.py --data-root "$DATA" --recipes "$RECIPES" --precisions ${PRECISIONS:-bf16} \
  --rounds ${ROUNDS:-3} --max-seconds ${MAX_S:-330} --json "$OUT/engine.json" ${ENGINE_ARGS:-} 2>&1 | tee "$OUT/engine.log" | tail -12 > "$OUT/engine.md"
cat "$OUT/engine.md"
[ -n "${NO_CURVES:-}" ] && exit 0
# 20 rounds, both engines, same seed: accuracy curves (run-to-run noise: GPU kernels differ by stream)
for e in sequential batched; do
  timeout 200 fedmef train --recipe $R/fedmef_narrow_cifar10.yaml --set data.root=$DATA --set fl.engine=$e \
    --set fl.rounds=20 --set eval.every=2 --set precision=bf16 --set output.dir=$R/runs --set output.name=curve_$e \
    --set output.memory_report=false --no-progress > "$OUT/curve_$e.log" 2>&1 &
done
wait
python3 - "$R/runs" <<'PY' | tee "$OUT/curves.md"
import json, sys
from pathlib import Path
rows = {}
for e in ("sequential", "batched"):
    f = Path(sys.argv[1]) / f"curve_{e}" / "metrics.jsonl"
    rows[e] = {r["round"]: r for r in map(json.loads, f.read_text().splitlines()) if "eval_acc" in r} if f.exists() else {}
print("| round | sequential | batched |\n| ---: | ---: | ---: |")
for t in sorted(set(rows["sequential"]) | set(rows["batched"])):
    print(f"| {t} | " + " | ".join(f"{rows[e][t]['eval_acc']:.3f}" if t in rows[e] else "-" for e in rows) + " |")
PY
