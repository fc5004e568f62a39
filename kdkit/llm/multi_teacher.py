"""Several LM teachers over one vocabulary: routed per training text, or mixed by fixed or learned weights.

Routing (`llm.multi_teacher.mix=route`) gives every training block one teacher, named by a dataset column (each
source's texts are packed into their own blocks, so a block never straddles two teachers); each teacher runs only on
its blocks, and the step's signal is theirs put back in block order (`routed_signal`). Mixing (`mean`, `fixed`,
`learned`) runs every teacher on every block and hands the losses the mixture log sum_k w_k p_k^T made at each
loss's own temperature (`TeacherMix`), which is MEAL V2's averaged target (Shen & Savvides 2020); learned weights are
a softmax trained with the student through that target, as the classifier zoo's `multi_teacher` loss does.

Teachers may be local models or served ones (`teachers.N.server`). All this is token-level, over the student's
vocabulary; a local teacher with another tokenizer trains through the cross-tokenizer path instead
(`kdkit.llm.cross_teachers`).
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses.ensemble import teacher_mixture_log_probs
from ..signals import DenseLogits, TeacherSignal, TopK


class TeacherMix(nn.Module):
    """The mixture weights over K teachers (a buffer for mean/fixed, a trained parameter for learned) and the mixed
    signal they make."""

    def __init__(self, k: int, mix: str, weights: list[float] | None = None):
        super().__init__()
        if k < 2:
            raise ConfigError(f"a teacher mixture needs at least 2 teachers, got {k}")
        self.k, self.mix = k, mix
        if mix == "learned":
            self.logits = nn.Parameter(torch.zeros(k))
        elif mix == "fixed":
            if len(weights or []) != k:
                raise ConfigError(f"llm.multi_teacher.weights={weights} needs one weight per teacher ({k})")
            w = torch.tensor(weights, dtype=torch.float32)
            self.register_buffer("fixed", w / w.sum(), persistent=False)
        elif mix == "mean":
            self.register_buffer("fixed", torch.full((k,), 1.0 / k), persistent=False)
        else:
            raise ConfigError(f"unknown teacher mixture {mix!r}; choose mean, fixed or learned")

    def weights(self) -> Tensor:
        return torch.softmax(self.logits, 0) if self.mix == "learned" else self.fixed

    def forward(self, signals: list[TeacherSignal], T: float, vocab_size: int, loss: str = "token_kd") -> DenseLogits:
        """The teachers' mixture at temperature T as a dense signal (exact at T: a loss at T reads sum_k w_k p_k^T)."""
        if len(signals) != self.k:
            raise ConfigError(f"the teacher mixture was built for {self.k} teachers, got {len(signals)} signals")
        logits = [s.teacher_logits(T, vocab_size, loss) for s in signals]
        shape = logits[0].shape
        log_mix = teacher_mixture_log_probs(logits, T, self.weights()).reshape(shape)
        return DenseLogits.from_logprobs(log_mix, T, tokenizer=signals[0].tokenizer)


def routed_signal(parts: list[tuple[Tensor, TeacherSignal]], batch: int, vocab_size: int) -> TeacherSignal:
    """One signal for the whole batch from each teacher's signal over its own rows ((row indices, signal) pairs).

    Signals of one kind stay that kind (dense logits, or top-k of one k); a mix of kinds (a local and a served
    teacher) becomes dense log-probs at temperature 1, the only temperature a served top-k signal has."""
    parts = [(rows, s) for rows, s in parts if len(rows)]
    kinds = {(type(s), s.indices.shape[-1] if isinstance(s, TopK) else None, s.temperature) for _, s in parts}
    first = parts[0][1]
    if len(kinds) == 1 and isinstance(first, (DenseLogits, TopK)):
        name = "logits" if isinstance(first, DenseLogits) else None
        fields = [name] if name else ["indices", "logprobs"]
        out = {}
        for f in fields:
            ref = getattr(first, f)
            full = ref.new_zeros((batch, *ref.shape[1:]))
            for rows, s in parts:
                full[rows.to(full.device)] = getattr(s, f).to(full.device)
            out[f] = full
        return replace(first, **out)
    logprobs = None
    for rows, s in parts:
        lp = torch.log_softmax(s.teacher_logits(1.0, vocab_size).float(), -1)
        if logprobs is None:
            logprobs = lp.new_zeros((batch, *lp.shape[1:]))
        logprobs[rows.to(lp.device)] = lp
    return DenseLogits.from_logprobs(logprobs, 1.0, tokenizer=first.tokenizer)


def route_index(values: list, route_values: list[str], k: int, column: str) -> list[int]:
    """Each text's teacher: its column value's position in `route_values`, or the value itself as an index 0..k-1."""
    if route_values:
        if len(route_values) != k:
            raise ConfigError(f"llm.multi_teacher.route_values={route_values} needs one value per teacher ({k})")
        where = {v: i for i, v in enumerate(route_values)}
        unknown = sorted({str(v) for v in values} - set(where))
        if unknown:
            raise ConfigError(f"column {column!r} holds {unknown[:5]}, which llm.multi_teacher.route_values="
                              f"{route_values} does not name; list every value, one per teacher")
        return [where[str(v)] for v in values]
    out = []
    for v in values:
        try:
            i = int(v)
        except (TypeError, ValueError):
            i = -1
        if str(v).strip() != str(i) or not 0 <= i < k:
            raise ConfigError(f"column {column!r} holds {v!r}: without llm.multi_teacher.route_values its values "
                              f"must be teacher indices 0..{k - 1}")
        out.append(i)
    return out
