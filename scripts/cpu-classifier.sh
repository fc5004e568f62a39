#!/usr/bin/env bash
# The CPU protocol of leaderboards/classifier-cifar10.md (issue 22), in resumable parts: an AirNet-w32 teacher
# (15 epochs, about 10 min on 2 cores), then every method x student x 3 seeds, 20 epochs on all 50,000 images.
# Each seed writes its result file when it finishes, and a seed whose file exists is skipped, so running this
# again after an interruption goes on where it stopped (the seed that was running starts over).
#   scripts/cpu-classifier.sh [STUDENT ...] [-- METHOD ...]     defaults: airnet_w16 airnet_w8 -- all methods
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 KDKIT_DATA_DIR=${KDKIT_DATA_DIR:-$PWD/../shared/data}
KD=${KD:-.venv/bin/python -m kdkit.cli}
students=(); methods=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do students+=("$1"); shift; done
[ $# -gt 0 ] && shift && methods=("$@")
[ ${#students[@]} -eq 0 ] && students=(airnet_w16 airnet_w8)
[ ${#methods[@]} -eq 0 ] && methods=(baseline kd dkd dist lskd nkd at crd)
$KD bench classifier method=teacher pair=airnet_w32-airnet_w16 seeds=1 protocol=cpu
for student in "${students[@]}"; do
  for method in "${methods[@]}"; do
    $KD bench classifier method=$method pair=airnet_w32-$student seeds=3 protocol=cpu
  done
done
