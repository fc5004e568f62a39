"""Self-attention distillation (MiniLM): attention-distribution and value-relation transfer between transformers.

Both losses are KL(teacher || student) between row distributions ``[B, H, L, L]`` (one distribution over keys
per head and query position), averaged as in the MiniLM paper's Eq. 1: over heads and query positions of each
sequence (``1 / (A_h |x|)``), then over the batch. With a padding mask ``[B, L]`` (1/True = real token), padded
keys are left out of every distribution and padded queries out of the average, so a sequence's loss is
normalised by its own length (as Bloomberg's MiniLMv2 implementation does for right-padded batches).
`MiniLMLoss` reads that mask from ``Outputs.features[ATTENTION_MASK_KEY]`` (``"attention_mask"``, the Hugging
Face ``attention_mask`` of the batch) when the trainer puts it there.
Inputs of any floating dtype give float32 (float64 for float64) losses.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import NonNegInt
from ..errors import ConfigError, ShapeMismatchError
from ..models.outputs import Outputs
from ..registry import LOSSES
from .base import DistillLoss, check_options

__all__ = ["attention_kl_loss", "value_relation_loss", "split_heads", "MiniLMLoss", "ATTENTION_MASK_KEY"]

# Reserved `Outputs.features` key: the batch's padding mask [B, L] (1 = real token, 0 = padding), as the
# Hugging Face ``attention_mask``; a trainer of padded token batches stores it here, losses read it.
ATTENTION_MASK_KEY = "attention_mask"


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def _dtype(*ts: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in ts:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_mask(mask: Tensor | None, b: int, l: int, what: str, device) -> Tensor | None:
    if mask is None:
        return None
    if tuple(mask.shape) != (b, l):
        raise ShapeMismatchError(f"{what}: padding mask of shape {_shape(mask)} must be [batch, length] = {(b, l)}")
    return mask.to(device=device).bool()


def _average_rows(rows: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of per-row KLs ``[B, H, L]``: over heads and (valid) queries of each sequence, then over the batch."""
    if mask is None:
        return rows.mean()
    q = mask[:, None, :].to(rows.dtype)  # [B, 1, L]
    per_seq = (rows * q).sum(dim=(1, 2)) / (q.sum(dim=(1, 2)) * rows.shape[1]).clamp_min(1.0)
    return per_seq.mean()


def _kl_from_probs(p_t: Tensor, p_s: Tensor, keys: Tensor | None) -> Tensor:
    """Per-row ``sum_k p_t (log p_t - log p_s)`` over keys with ``p_t > 0`` (and valid): shape ``[..., L]``."""
    keep = p_t > 0
    if keys is not None:
        keep = keep & keys
    tiny = torch.finfo(p_s.dtype).tiny  # an underflowed student probability gives a large, finite term
    log_t = torch.log(torch.where(keep, p_t, 1.0))
    log_s = torch.log(torch.where(keep, p_s.clamp_min(tiny), 1.0))
    return torch.where(keep, p_t * (log_t - log_s), 0.0).sum(dim=-1)


def attention_kl_loss(s_attn: Tensor, t_attn: Tensor, mask: Tensor | None = None) -> Tensor:
    """Wang et al., NeurIPS 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
    Pre-Trained Transformers" (Eq. 1): KL(teacher attention || student attention) per head and query, averaged.

    ``s_attn`` / ``t_attn``: attention probabilities ``[B, H, L, L]`` (rows sum to 1 over keys, as the eager
    attention weights of Hugging Face models); student and teacher need the same number of heads H.
    Keys the teacher gives probability 0 (causal or padding masks) contribute nothing.
    """
    if s_attn.dim() != 4 or s_attn.shape != t_attn.shape or s_attn.shape[-1] != s_attn.shape[-2]:
        raise ShapeMismatchError(
            f"attention_kl_loss: student attention {_shape(s_attn)} and teacher attention {_shape(t_attn)} must "
            "both be [batch, heads, length, length] with the same shape (MiniLM needs equal head counts for "
            "attention transfer; use the value relation with relation heads for different counts)"
        )
    b, _, l, _ = s_attn.shape
    dtype = _dtype(s_attn, t_attn)
    mask = _check_mask(mask, b, l, "attention_kl_loss", s_attn.device)
    keys = None if mask is None else mask[:, None, None, :]
    rows = _kl_from_probs(t_attn.to(dtype), s_attn.to(dtype), keys)  # [B, H, L]
    return _average_rows(rows, mask)


def split_heads(x: Tensor, num_heads: int, what: str = "values") -> Tensor:
    """``[B, L, H*d]`` -> ``[B, H, L, d]`` (heads are consecutive slices of the last dimension, as in BERT/Llama)."""
    if x.dim() != 3:
        raise ShapeMismatchError(f"{what} must be [batch, length, heads*head_dim], got {_shape(x)}")
    if num_heads < 1 or x.shape[-1] % num_heads != 0:
        raise ShapeMismatchError(
            f"{what} of width {x.shape[-1]} (shape {_shape(x)}) cannot be split into {num_heads} heads; "
            "the number of heads must divide the width"
        )
    b, l, d = x.shape
    return x.reshape(b, l, num_heads, d // num_heads).transpose(1, 2)


def _relation_log_probs(v: Tensor, keys: Tensor | None) -> Tensor:
    """log softmax(V V^T / sqrt(d)) over keys, masked keys at -inf: ``[B, H, L, L]``."""
    scores = v @ v.transpose(-1, -2) / math.sqrt(v.shape[-1])
    if keys is not None:
        scores = scores.masked_fill(~keys, float("-inf"))
    return F.log_softmax(scores, dim=-1)


def value_relation_loss(
    s_values: Tensor,
    t_values: Tensor,
    num_heads_s: int,
    num_heads_t: int,
    mask: Tensor | None = None,
) -> Tensor:
    """Wang et al., NeurIPS 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
    Pre-Trained Transformers" (Eq. 3-4): KL between teacher and student value relations softmax(V V^T / sqrt(d_k)).

    ``s_values`` ``[B, L, H_s*d_s]``, ``t_values`` ``[B, L, H_t*d_t]`` (the ``v_proj`` / ``value`` outputs) are
    split into heads; each relation uses its own model's head size ``d_k``. The head counts must be equal --
    MiniLM's value heads, or MiniLMv2's (Wang et al., ACL Findings 2021) relation heads: pass the same number of
    relation heads for both models, whatever their attention head counts, to compare models with different ones.
    """
    if s_values.dim() != 3 or t_values.dim() != 3 or s_values.shape[:2] != t_values.shape[:2]:
        raise ShapeMismatchError(
            f"value_relation_loss: student values {_shape(s_values)} and teacher values {_shape(t_values)} must be "
            "[batch, length, width] with the same batch and length"
        )
    if num_heads_s != num_heads_t:
        raise ShapeMismatchError(
            f"value_relation_loss: student has {num_heads_s} heads and teacher {num_heads_t}; the relations are "
            "compared head by head, so split both into the same number of relation heads (MiniLMv2: heads=N)"
        )
    dtype = _dtype(s_values, t_values)
    vs = split_heads(s_values.to(dtype), num_heads_s, "student values")
    vt = split_heads(t_values.to(dtype), num_heads_t, "teacher values")
    b, l = s_values.shape[:2]
    mask = _check_mask(mask, b, l, "value_relation_loss", s_values.device)
    keys = None if mask is None else mask[:, None, None, :]
    log_s = _relation_log_probs(vs, keys)
    log_t = _relation_log_probs(vt, keys)
    p_t = log_t.exp()
    keep = p_t > 0
    rows = torch.where(keep, p_t * (torch.where(keep, log_t, 0.0) - torch.where(keep, log_s, 0.0)), 0.0).sum(-1)
    return _average_rows(rows, mask)


def _padding_mask(student: Outputs, teacher: Outputs, explicit: Tensor | None) -> Tensor | None:
    """The batch's padding mask: ``explicit`` or the reserved feature of either outputs; all given must agree."""
    found = [("attention_mask=", explicit)] if explicit is not None else []
    found += [(f"{who}.features[{ATTENTION_MASK_KEY!r}]", out.features[ATTENTION_MASK_KEY])
              for who, out in (("student", student), ("teacher", teacher)) if ATTENTION_MASK_KEY in out.features]
    if not found:
        return None
    (name, mask), rest = found[0], found[1:]
    for other_name, other in rest:
        if tuple(other.shape) != tuple(mask.shape) or not torch.equal(other.to(mask.device).bool(), mask.bool()):
            raise ShapeMismatchError(
                f"minilm: the padding masks {name} {_shape(mask)} and {other_name} {_shape(other)} differ; student "
                "and teacher must see the same padded batch"
            )
    return mask


class MiniLMLoss(DistillLoss):
    """Wang et al., NeurIPS 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
    Pre-Trained Transformers" (attention-distribution KL plus value-relation KL of one layer pair).

    ``student_attn`` / ``teacher_attn`` tap the attention probabilities, e.g. ``model.layers.5.self_attn[1]``
    on Hugging Face Llama or ``encoder.layer.5.attention.self[1]`` on BERT, both with
    ``attn_implementation="eager"`` (MiniLM distils the last layer of each). Set the student's attention dropout
    to 0: the eager weights are returned after dropout. ``student_values`` / ``teacher_values`` (optional, both
    or neither) tap the value projections (``...self_attn.v_proj`` / ``...attention.self.value``); the loss is
    then attention KL + value-relation KL (the paper's sum, unweighted). ``heads=0`` splits the values into the
    attention maps' head counts (MiniLM; they must be equal); ``heads=N`` uses N relation heads for both
    (MiniLMv2), which also suits grouped-query attention (set N to divide the key/value heads' width).

    Padding: the batch's ``[B, L]`` mask (1 = token, 0 = padding) is read from
    ``student.features["attention_mask"]`` or ``teacher.features["attention_mask"]`` (`ATTENTION_MASK_KEY`; both,
    if present, must agree) or passed as ``attention_mask=`` to the call. Padded keys are left out of every
    distribution and padded queries out of the average, so a padded batch gives the mean of the sequences'
    unpadded losses. Without a mask every position counts.
    """

    def __init__(
        self,
        *,
        student_attn: str = "",
        teacher_attn: str = "",
        student_values: str = "",
        teacher_values: str = "",
        heads: NonNegInt = 0,
    ):
        super().__init__()
        check_options(self, locals())
        if bool(student_values) != bool(teacher_values):
            raise ConfigError(
                "minilm: set both student_values and teacher_values (value-relation transfer) or neither; got "
                f"student_values={student_values!r}, teacher_values={teacher_values!r}"
            )
        self.student_attn, self.teacher_attn = student_attn, teacher_attn
        self.student_values, self.teacher_values = student_values, teacher_values
        self.heads = int(heads)
        self.student_taps = tuple(p for p in (student_attn, student_values) if p)
        self.teacher_taps = tuple(p for p in (teacher_attn, teacher_values) if p)

    def _check_paths(self) -> None:
        if not self.student_attn or not self.teacher_attn:
            raise ConfigError(
                "minilm needs the attention maps to distil: set student_attn and teacher_attn to tapped attention "
                "outputs, e.g. student_attn='model.layers.3.self_attn[1]' (Hugging Face, eager attention)"
            )

    def setup(self, student: Outputs, teacher: Outputs | None) -> None:
        self._check_paths()
        self(student, teacher)  # checks every shape on the example batch

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        self._check_paths()
        if teacher is None:
            raise ValueError("minilm needs the teacher's outputs, but none were passed")
        mask = _padding_mask(student, teacher, attention_mask)
        s_attn = student.feature(self.student_attn, "student")
        t_attn = teacher.feature(self.teacher_attn, "teacher")
        loss = attention_kl_loss(s_attn, t_attn, mask=mask)
        if self.student_values:
            h_s = self.heads or s_attn.shape[1]
            h_t = self.heads or t_attn.shape[1]
            loss = loss + value_relation_loss(
                student.feature(self.student_values, "student"),
                teacher.feature(self.teacher_values, "teacher"),
                h_s,
                h_t,
                mask=mask,
            )
        return loss

    def extra_repr(self) -> str:
        return (f"student_attn={self.student_attn!r}, teacher_attn={self.teacher_attn!r}, "
                f"student_values={self.student_values!r}, teacher_values={self.teacher_values!r}, heads={self.heads}")


if "minilm" not in LOSSES:  # tolerate a re-import
    LOSSES.register("minilm", MiniLMLoss)
