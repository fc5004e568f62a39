"""The token-chunk loop both fused linear-KD backends share: matmuls per chunk, gradients accumulated in forward.

Why in forward: the loss is a sum over tokens, so each chunk's gradient w.r.t. its student logits is final as soon
as the chunk is seen. Forward turns it straight into grad_hidden[chunk] and a running grad_weight (and grad_bias)
and lets the chunk's logits go; backward only scales the stored gradients by grad_output. Peak memory is then
one chunk of student and teacher logits (chunk x V) on top of the gradients, never tokens x V (as in Liger).

A backend supplies `rows(student_logits, teacher_logits, labels, weights, inv_n) -> (loss sum, dlogits)` for one
chunk: the chunk's share of the (already normalised) loss and d loss / d student logits in the logits' dtype
(it may overwrite the logits buffer in place and return it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..losses.token import sparse_to_dense_logprobs


@dataclass(frozen=True)
class ChunkPlan:
    """What the loop needs besides the tensors: chunk length, matmul dtypes, the sparse teacher's densifying."""

    chunk_size: int
    student_dtype: torch.dtype  # dtype the student matmuls run in (the autocast dtype under autocast)
    teacher_dtype: torch.dtype
    vocab_size: int
    ignore_index: int = -100
    topk_fill: str = "uniform"


class ChunkedLinearKD(torch.autograd.Function):
    """loss = sum over chunks of rows(h_s[c] @ W_s.T + b_s, teacher logits of c, ...); grads to h_s, W_s, b_s."""

    @staticmethod
    def forward(ctx, h_s: Tensor, w_s: Tensor, b_s: Tensor | None, h_t: Tensor | None, w_t: Tensor | None,
                b_t: Tensor | None, topk_idx: Tensor | None, topk_lp: Tensor | None, labels: Tensor | None,
                weights: Tensor | None, plan: ChunkPlan, rows: Callable) -> Tensor:
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
    n_tokens, device = h_s.shape[0], h_s.device
    # The token-mean denominator counts unmasked tokens over all chunks, so each chunk's share is final.
    # A tensor, not a Python number: no host-device sync on CUDA.
    count = (torch.tensor(n_tokens, device=device) if labels is None
             else (labels != plan.ignore_index).sum())
    acc_dtype = torch.float64 if plan.student_dtype == torch.float64 else torch.float32
    inv_n = 1.0 / count.clamp(min=1).to(acc_dtype)

    ws = w_s.to(plan.student_dtype)
    bs = None if b_s is None else b_s.to(plan.student_dtype)
    wt = None if w_t is None else w_t.to(plan.teacher_dtype)
    bt = None if b_t is None else b_t.to(plan.teacher_dtype)
    # A frozen LM head (LoRA) or frozen hidden states skip their gradient matmul: a quarter of the FLOPs each.
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    grad_h = torch.empty(h_s.shape if need_h else (0,), dtype=plan.student_dtype, device=device)
    # grad_weight accumulates in the weight's dtype; in place with addmm_ (no V x H temporary) when the matmul
    # dtype is the weight's own (the usual case; under autocast the fp32 master weight gets a bf16 product added).
    grad_w = torch.zeros(w_s.shape if need_w else (0,), dtype=w_s.dtype, device=device)
    in_place_w = w_s.dtype == plan.student_dtype
    grad_b = torch.zeros(w_s.shape[0], dtype=acc_dtype, device=device) if b_s is not None and need_b else None
    loss = torch.zeros((), dtype=acc_dtype, device=device)

    for start in range(0, n_tokens, plan.chunk_size):
        end = min(start + plan.chunk_size, n_tokens)
        hs = h_s[start:end].to(plan.student_dtype)
        zs = hs @ ws.T if bs is None else torch.addmm(bs, hs, ws.T)
        with torch.no_grad():
            if topk_idx is not None:
                zt = sparse_to_dense_logprobs(topk_idx[start:end], topk_lp[start:end], plan.vocab_size,
                                              plan.topk_fill)
            else:
                ht = h_t[start:end].to(plan.teacher_dtype)
                zt = ht @ wt.T if bt is None else torch.addmm(bt, ht, wt.T)
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

    ctx.needs = (need_h, need_w, grad_b is not None)
    ctx.save_for_backward(grad_h.to(h_s.dtype), grad_w, None if grad_b is None else grad_b.to(b_s.dtype))
    return loss
