#!/usr/bin/env bash
# Reference code that kdkit's benches run beside kdkit, fetched into .refs/ (git-ignored, never committed).
# Nothing here is needed by the tests: a bench skips its reference with one line when the code is absent.
#
#   bash scripts/fetch-refs.sh              # every reference
#   bash scripts/fetch-refs.sh mdistiller   # one
set -euo pipefail
cd "$(dirname "$0")/.."
REFS=${KDKIT_REFS_DIR:-$PWD/.refs}
PY=${PY:-.venv/bin/python}

fetch() {  # fetch NAME URL COMMIT: a clone of URL checked out at COMMIT in $REFS/NAME
  local dir=$REFS/$1
  if [ -d "$dir/.git" ] && [ "$(git -C "$dir" rev-parse HEAD)" = "$3" ]; then return; fi
  rm -rf "$dir"
  git clone -q "$2" "$dir"
  git -C "$dir" checkout -q "$3"
}

# megvii-research/mdistiller: `kdkit bench throughput variants=mdistiller` (kdkit/bench/mdistiller_loop.py) runs
# its KD distiller and BaseTrainer.train_iter. Its CFG needs yacs; tensorboardX is stubbed when missing.
mdistiller() {
  fetch mdistiller https://github.com/megvii-research/mdistiller a08d46f10d6102bd6e3f258ca5ac880b020ea259
  $PY -m pip install -q yacs
}

for name in "${@:-mdistiller}"; do
  case $name in
    mdistiller) mdistiller ;;
    *) echo "fetch-refs.sh: error: unknown reference '$name' (known: mdistiller)" >&2; exit 2 ;;
  esac
done
