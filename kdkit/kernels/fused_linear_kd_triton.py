"""Triton rows for `fused_linear_kd`: loss and d loss / d student logits of one token chunk, in one kernel.

The matmuls stay on cuBLAS (`chunked.py`); this kernel does the row-wise part, one program per token, reading
the student and teacher logit rows in vocabulary blocks (bf16 or fp32 in, fp32 arithmetic):

1. online softmax: a running max and sum over the blocks (kept per lane, combined once at the end) give
   log Z_q of z/T, log Z_p of t/T and, for the hard CE term at T != 1, log Z of z;
2. (every divergence but fkl) the row reduction c = <q, g> the gradient needs, and the per-token loss;
3. the gradient, written over the student logits in place (the buffer is dead after this), and fkl's loss.
fkl needs no c, so it reads each row twice; the others three times.

Gradients. With a = z/T, q = softmax(a), log q = a - log Z_q, p = softmax(t/T), and D(p, q) summed over the
vocabulary, dD/da = q * (g - <q, g>) for g = dD/dq, and d(T^2 D)/dz = T * dD/da. Written out (m is each
divergence's mixture):

- fkl   KL(p||q):                    dD/da = q - p
- rkl   KL(q||p):                    dD/da = q (log q - log p - c),        c = KL(q||p)
- jsd   b KL(p||m) + (1-b) KL(q||m), m = b p + (1-b) q:
                                     dD/da = (1-b) q (log q - log m - c),  c = KL(q||m)
  (g = (1-b)(log q - log m + 1): the p/m terms of both KLs cancel; b=0 is fkl and b=1 rkl, as in token.py)
- skl   KL(p||m), m = s p + (1-s) q: dD/da = (1-s) (q c - q p / m),        c = sum q p / m
- srkl  KL(q||m), m = s q + (1-s) p: dD/da = q (u - c),  u = log q - log m - s q / m,  c = sum q u
- tvd   0.5 sum |p - q|:             dD/da = q (h - c),  h = 0.5 sign(q - p),  c = sum q h
- CE at T=1:                         dCE/dz = softmax(z) - onehot(label)

Each row's loss and gradient are scaled by kd_weight * weight / n (n = unmasked tokens of the whole batch, read
from a device tensor: no host sync); masked rows (label == ignore_index) skip the passes and get zero gradient.
Terms with p = 0 (a sparse teacher with ``-inf`` log-probs) contribute 0 to the loss, as in token.py.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..errors import ConfigError
from .rows import RowOptions

MODES = {"fkl": 0, "rkl": 1, "jsd": 2, "skl": 3, "srkl": 4, "tvd": 5}
DEFAULT_BLOCK_V = 4096  # vocabulary block per loop step; tests under the interpreter lower it to exercise the loop


@triton.jit
def _kd_rows_kernel(s_ptr, t_ptr, s_stride, t_stride, labels_ptr, weights_ptr, inv_n_ptr, loss_ptr,
                    V, inv_T, T, kd_weight, ce_weight, beta, log_w1, log_w2, skew, ignore_index,
                    MODE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_KD: tl.constexpr,
                    HAS_CE: tl.constexpr, CE_OWN_LSE: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    inv_n = tl.load(inv_n_ptr).to(tl.float32)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        v_end = tl.where(valid, V, 0)  # masked rows run no vocabulary pass, only the zero fill
    else:
        label = row * 0 - 1
        valid = row >= 0
        v_end = V
    kd_scale = kd_weight * inv_n
    if HAS_WEIGHTS:
        kd_scale = kd_scale * tl.load(weights_ptr + row).to(tl.float32)
    ce_scale = ce_weight * inv_n

    # Pass 1: online log-sum-exps, kept per lane (one exp per element, e = exp(-|x - running max|), and no
    # cross-lane reduction inside the loop); the lanes are combined once after it. Running maxima start at a
    # finite -1e30, so -inf entries (padding lanes, a sparse teacher) never meet -inf - -inf.
    ms = tl.full([BLOCK_V], -1.0e30, tl.float32)
    ds = tl.zeros([BLOCK_V], tl.float32)
    mt = tl.full([BLOCK_V], -1.0e30, tl.float32)
    dt = tl.zeros([BLOCK_V], tl.float32)
    mc = tl.full([BLOCK_V], -1.0e30, tl.float32)
    dc = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, v_end, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        msk = offs < V
        z = tl.load(s_row + offs, mask=msk, other=float("-inf")).to(tl.float32)
        if HAS_KD:
            a = z * inv_T
            b = tl.load(t_row + offs, mask=msk, other=float("-inf")).to(tl.float32) * inv_T
            e = tl.exp(-tl.abs(a - ms))
            ds = tl.where(a > ms, ds * e + 1.0, ds + e)
            ms = tl.maximum(ms, a)
            e = tl.exp(-tl.abs(b - mt))
            dt = tl.where(b > mt, dt * e + 1.0, dt + e)
            mt = tl.maximum(mt, b)
        if CE_OWN_LSE:
            e = tl.exp(-tl.abs(z - mc))
            dc = tl.where(z > mc, dc * e + 1.0, dc + e)
            mc = tl.maximum(mc, z)
    lse_s = 0.0
    lse_t = 0.0
    if HAS_KD:
        mx = tl.max(ms, 0)
        lse_s = mx + tl.log(tl.sum(ds * tl.exp(ms - mx), 0))
        mx = tl.max(mt, 0)
        lse_t = mx + tl.log(tl.sum(dt * tl.exp(mt - mx), 0))
    if CE_OWN_LSE:
        mx = tl.max(mc, 0)
        lse_c = mx + tl.log(tl.sum(dc * tl.exp(mc - mx), 0))
    else:
        lse_c = lse_s  # T == 1: the CE softmax is the student's q

    z_label = 0.0
    if HAS_CE:
        ok = valid & (label >= 0) & (label < V)
        z_label = tl.load(s_row + label, mask=ok, other=0.0).to(tl.float32)

    # Pass 2: the reduction c and the loss, for the divergences whose gradient needs c (per-lane sums again).
    # The mixtures: jsd m = b p + (1-b) q and skl m = s p + (1-s) q (w1 = b or s); srkl m = s q + (1-s) p.
    c_acc = tl.zeros([BLOCK_V], tl.float32)
    kd_acc = tl.zeros([BLOCK_V], tl.float32)
    c = 0.0
    if HAS_KD and MODE != 0:
        for start in range(0, v_end, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            msk = offs < V
            lq = tl.load(s_row + offs, mask=msk, other=0.0).to(tl.float32) * inv_T - lse_s
            lp = tl.load(t_row + offs, mask=msk, other=0.0).to(tl.float32) * inv_T - lse_t
            q = tl.exp(lq)
            p = tl.exp(lp)
            if MODE >= 2 and MODE <= 4:  # log m = logaddexp(lx, ly), written out: nested jit calls interpret slowly
                if MODE == 4:
                    lx = lq + log_w1
                    ly = lp + log_w2
                else:
                    lx = lp + log_w1
                    ly = lq + log_w2
                mx = tl.maximum(lx, ly)
                lm = mx + tl.log(tl.exp(lx - mx) + tl.exp(ly - mx))
            if MODE == 1:  # rkl: c = KL(q||p) = the loss
                kd_acc += tl.where(msk & (q > 0), q * (lq - lp), 0.0)
            elif MODE == 2:  # jsd: c = KL(q||m)
                tq = tl.where(msk & (q > 0), q * (lq - lm), 0.0)
                c_acc += tq
                kd_acc += beta * tl.where(msk & (p > 0), p * (lp - lm), 0.0) + (1.0 - beta) * tq
            elif MODE == 3:  # skl: c = sum q p / m
                kd_acc += tl.where(msk & (p > 0), p * (lp - lm), 0.0)
                c_acc += tl.where(msk, tl.exp(lq + lp - lm), 0.0)
            elif MODE == 4:  # srkl: c = sum q (log q - log m - s q / m)
                kd_acc += tl.where(msk & (q > 0), q * (lq - lm), 0.0)
                c_acc += tl.where(msk & (q > 0), q * (lq - lm - skew * tl.exp(lq - lm)), 0.0)
            else:  # tvd: c = sum q * 0.5 sign(q - p)
                kd_acc += tl.where(msk, 0.5 * tl.abs(p - q), 0.0)
                c_acc += tl.where(msk, q * tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0)), 0.0)
        if MODE == 1:
            c = tl.sum(kd_acc, 0)
        else:
            c = tl.sum(c_acc, 0)

    # Pass 3: d loss / d z over the logits in place (each block is read before it is written), and fkl's loss.
    g_scale = kd_scale * T
    for start in range(0, v_end, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        msk = offs < V
        z = tl.load(s_row + offs, mask=msk, other=0.0).to(tl.float32)
        grad = tl.zeros([BLOCK_V], dtype=tl.float32)
        if HAS_KD:
            lq = z * inv_T - lse_s
            lp = tl.load(t_row + offs, mask=msk, other=0.0).to(tl.float32) * inv_T - lse_t
            q = tl.exp(lq)
            p = tl.exp(lp)
            if MODE >= 2 and MODE <= 4:
                if MODE == 4:
                    lx = lq + log_w1
                    ly = lp + log_w2
                else:
                    lx = lp + log_w1
                    ly = lq + log_w2
                mx = tl.maximum(lx, ly)
                lm = mx + tl.log(tl.exp(lx - mx) + tl.exp(ly - mx))
            if MODE == 0:  # fkl
                kd_acc += tl.where(msk & (p > 0), p * (lp - lq), 0.0)
                gd = q - p
            elif MODE == 1:  # rkl
                gd = tl.where(q > 0, q * (lq - lp - c), 0.0)
            elif MODE == 2:  # jsd
                gd = (1.0 - beta) * tl.where(q > 0, q * (lq - lm - c), 0.0)
            elif MODE == 3:  # skl
                gd = (1.0 - skew) * (q * c - tl.exp(lq + lp - lm))
            elif MODE == 4:  # srkl
                gd = tl.where(q > 0, q * (lq - lm - skew * tl.exp(lq - lm) - c), 0.0)
            else:  # tvd
                gd = q * (tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0)) - c)
            grad += g_scale * gd
        if HAS_CE:
            grad += ce_scale * (tl.exp(z - lse_c) - tl.where(offs == label, 1.0, 0.0))
        tl.store(s_row + offs, grad.to(s_ptr.dtype.element_ty), mask=msk)
    for start in range(0, V - v_end, BLOCK_V):  # masked rows: zero gradient
        offs = start + tl.arange(0, BLOCK_V)
        tl.store(s_row + offs, tl.zeros([BLOCK_V], dtype=tl.float32).to(s_ptr.dtype.element_ty), mask=offs < V)

    loss = 0.0
    if HAS_KD:
        loss += kd_scale * T * T * tl.sum(kd_acc, 0)
    if HAS_CE:
        loss += ce_scale * (lse_c - z_label)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))


def triton_rows(opts: RowOptions, block_v: int | None = None):
    """Chunk rows computed by `_kd_rows_kernel`; the gradient overwrites the student logits and is returned."""
    mode, w1 = _mode(opts)
    log_w1 = math.log(w1) if w1 > 0 else float("-inf")
    log_w2 = math.log1p(-w1) if w1 < 1 else float("-inf")
    has_kd, has_ce = opts.kd_weight != 0.0, opts.ce_weight != 0.0

    def rows(zs: torch.Tensor, zt: torch.Tensor, labels, weights, inv_n: torch.Tensor):
        c, v = zs.shape
        if not zs.is_contiguous() or not zt.is_contiguous():
            raise AssertionError("chunk logits must be contiguous rows")
        loss_rows = torch.empty(c, dtype=torch.float32, device=zs.device)
        labels = None if labels is None else labels.contiguous()  # read as labels_ptr + row
        weights = None if weights is None else weights.contiguous()
        block = min(block_v or DEFAULT_BLOCK_V, triton.next_power_of_2(v))
        # The dummy pointers for absent labels/weights are never read (constexpr flags).
        _kd_rows_kernel[(c,)](
            zs, zt, zs.stride(0), zt.stride(0), labels if labels is not None else loss_rows,
            weights if weights is not None else loss_rows, inv_n, loss_rows, v, 1.0 / opts.div.T, opts.div.T,
            opts.kd_weight, opts.ce_weight, opts.div.beta, log_w1, log_w2, opts.div.skew, opts.ignore_index,
            MODE=mode, HAS_LABELS=labels is not None, HAS_WEIGHTS=weights is not None, HAS_KD=has_kd,
            HAS_CE=has_ce, CE_OWN_LSE=has_ce and (opts.div.T != 1.0 or not has_kd), BLOCK_V=block,
            num_warps=_num_warps(block))
        return loss_rows.sum(), zs

    return rows


def _mode(opts: RowOptions) -> tuple[int, float]:
    """Kernel mode and the mixture weight w1 of its first log term (jsd: beta; skl/srkl: skew)."""
    d, beta = opts.div.name, opts.div.beta
    if d not in MODES:
        raise ConfigError(f"divergence {d!r} has no Triton kernel mode (choices: {', '.join(MODES)}); use the "
                          "unfused path (llm.fused=false) or backend='torch'")
    if d == "jsd":
        if beta == 0.0:
            return MODES["fkl"], 0.0
        if beta == 1.0:
            return MODES["rkl"], 0.0
        return MODES["jsd"], beta
    if d in ("skl", "srkl"):
        return MODES[d], opts.div.skew
    return MODES[d], 0.0


def _num_warps(block: int) -> int:
    return 16 if block >= 4096 else 8 if block >= 2048 else 4
