#!/usr/bin/env bash
# One device-tool call: install, simulator + step benchmarks, then the accuracy
# experiments as concurrent processes on the one GPU. Everything lands in $OUT.
#   PHASE=1: simulator throughput (fp32, bf16) and the step table in one process
#   PHASE=2: step diagnostics, then every accuracy experiment (issues 3, 4, 5) at once
#   PHASE=3: step table + SAP accuracy runs;  PHASE=4: step table, one process per config
#   PHASE=7: GPU tests, step table, profile (final check)
#   PHASE=6: fused kernels vs PyTorch ops, graphed and eager
#   PHASE=5: CUDA graphs: GPU tests, step table eager vs graphed, profile, simulator graphs on/off
set -u
export PYTHONUNBUFFERED=1 FEDMEF_CACHE=/tmp/fedmef-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PHASE=${PHASE:-1}; BUDGET=${BUDGET:-480}
# the device image has torch but may lack our CLI dependencies: carried wheels, no index
python3 -m pip install --no-index --find-links carry/wheels click rich pyyaml > "$OUT/install.log" 2>&1
python3 -m pip install --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1 || { echo "install failed"; tail -5 "$OUT/install.log"; }
python3 -c "import fedmef_toolkit.cli.main, click, rich, yaml, safetensors, scipy; print('imports ok')" || tail -5 "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
DATA=carry/cifar10-jpeg-train.tar.xz
R=runs
COMMON=(--set data.root=$DATA --set output.dir=$R --set precision=bf16 --set eval.every=5 --no-progress)
# phases that train need the carried archive; the step benchmarks and tests do not
[ -f "$DATA" ] && python3 -c "
from fedmef_toolkit.recipe import DataSpec; from fedmef_toolkit.data import load_data; import time; t=time.time()
load_data(DataSpec(dataset='cifar10', root='$DATA'), 'val', 0); print('decode+cache s', round(time.time()-t,1))"
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
# FedMef on ResNet18 / CIFAR-10 for the accuracy experiments: 40 rounds, 8 adjustments
MEF=(--set fl.rounds=40 --set fl.local_epochs=2 --set method.sparsity.delta_t=5 --set method.sparsity.t_end=50
     --set fl.lr=0.05 --set fl.momentum=0.9)
pids=()
sap_runs() {  # SAP gamma 0.5 and 0.9 (gamma 0 is the BaE run), in the background
  for g in 0.5 0.9; do
    timeout $(left) fedmef train --recipe fedmef_resnet18_cifar10.yaml "${COMMON[@]}" "${MEF[@]}" \
      --set output.name=fedmef_sap_$g --set method.sap.enabled=true --set method.sap.gamma=$g \
      > "$R-fedmef_sap_$g.log" 2>&1 & pids+=($!)
  done
}

if [ "$PHASE" = 7 ]; then
  # PHASE=7: final check: GPU tests, step table, profile
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_cuda_graphs.py tests/test_sap.py tests/test_nsconv.py 2>&1 \
    | grep -E "passed|failed|Error|assert|differs|SKIPPED" | head -40 | tee "$OUT/tests.txt"
  python3 benchmarks/bench_step.py --device cuda --out "$OUT/step_fused.json" 2>&1 | tail -12 | tee "$OUT/step.md"
  python3 benchmarks/profile_step.py --out "$OUT/profile.json" > "$OUT/profile.txt" 2>&1; grep "==\|CUDA graphs" "$OUT/profile.txt"
  exit 0
elif [ "$PHASE" = 6 ]; then
  # PHASE=6: fused kernels: GPU tests, step table with the kernels and without (FEDMEF_KERNELS=torch), profile, simulator
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_cuda_graphs.py tests/test_sap.py tests/test_nsconv.py 2>&1 \
    | grep -E "passed|failed|Error|assert|Mismatch|differs|Greatest" | head -40 | tee "$OUT/tests.txt"
  python3 benchmarks/bench_step.py --device cuda --out "$OUT/step_fused.json" 2>&1 | tail -12 | tee "$OUT/step.md"
  FEDMEF_KERNELS=torch python3 benchmarks/bench_step.py --device cuda --out "$OUT/step_torch.json" 2>&1 | tail -12 | tee -a "$OUT/step.md"
  python3 benchmarks/profile_step.py --out "$OUT/profile.json" > "$OUT/profile.txt" 2>&1; grep "==\|CUDA graphs" "$OUT/profile.txt"
  for g in true false; do
    fedmef train --recipe fedmef_resnet18_cifar10.yaml --set data.root=$DATA --set output.dir=$R --set output.name=mef_fused_graphs_$g \
      --set cuda_graphs=$g --set fl.rounds=3 --set fl.local_epochs=1 --set eval.every=3 --set method.sap.gamma=0.9 \
      --set method.sparsity.delta_t=2 --no-progress > "$R-mef_fused_graphs_$g.log" 2>&1
  done
  grep -h "CUDA graphs" $R-*.log
elif [ "$PHASE" = 5 ]; then
  # PHASE=5: CUDA graphs: GPU tests, step table (eager and graphed), profile, simulator with graphs on/off
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_sap.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
  python3 benchmarks/bench_step.py --device cuda --out "$OUT/step_fp32.json" 2>&1 | tail -12 | tee "$OUT/step.md"
  python3 benchmarks/profile_step.py --out "$OUT/profile.json" > "$OUT/profile.txt" 2>&1; grep "==\|CUDA graphs\|shape" "$OUT/profile.txt"
  for g in true false; do
    fedmef train --recipe resnet18_cifar10.yaml --set data.root=$DATA --set output.dir=$R --set output.name=sim_graphs_$g \
      --set cuda_graphs=$g --set fl.rounds=3 --set eval.every=3 --no-progress > "$R-sim_graphs_$g.log" 2>&1
    fedmef train --recipe fedmef_resnet18_cifar10.yaml --set data.root=$DATA --set output.dir=$R --set output.name=mef_graphs_$g \
      --set cuda_graphs=$g --set fl.rounds=3 --set fl.local_epochs=1 --set eval.every=3 --set method.sap.gamma=0.9 --set method.sparsity.delta_t=2 \
      --no-progress > "$R-mef_graphs_$g.log" 2>&1
  done
  grep -h "CUDA graphs" $R-*.log
elif [ "$PHASE" = 1 ]; then
  # issue 2: the simulator alone, ResNet18 FedAvg (BN), 3 rounds of the paper setting, fp32 and bf16
  for prec in fp32 bf16; do
    fedmef train --recipe resnet18_cifar10.yaml --set data.root=$DATA --set output.dir=$R --set output.name=sim_$prec \
      --set precision=$prec --set fl.rounds=3 --set eval.every=3 --no-progress > "$OUT/sim_$prec.log" 2>&1
  done
  python3 benchmarks/summarize_runs.py $R/sim_fp32 $R/sim_bf16 | tee "$OUT/sim.md"
  # issue 5: step memory/speed table
  python3 benchmarks/bench_step.py --device cuda --out "$OUT/step_fp32.json" | tee "$OUT/step.md"
  python3 benchmarks/bench_step.py --device cuda --bf16 --out "$OUT/step_bf16.json" | tee -a "$OUT/step.md"
elif [ "$PHASE" = 4 ]; then
  # PHASE=4: the step table only, one process per configuration
  python3 benchmarks/bench_step.py --device cuda --out "$OUT/step_fp32.json" 2>&1 | tee "$OUT/step.md"
  exit 0
elif [ "$PHASE" = 3 ]; then
  # PHASE=3: step table with the corrected peak measurement, SAP accuracy runs to 40 rounds
  python3 benchmarks/bench_step.py --device cuda --out "$OUT/step_fp32.json" > "$OUT/step.md" 2>&1
  cat "$OUT/step.md"
  sap_runs
  wait "${pids[@]}"
else
  # PHASE=2: step diagnostics, then every accuracy experiment at once (issues 3, 4, 5)
  python3 benchmarks/diag_step.py resnet18 > "$OUT/diag.txt" 2>&1
  for arch in resnet18 mobilenetv2; do for norm in bn nsconv; do for bs in 64 8; do
    timeout $(left) fedmef train --recipe ${arch}_cifar10.yaml "${COMMON[@]}" --set output.name=norm_${arch}_${norm}_b$bs \
      --set model.norm=$norm --set fl.batch_size=$bs --set fl.rounds=20 --set fl.local_epochs=1 \
      --set fl.lr=0.02 --set fl.momentum=0.9 > "$R-norm_${arch}_${norm}_b$bs.log" 2>&1 & pids+=($!)
  done; done; done
  for bae in true false; do
    timeout $(left) fedmef train --recipe fedmef_resnet18_cifar10.yaml "${COMMON[@]}" "${MEF[@]}" \
      --set output.name=fedmef_bae_$bae --set method.bae.enabled=$bae --set method.sap.enabled=false \
      > "$R-fedmef_bae_$bae.log" 2>&1 & pids+=($!)
  done
  sap_runs
  wait "${pids[@]}"
fi
python3 benchmarks/summarize_runs.py $R/* --json "$OUT/runs_phase$PHASE.json" | tee "$OUT/runs_phase$PHASE.md"
tail -n 3 $R-*.log > "$OUT/run_logs_tail.txt" 2>&1
