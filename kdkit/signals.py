"""Typed teacher signals: what an LM teacher hands the losses, whether it runs live, is read from a store or served.

Every LM loss, the fused linear-KD kernel, the teacher-signal store and the on-policy path take a `TeacherSignal`,
so a store-backed run means exactly what a live-teacher run means: the loss applies its own divergence, T, beta,
skew and ignore_index to whichever kind it is given. The kinds:

- `DenseLogits`     logits [..., V] (a live teacher; a dense store's log-probs at T0 times T0 are exact logits)
- `HiddenStates`    final hidden states [N, H] plus the LM head (weight [V, H], bias [V]): the fused kernel's input
- `TopK`            the k most likely ids and their log-probs [..., k] at `temperature`
- `Sampled`         RS-KD (Anshumann et al., ACL 2025): distinct sampled ids, their log-probs, counts and
                    importance ratios p/q (1 when drawn from p itself) [..., k], at `temperature`
- `CrossTokenizerChunks`  the teacher's own logits and ids with text-chunk ids, for cross-tokenizer KD

Each records the temperature its probabilities were produced at (dense logits and hidden states: 1, raw logits,
which any T re-tempers exactly; sparse kinds cannot be re-tempered, so a loss at another T is refused) and the
teacher tokenizer's fingerprint (`kdkit.llm.tokenizers.tokenizer_fingerprint`), checked where a student's
tokenizer is known.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
from torch import Tensor

from .errors import ConfigError, ShapeMismatchError

TopKTail = Literal["uniform", "none", "support"]


@dataclass(frozen=True, kw_only=True)
class TeacherSignal:
    """What all kinds share: the temperature the signal was made at and the teacher tokenizer's fingerprint."""

    temperature: float = 1.0
    tokenizer: str | None = None

    retemperable = False  # dense kinds: True (raw logits serve every T)

    def to(self, device) -> "TeacherSignal":
        """The same signal with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if torch.is_tensor(getattr(self, f.name))}
        return replace(self, **moved)

    def check_temperature(self, T: float, loss: str) -> None:
        """A sparse signal only means something at the temperature it was made at."""
        if not self.retemperable and float(T) != float(self.temperature):
            raise ConfigError(
                f"{loss}: the {self.kind} teacher signal was made at temperature {self.temperature}; a sparse signal "
                f"cannot be re-tempered, so the loss must use T={self.temperature} (got T={T}), or remake the signal "
                f"at T={T}")

    def check_tokenizer(self, fingerprint: str | None, who: str = "the student") -> None:
        if self.tokenizer is not None and fingerprint is not None and fingerprint != self.tokenizer:
            from .errors import TokenizerMismatchError

            raise TokenizerMismatchError(
                f"the teacher signal was made with the tokenizer of fingerprint {self.tokenizer}, {who} uses "
                f"{fingerprint}: token ids would be read against another vocabulary")

    @property
    def kind(self) -> str:
        return type(self).__name__

    per_position = "logits"  # the field whose leading shape [...] is one distribution per position

    def positions(self) -> torch.Size:
        """The leading shape (one distribution per position)."""
        return getattr(self, self.per_position).shape[:-1]

    def teacher_logits(self, T: float, vocab_size: int, loss: str = "token_kd") -> Tensor:
        """Logits x with softmax(x / T) the teacher's distribution at T ([..., V], float32): what a dense-logit loss
        compares against. Kinds without a full distribution (Sampled, CrossTokenizerChunks) refuse, naming why."""
        raise ConfigError(f"{loss} needs the teacher's full distribution; a {self.kind} signal does not have one")


@dataclass(frozen=True, kw_only=True)
class DenseLogits(TeacherSignal):
    """Teacher logits [..., V]: raw (temperature 1), re-tempered exactly by any loss T."""

    logits: Tensor | None = None
    retemperable = True

    def teacher_logits(self, T: float, vocab_size: int, loss: str = "token_kd") -> Tensor:
        _check_vocab(self.logits.shape[-1], vocab_size, loss)
        return self.logits if self.temperature == 1.0 else self.logits * self.temperature

    @classmethod
    def from_logprobs(cls, logprobs: Tensor, temperature: float, tokenizer: str | None = None) -> "DenseLogits":
        """Stored log p at T0: log p * T0 are logits whose softmax at T0 is p, and at any T the teacher at T."""
        return cls(temperature=1.0, tokenizer=tokenizer, logits=_at_least_float32(logprobs) * float(temperature))


@dataclass(frozen=True, kw_only=True)
class HiddenStates(TeacherSignal):
    """The teacher's final hidden states [N, H] and LM head (weight [V, H], optional bias [V]): the fused kernel
    computes the logits chunk by chunk instead of holding N x V of them."""

    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    retemperable = True

    per_position = "hidden"

    def teacher_logits(self, T: float, vocab_size: int, loss: str = "token_kd") -> Tensor:
        _check_vocab(self.weight.shape[0], vocab_size, loss)
        logits = self.hidden @ self.weight.T.to(self.hidden.dtype)
        return logits if self.bias is None else logits + self.bias.to(logits.dtype)


@dataclass(frozen=True, kw_only=True)
class TopK(TeacherSignal):
    """The k most likely ids and their log-probs at `temperature` ([..., k]). `tail`: how a loss completes the row:
    ``uniform`` spreads the missing mass evenly over the other ids, ``none`` keeps only the support (renormalised
    by the loss's softmax), ``support`` is forward KL summed over the stored ids alone (DistillKit's "missing mass
    is zero")."""

    indices: Tensor | None = None
    logprobs: Tensor | None = None
    tail: TopKTail = "uniform"

    def __post_init__(self):
        _check_sparse(self.indices, self.logprobs, "top-k")
        if self.tail not in ("uniform", "none", "support"):
            raise ConfigError(f"top-k tail must be one of uniform, none, support, got {self.tail!r}")

    per_position = "indices"

    def teacher_logits(self, T: float, vocab_size: int, loss: str = "token_kd") -> Tensor:
        self.check_temperature(T, loss)
        if self.tail == "support":
            raise ConfigError(f"{loss}: a top-k signal with tail='support' is scored on its stored ids only (forward "
                              "KL); use tail='uniform' or 'none' for a full distribution")
        return sparse_to_dense_logprobs(self.indices, self.logprobs, vocab_size, self.tail) * T


@dataclass(frozen=True, kw_only=True)
class Sampled(TeacherSignal):
    """RS-KD samples: distinct ids, their teacher log-probs, counts c out of `samples` draws and importance ratios
    p/q ([..., k]; padding entries have count 0). weights = c / N * p / q has E[weights] = p, so the loss
    sum_i w_i (log p_i - log s_i) is an unbiased estimate of forward KL(p || s) in value and gradient."""

    indices: Tensor | None = None
    logprobs: Tensor | None = None
    counts: Tensor | None = None
    ratios: Tensor | None = None  # None: drawn from p itself (ratios 1)
    samples: int = 1

    def __post_init__(self):
        _check_sparse(self.indices, self.logprobs, "sampled")
        if self.counts is None or self.counts.shape != self.indices.shape:
            raise ShapeMismatchError(f"sampled counts {None if self.counts is None else tuple(self.counts.shape)} must "
                                     f"match the ids {tuple(self.indices.shape)}")
        if self.ratios is not None and self.ratios.shape != self.indices.shape:
            raise ShapeMismatchError(f"sampled ratios {tuple(self.ratios.shape)} must match the ids "
                                     f"{tuple(self.indices.shape)}")
        if not (isinstance(self.samples, int) and self.samples >= 1):
            raise ConfigError(f"samples must be a positive integer, got {self.samples!r}")

    per_position = "indices"

    def weights(self) -> Tensor:
        dtype = torch.promote_types(self.logprobs.dtype, torch.float32)
        w = self.counts.to(dtype) / self.samples
        return w if self.ratios is None else w * self.ratios.to(dtype)


@dataclass(frozen=True, kw_only=True)
class CrossTokenizerChunks(TeacherSignal):
    """The teacher's logits over its own ids [B, Lt, Vt], with the text-chunk ids [B, Lt] that align them to the
    student's chunks (and the space mask for ALM's append_space), from `CrossTokenizerBatcher`."""

    logits: Tensor | None = None
    input_ids: Tensor | None = None
    chunk_ids: Tensor | None = None
    space_mask: Tensor | None = None
    retemperable = True


def as_signal(teacher) -> TeacherSignal | None:
    """A TeacherSignal as it is; `Outputs` (or a tensor) of a live teacher as its `DenseLogits`; None stays None."""
    if teacher is None or isinstance(teacher, TeacherSignal):
        return teacher
    if torch.is_tensor(teacher):
        return DenseLogits(logits=teacher)
    logits = getattr(teacher, "logits", None)
    if logits is None:
        raise ConfigError(f"the teacher gave no logits and no teacher signal (got {type(teacher).__name__})")
    return DenseLogits(logits=logits)


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
    logprobs = _at_least_float32(logprobs)
    probs = torch.zeros(*indices.shape[:-1], vocab_size, dtype=logprobs.dtype, device=indices.device)
    probs.scatter_add_(-1, indices.long(), logprobs.exp())
    if fill == "uniform" and vocab_size > k:
        present = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, indices.long(), True)
        rest = (1.0 - probs.sum(-1, keepdim=True)).clamp(min=0.0)
        n_rest = (~present).sum(-1, keepdim=True).clamp(min=1)
        probs = torch.where(present, probs, rest / n_rest)
    return probs.log()


def _at_least_float32(x: Tensor) -> Tensor:
    """float32 for stored half-precision log-probs; float64 stays float64 (reference checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_sparse(indices: Tensor | None, logprobs: Tensor | None, what: str) -> None:
    if indices is None or logprobs is None:
        raise ConfigError(f"a {what} teacher signal needs both indices and logprobs")
    if indices.shape != logprobs.shape:
        raise ShapeMismatchError(f"{what} ids {tuple(indices.shape)} and log-probs {tuple(logprobs.shape)} must "
                                 "have the same shape [..., k]")


def _check_vocab(teacher_vocab: int, vocab_size: int, loss: str) -> None:
    if teacher_vocab != vocab_size:
        raise ShapeMismatchError(
            f"{loss}: the student's logits have {vocab_size:,} vocabulary entries and the teacher's {teacher_vocab:,};"
            " token KD compares the two distributions id by id, so they must be the same size. If the tokenizers "
            "are the same and one LM head is only padded, slice both logits to the tokenizer's vocabulary; if they "
            "differ, use the cross-tokenizer loss (losses.cross_tokenizer). `kdkit check teacher=... student=...` "
            "lists the differences.")
