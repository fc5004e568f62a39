"""The row contract of `fused_linear_kd`: what every backend computes for one chunk of tokens (`RowOptions`), and
the torch reference backend (`torch_rows`). A backend is ``rows(opts)`` returning
``f(student_logits, teacher_logits, labels, weights, inv_n) -> (loss, d loss / d student logits)``;
`fused_linear_kd_triton.triton_rows` is the other one. Kept apart from `fused_linear_kd.py` so that a backend
needs only this contract, not the dispatcher that imports it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses.token import divergence_from_logprobs


@dataclass(frozen=True)
class RowOptions:
    """Per-row loss settings shared by the backends: divergence, temperature, weights of the two terms."""

    divergence: str = "fkl"
    T: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    ignore_index: int = -100
    kd_weight: float = 1.0
    ce_weight: float = 0.0


def torch_rows(opts: RowOptions):
    """The reference chunk rows: kdkit's divergence on materialised chunk logits, gradient by autograd."""
    T, ignore = opts.T, opts.ignore_index

    def rows(zs: Tensor, zt: Tensor, labels: Tensor | None, weights: Tensor | None, inv_n: Tensor):
        compute = torch.float64 if zs.dtype == torch.float64 else torch.float32
        with torch.enable_grad():
            z = zs.detach().to(compute).requires_grad_()
            loss = torch.zeros((), dtype=compute, device=z.device)
            if opts.kd_weight:
                log_q = F.log_softmax(z / T, dim=-1)
                log_p = F.log_softmax(zt.to(compute) / T, dim=-1)
                d = divergence_from_logprobs(log_q, log_p, opts.divergence, beta=opts.beta, skew=opts.skew) * (T * T)
                if weights is not None:
                    d = d * weights.to(compute)
                if labels is not None:
                    d = torch.where(labels != ignore, d, 0.0)
                loss = loss + opts.kd_weight * (d.sum() * inv_n)
            if opts.ce_weight:
                ce = F.cross_entropy(z, labels, ignore_index=ignore, reduction="sum")
                loss = loss + opts.ce_weight * (ce * inv_n)
            dz, = torch.autograd.grad(loss, z) if loss.requires_grad else (torch.zeros_like(z),)
        return loss.detach(), dz

    return rows
