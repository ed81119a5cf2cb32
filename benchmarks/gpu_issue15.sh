#!/usr/bin/env bash
# Issue 15 experiments in one device-tool call (runs concurrently on one GPU).
#   PHASE=proxy: benchmarks/nsconv_proxy.py variants at once (PROXY="name|args;...")
#   PHASE=mbdw: MobileNetV2 with uncentred depthwise filters, BN vs NSConv, momentum settings
#   PHASE=sweep: static sparse FedAvg (density 0.1), BN vs NSConv variants, batch 64 and 8
#   PHASE=headc: centred classifier input at BN's learning rates (MobileNetV2 b64, ResNet18 b8)
#   PHASE=paper: paper protocol FedMef vs FedDST, ResNet18 and MobileNetV2 (resumable: rerun while warm;
#                RUNS= a subset, ENGINE= fl.engine, STATIC=1 adds the ResNet18 batch-64 static pair)
#                MBNOBAE=1 adds MobileNetV2 FedMef with BaE off (60 rounds: its adjustment drops
#                beside mef_mb's); STEP=1 runs bench_step.py alone first; PACK=1 packs each unfinished
#                run into $OUT/run-NAME.tar.xz so that a later session can go on: copy those files to
#                carry/ckpt/ and the next call restores them before resuming
#   PHASE=step:  bench_step.py (memory and speed of one client step)
# Needs carry/ (the CIFAR-10 archive; carry/wheels only where click/rich/pyyaml are missing).
# Results: $OUT/*.md and $OUT/metrics.tgz (at most 8 files come back).
set -u
export PYTHONUNBUFFERED=1 FEDMEF_CACHE=/tmp/fedmef-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PHASE=${PHASE:-sweep}; BUDGET=${BUDGET:-540}  # seconds from here to the runs' stop
start=$(date +%s)
python3 -m pip install --no-index --find-links carry/wheels click rich pyyaml > /tmp/install.log 2>&1
python3 -m pip install --no-deps --no-build-isolation -e . >> /tmp/install.log 2>&1 || tail -5 /tmp/install.log
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
DATA=carry/cifar10-jpeg-train.tar.xz
R=runs
mkdir -p $R
for f in carry/ckpt/run-*.tar.xz; do  # runs packed by an earlier call (PACK=1), unless already here
  [ -f "$f" ] || continue
  name=$(basename "$f" .tar.xz); name=${name#run-}
  [ -d "$R/$name" ] || { tar xJf "$f" -C $R && echo "restored $name (round $(python3 -c "import json;print(json.load(open('$R/$name/checkpoint.json'))['round'])"))"; }
done
python3 -c "
from fedmef_toolkit.recipe import DataSpec; from fedmef_toolkit.data import load_data
load_data(DataSpec(dataset='cifar10', root='$DATA'), 'val', 0)" || exit 1
bench_step() { python3 benchmarks/bench_step.py --device cuda --out "$1" 2>&1 | tail -12 | tee "$OUT/step.md"; }
if [ -n "${STEP:-}" ]; then  # alone on the GPU, before any run starts
  bench_step /tmp/step.json
fi
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
COMMON=(--set data.root=$DATA --set output.dir=$R --set precision=bf16 --set output.memory_report=false --no-progress)

launch() {  # launch NAME RECIPE [--set ...]: a new run, or resume it if its directory exists
  local name=$1 recipe=$2; shift 2
  if [ -f "$R/$name/checkpoint.json" ]; then
    timeout -s INT $(left) fedmef train --resume "$R/$name" --no-progress >> "$R-$name.log" 2>&1 &
  else
    rm -rf "$R/$name"
    timeout -s INT $(left) fedmef train --recipe "$recipe" "${COMMON[@]}" --set output.name=$name "$@" > "$R-$name.log" 2>&1 &
  fi
}

# static sparse FedAvg (1 local epoch, 10 clients a round), lr decayed 10x over 50 rounds; batch 8 runs 30 rounds
S=fedavg_sparse_resnet18_cifar10.yaml
B64=(--set fl.rounds=50 --set fl.local_epochs=1 --set eval.every=5 --set fl.lr_schedule=exp --set fl.lr_decay=0.955)
B8=(--set fl.rounds=30 --set fl.local_epochs=1 --set eval.every=5 --set fl.batch_size=8 --set fl.lr_schedule=exp --set fl.lr_decay=0.955)
NS=(--set model.norm=nsconv); CAL=(--set model.nsconv.calibrate=true); NOCAL=(--set model.nsconv.calibrate=false)
MB=(--set model.arch=mobilenetv2); NR=(--set model.arch=resnet_narrow); A16=(--set fl.agc=0.16)

if [ "$PHASE" = sweep ]; then
  B8+=(--set fl.lr=0.03)
  launch r18_bn $S "${B64[@]}" --set model.norm=bn --set fl.lr=0.1
  launch r18_ns $S "${B64[@]}" --set model.norm=nsconv --set fl.lr=0.1
  launch r18_ns_agc04 $S "${B64[@]}" --set model.norm=nsconv --set fl.lr=0.1 --set fl.agc=0.04
  launch r18_ns_agc16 $S "${B64[@]}" --set model.norm=nsconv --set fl.lr=0.1 --set fl.agc=0.16
  launch r18_bn_lr2 $S "${B64[@]}" --set model.norm=bn --set fl.lr=0.2
  launch r18_ns_lr2 $S "${B64[@]}" --set model.norm=nsconv --set fl.lr=0.2
  launch r18_ns_all $S "${B64[@]}" --set model.norm=nsconv --set fl.lr=0.1 --set model.nsconv.stats=all
  launch r18_ns_wd5 $S "${B64[@]}" --set model.norm=nsconv --set fl.lr=0.1 --set fl.weight_decay=5e-5
  launch mb_bn $S "${B64[@]}" --set model.arch=mobilenetv2 --set model.norm=bn --set fl.lr=0.1
  launch mb_ns $S "${B64[@]}" --set model.arch=mobilenetv2 --set model.norm=nsconv --set fl.lr=0.1
  launch mb_ns_agc04 $S "${B64[@]}" --set model.arch=mobilenetv2 --set model.norm=nsconv --set fl.lr=0.1 --set fl.agc=0.04
  launch r18_bn_b8 $S "${B8[@]}" --set model.norm=bn
  launch r18_ns_b8 $S "${B8[@]}" --set model.norm=nsconv
  launch mb_bn_b8 $S "${B8[@]}" --set model.arch=mobilenetv2 --set model.norm=bn
  launch mb_ns_b8 $S "${B8[@]}" --set model.arch=mobilenetv2 --set model.norm=nsconv
elif [ "$PHASE" = proxy ]; then  # centralised proxy variants at once: PROXY="name|args;name|args;..."
  IFS=';' read -ra SPECS <<< "${PROXY:-bn|--norm bn;ns|--norm nsconv;ns_centred|--variant dwcentred}"
  for spec in "${SPECS[@]}"; do
    name=${spec%%|*}; args=${spec#*|}
    timeout $(left) python3 benchmarks/nsconv_proxy.py --data $DATA --device cuda --bf16 $args > "$OUT/proxy-$name.log" 2>&1 &
  done
  wait
  for f in "$OUT"/proxy-*.log; do echo "$(basename $f .log): $(tail -1 $f)"; done | tee "$OUT/proxy.md"
elif [ "$PHASE" = mbdw ]; then  # MobileNetV2 with uncentred depthwise filters (momentum 0.9)
  M9=(--set fl.momentum=0.9)
  launch mb_bn_lr1 $S "${B64[@]}" "${MB[@]}" --set model.norm=bn --set fl.lr=0.1
  launch mb_bn_lr3 $S "${B64[@]}" "${MB[@]}" --set model.norm=bn --set fl.lr=0.3
  launch mb_bn_m9 $S "${B64[@]}" "${MB[@]}" --set model.norm=bn --set fl.lr=0.01 "${M9[@]}"
  launch mb_ns_m9 $S "${B64[@]}" "${MB[@]}" "${NS[@]}" --set fl.lr=0.01 "${M9[@]}"
  launch mb_ns_m9_lr2 $S "${B64[@]}" "${MB[@]}" "${NS[@]}" --set fl.lr=0.02 "${M9[@]}"
  launch mb_ns_m9_lr2_agc $S "${B64[@]}" "${MB[@]}" "${NS[@]}" --set fl.lr=0.02 "${M9[@]}" "${A16[@]}"
  launch mb_ns_lr03 $S "${B64[@]}" "${MB[@]}" "${NS[@]}" --set fl.lr=0.03
  launch mb_bn_b8 $S "${B8[@]}" "${MB[@]}" --set model.norm=bn --set fl.lr=0.03
  launch mb_bn_b8_m9 $S "${B8[@]}" "${MB[@]}" --set model.norm=bn --set fl.lr=0.003 "${M9[@]}"
  launch mb_ns_b8_m9 $S "${B8[@]}" "${MB[@]}" "${NS[@]}" --set fl.lr=0.003 "${M9[@]}"
  launch mb_ns_b8_m9_lr1 $S "${B8[@]}" "${MB[@]}" "${NS[@]}" --set fl.lr=0.001 "${M9[@]}"
  launch r18_bn_b8 $S "${B8[@]}" --set model.norm=bn --set fl.lr=0.03
  launch r18_bn_b8_m9 $S "${B8[@]}" --set model.norm=bn --set fl.lr=0.003 "${M9[@]}"
  launch r18_ns_b8_m9 $S "${B8[@]}" "${NS[@]}" "${CAL[@]}" "${A16[@]}" --set model.nsconv.alpha=0.5 --set fl.lr=0.003 "${M9[@]}"
elif [ "$PHASE" = sweep2 ]; then
  B64+=(--set fl.lr=0.1)
  B8+=(--set fl.lr=0.03)
  launch r18_bn $S "${B64[@]}" --set model.norm=bn
  launch r18_ns_cal $S "${B64[@]}" "${NS[@]}" "${CAL[@]}"
  launch r18_ns_cal_a5 $S "${B64[@]}" "${NS[@]}" "${CAL[@]}" --set model.nsconv.alpha=0.5
  launch r18_ns_a5 $S "${B64[@]}" "${NS[@]}" "${NOCAL[@]}" --set model.nsconv.alpha=0.5
  launch r18_ns_cal_lr2 $S "${B64[@]}" "${NS[@]}" "${CAL[@]}" --set fl.lr=0.2
  launch mb_ns_cal $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${CAL[@]}"
  launch mb_ns_cal_a5 $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${CAL[@]}" --set model.nsconv.alpha=0.5
  launch mb_ns_a5 $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${NOCAL[@]}" --set model.nsconv.alpha=0.5
  launch r18_ns_cal_b8 $S "${B8[@]}" "${NS[@]}" "${CAL[@]}"
  launch mb_ns_cal_b8 $S "${B8[@]}" "${MB[@]}" "${NS[@]}" "${CAL[@]}"
  launch nr_bn $S "${B64[@]}" "${NR[@]}" --set model.norm=bn
  launch nr_ns $S "${B64[@]}" "${NR[@]}" "${NS[@]}" "${NOCAL[@]}"
  launch nr_ns_cal $S "${B64[@]}" "${NR[@]}" "${NS[@]}" "${CAL[@]}"
elif [ "$PHASE" = sweep3 ]; then
  B64+=(--set fl.lr=0.1)
  launch r18_ns_cal_agc16 $S "${B64[@]}" "${NS[@]}" "${CAL[@]}" --set fl.agc=0.16
  launch r18_ns_cal_agc04 $S "${B64[@]}" "${NS[@]}" "${CAL[@]}" --set fl.agc=0.04
  launch r18_ns_cal_a5_agc16 $S "${B64[@]}" "${NS[@]}" "${CAL[@]}" --set fl.agc=0.16 --set model.nsconv.alpha=0.5
  launch r18_ns_cal_lr3_agc16 $S "${B64[@]}" "${NS[@]}" "${CAL[@]}" --set fl.agc=0.16 --set fl.lr=0.3
  launch r18_ns_cal_lr3_agc04 $S "${B64[@]}" "${NS[@]}" "${CAL[@]}" --set fl.agc=0.04 --set fl.lr=0.3
  launch r18_bn_lr3 $S "${B64[@]}" --set model.norm=bn --set fl.lr=0.3
  launch r18_ns_cal_a1_agc16 $S "${B64[@]}" "${NS[@]}" "${CAL[@]}" --set fl.agc=0.16 --set model.nsconv.alpha=1.0
  launch mb_ns_agc16 $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${NOCAL[@]}" --set fl.agc=0.16
  launch mb_ns_lr3_agc16 $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${NOCAL[@]}" --set fl.agc=0.16 --set fl.lr=0.3
  launch mb_ns_a5_agc16 $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${NOCAL[@]}" --set fl.agc=0.16 --set model.nsconv.alpha=0.5
  launch mb_ns_cal_lr3_agc16 $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${CAL[@]}" --set fl.agc=0.16 --set fl.lr=0.3
  launch mb_bn_lr3 $S "${B64[@]}" "${MB[@]}" --set model.norm=bn --set fl.lr=0.3
elif [ "$PHASE" = sweep4 ]; then
  launch r18_ns_lr3_a5 $S "${B64[@]}" "${NS[@]}" "${CAL[@]}" "${A16[@]}" --set fl.lr=0.3 --set model.nsconv.alpha=0.5
  launch r18_ns_lr3_agc32 $S "${B64[@]}" "${NS[@]}" "${CAL[@]}" --set fl.agc=0.32 --set fl.lr=0.3
  launch r18_ns_lr5 $S "${B64[@]}" "${NS[@]}" "${CAL[@]}" "${A16[@]}" --set fl.lr=0.5
  launch r18_ns_b8_lr1 $S "${B8[@]}" "${NS[@]}" "${CAL[@]}" "${A16[@]}" --set fl.lr=0.1
  launch r18_bn_b8_lr1 $S "${B8[@]}" --set model.norm=bn --set fl.lr=0.1
  launch mb_ns_dw $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${NOCAL[@]}" --set fl.lr=0.1
  launch mb_ns_dw_cal $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${CAL[@]}" --set fl.lr=0.1
  launch mb_ns_dw_cal_lr3 $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${CAL[@]}" "${A16[@]}" --set fl.lr=0.3
  launch mb_ns_dw_lr3 $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${NOCAL[@]}" "${A16[@]}" --set fl.lr=0.3
  launch mb_ns_dw_cal_a5_lr3 $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${CAL[@]}" "${A16[@]}" --set fl.lr=0.3 --set model.nsconv.alpha=0.5
  launch mb_ns_b8_lr1 $S "${B8[@]}" "${MB[@]}" "${NS[@]}" "${CAL[@]}" "${A16[@]}" --set fl.lr=0.1
  launch mb_bn_b8_lr1 $S "${B8[@]}" "${MB[@]}" --set model.norm=bn --set fl.lr=0.1
elif [ "$PHASE" = sweep5 ]; then
  # MobileNetV2 with the BN-free ReLU unclipped (sweeps 1-4 clipped it at 6)
  launch mb_ns_u $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${NOCAL[@]}" --set fl.lr=0.1
  launch mb_ns_u_r18recipe $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${CAL[@]}" "${A16[@]}" --set fl.lr=0.3 --set model.nsconv.alpha=0.5
  launch mb_ns_u_lr3 $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${NOCAL[@]}" "${A16[@]}" --set fl.lr=0.3
  launch mb_ns_u_cal_lr1 $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${CAL[@]}" "${A16[@]}" --set fl.lr=0.1
elif [ "$PHASE" = headc ]; then  # centred classifier input (model.nsconv.center_head): BN's learning rates
  HC=(--set model.nsconv.center_head=true)
  launch mb_bn_lr1 $S "${B64[@]}" "${MB[@]}" --set model.norm=bn --set fl.lr=0.1
  launch mb_ns_hc_lr1 $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${HC[@]}" --set fl.lr=0.1
  launch mb_ns_hc_lr1_agc $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${HC[@]}" "${A16[@]}" --set fl.lr=0.1
  launch mb_ns_hc_lr3_agc $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${HC[@]}" "${A16[@]}" --set fl.lr=0.3
  launch mb_ns_hc_lr1_agc_cal $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${HC[@]}" "${A16[@]}" "${CAL[@]}" --set fl.lr=0.1
  launch mb_ns_hc_lr1_agc_a5 $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${HC[@]}" "${A16[@]}" --set model.nsconv.alpha=0.5 --set fl.lr=0.1
  launch mb_ns_hc_m9 $S "${B64[@]}" "${MB[@]}" "${NS[@]}" "${HC[@]}" --set fl.lr=0.01 --set fl.momentum=0.9
  launch r18_bn_b8 $S "${B8[@]}" --set model.norm=bn --set fl.lr=0.03
  launch r18_bn_b8_m9 $S "${B8[@]}" --set model.norm=bn --set fl.lr=0.003 --set fl.momentum=0.9
  R18=("${NS[@]}" "${CAL[@]}" --set model.nsconv.alpha=0.5)
  launch r18_ns_b8_hc_lr1 $S "${B8[@]}" "${R18[@]}" "${HC[@]}" "${A16[@]}" --set fl.lr=0.1
  launch r18_ns_b8_hc_lr03 $S "${B8[@]}" "${R18[@]}" "${HC[@]}" "${A16[@]}" --set fl.lr=0.03
  launch r18_ns_b8_hc_lr3 $S "${B8[@]}" "${R18[@]}" "${HC[@]}" "${A16[@]}" --set fl.lr=0.3
  launch r18_ns_b8_lr05 $S "${B8[@]}" "${R18[@]}" "${A16[@]}" --set fl.lr=0.05
  launch r18_ns_b8_hc_lr1_agc08 $S "${B8[@]}" "${R18[@]}" "${HC[@]}" --set fl.agc=0.08 --set fl.lr=0.1
  launch r18_ns_hc $S "${B64[@]}" "${R18[@]}" "${HC[@]}" "${A16[@]}" --set fl.lr=0.3
elif [ "$PHASE" = paper ]; then
  P=(--set eval.every=10 --set output.checkpoint_every=10 --set fl.rounds=${ROUNDS:-200} --set fl.engine=${ENGINE:-auto})
  if [ -n "${STATIC:-}" ]; then  # the batch-64 static sparse ResNet18 pair of the headc phase, same call
    launch r18_bn $S "${B64[@]}" --set model.norm=bn --set fl.lr=0.1
    launch r18_ns_hc $S "${B64[@]}" "${NS[@]}" "${CAL[@]}" --set model.nsconv.alpha=0.5 \
      --set model.nsconv.center_head=true "${A16[@]}" --set fl.lr=0.3
  fi
  # the shipped recipes; MobileNetV2 on CIFAR-10 (the archive at hand), FedDST with its own settings
  RUNS=${RUNS:-mef_r18 dst_r18 mef_mb dst_mb}  # a subset, e.g. RUNS="mef_mb dst_mb"
  want() { [[ " $RUNS " == *" $1 "* ]]; }
  want mef_r18 && launch mef_r18 fedmef_resnet18_cifar10.yaml "${P[@]}"
  want dst_r18 && launch dst_r18 feddst_resnet18_cifar10.yaml "${P[@]}"
  want mef_mb && launch mef_mb fedmef_mobilenetv2_cinic10.yaml "${P[@]}" --set data.dataset=cifar10
  want dst_mb && launch dst_mb feddst_resnet18_cifar10.yaml "${P[@]}" --set model.arch=mobilenetv2
  if [ -n "${MBNOBAE:-}" ]; then  # BaE off, everything else as mef_mb: its adjustment drops beside mef_mb's
    launch mef_mb_nobae fedmef_mobilenetv2_cinic10.yaml "${P[@]}" --set data.dataset=cifar10 \
      --set fl.rounds=60 --set method.bae.enabled=false
  fi
elif [ "$PHASE" = step ]; then
  bench_step "$OUT/step.json"
fi
wait
python3 benchmarks/summarize_runs.py $R/* > "$OUT/summary.txt" 2>&1
python3 - "$R" <<'PY' | tee "$OUT/table.md"
import json, sys
from pathlib import Path
for d in sorted(Path(sys.argv[1]).iterdir()):
    f = d / "metrics.jsonl"
    if not f.exists():
        continue
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    ev = [(r["round"], r["eval_acc"]) for r in rows if "eval_acc" in r]
    print(f"| {d.name} | {rows[-1]['round'] if rows else 0} | " + " ".join(f"{t}:{a:.3f}" for t, a in ev[-8:]) + " |")
PY
grep -l -i -E "Traceback|Error" $R-*.log 2>/dev/null | head; for f in $(grep -l -i -E "Traceback|Error" $R-*.log 2>/dev/null | head -3); do tail -3 $f; done
tar czf "$OUT/metrics.tgz" $R/*/metrics.jsonl $R/*/recipe.yaml $R-*.log 2>/dev/null
if [ -n "${PACK:-}" ]; then  # unfinished runs, for a later machine (see the top of this file)
  for d in $R/*/; do
    name=$(basename $d)
    [ -f "$d/checkpoint.json" ] && [ ! -f "$d/model.safetensors" ] || continue
    tar cf - -C $R "$name" | xz -T0 -6 > "$OUT/run-$name.tar.xz"
    echo "packed $name: $(du -h "$OUT/run-$name.tar.xz" | cut -f1)"
  done
fi
echo "left $(left) s"
