#!/usr/bin/env bash
# The CPU-scale rows of leaderboards/classifier-cifar10.md (what 2 CPU cores can measure in about an hour):
# a ConvNet-3 width-32 teacher (4 epochs, all 50,000 images), then no-teacher / KD / DKD students of width 16
# and 8, 3 seeds each, 15 epochs on 500 images per class, evaluated on the full test split.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 KDKIT_DATA_DIR=${KDKIT_DATA_DIR:-$PWD/../shared/data}
KD=${KD:-.venv/bin/python -m kdkit.cli}
$KD bench classifier method=teacher pair=convnet3_w32-convnet3_w16 seeds=1 epochs=4 trainer.threads=2
for student in convnet3_w16 convnet3_w8; do
  for method in baseline kd dkd; do
    $KD bench classifier method=$method pair=convnet3_w32-$student seeds=3 jobs=2 epochs=15 \
      data.train_per_class=500 trainer.threads=1
  done
done
