#!/usr/bin/env bash
# The CIFAR-10 leaderboard runs on a lent GPU (see leaderboards/classifier-cifar10.md), in phases:
#   scripts/gpu-classifier.sh bench                     throughput: plain PyTorch loop vs kdkit (fp32, fast)
#   scripts/gpu-classifier.sh teachers EPOCHS ARCH...   train teachers concurrently (one process each)
#   scripts/gpu-classifier.sh students EPOCHS PAIR...   baseline, KD, DKD x 3 seeds per pair, all concurrently
#   scripts/gpu-classifier.sh pack                      results (+ small teacher weights) into $OUT
# Needs KDKIT_DATA_DIR with cifar10/*.parquet. Small runs share the GPU as separate processes.
# Not yet run on a GPU: the task that wrote it had no device lent (see the issue notes).
set -uo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2}
export KDKIT_CACHE_DIR=${KDKIT_CACHE_DIR:-$PWD/.cache}
PY=${PY:-python3}
OUT=${OUT:-runs/out}
mkdir -p "$OUT" runs
phase=$1; shift
case "$phase" in
  bench)
    $PY -c "from kdkit.data import load_cifar10; load_cifar10('train'); load_cifar10('test')"
    $PY -m kdkit.cli bench throughput variants=${VARIANTS:-plain,fp32,fast} steps=${STEPS:-200} warmup=${WARMUP:-30} 2>&1 | grep -v Warning
    ;;
  teachers)
    epochs=$1; shift
    for arch in "$@"; do
      $PY -m kdkit.cli bench classifier method=teacher pair=$arch-$arch seeds=1 epochs=$epochs > runs/teacher-$arch.out 2>&1 &
    done
    wait; tail -n 3 runs/teacher-*.out
    ;;
  students)
    epochs=$1; shift
    for pair in "$@"; do
      for method in baseline kd dkd; do
        $PY -m kdkit.cli bench classifier method=$method pair=$pair seeds=3 jobs=3 epochs=$epochs > runs/$method-$pair.out 2>&1 &
      done
    done
    wait; tail -n 2 runs/*-*-*.out
    ;;
  pack)
    $PY -m kdkit.cli bench classifier-table
    tar czf "$OUT/results.tgz" leaderboards runs/*.out runs/bench-classifier/*.log runs/bench-classifier/*/metrics.json 2>/dev/null
    ls -la "$OUT"
    ;;
  *) echo "unknown phase $phase"; exit 2;;
esac
