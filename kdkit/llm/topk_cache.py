"""The teacher's top-k log-probs per training sequence, computed the first time a sequence is seen and reused.

Why: SFT sees the same sequences every epoch, so a live teacher repeats the same forward passes; on a CPU the
teacher's forward costs more than the student's step. Stored as a sparse top-k signal (`kdkit.signals.TopK`, the
missing mass spread uniformly), the teacher runs once per sequence: DistillKit's offline top-k logits, built
on the fly. Keys are the unpadded token ids, so batching, padding side and shuffling do not matter.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..signals import TopK


class TeacherTopKCache:
    """`signal(input_ids, attention_mask)` -> the teacher's top-k signal at every position of the batch; the
    teacher is a local causal LM or a `ServedTeacher` (its prompt log-probs)."""

    def __init__(self, teacher, k: int):
        self.teacher, self.k = teacher, int(k)
        self.rows: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}  # ids -> (top-k ids, log-probs) [n, k]
        self.forwards = 0  # sequences the teacher has run on

    def signal(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> TopK:
        """TopK at temperature 1 over [B, L]. Padding positions have no teacher row: they get ids 0..k-1 at
        log(1/k) each (a valid distribution the loss never reads, since their labels are masked)."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        keys = [tuple(ids[m].tolist()) for ids, m in zip(input_ids, mask)]
        missing = [i for i, key in enumerate(keys) if key not in self.rows]
        if missing and not isinstance(self.teacher, torch.nn.Module):  # a ServedTeacher: one request per sequence
            for i in missing:
                self.rows[keys[i]] = self._served_row(list(keys[i]))
            self.forwards += len(missing)
        elif missing:
            with torch.no_grad():
                logits = self.teacher(input_ids=input_ids[missing], attention_mask=mask[missing].long()).logits
            logprobs, ids = logits.float().log_softmax(-1).topk(self.k, dim=-1)
            for j, i in enumerate(missing):
                self.rows[keys[i]] = (ids[j][mask[i]].cpu(), logprobs[j][mask[i]].cpu())
            self.forwards += len(missing)
        b, length = input_ids.shape
        ids = torch.arange(self.k, device=input_ids.device).expand(b, length, self.k).clone()
        logprobs = torch.full((b, length, self.k), -math.log(self.k), device=input_ids.device)
        for i, key in enumerate(keys):
            top_ids, top_lp = self.rows[key]
            ids[i][mask[i]] = top_ids.to(ids.device)
            logprobs[i][mask[i]] = top_lp.to(logprobs.device)
        return TopK(indices=ids, logprobs=logprobs, temperature=1.0, tail="uniform")

    def _served_row(self, key: list[int]) -> tuple[Tensor, Tensor]:
        """A served teacher's top-k at every position of one sequence. The server scores positions 0..n-2 (each
        predicting a prompt token); the last position predicts past the sequence, which no label reads, so it gets
        the same uniform filler as padding."""
        if self.k > self.teacher.k:
            from ..errors import ConfigError

            raise ConfigError(f"kd_topk={self.k} is more than the served teacher's teacher.server_k={self.teacher.k}")
        top_ids, top_lp = self.teacher.prompt_topk(key)
        last_ids = torch.arange(self.k).unsqueeze(0)
        last_lp = torch.full((1, self.k), -math.log(self.k))
        return (torch.cat([top_ids[:, :self.k], last_ids]), torch.cat([top_lp[:, :self.k], last_lp]))
