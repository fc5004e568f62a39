#!/usr/bin/env bash
# The CPU-scale rows of leaderboards/condense-cifar10.md: DM, MTT and DATM at IPC 1 and 10 on one shared budget
# (ConvNet-3 width 32, 5,000 training images, 5 experts x 10 epochs, 200 iterations, N = 20 student steps,
# evaluation 3 nets x 300 epochs on 2,000 test images, DD-Ranking's full-data network 100 epochs), each beside the
# same number of random real images. Resumable row by row: a finished row leaves .cache/cpu-condense/<row>.done
# (its result file is already in leaderboards/results/condense-cifar10/); rerun the script to go on.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 KDKIT_DATA_DIR=${KDKIT_DATA_DIR:-$PWD/../shared/data}
KD=${KD:-.venv/bin/python -m kdkit.cli}
RUNS=${RUNS:-$PWD/.cache/cpu-condense}
mkdir -p "$RUNS"
COMMON="width=32 train_subset=5000 test_subset=2000 zca=false eval_epochs=300 eval_nets=3 full_epochs=100
  iterations=200 output_dir=$RUNS/runs checkpoint_every=50 progress=false"
TM="experts=5 expert_epochs=10 syn_steps=20 match_epochs=2 tesla=true"  # the exact adjoint: fastest compiled, flat memory
row() {  # row NAME ARGS...: one bench run unless it finished before
  local name=$1; shift
  [[ -f "$RUNS/$name.done" ]] && { echo "skip $name (done)"; return; }
  $KD bench condense-images "$@" && touch "$RUNS/$name.done"
}
row dm-10 methods=dm ipcs=10 $COMMON batch_real=64
row dm-1 methods=dm ipcs=1 $COMMON batch_real=64
# the papers' per-IPC settings (recipes/condense-cifar10-{mtt,datm}-ipc{1,10}.yaml) with start epochs scaled to
# 10-epoch experts; DATM's window growth and EMA are scaled to the run's length by the method itself
row mtt-10 methods=mtt ipcs=10 $COMMON $TM max_start_epoch=5 lr_img=1000 lr_lr=1e-5
row mtt-1 methods=mtt ipcs=1 $COMMON $TM max_start_epoch=2 lr_img=1000 lr_lr=1e-7
row datm-10 methods=datm ipcs=10 $COMMON $TM current_max_start=3 max_start_epoch=5 lr_img=100 lr_lr=1e-5 lr_y=2
row datm-1 methods=datm ipcs=1 $COMMON $TM current_max_start=4 max_start_epoch=4 lr_img=100 lr_lr=1e-7 lr_y=5 \
  expand_until=0 ema_decay=0.995
