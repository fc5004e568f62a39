"""Divergences between token distributions for causal-LM distillation (one function per row of logits).

Conventions (shared with the fused kernel in `kdkit/kernels/`, and matching TRL/Liger where they overlap):
p = softmax(teacher / T), q = softmax(student / T), per token, summed over the vocabulary, times T^2.

- ``fkl``  forward KL,  KL(p || q)                                   (Hinton; the usual "KD")
- ``rkl``  reverse KL,  KL(q || p)                                   (MiniLLM's mode-seeking objective)
- ``jsd``  generalised JSD(beta) = beta KL(p || m) + (1-beta) KL(q || m), m = beta p + (1-beta) q;
  beta=0 is forward KL and beta=1 reverse KL, as in TRL's GKD and Liger's ``LigerFusedLinearJSDLoss``
- ``skl``  skew forward KL,  KL(p || skew p + (1-skew) q)           (DistiLLM, Ko et al. 2024, skew=0.1)
- ``srkl`` skew reverse KL,  KL(q || skew q + (1-skew) p)           (DistiLLM)
- ``tvd``  total variation,  0.5 sum |p - q|

Tokens are masked by ``labels == ignore_index`` and weighted by optional per-token ``weights``; the mean is
over unmasked tokens: sum(w * d) / #unmasked. Teacher rows may hold log-probabilities with ``-inf`` entries
(sparse teacher signals, see `sparse_to_dense_logprobs`): terms with zero teacher mass contribute 0.
"""
import math
import typing
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import PositiveFloat, Probability, Range
from ..errors import ConfigError, ShapeMismatchError
from ..models.outputs import Outputs
from ..registry import LOSSES
from .base import DistillLoss, check_options

Divergence = Literal["fkl", "rkl", "jsd", "skl", "srkl", "tvd"]
DIVERGENCES: tuple[str, ...] = typing.get_args(Divergence)
# GKD's beta, the teacher's share of the mixture m = beta p + (1 - beta) q: 0 is forward KL, 1 reverse KL.
JSDBeta = Probability
# DistiLLM's skew alpha, the first distribution's share of the mixture: 0 is the plain KL; at 1 the mixture is the
# first distribution itself and the divergence is 0 whatever the student does, so 1 is refused.
Skew = Annotated[float, Range(ge=0, lt=1)]


def check_divergence(divergence: str, beta: float = 0.5, skew: float = 0.1, T: float = 1.0) -> None:
    """Fail early, naming the choices, on an unknown divergence or an out-of-range parameter."""
    if divergence not in DIVERGENCES:
        raise ConfigError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"jsd beta must be in [0, 1], got {beta}")
    if not 0.0 <= skew < 1.0:
        raise ConfigError(f"skew must be in [0, 1), got {skew}")
    if not T > 0:
        raise ConfigError(f"temperature T must be > 0, got {T}")


def _plogp_ratio(log_a: Tensor, log_b: Tensor) -> Tensor:
    """a * (log a - log b) elementwise, 0 where a == 0 (so -inf log-probs in a sparse teacher are harmless)."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - torch.where(a > 0, log_b, 0.0)), 0.0)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w a + (1 - w) b) from log a and log b, stable."""
    if w <= 0.0:
        return log_b
    if w >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def divergence_from_logprobs(log_q: Tensor, log_p: Tensor, divergence: str = "fkl", *, beta: float = 0.5,
                             skew: float = 0.1) -> Tensor:
    """Per-row divergence [...] between student log-probs `log_q` and teacher log-probs `log_p` ([..., V])."""
    if divergence == "fkl":
        d = _plogp_ratio(log_p, log_q)
    elif divergence == "rkl":
        d = _plogp_ratio(log_q, log_p)
    elif divergence == "jsd":
        if beta == 0.0:
            d = _plogp_ratio(log_p, log_q)
        elif beta == 1.0:
            d = _plogp_ratio(log_q, log_p)
        else:
            log_m = _log_mix(log_p, log_q, beta)
            d = beta * _plogp_ratio(log_p, log_m) + (1.0 - beta) * _plogp_ratio(log_q, log_m)
    elif divergence == "skl":
        d = _plogp_ratio(log_p, _log_mix(log_p, log_q, skew))
    elif divergence == "srkl":
        d = _plogp_ratio(log_q, _log_mix(log_q, log_p, skew))
    elif divergence == "tvd":
        d = 0.5 * (log_p.exp() - log_q.exp()).abs()
    else:
        check_divergence(divergence)
        raise AssertionError
    return d.sum(-1)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 when any input is float64 (so gradcheck can run)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def divergence_per_token(student_logits: Tensor, teacher_logits: Tensor, divergence: str = "fkl", *,
                         T: float = 1.0, beta: float = 0.5, skew: float = 0.1) -> Tensor:
    """T^2 * D(p_teacher, q_student) per token: logits [..., V] -> [...], in float32 (float64 for float64 input)."""
    check_divergence(divergence, beta, skew, T)
    if student_logits.shape != teacher_logits.shape:
        raise ShapeMismatchError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "token KD needs the same positions and the same vocabulary (a tokenizer mismatch? see `kdkit check`)")
    dtype = compute_dtype(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits.to(dtype) / T, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(dtype) / T, dim=-1)
    return divergence_from_logprobs(log_q, log_p, divergence, beta=beta, skew=skew) * (T * T)


def token_mask(shape: torch.Size, labels: Tensor | None, ignore_index: int = -100,
               device: torch.device | None = None) -> Tensor:
    """Boolean mask of the tokens that count: labels != ignore_index (all tokens without labels)."""
    if labels is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if labels.shape != shape:
        raise ShapeMismatchError(f"labels {tuple(labels.shape)} do not match the logits' positions {tuple(shape)}")
    return labels != ignore_index


def masked_token_mean(per_token: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """sum(w * d over unmasked tokens) / #unmasked (0 when no token counts, with a gradient path kept)."""
    d = per_token if weights is None else per_token * weights.to(per_token.dtype)
    d = torch.where(mask, d, 0.0)
    return d.sum() / mask.sum().clamp(min=1)


def token_kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
                  divergence: str = "fkl", T: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                  ignore_index: int = -100, weights: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Token-level KD for LMs: `divergence_per_token`, masked by `labels`, weighted, averaged over tokens.

    `reduction="none"` returns the per-token values (masked positions are 0).
    """
    d = divergence_per_token(student_logits, teacher_logits, divergence, T=T, beta=beta, skew=skew)
    mask = token_mask(d.shape, labels, ignore_index, d.device)
    if weights is not None and weights.shape != d.shape:
        raise ShapeMismatchError(f"per-token weights {tuple(weights.shape)} do not match the tokens {tuple(d.shape)}")
    if reduction == "none":
        return torch.where(mask, d if weights is None else d * weights, 0.0)
    if reduction != "mean":
        raise ConfigError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return masked_token_mean(d, mask, weights)


def sparse_to_dense_logprobs(indices: Tensor, logprobs: Tensor, vocab_size: int, fill: str = "uniform") -> Tensor:
    """A sparse teacher signal (top-k or sampled token ids [..., k] and their log-probs) as dense log-probs [..., V].

    ``fill="uniform"`` spreads the mass the stored entries miss evenly over the other tokens (a proper
    distribution, finite everywhere, so every divergence is defined); ``fill="none"`` leaves them at ``-inf``
    (only the stored support; reverse-KL-type divergences are then infinite where the student puts mass).
    Repeated indices (sampled signals) are summed in probability space.
    """
    if indices.shape != logprobs.shape:
        raise ShapeMismatchError(f"sparse indices {tuple(indices.shape)} and values {tuple(logprobs.shape)} differ")
    if fill not in ("uniform", "none"):
        raise ConfigError(f"fill must be 'uniform' or 'none', got {fill!r}")
    k = indices.shape[-1]
    probs = torch.zeros(*indices.shape[:-1], vocab_size, dtype=torch.float32, device=indices.device)
    probs.scatter_add_(-1, indices.long(), logprobs.float().exp())
    if fill == "uniform" and vocab_size > k:
        present = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, indices.long(), True)
        rest = (1.0 - probs.sum(-1, keepdim=True)).clamp(min=0.0)
        n_rest = (~present).sum(-1, keepdim=True).clamp(min=1)
        probs = torch.where(present, probs, rest / n_rest)
    return probs.log()


# ---------------------------------------------------------------- the registered loss module

TOKEN_WEIGHTS = "token_weights"


def token_logits(student: Outputs, teacher: Outputs | None, loss: str) -> tuple[Tensor, Tensor]:
    """Student and teacher logits [B, L, V], refused (not truncated) when the vocabularies or positions differ.

    LM heads are often padded past the tokenizer (e.g. 49152 rows for a 49152-token tokenizer on one side, a
    multiple of 64 or 128 on the other): cutting the longer head silently would hide a tokenizer mismatch, so the
    error names both sizes and the ways out.
    """
    for who, out in (("student", student), ("teacher", teacher)):
        if out is None or out.logits is None:
            raise ValueError(f"{loss} needs {who} logits, but the {who} returned none")
    s, t = student.logits, teacher.logits
    if s.shape[-1] != t.shape[-1]:
        raise ShapeMismatchError(
            f"{loss}: the student's logits have {s.shape[-1]:,} vocabulary entries and the teacher's "
            f"{t.shape[-1]:,}; token KD compares the two distributions id by id, so they must be the same size. "
            "If the tokenizers are the same and one LM head is only padded, slice both logits to the tokenizer's "
            "vocabulary before the loss; if they differ, use the cross-tokenizer loss (losses.cross_tokenizer). "
            "`kdkit check teacher=... student=...` lists the differences.")
    if s.shape != t.shape:
        raise ShapeMismatchError(f"{loss}: student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} "
                                 "cover different positions; both must be [batch, length, vocab], already aligned")
    return s, t


def token_weights(student: Outputs, shape: torch.Size) -> Tensor | None:
    """Optional per-token weights [B, L] passed as ``student.features["token_weights"]`` (None: every token 1)."""
    w = student.features.get(TOKEN_WEIGHTS)
    if w is not None and w.shape != shape:
        raise ShapeMismatchError(f"student.features[{TOKEN_WEIGHTS!r}] {tuple(w.shape)} does not match the "
                                 f"tokens {tuple(shape)}")
    return w


class TokenKDLoss(DistillLoss):
    """Token-level KD for causal LMs: Hinton et al. 2015 soft targets per token, with the GKD / MiniLLM / DistiLLM divergences.

    The divergences: generalised JSD of GKD (Agarwal et al., ICLR 2024), reverse KL of MiniLLM (Gu et al., ICLR
    2024), skew KLs of DistiLLM (Ko et al., ICML 2024), total variation.

    ``T^2 * D(softmax(teacher / T), softmax(student / T))`` per token (`token_kd_loss`; ``divergence`` one of
    `DIVERGENCES`, ``beta`` for jsd, ``skew`` for skl/srkl), averaged over the tokens whose label is not
    ``ignore_index``. Logits are [B, L, V] and already aligned (the LM trainer shifts them so position t predicts
    token t + 1); labels [B, L] are only the mask (without labels every token counts). Per-token weights, when a
    caller has them, go in ``student.features["token_weights"]`` ([B, L]): the mean is then
    sum(w * d over counted tokens) / #counted. Different vocabulary sizes raise `ShapeMismatchError`.
    """

    needs_labels = True

    def __init__(self, *, divergence: Divergence = "fkl", T: PositiveFloat = 1.0, beta: JSDBeta = 0.5,
                 skew: Skew = 0.1, ignore_index: int = -100):
        super().__init__()
        check_options(self, locals())
        self.divergence = divergence
        self.T = float(T)
        self.beta = float(beta)
        self.skew = float(skew)
        self.ignore_index = int(ignore_index)

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        s, t = token_logits(student, teacher, "token_kd")
        return token_kd_loss(s, t, labels, divergence=self.divergence, T=self.T, beta=self.beta, skew=self.skew,
                             ignore_index=self.ignore_index, weights=token_weights(student, s.shape[:-1]))

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, T={self.T}, beta={self.beta}, skew={self.skew}, "
                f"ignore_index={self.ignore_index}")


if "token_kd" not in LOSSES:  # tolerate a re-import (importlib.reload)
    LOSSES.register("token_kd", TokenKDLoss)
