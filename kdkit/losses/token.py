"""Token-level KD for causal LMs: a `kdkit.divergence.Divergence` per token, masked, weighted and averaged.

The divergences (fkl, rkl, jsd, skl, srkl, tvd), their parameters and the T² convention are defined once in
`kdkit.divergence`, shared with the classifier losses and the fused kernel in `kdkit/kernels/`.

Tokens are masked by ``labels == ignore_index`` and weighted by optional per-token ``weights``; the mean is
over unmasked tokens: sum(w * d) / #unmasked. Teacher rows may hold log-probabilities with ``-inf`` entries
(sparse teacher signals, see `sparse_to_dense_logprobs`): terms with zero teacher mass contribute 0.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import PositiveFloat
from ..divergence import (DIVERGENCES, Divergence, DivergenceName, JSDBeta, Skew, check_divergence, compute_dtype,
                          divergence_from_logprobs)
from ..errors import ConfigError, ShapeMismatchError
from ..models.outputs import Outputs
from ..registry import LOSSES
from ..signals import sparse_to_dense_logprobs
from .base import DistillLoss, check_options

__all__ = ["DIVERGENCES", "Divergence", "DivergenceName", "JSDBeta", "Skew", "check_divergence", "compute_dtype",
           "divergence_from_logprobs", "divergence_per_token", "token_kd_loss", "sparse_to_dense_logprobs",
           "TokenKDLoss"]


def divergence_per_token(student_logits: Tensor, teacher_logits: Tensor, divergence: str = "fkl", *,
                         T: float = 1.0, beta: float = 0.5, skew: float = 0.1) -> Tensor:
    """T^2 * D(p_teacher, q_student) per token: logits [..., V] -> [...], in float32 (float64 for float64 input)."""
    return Divergence(divergence, T, beta, skew).per_row(student_logits, teacher_logits)


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

    def __init__(self, *, divergence: DivergenceName = "fkl", T: PositiveFloat = 1.0, beta: JSDBeta = 0.5,
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
