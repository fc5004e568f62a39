#!/usr/bin/env bash
# The CPU rows of leaderboards/kernels.md: fp32 and bf16, fkl/rkl/jsd, dense and top-k teachers, three shapes,
# plain PyTorch, Liger and kdkit side by side in each run. BEFORE=<commit> also measures that commit's kdkit-torch
# (from a git worktree) and merges its rows tagged "before". Each `kdkit bench kernels` call writes its rows as it
# goes; a finished step is skipped on a rerun (marker files under $STATE).
set -euo pipefail
cd "$(dirname "$0")/.."
KD=${KD:-.venv/bin/kdkit}
STATE=${STATE:-.cache/bench-kernels-cpu}
mkdir -p "$STATE"
step() {  # step NAME ARGS...: run `kdkit bench kernels ARGS` once
  local name=$1; shift
  [[ -e "$STATE/$name.done" ]] && { echo "skip $name"; return; }
  "$KD" bench kernels "$@"
  touch "$STATE/$name.done"
}
DIVS=divergences=fkl,rkl,jsd
step fp32-dense $DIVS dtype=float32 repeats=3
step bf16-dense $DIVS dtype=bfloat16 repeats=3
step fp32-topk $DIVS dtype=float32 teacher=topk topk=64 impls=plain,kdkit-compiled,kdkit-torch
step bf16-topk $DIVS dtype=bfloat16 teacher=topk topk=64 impls=plain,kdkit-compiled,kdkit-torch
if [[ -n "${BEFORE:-}" ]]; then
  tree=/tmp/kdkit-before-$BEFORE
  [[ -d $tree ]] || git worktree add -f "$tree" "$BEFORE"
  for dt in float32 bfloat16; do
    name=before-$dt
    [[ -e "$STATE/$name.done" ]] && continue
    (cd "$tree" && PYTHONPATH="$tree" "$OLDPWD/.venv/bin/python" -m kdkit.cli bench kernels $DIVS dtype=$dt \
       impls=kdkit-torch out="$OLDPWD/$STATE/before")
    .venv/bin/python - "$STATE/before" "$BEFORE" <<'PY'
import json, sys
from pathlib import Path
from kdkit.bench.kernels import RESULTS_DIR, _row_order, write_kernels_markdown
src, commit = Path(sys.argv[1]), sys.argv[2]
for f in src.glob("*.json"):
    new = json.loads(f.read_text())
    dst = RESULTS_DIR / "kernels" / f.name
    rec = json.loads(dst.read_text())
    key = lambda r: (r["impl"], r.get("tag", ""), r.get("teacher", "dense"), r["divergence"], r["tokens"], r["hidden"],
                     r["vocab"], r["dtype"])
    rows = {key(r): r for r in rec["rows"]}
    for r in new["rows"]:
        r |= {"tag": f"before, {commit}", "teacher": "dense"}
        rows[key(r)] = r
    rec["rows"] = sorted(rows.values(), key=_row_order)
    dst.write_text(json.dumps(rec, indent=1))
print("wrote", write_kernels_markdown())
PY
    touch "$STATE/$name.done"
  done
fi
