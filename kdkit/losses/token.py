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
from ..signals import CrossTokenizerChunks, Sampled, TeacherSignal, TopK, as_signal, sparse_to_dense_logprobs
from .base import DistillLoss, check_options

__all__ = ["DIVERGENCES", "Divergence", "DivergenceName", "JSDBeta", "Skew", "check_divergence", "compute_dtype",
           "divergence_from_logprobs", "divergence_per_token", "token_kd_loss", "signal_kd_loss",
           "sparse_to_dense_logprobs", "TokenKDLoss"]


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


def sparse_fkl_per_token(student_logits: Tensor, signal: TopK | Sampled, T: float = 1.0) -> Tensor:
    """T^2 * sum_i w_i (log p_i - log s_i) over a sparse signal's ids [...]: forward KL on the support of a top-k
    signal with tail='support' (w = p), or RS-KD's unbiased estimate of forward KL from a sampled one (w = counts
    / N * p / q). Entries of weight 0 (padding) contribute nothing."""
    dtype = compute_dtype(student_logits)
    idx = signal.indices.to(student_logits.device).long()
    t_logp = signal.logprobs.to(student_logits.device, dtype)
    w = signal.weights().to(t_logp) if isinstance(signal, Sampled) else t_logp.exp()
    log_s = F.log_softmax(student_logits.to(dtype) / T, dim=-1).gather(-1, idx)
    return torch.where(w > 0, w * (t_logp - log_s), 0.0).sum(-1) * (T * T)


def topk_uniform_fkl_per_token(student_logits: Tensor, signal: TopK, T: float = 1.0) -> Tensor:
    """T^2 * KL(p || s) [...] where p is a top-k signal whose missing mass m is spread evenly over the V - k other
    ids, in closed form: sum_K p (log p - log s) + m log(m / (V - k)) - m / (V - k) * sum_{j not in K} log s_j.
    Why: the same value as densifying p to [..., V] (`sparse_to_dense_logprobs`), without building, scattering
    and reading a teacher tensor as large as the student's logits, which made top-k KD ~3x slower than SFT."""
    dtype = compute_dtype(student_logits)
    idx = signal.indices.to(student_logits.device).long()
    t_logp = signal.logprobs.to(student_logits.device, dtype)
    vocab, k = student_logits.shape[-1], idx.shape[-1]
    log_s = F.log_softmax(student_logits.to(dtype) / T, dim=-1)
    log_s_top = log_s.gather(-1, idx)
    p = t_logp.exp()
    d = (p * (t_logp - log_s_top)).sum(-1)
    if vocab > k:
        rest = (1.0 - p.sum(-1)).clamp(min=0.0)
        q = rest / (vocab - k)
        d = d + torch.xlogy(rest, q) - q * (log_s.sum(-1) - log_s_top.sum(-1))
    return d * (T * T)


def signal_kd_loss(student_logits: Tensor, teacher, labels: Tensor | None = None, *, div: Divergence,
                   ignore_index: int = -100, weights: Tensor | None = None, reduction: str = "mean",
                   loss: str = "token_kd") -> Tensor:
    """Token KD of `student_logits` [..., V] against any teacher signal at the same positions [...]: a live
    teacher's logits (`Outputs` or a tensor), or a `TeacherSignal` from a store, a server or the fused path.

    Kinds with a full distribution (dense logits, hidden states + head, top-k with a uniform or renormalised tail)
    go through `token_kd_loss` with every setting of `div` (forward KL against a uniform-tail top-k in closed form,
    `topk_uniform_fkl_per_token`); a top-k signal with tail='support' and a sampled one
    estimate forward KL on their ids (`sparse_fkl_per_token`), so they take divergence='fkl' only. Sparse signals
    are refused at another temperature than their own.
    """
    signal = as_signal(teacher)
    if signal is None:
        raise ConfigError(f"{loss} needs a teacher signal, got none")
    if tuple(signal.positions()) != tuple(student_logits.shape[:-1]):
        raise ShapeMismatchError(f"{loss}: student logits {tuple(student_logits.shape)} and the {signal.kind} "
                                 f"teacher signal at positions {tuple(signal.positions())} cover different positions;"
                                 " both must be aligned already (position t predicts token t + 1)")
    if isinstance(signal, CrossTokenizerChunks):
        raise ConfigError(f"{loss} compares distributions id by id; a CrossTokenizerChunks signal comes from a "
                          "teacher with another tokenizer: use the cross_tokenizer loss")
    sparse = isinstance(signal, Sampled) or (isinstance(signal, TopK) and signal.tail == "support")
    if sparse and div.name != "fkl":
        what = "a sampled (RS-KD) signal" if isinstance(signal, Sampled) else "a top-k signal with tail='support'"
        raise ConfigError(f"{loss}: {what} estimates forward KL only (divergence='fkl'), got {div.name!r}; use a "
                          "dense signal or a top-k one with tail='uniform' or 'none' for other divergences")
    uniform_fkl = isinstance(signal, TopK) and signal.tail == "uniform" and div.name == "fkl"
    if sparse or uniform_fkl:
        signal.check_temperature(div.T, loss)
        d = topk_uniform_fkl_per_token(student_logits, signal, div.T) if uniform_fkl else \
            sparse_fkl_per_token(student_logits, signal, div.T)
        mask = token_mask(d.shape, labels, ignore_index, d.device)
        if weights is not None and weights.shape != d.shape:
            raise ShapeMismatchError(f"per-token weights {tuple(weights.shape)} do not match the tokens "
                                     f"{tuple(d.shape)}")
        if reduction == "none":
            return torch.where(mask, d if weights is None else d * weights, 0.0)
        return masked_token_mean(d, mask, weights)
    t = signal.teacher_logits(div.T, student_logits.shape[-1], loss)
    return token_kd_loss(student_logits, t, labels, divergence=div.name, T=div.T, beta=div.beta, skew=div.skew,
                         ignore_index=ignore_index, weights=weights, reduction=reduction)


# ---------------------------------------------------------------- the registered loss module

TOKEN_WEIGHTS = "token_weights"


def token_logits(student: Outputs, teacher, loss: str, T: float = 1.0) -> tuple[Tensor, Tensor]:
    """Student logits [B, L, V] and teacher logits whose softmax at T is the teacher at T, from a live teacher's
    `Outputs` or any `TeacherSignal` with a full distribution; refused (not truncated) when the vocabularies or
    positions differ.

    LM heads are often padded past the tokenizer (e.g. 49152 rows for a 49152-token tokenizer on one side, a
    multiple of 64 or 128 on the other): cutting the longer head silently would hide a tokenizer mismatch, so the
    error names both sizes and the ways out.
    """
    if student is None or student.logits is None:
        raise ValueError(f"{loss} needs student logits, but the student returned none")
    if teacher is None or (isinstance(teacher, Outputs) and teacher.logits is None):
        raise ValueError(f"{loss} needs teacher logits, but the teacher returned none")
    s, signal = student.logits, as_signal(teacher)
    t = signal.teacher_logits(T, s.shape[-1], loss)
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
        self.div = Divergence(divergence, T, beta, skew)
        self.ignore_index = int(ignore_index)

    divergence = property(lambda self: self.div.name)
    T = property(lambda self: self.div.T)
    beta = property(lambda self: self.div.beta)
    skew = property(lambda self: self.div.skew)

    def forward(self, student: Outputs, teacher: Outputs | TeacherSignal | None,
                labels: Tensor | None = None) -> Tensor:
        if student is None or student.logits is None:
            raise ValueError("token_kd needs student logits, but the student returned none")
        if teacher is None or (isinstance(teacher, Outputs) and teacher.logits is None):
            raise ValueError("token_kd needs teacher logits, but the teacher returned none")
        s = student.logits
        return signal_kd_loss(s, teacher, labels, div=self.div, ignore_index=self.ignore_index,
                              weights=token_weights(student, s.shape[:-1]))

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, T={self.T}, beta={self.beta}, skew={self.skew}, "
                f"ignore_index={self.ignore_index}")


if "token_kd" not in LOSSES:  # tolerate a re-import (importlib.reload)
    LOSSES.register("token_kd", TokenKDLoss)
