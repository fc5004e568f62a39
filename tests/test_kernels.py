"""`kdkit.kernels.fused_linear_kd`: the chunked torch reference against plain PyTorch (materialised logits +
`token_kd_loss` + cross-entropy, autograd), its memory bound, its input errors, the Triton kernel under Triton's
CPU interpreter against the reference, and the `bench kernels` result files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdkit.errors import ConfigError, ShapeMismatchError
from kdkit.kernels import fused_linear_kd
from kdkit.losses.token import DIVERGENCES, divergence_from_logprobs, sparse_to_dense_logprobs

N, HS, HT, V, CHUNK = 50, 12, 10, 97, 16  # N is not a multiple of CHUNK: the last chunk is ragged


def make(dtype=torch.float32, seed=0, bias=True, n=N, hs=HS, ht=HT, v=V):
    """Student (leaf tensors) and teacher inputs, labels with ignored tokens, per-token weights."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = {"h_s": r(n, hs).requires_grad_(), "w_s": r(v, hs, scale=0.5).requires_grad_(),
         "h_t": r(n, ht), "w_t": r(v, ht, scale=0.5), "b_s": None, "b_t": None}
    if bias:
        x["b_s"], x["b_t"] = r(v, scale=0.3).requires_grad_(), r(v, scale=0.3)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    x["labels"], x["weights"] = labels, torch.rand(n, generator=g, dtype=torch.float64).to(dtype) + 0.5
    return x


def plain(x, divergence, *, T=1.0, beta=0.5, skew=0.1, kd_weight=1.0, ce_weight=0.0, weighted=True,
          teacher_logprobs=None, labels=True):
    """The unfused definition: full logits, kdkit's divergence in the inputs' precision (>= fp32), autograd."""
    compute = torch.float64 if x["h_s"].dtype == torch.float64 else torch.float32
    z = x["h_s"] @ x["w_s"].T + (0 if x["b_s"] is None else x["b_s"])
    t = teacher_logprobs if teacher_logprobs is not None else x["h_t"] @ x["w_t"].T + (0 if x["b_t"] is None
                                                                                       else x["b_t"])
    log_q = F.log_softmax(z.to(compute) / T, -1)
    log_p = F.log_softmax(t.to(compute) / T, -1)
    d = divergence_from_logprobs(log_q, log_p, divergence, beta=beta, skew=skew) * T * T
    if weighted:
        d = d * x["weights"].to(compute)
    mask = x["labels"] != -100 if labels else torch.ones(len(d), dtype=torch.bool)
    loss = kd_weight * torch.where(mask, d, 0.0).sum() / mask.sum()
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(z.to(compute), x["labels"], ignore_index=-100)
    return loss


def fused(x, divergence, *, weighted=True, labels=True, **kw):
    kw.setdefault("chunk_size", CHUNK)
    return fused_linear_kd(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["labels"] if labels else None,
                           divergence=divergence, weights=x["weights"] if weighted else None,
                           student_bias=x["b_s"], teacher_bias=x["b_t"], **kw)


def grads(loss, x):
    params = [x["h_s"], x["w_s"]] + ([x["b_s"]] if x["b_s"] is not None else [])
    return torch.autograd.grad(loss, params)


def assert_matches(got, want, rel):
    """Loss to `rel` relative; each gradient to `rel` of its largest entry, elementwise."""
    (lg, gg), (lw, gw) = got, want
    assert lg.item() == pytest.approx(lw.item(), rel=rel, abs=rel * 1e-3), (lg.item(), lw.item())
    for a, b in zip(gg, gw):
        assert a.dtype == b.dtype and a.shape == b.shape
        err = (a - b).abs().max().item()
        assert err <= rel * b.abs().max().item(), (err, b.abs().max().item())


def both(x, divergence, **kw):
    """(loss, grads) of the fused torch reference and of the plain definition on the same inputs."""
    f = fused(x, divergence, backend="torch", **kw)
    p = plain(x, divergence, **kw)
    return (f, grads(f, x)), (p, grads(p, x))


# ---- torch reference vs plain PyTorch ----

@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_matches_plain_float32(divergence):
    x = make(torch.float32)
    got, want = both(x, divergence, T=2.0, kd_weight=0.7, ce_weight=0.3)
    assert_matches(got, want, 1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_matches_plain_float64(divergence):
    x = make(torch.float64, seed=1)
    got, want = both(x, divergence, T=3.0, beta=0.3, skew=0.2, kd_weight=1.3, ce_weight=0.5)
    assert got[0].dtype == torch.float64
    assert_matches(got, want, 1e-10)


@pytest.mark.parametrize("divergence,kw", [("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}), ("skl", {"skew": 0.0}),
                                           ("srkl", {"skew": 0.0}), ("tvd", {"T": 0.5})])
def test_reference_parameter_edges(divergence, kw):
    """beta=0/1 are forward/reverse KL, skew=0 the plain KLs (token.py's conventions), T < 1 sharpens."""
    x = make(torch.float64, seed=2, bias=False)
    got, want = both(x, divergence, weighted=False, **kw)
    assert_matches(got, want, 1e-10)


def test_reference_without_labels_counts_every_token():
    x = make(torch.float64, seed=3)
    got, want = both(x, "rkl", labels=False)
    assert_matches(got, want, 1e-10)


@pytest.mark.parametrize("fill,divergence", [*(("uniform", d) for d in DIVERGENCES), ("none", "fkl")])
def test_reference_sparse_topk_teacher(fill, divergence):
    """Top-k ids + log-probs densified per chunk equal token_kd_loss on the densified teacher, T included."""
    x = make(torch.float64, seed=4)
    full = torch.log_softmax(x["h_t"] @ x["w_t"].T + x["b_t"], -1)
    lp, idx = full.topk(8, -1)
    kw = dict(T=1.5, ce_weight=0.2)
    f = fused_linear_kd(x["h_s"], x["w_s"], None, None, x["labels"], divergence=divergence,
                        weights=x["weights"], student_bias=x["b_s"], teacher_topk_indices=idx,
                        teacher_topk_logprobs=lp, topk_fill=fill, chunk_size=CHUNK, backend="torch", **kw)
    p = plain(x, divergence, teacher_logprobs=sparse_to_dense_logprobs(idx, lp, V, fill), **kw)
    assert torch.isfinite(f)
    assert_matches((f, grads(f, x)), (p, grads(p, x)), 1e-10)


@pytest.mark.parametrize("divergence,topk", [("jsd", False), ("rkl", True)])
def test_compiled_backend_matches_plain_float64(divergence, topk):
    """backend='compiled' (torch.compile per row block, the CPU default for large calls) is the same math: float64
    agreement with the plain definition, dense and top-k teachers. V = 4096 gives full blocks and a ragged one."""
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    x = make(torch.float64, seed=7, n=40, v=4096)
    kw = dict(T=1.5, beta=0.3, ce_weight=0.2)
    if topk:
        full = torch.log_softmax(x["h_t"] @ x["w_t"].T + x["b_t"], -1)
        lp, idx = full.topk(16, -1)
        f = fused_linear_kd(x["h_s"], x["w_s"], None, None, x["labels"], divergence=divergence,
                            weights=x["weights"], student_bias=x["b_s"], teacher_topk_indices=idx,
                            teacher_topk_logprobs=lp, chunk_size=24, backend="compiled", **kw)
        p = plain(x, divergence, teacher_logprobs=sparse_to_dense_logprobs(idx, lp, 4096), **kw)
    else:
        f = fused(x, divergence, backend="compiled", chunk_size=24, **kw)
        p = plain(x, divergence, **kw)
    assert_matches((f, grads(f, x)), (p, grads(p, x)), 1e-10)


@pytest.mark.parametrize("divergence,beta", [("fkl", 0.0), ("rkl", 1.0), ("jsd", 0.5), ("jsd", 0.9)])
def test_fused_matches_liger_fused_linear_jsd(divergence, beta):
    """kdkit's fused kernel against Liger-Kernel's LigerFusedLinearJSDLoss on the same inputs (float32, T = 2):
    Liger has no T^2 factor and sums over the batch's unmasked tokens divided by their count, so
    kdkit = T^2 * Liger; gradients likewise."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    x = make(torch.float32, seed=8, bias=False)
    T = 2.0
    f = fused(x, divergence, weighted=False, T=T, beta=beta, backend="torch")
    mod = liger.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=T,
                                        chunk_size=CHUNK, compiled=False)
    ref = mod(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["labels"]) * T * T
    got_g, ref_g = grads(f, x), grads(ref, x)
    assert f.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(got_g, ref_g):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


def test_reference_ce_only_and_grad_output_scaling():
    """kd_weight=0 is plain token-mean CE; backward scales the stored gradients by grad_output."""
    x = make(torch.float64, seed=5)
    f = fused(x, "fkl", kd_weight=0.0, ce_weight=1.0, backend="torch")
    z = x["h_s"] @ x["w_s"].T + x["b_s"]
    ce = F.cross_entropy(z, x["labels"])
    assert_matches((f, grads(f, x)), (ce, grads(ce, x)), 1e-10)
    f = fused(x, "jsd", T=2.0, backend="torch")
    g1 = grads(f, x)
    g3 = grads(-3.0 * fused(x, "jsd", T=2.0, backend="torch"), x)
    for a, b in zip(g1, g3):
        torch.testing.assert_close(b, -3.0 * a, rtol=1e-12, atol=0)


def test_teacher_gets_no_gradient_and_chunk_size_does_not_matter():
    x = make(torch.float64, seed=6)
    x["h_t"].requires_grad_()
    losses = [fused(x, "skl", chunk_size=c, backend="torch") for c in (1, 7, N, 4 * N)]
    assert max(abs(loss.item() - losses[0].item()) for loss in losses) < 1e-12
    losses[0].backward()
    assert x["h_t"].grad is None and x["h_s"].grad is not None


def test_frozen_head_gets_no_gradient_and_hidden_gradient_stays_exact():
    """A frozen LM head (LoRA) skips the weight-gradient matmul; the hidden-state gradient is unchanged."""
    x = make(torch.float64, seed=9)
    x["w_s"].requires_grad_(False)
    x["b_s"].requires_grad_(False)
    f = fused(x, "tvd", T=2.0, ce_weight=0.2, backend="torch")
    p = plain(x, "tvd", T=2.0, ce_weight=0.2)
    f.backward()
    assert x["w_s"].grad is None and x["b_s"].grad is None
    torch.testing.assert_close(x["h_s"].grad, torch.autograd.grad(p, x["h_s"])[0], rtol=1e-10, atol=1e-12)


def test_reference_under_cpu_autocast_keeps_parameter_dtypes():
    """Under autocast the LM-head matmuls run in bf16 (as nn.Linear would); gradients keep the fp32 dtypes."""
    x = make(torch.float32, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = fused(x, "fkl", T=2.0, ce_weight=0.5, backend="torch")
        p = plain(x, "fkl", T=2.0, ce_weight=0.5)
    gf, gp = grads(f, x), grads(p, x)
    assert f.dtype == torch.float32 and [g.dtype for g in gf] == [torch.float32] * 3
    assert f.item() == pytest.approx(p.item(), rel=2e-2)
    for a, b in zip(gf, gp):
        assert (a - b).abs().max() <= 5e-2 * b.abs().max()


# ---- memory: no tokens x vocab tensor ----

class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and the per-chunk autograd.grad alike)."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.__name__.split(".")[0])
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_reference_never_materialises_tokens_by_vocab():
    n, v, chunk = 256, 300, 32  # N x V = 76,800; chunk x V = 9,600; V x H = 3,600
    x = make(torch.float32, seed=8, n=n, v=v)
    with LargestTensor() as seen_fused:
        grads(fused(x, "jsd", T=2.0, ce_weight=0.1, chunk_size=chunk, backend="torch"), x)
    with LargestTensor() as seen_plain:
        grads(plain(x, "jsd", T=2.0, ce_weight=0.1), x)
    assert "_log_softmax" in seen_fused.ops  # the instrument sees the chunk rows
    assert "_log_softmax_backward_data" not in seen_fused.ops  # closed-form gradients: no autograd per chunk
    assert seen_plain.largest >= n * v  # the instrument does see a tokens x vocab tensor when there is one
    assert seen_fused.largest <= chunk * v, seen_fused.largest


# ---- input errors ----

def test_bad_inputs_raise_kdkit_errors():
    x = make()
    with pytest.raises(ShapeMismatchError, match="student hidden size 12 != student weight's 11"):
        fused_linear_kd(x["h_s"], x["w_s"][:, :11], x["h_t"], x["w_t"])
    with pytest.raises(ShapeMismatchError, match="teacher vocabulary 96 != student vocabulary 97"):
        fused_linear_kd(x["h_s"], x["w_s"], x["h_t"], x["w_t"][:96])
    with pytest.raises(ShapeMismatchError, match="teacher hidden"):
        fused_linear_kd(x["h_s"], x["w_s"], x["h_t"][:10], x["w_t"])
    with pytest.raises(ShapeMismatchError, match=r"labels \(49,\) must be \[50\]"):
        fused_linear_kd(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["labels"][:49])
    with pytest.raises(ShapeMismatchError, match="weights"):
        fused_linear_kd(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["labels"], weights=x["weights"][:3])
    with pytest.raises(ShapeMismatchError, match="student bias"):
        fused_linear_kd(x["h_s"], x["w_s"], x["h_t"], x["w_t"], student_bias=torch.zeros(5))
    with pytest.raises(ShapeMismatchError, match="top-k"):
        fused_linear_kd(x["h_s"], x["w_s"], None, None, teacher_topk_indices=torch.zeros(N, 3, dtype=torch.long),
                        teacher_topk_logprobs=torch.zeros(N, 4))
    with pytest.raises(ConfigError, match="unknown divergence 'kl'.*fkl, rkl, jsd"):
        fused_linear_kd(x["h_s"], x["w_s"], x["h_t"], x["w_t"], divergence="kl")
    with pytest.raises(ConfigError, match="either dense .* or sparse .*neither"):
        fused_linear_kd(x["h_s"], x["w_s"], None, None)
    with pytest.raises(ConfigError, match="ce_weight > 0 needs labels"):
        fused_linear_kd(x["h_s"], x["w_s"], x["h_t"], x["w_t"], ce_weight=1.0)
    with pytest.raises(ConfigError, match="unknown backend 'cuda'"):
        fused_linear_kd(x["h_s"], x["w_s"], x["h_t"], x["w_t"], backend="cuda")
    with pytest.raises(ConfigError, match="chunk_size"):
        fused_linear_kd(x["h_s"], x["w_s"], x["h_t"], x["w_t"], chunk_size=0)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
            fused_linear_kd(x["h_s"], x["w_s"], x["h_t"], x["w_t"], backend="triton")


# ---- the Triton kernel, under Triton's CPU interpreter (a subprocess: TRITON_INTERPRET is read at import) ----

# name -> (divergence, dtype, options). Tiny shapes: the interpreter runs every program and op in Python.
TRITON_CASES = {
    **{f"{d}-fp32": (d, "float32", {"T": 2.0, "ce_weight": 0.3, "kd_weight": 0.7}) for d in DIVERGENCES},
    **{f"{d}-bf16": (d, "bfloat16", {"T": 2.0, "ce_weight": 0.3}) for d in ("fkl", "jsd", "tvd")},
    "jsd-beta1-fp32": ("jsd", "float32", {"beta": 1.0, "T": 0.7}),
    "skl-skew0-fp32": ("skl", "float32", {"skew": 0.0}),
    "rkl-nolabels-T1-fp32": ("rkl", "float32", {"labels": False}),
    "ce-only-T1-fp32": ("fkl", "float32", {"kd_weight": 0.0, "ce_weight": 1.0}),
    "topk-jsd-fp32": ("jsd", "float32", {"T": 2.0, "ce_weight": 0.3, "topk": "uniform"}),
    "topk-fkl-none-fp32": ("fkl", "float32", {"T": 1.0, "topk": "none"}),
}
TRITON_TOL = {"float32": 1e-5, "bfloat16": 2e-2}  # bf16: gradients pass through bf16 logits buffers and matmuls
TN, TV = 20, 300  # chunks of 8 (8, 8, 4 rows); 300 = 2 x 128 + 44 vocabulary: three blocks, the last partial


def triton_interpreter_results() -> dict:
    """Run in a TRITON_INTERPRET=1 process: per case, loss and gradient errors of triton vs the torch reference."""
    import kdkit.kernels.fused_linear_kd_triton as kt

    kt.DEFAULT_BLOCK_V = 128
    torch.set_num_threads(1)
    out = {}
    for seed, (name, (divergence, dtype, opts)) in enumerate(TRITON_CASES.items()):
        opts = dict(opts)
        topk, labels = opts.pop("topk", None), opts.pop("labels", True)
        x = make(getattr(torch, dtype), seed=seed, n=TN, v=TV, bias=topk is None)
        res = {}
        for backend in ("torch", "triton"):
            kw = dict(divergence=divergence, weights=x["weights"], student_bias=x["b_s"], chunk_size=8,
                      backend=backend, **opts)
            lab = x["labels"] if labels else None
            if topk:
                lp, idx = torch.log_softmax((x["h_t"] @ x["w_t"].T).float(), -1).topk(6, -1)
                loss = fused_linear_kd(x["h_s"], x["w_s"], None, None, lab, teacher_topk_indices=idx,
                                       teacher_topk_logprobs=lp, topk_fill=topk, **kw)
            else:
                loss = fused_linear_kd(x["h_s"], x["w_s"], x["h_t"], x["w_t"], lab, teacher_bias=x["b_t"], **kw)
            res[backend] = (loss, grads(loss, x))
        (lt, gt), (lr, gr) = res["triton"], res["torch"]
        out[name] = {"loss": lt.item(), "ref": lr.item(), "loss_rel": abs(lt.item() - lr.item()) / abs(lr.item()),
                     "grad_rel": max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                                     for a, b in zip(gt, gr)), "dtype": dtype}
    return out


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    code = ("import os, sys, json; os.environ['TRITON_INTERPRET'] = '1'; "
            f"sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]; "
            "import test_kernels; print('RESULTS' + json.dumps(test_kernels.triton_interpreter_results()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS"):])


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_kernel_matches_reference_under_interpreter(interpreted, case):
    r = interpreted[case]
    tol = TRITON_TOL[r["dtype"]]
    assert r["loss_rel"] <= (1e-5 if r["dtype"] == "float32" else 1e-4), r
    assert r["grad_rel"] <= tol, r


# ---- bench kernels: result file and leaderboard ----

def test_bench_kernels_cpu_rows_and_markdown(tmp_path):
    from kdkit.bench.kernels import run_kernels, write_kernels_markdown

    pytest.importorskip("liger_kernel")
    common = ["tokens=64", "hidden=16", "vocab=256", "repeats=1", "warmup=0", "divergences=jsd,rkl",
              "impls=plain,liger,kdkit-torch", f"out={tmp_path}"]
    run_kernels(common)
    path = run_kernels([*common, "teacher=topk", "topk=8"])
    record = json.loads(path.read_text())
    assert path.parent == tmp_path and record["device"] and record["torch"] == torch.__version__
    rows = {(r["impl"], r["teacher"], r["divergence"]): r for r in record["rows"]}
    assert len(rows) == 12
    for r in rows.values():
        assert (r["tokens"], r["hidden"], r["vocab"]) == (64, 16, 256)
        if r["impl"] == "liger" and r["teacher"] == "topk-8":
            assert r["status"] == "n/a"  # Liger takes a dense teacher only
            continue
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["tflops"] > 0
    for teacher in ("dense", "topk-8"):
        for div in ("jsd", "rkl"):
            kd, plain = rows["kdkit-torch", teacher, div], rows["plain", teacher, div]
            assert kd["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    # Liger has no T^2 factor but T = 1 here, and the same beta convention: the same loss
    assert rows["liger", "dense", "jsd"]["loss"] == pytest.approx(rows["plain", "dense", "jsd"]["loss"], rel=1e-5)
    md = write_kernels_markdown(tmp_path, tmp_path / "kernels.md").read_text()
    assert record["device"] in md and "| float32 | dense | jsd | 64 | 16 | 256 |" in md
    assert "| float32 | topk-8 | rkl | 64 | 16 | 256 |" in md
    kd_line = next(line for line in md.splitlines() if "| dense | jsd |" in line and "| kdkit-torch |" in line)
    ratio = rows["liger", "dense", "jsd"]["median_ms"] / rows["kdkit-torch", "dense", "jsd"]["median_ms"]
    assert f"{ratio:.2f}x" in kd_line
    with pytest.raises(ConfigError, match=r"unknown .*'tokenz'"):
        run_kernels(["tokenz=4"])
