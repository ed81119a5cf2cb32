#!/bin/bash
# Issue 15, BaE: on the CPU, FedMef on the narrow NSConv ResNet with large prune fractions, with and without BaE.
# Usage: [DATA=archive] [OUT=dir] bash benchmarks/cpu_bae_drop.sh; about 35 minutes on 2 cores.
D=${DATA:-../shared/data/cifar10-jpeg-train.tar.xz}
O=${OUT:-/tmp/bae}; mkdir -p "$O"
run() { name=$1; shift
  rm -rf "$O/runs/$name"  # this script's own run directories
  OMP_NUM_THREADS=1 fedmef train --recipe fedmef_resnet18_cifar10.yaml --set data.root=$D --set model.arch=resnet_narrow \
    --set device=cpu --set fl.local_epochs=1 --set fl.rounds=30 --set method.sparsity.delta_t=5 --set method.sparsity.t_end=30 \
    --set method.sap.enabled=false --set eval.every=5 --set output.dir=$O/runs --set output.name=$name \
    --set output.memory_report=false --no-progress "$@" > $O/$name.log 2>&1
}
run a5_bae --set method.sparsity.alpha=0.5 --set method.bae.enabled=true &
run a5_nobae --set method.sparsity.alpha=0.5 --set method.bae.enabled=false &
wait
run a8_bae --set method.sparsity.alpha=0.8 --set method.bae.enabled=true --set method.bae.lam=0.1 &
run a8_nobae --set method.sparsity.alpha=0.8 --set method.bae.enabled=false &
wait
