"""Cross-tokenizer distillation loss: Approximate Likelihood Matching (ALM) over aligned text chunks.

Minixhofer, Vulić & Ponti 2025, "Cross-Tokenizer Distillation via Approximate Likelihood Matching"
(arXiv 2503.20083; reference code bminixhofer/tokenkit: `tokenkit/training/losses.py`,
`docs/pytorch_alm_from_scratch.ipynb`). The text alignment that produces the chunks (tokenizers, offsets,
batching) lives with the LM pillar in `kdkit.llm.cross_tokenizer` (`CrossTokenizerBatcher`); this module is the
tensor side only, so the loss zoo does not depend on the LM pillar.

1. Chunk likelihood (`chunk_logprobs`): a model's log-likelihood of a chunk is the sum of the log-probs of its own
   next tokens inside the chunk (a token at position 0 has none, so a chunk holding one is left out). With
   `append_space`, tokenkit's `alm_mode=append_space`, the log-prob that the token after the chunk starts with
   whitespace (or is special) is added on each side: both then score "this text, then a word boundary".
2. Loss (`binarised_divergence`, `alm_loss`): per chunk, p = exp(teacher chunk logp), q = exp(student chunk logp),
   a divergence between Bernoulli(p^(1/T)) and Bernoulli(q^(1/T)), as tokenkit: log p^(1/T) = logp / T - 1e-6
   (the epsilon keeps it < 0), chunk logps clipped to <= 0, T = 100 (`bce_temp`), averaged over the chunks
   (`distill_main_path_numerator = denominator = chunk_count`). tokenkit's default `binary_ce` is the binary cross
   entropy -(p' log q' + (1-p') log(1-q')); our default `binary_kl` subtracts the teacher's binary entropy from it:
   the same gradient for the student, and exactly 0 when the chunk likelihoods agree. Values scale roughly as 1/T.

`CrossTokenizerLoss` (registered as loss ``cross_tokenizer``) reads, for each side (student and teacher `Outputs`):
  - ``logits``: [B, L, V], the model's logits over its own input ids, *not* shifted (position t predicts t+1);
  - ``features["input_ids"]``: [B, L] those ids;
  - ``features["chunk_ids"]``: [B, L] long, the chunk each token belongs to (-1: none; padding, BOS, excluded);
    the same id names the same text on both sides;
  - ``features["space_mask"]``: [V'] bool, only with ``append_space`` (tokens starting with whitespace or special).
`kdkit.llm.cross_tokenizer.CrossTokenizerBatcher(teacher_tok, student_tok, max_length)(texts)` returns exactly
these as ``batch["teacher"]`` / ``batch["student"]`` (plus ``attention_mask``). Only the student gets gradients
(the teacher's chunk log-likelihoods are detached).
"""

import math
import typing
from typing import Literal

import torch
from torch import Tensor

from ..config import PositiveFloat
from ..errors import ConfigError, ShapeMismatchError
from ..models.outputs import Outputs
from ..registry import LOSSES
from ..signals import CrossTokenizerChunks
from .base import DistillLoss, check_options

__all__ = ["chunk_logprobs", "binarised_divergence", "alm_loss", "CrossTokenizerLoss", "CHUNK_MODES",
           "ALM_DIVERGENCES"]

# where chunks may end: at every shared token boundary, or only before whitespace (word-level chunks)
ChunkMode = Literal["unconstrained", "space"]
CHUNK_MODES: tuple[str, ...] = typing.get_args(ChunkMode)
AlmDivergence = Literal["binary_kl", "binary_ce", "reverse_binary_kl", "abs"]
ALM_DIVERGENCES: tuple[str, ...] = typing.get_args(AlmDivergence)
_EPS = 1e-6  # tokenkit's epsilon: log p^(1/T) - eps < 0, so log(1 - p^(1/T)) stays finite


def chunk_logprobs(logits: Tensor, input_ids: Tensor, chunk_ids: Tensor, n_chunks: int,
                   space_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-chunk log-likelihoods [B, C] of a model's own tokens, and [B, C] bool: the chunk is scored.

    `logits` [B, L, V] unshifted (position t predicts token t+1), `input_ids` / `chunk_ids` [B, L]. A chunk is
    scored when it has tokens here and none at position 0 (which nothing predicts). With `space_mask` ([V'] bool,
    V' <= V) the log-prob that the token after the chunk's last token is in the mask is added (append_space).
    """
    b, n, v = logits.shape
    if input_ids.shape != (b, n) or chunk_ids.shape != (b, n):
        raise ShapeMismatchError(
            f"logits {tuple(logits.shape)} need input_ids and chunk_ids of shape {(b, n)}, got "
            f"{tuple(input_ids.shape)} and {tuple(chunk_ids.shape)}; pass the model's logits unshifted, one row per "
            "input token")
    if int(chunk_ids.max()) >= n_chunks:
        raise ShapeMismatchError(f"chunk id {int(chunk_ids.max())} >= n_chunks {n_chunks}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32, fp64 stays
    lse = logits.logsumexp(-1)  # [B, L]
    tok = logits[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1) - lse[:, :-1]  # log p(token t | < t)
    slot = chunk_ids[:, 1:] + 1  # slot 0 collects tokens in no chunk
    sums = tok.new_zeros(b, n_chunks + 1).scatter_add(1, slot, tok)[:, 1:]
    counts = tok.new_zeros(b, n_chunks + 1).scatter_add(1, slot, torch.ones_like(tok))[:, 1:]
    first = torch.zeros(b, n_chunks + 1, dtype=torch.bool, device=logits.device)
    first[torch.arange(b, device=logits.device), chunk_ids[:, 0] + 1] = True
    valid = (counts > 0) & ~first[:, 1:]
    if space_mask is not None:
        if space_mask.dim() != 1 or space_mask.numel() > v:
            raise ShapeMismatchError(f"space_mask must be [V'] with V' <= {v} (the logits' vocabulary), got "
                                     f"{tuple(space_mask.shape)}")
        keep = torch.zeros(v, dtype=torch.bool, device=logits.device)
        keep[:space_mask.numel()] = space_mask.to(logits.device, torch.bool)
        if not keep.any():
            raise ConfigError("space_mask marks no token; build it with space_token_mask(tokenizer)")
        space_lp = logits.masked_fill(~keep, float("-inf")).logsumexp(-1) - lse  # [B, L]
        pos = torch.arange(n, device=logits.device).expand(b, n)
        last = torch.zeros(b, n_chunks + 1, dtype=torch.long, device=logits.device)
        last = last.scatter_reduce(1, chunk_ids + 1, pos, reduce="amax", include_self=True)[:, 1:]
        sums = sums + torch.where(valid, space_lp.gather(1, last), 0.0)
    return sums, valid


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, precise at both ends (Mächler 2012), as tokenkit's `log1mexp`."""
    small = x < -math.log(2.0)
    return torch.where(small, torch.log1p(-torch.exp(torch.where(small, x, -1.0))),
                       torch.log(-torch.expm1(torch.where(small, -1.0, x))))


def binarised_divergence(teacher_logp: Tensor, student_logp: Tensor, divergence: str = "binary_kl",
                         T: float = 100.0) -> Tensor:
    """Elementwise divergence between Bernoulli(p^(1/T)) and Bernoulli(q^(1/T)), given log p and log q (<= 0).

    ``binary_kl``: KL(teacher || student); ``binary_ce``: tokenkit's default, KL plus the teacher's binary entropy;
    ``reverse_binary_kl``: KL(student || teacher); ``abs``: |log p - log q| (tokenkit's "abs", no temperature).
    """
    if divergence not in ALM_DIVERGENCES:
        raise ConfigError(f"unknown ALM divergence {divergence!r}; choose one of {', '.join(ALM_DIVERGENCES)}")
    if not T > 0:
        raise ConfigError(f"temperature T must be > 0, got {T}")
    if divergence == "abs":
        return (teacher_logp - student_logp).abs()
    a = teacher_logp / T - _EPS
    c = student_logp / T - _EPS
    p, q = a.exp(), c.exp()
    if divergence == "binary_ce":
        return -(p * c + (1 - p) * _log1mexp(c))
    if divergence == "binary_kl":
        return p * (a - c) + (1 - p) * (_log1mexp(a) - _log1mexp(c))
    return q * (c - a) + (1 - q) * (_log1mexp(c) - _log1mexp(a))


def alm_loss(student_logits: Tensor, teacher_logits: Tensor, student_ids: Tensor, teacher_ids: Tensor,
             student_chunks: Tensor, teacher_chunks: Tensor, *, divergence: str = "binary_kl", T: float = 100.0,
             student_space_mask: Tensor | None = None, teacher_space_mask: Tensor | None = None,
             reduction: str = "mean") -> Tensor:
    """ALM: the mean over chunks scored on both sides of `binarised_divergence(teacher chunk logp, student's)`.

    Teacher tensors are detached. ``reduction="none"`` gives [B, C] with 0 where a chunk is not scored.
    Space masks: both or neither (append_space).
    """
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ShapeMismatchError(f"student batch {student_logits.shape[0]} != teacher batch {teacher_logits.shape[0]}")
    if (student_space_mask is None) != (teacher_space_mask is None):
        raise ConfigError("append_space needs a space_mask for both the student and the teacher")
    c = int(max(student_chunks.max(), teacher_chunks.max())) + 1
    s_lp, s_ok = chunk_logprobs(student_logits, student_ids, student_chunks, c, student_space_mask)
    with torch.no_grad():
        t_lp, t_ok = chunk_logprobs(teacher_logits.detach(), teacher_ids, teacher_chunks, c, teacher_space_mask)
    ok = s_ok & t_ok
    d = binarised_divergence(t_lp.clamp(max=0.0), s_lp.clamp(max=0.0), divergence, T)
    d = torch.where(ok, d, 0.0)
    if reduction == "none":
        return d
    if reduction != "mean":
        raise ConfigError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return d.sum() / ok.sum().clamp(min=1)


def _side(outputs: Outputs | None, who: str, key: str) -> Tensor:
    if outputs is None or outputs.logits is None:
        raise ConfigError(f"cross_tokenizer needs {who} logits (unshifted, over the {who}'s own input ids)")
    if key not in outputs.features:
        raise ConfigError(f"cross_tokenizer needs {who}.features['{key}'] (from CrossTokenizerBatcher); has "
                          f"{sorted(outputs.features) or 'none'}")
    return outputs.features[key]


class CrossTokenizerLoss(DistillLoss):
    """Cross-tokenizer KD: Approximate Likelihood Matching (Minixhofer, Vulić & Ponti 2025, arXiv 2503.20083).

    Matches the teacher's and the student's likelihoods of the same text chunks, so teacher and student may
    tokenize differently; see the module docstring for what it reads from `Outputs` (the chunks come from
    `kdkit.llm.cross_tokenizer.CrossTokenizerBatcher`).
    Options: `T` (tokenkit's bce_temp, 100), `divergence` (binary_kl, binary_ce, reverse_binary_kl, abs),
    `append_space` (add P(next token starts a word) to each chunk, tokenkit's default alm_mode), `chunks`
    ("unconstrained" or "space": read by the trainer to build its `CrossTokenizerBatcher`).
    """

    needs_labels = False

    def __init__(self, *, T: PositiveFloat = 100.0, divergence: AlmDivergence = "binary_kl", append_space: bool = False,
                 chunks: ChunkMode = "unconstrained"):
        super().__init__()
        check_options(self, locals())
        self.T, self.divergence, self.append_space, self.chunks = float(T), divergence, bool(append_space), chunks

    def _inputs(self, student: Outputs, teacher: Outputs | CrossTokenizerChunks | None) -> dict:
        if isinstance(teacher, CrossTokenizerChunks):  # the trainer's typed signal: the same fields, named
            teacher = Outputs(teacher.logits, {k: v for k, v in (("input_ids", teacher.input_ids),
                                                                  ("chunk_ids", teacher.chunk_ids),
                                                                  ("space_mask", teacher.space_mask)) if v is not None})
        s_ids, t_ids = _side(student, "student", "input_ids"), _side(teacher, "teacher", "input_ids")
        space = self.append_space
        return dict(student_logits=student.logits, teacher_logits=teacher.logits, student_ids=s_ids,
                    teacher_ids=t_ids, student_chunks=_side(student, "student", "chunk_ids"),
                    teacher_chunks=_side(teacher, "teacher", "chunk_ids"),
                    student_space_mask=_side(student, "student", "space_mask") if space else None,
                    teacher_space_mask=_side(teacher, "teacher", "space_mask") if space else None,
                    divergence=self.divergence, T=self.T)

    def forward(self, student: Outputs, teacher: Outputs | CrossTokenizerChunks | None, labels: Tensor | None = None) -> Tensor:
        return alm_loss(**self._inputs(student, teacher))

    def per_chunk(self, student: Outputs, teacher: Outputs | None) -> Tensor:
        """[B, C] divergences, 0 on chunks not scored (forward is their mean over scored chunks)."""
        return alm_loss(**self._inputs(student, teacher), reduction="none")

    def extra_repr(self) -> str:
        return f"T={self.T}, divergence={self.divergence}, append_space={self.append_space}, chunks={self.chunks}"


if "cross_tokenizer" not in LOSSES:  # tolerate a re-import (importlib.reload)
    LOSSES.register("cross_tokenizer", CrossTokenizerLoss)
