"""The token-chunk loop both fused linear-KD backends share: matmuls per chunk, gradients accumulated in forward.

Why in forward: the loss is a sum over tokens, so each chunk's gradient w.r.t. its student logits is final as soon
as the chunk is seen. Forward turns it straight into grad_hidden[chunk] and a running grad_weight (and grad_bias)
and lets the chunk's logits go; backward only scales the stored gradients by grad_output. Peak memory is then
one chunk of student and teacher logits (chunk x V) on top of the gradients, never tokens x V (as in Liger).

A backend supplies `rows(student_logits, teacher, labels, weights, inv_n) -> (loss sum, dlogits)` for one
chunk: the chunk's share of the (already normalised) loss and d loss / d student logits in the logits' dtype
(it may overwrite the logits buffer in place and return it). `teacher` is the chunk's dense teacher logits, or for
a sparse (top-k) teacher the pair (ids, log-probs) when the backend densifies itself (`densifies`), else densified
here.

Tokens whose label is ignore_index (prompts, padding) contribute nothing, so they are dropped before the loop: no
matmul or row work is spent on them, and their hidden-state gradient is zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..signals import sparse_to_dense_logprobs


@dataclass(frozen=True)
class ChunkPlan:
    """What the loop needs besides the tensors: chunk length, matmul dtypes, the sparse teacher's densifying."""

    chunk_size: int
    student_dtype: torch.dtype  # dtype the student matmuls run in (the autocast dtype under autocast)
    teacher_dtype: torch.dtype
    vocab_size: int
    ignore_index: int = -100
    topk_fill: str = "uniform"
    densifies: bool = False  # the backend's rows take a sparse teacher as (ids, log-probs) and densify per block


class ChunkedLinearKD(torch.autograd.Function):
    """loss = sum over chunks of rows(h_s[c] @ W_s.T + b_s, teacher logits of c, ...); grads to h_s, W_s, b_s."""

    @staticmethod
    def forward(ctx, h_s: Tensor, w_s: Tensor, b_s: Tensor | None, h_t: Tensor | None, w_t: Tensor | None,
                b_t: Tensor | None, topk_idx: Tensor | None, topk_lp: Tensor | None, labels: Tensor | None,
                weights: Tensor | None, plan: ChunkPlan, rows: Callable) -> Tensor:
        ctx.h_dtype = h_s.dtype
        with torch.autocast(h_s.device.type, enabled=False):
            return _forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, topk_idx, topk_lp, labels, weights, plan, rows)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grads = [g if need else None for g, need in zip(ctx.saved_tensors, ctx.needs)]
        grad_h, grad_w, grad_b = grads
        # The usual case (loss.backward() on this loss alone) has grad_output == 1: skip copying V x H gradients.
        if not bool(grad_output == 1):
            grad_h, grad_w, grad_b = (None if g is None else g * grad_output for g in (grad_h, grad_w, grad_b))
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None


def _forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, topk_idx, topk_lp, labels, weights, plan: ChunkPlan, rows):
    n_all, device = h_s.shape[0], h_s.device
    acc_dtype = torch.float64 if plan.student_dtype == torch.float64 else torch.float32
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    keep = None
    if labels is not None:
        valid = labels != plan.ignore_index
        # The token-mean denominator counts unmasked tokens of the whole call (a device tensor: no host sync for it).
        inv_n = 1.0 / valid.sum().clamp(min=1).to(acc_dtype)
        if not bool(valid.all()):
            keep = valid.nonzero()[:, 0]
            h_s, labels = h_s.index_select(0, keep), labels.index_select(0, keep)
            weights = None if weights is None else weights.index_select(0, keep)
            h_t = None if h_t is None else h_t.index_select(0, keep)
            topk_idx = None if topk_idx is None else topk_idx.index_select(0, keep)
            topk_lp = None if topk_lp is None else topk_lp.index_select(0, keep)
    else:
        inv_n = torch.ones((), dtype=acc_dtype, device=device) / max(n_all, 1)
    n_tokens = h_s.shape[0]

    ws = w_s.to(plan.student_dtype)
    bs = None if b_s is None else b_s.to(plan.student_dtype)
    wt = None if w_t is None else w_t.to(plan.teacher_dtype)
    bt = None if b_t is None else b_t.to(plan.teacher_dtype)
    # A frozen LM head (LoRA) or frozen hidden states skip their gradient matmul: a quarter of the FLOPs each.
    grad_h = torch.empty(h_s.shape if need_h else (0,), dtype=plan.student_dtype, device=device)
    # grad_weight accumulates in the weight's dtype; in place with addmm_ (no V x H temporary) when the matmul
    # dtype is the weight's own (the usual case; under autocast the fp32 master weight gets a bf16 product added).
    grad_w = torch.zeros(w_s.shape if need_w else (0,), dtype=w_s.dtype, device=device)
    in_place_w = w_s.dtype == plan.student_dtype
    grad_b = torch.zeros(w_s.shape[0], dtype=acc_dtype, device=device) if b_s is not None and need_b else None
    loss = torch.zeros((), dtype=acc_dtype, device=device)

    # One logits buffer per side for the whole loop: a chunk's logits (tens of MB) are above glibc's mmap threshold,
    # so a fresh tensor per chunk is a fresh mapping whose pages fault in again (measured: a quarter of the matmul).
    rows_max = min(plan.chunk_size, n_tokens)
    zs_buf = torch.empty((rows_max, w_s.shape[0]), dtype=plan.student_dtype, device=device)
    zt_buf = None if wt is None else torch.empty((rows_max, wt.shape[0]), dtype=plan.teacher_dtype, device=device)
    for start in range(0, n_tokens, plan.chunk_size):
        end = min(start + plan.chunk_size, n_tokens)
        hs = h_s[start:end].to(plan.student_dtype)
        zs = _linear(hs, ws, bs, zs_buf[:end - start])
        with torch.no_grad():
            if topk_idx is not None and plan.densifies:
                zt = (topk_idx[start:end], topk_lp[start:end])
            elif topk_idx is not None:
                zt = sparse_to_dense_logprobs(topk_idx[start:end], topk_lp[start:end], plan.vocab_size,
                                              plan.topk_fill)
            else:
                zt = _linear(h_t[start:end].to(plan.teacher_dtype), wt, bt, zt_buf[:end - start])
        part, dz = rows(zs, zt, None if labels is None else labels[start:end],
                        None if weights is None else weights[start:end], inv_n)
        del zt
        loss += part
        dz = dz.to(plan.student_dtype)
        if need_h:
            torch.mm(dz, ws, out=grad_h[start:end])
        if need_w and in_place_w:
            grad_w.addmm_(dz.T, hs)
        elif need_w:
            grad_w += (dz.T @ hs).to(w_s.dtype)
        if grad_b is not None:
            grad_b += dz.sum(0, dtype=acc_dtype)
        del zs, dz

    if keep is not None and need_h:  # dropped tokens get a zero gradient
        grad_h = torch.zeros((n_all, grad_h.shape[1]), dtype=grad_h.dtype, device=device).index_copy_(0, keep, grad_h)
    del zs_buf, zt_buf
    ctx.needs = (need_h, need_w, grad_b is not None)
    ctx.save_for_backward(grad_h.to(ctx.h_dtype), grad_w, None if grad_b is None else grad_b.to(b_s.dtype))
    return loss


def _linear(x: Tensor, w: Tensor, b: Tensor | None, out: Tensor) -> Tensor:
    """x @ w.T (+ b) written into `out`."""
    return torch.mm(x, w.T, out=out) if b is None else torch.addmm(b, x, w.T, out=out)
