"""The row contract of `fused_linear_kd`: what every backend computes for one chunk of tokens (`RowOptions`), and
the torch backends (`torch_rows`: eager, or compiled with ``torch.compile``).

A backend is ``rows(opts)`` returning ``f(student_logits, teacher, labels, weights, inv_n) -> (loss, dlogits)``
for one chunk, where ``teacher`` is the chunk's dense teacher logits [c, V] or a sparse ``(ids, log-probs)``
pair [c, k]; `fused_linear_kd_triton.triton_rows` is the CUDA one. Kept apart from `fused_linear_kd.py` so that
a backend needs only this contract, not the dispatcher that imports it.

Why the torch rows are fast on CPU: the math is `Divergence.value_and_grad` (closed-form gradients, no
``autograd.grad`` per chunk), and it runs on blocks of rows sized to stay in the CPU's L2 cache (`block_rows`),
writing the gradient over the student logits in place. A chunk's logits (c x V, tens of MB) do not fit a cache,
so a full-chunk op streams them from memory once per elementwise op; per cache-sized block, every pass after the
first reads from cache. Compiled (``backend="compiled"``), each block is one fused C++ loop nest.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..divergence import Divergence
from ..signals import sparse_to_dense_logprobs

BLOCK_BYTES = 1 << 20  # float32 bytes of one row block: a core's L2 share, temporaries fitting beside it
MIN_BLOCK_ROWS = 16  # fewer rows per block cost more in per-call overhead than they gain in locality


@dataclass(frozen=True)
class RowOptions:
    """Per-row loss settings shared by the backends: the divergence (with T, beta, skew: one definition, in
    `kdkit.divergence`), the ignored label, the weights of the two terms and how a top-k teacher is filled."""

    div: Divergence = Divergence()
    ignore_index: int = -100
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    topk_fill: str = "uniform"


def block_rows(vocab: int) -> int:
    """Rows per block: a power of two with rows x vocab x 4 bytes near BLOCK_BYTES, at least MIN_BLOCK_ROWS.

    Measured on 2 cores (fp32, compiled): at a 8k vocabulary 32-row blocks need 40 MiB per step against 59 MiB for
    128 rows, at the same speed; at 49k, 4-row blocks ran 18% slower than 16; at 262k, 16 rows beat 4 by 5-8%."""
    rows = max(MIN_BLOCK_ROWS, BLOCK_BYTES // (4 * vocab))
    return 1 << (rows.bit_length() - 1)


def block_math(opts: RowOptions, z: Tensor, teacher: Tensor, kd_scale: Tensor, ce_scale: Tensor | None,
               labels: Tensor | None) -> tuple[Tensor, Tensor]:
    """(loss, d loss / d z) of one block: kd_scale · T² D(teacher, z) + ce_scale · CE(z, labels), per row summed.

    `teacher` holds logits (dense) or log-probs (sparse, densified); either way log_softmax(teacher / T) is the
    teacher at T. `kd_scale`, `ce_scale` [b] carry the weights, the mask and 1 / #tokens.
    """
    loss = z.new_zeros(())
    grad = None
    if opts.kd_weight:
        div = opts.div
        log_p = F.log_softmax(teacher.to(z.dtype) / div.T, dim=-1)
        d, grad = div.value_and_grad(z, log_p, kd_scale)
        loss = loss + (d * kd_scale).sum()
    if ce_scale is not None:
        log_s = F.log_softmax(z, dim=-1)
        safe = torch.where(ce_scale > 0, labels, 0).long()[:, None]
        loss = loss - (log_s.gather(1, safe)[:, 0] * ce_scale).sum()
        g_ce = log_s.exp().mul_(ce_scale[:, None])
        g_ce.scatter_add_(1, safe, -ce_scale[:, None])
        grad = g_ce if grad is None else grad.add_(g_ce)
    return loss, grad


def torch_rows(opts: RowOptions, compiled: bool = False):
    """Chunk rows by `block_math` over cache-sized blocks; ``compiled`` runs each full block through
    ``torch.compile`` (one compilation per shape and options, kept for the process)."""
    math_fn = _compiled_math(opts) if compiled else functools.partial(block_math, opts)
    eager = functools.partial(block_math, opts)
    ignore = opts.ignore_index

    def rows(zs: Tensor, teacher, labels: Tensor | None, weights: Tensor | None, inv_n: Tensor):
        c, vocab = zs.shape
        compute = torch.float64 if zs.dtype == torch.float64 else torch.float32
        valid = torch.ones(c, dtype=torch.bool, device=zs.device) if labels is None else labels != ignore
        kd_scale = valid.to(compute) * (inv_n.to(compute) * opts.kd_weight)
        if weights is not None:
            kd_scale = kd_scale * weights.to(compute)
        ce_scale = valid.to(compute) * (inv_n.to(compute) * opts.ce_weight) if opts.ce_weight else None
        step = block_rows(vocab)
        loss = torch.zeros((), dtype=compute, device=zs.device)
        for i in range(0, c, step):
            j = min(i + step, c)
            part = (teacher[i:j] if torch.is_tensor(teacher)
                    else sparse_to_dense_logprobs(teacher[0][i:j], teacher[1][i:j], vocab, opts.topk_fill))
            fn = math_fn if j - i == step else eager  # a ragged tail block is not worth a compilation
            block_loss, grad = fn(zs[i:j].to(compute), part, kd_scale[i:j],
                                  None if ce_scale is None else ce_scale[i:j],
                                  None if labels is None else labels[i:j])
            loss += block_loss
            if grad is None:  # kd_weight = ce_weight = 0
                grad = 0.0
            zs[i:j] = grad  # the chunk's logits are dead after this: their buffer carries the gradient
        return loss, zs

    return rows


@functools.lru_cache(maxsize=64)
def _compiled_math(opts: RowOptions):
    """torch.compile of `block_math` for these options (shapes are static: full blocks only)."""
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    return torch.compile(functools.partial(block_math, opts), dynamic=False)
