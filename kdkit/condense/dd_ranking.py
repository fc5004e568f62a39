"""DD-Ranking's label-robust scores of a condensed set: HLR, IOR and DDRS.

From the DD-Ranking paper (Li et al. 2025, "DD-Ranking: Rethinking the Evaluation of Dataset Distillation",
arXiv:2505.13300) and its repository (github.com/NUS-HPC-AI-Lab/DD-Ranking, commit b8b0966; README.md lines
81-97, `ddranking/metrics/hard_label.py` lines 339-388, `ddranking/metrics/soft_label.py` lines 512-568):

- HLR (hard-label recovery, lower is better) = Acc(real-hard) - Acc(syn-hard): the accuracy of a network trained
  on the whole real training set with hard labels, minus that of one trained on the synthetic images with hard
  labels (their class).
- IOR (improvement over random, higher is better) = Acc(syn-any) - Acc(rdm-any): the synthetic set under the
  method's own evaluation (its labels, soft or hard), minus the same number of randomly selected real images per
  class under that very evaluation (for soft labels the repository labels the random images with its teacher:
  `soft_label.py` lines 444-456, 484-485).
- DDRS = (exp(a) - exp(-1)) / (exp(1) - exp(-1)) with a = w IOR - (1 - w) HLR, w in [0, 1] (0.5 on the
  leaderboard). The repository's first README called it the DD-Ranking Score (DDRS, commit e5847f0e); the paper and
  v0.2 call the same formula the Label-Robust Score (LRS).

Accuracies are fractions in [0, 1], so HLR and IOR lie in [-1, 1] and DDRS in [0, 1]: DDRS is 0 at IOR = -1,
HLR = 1 and 1 at IOR = 1, HLR = -1. (The repository's code subtracts accuracies in percent, `hard_label.py` line
380, which would put DDRS outside [0, 1]; the README's normalisation needs fractions.) As in the repository, a
score over several evaluation rounds is the mean (and population std) of the per-round scores, not the score of
the mean accuracies; `scores` takes per-round accuracies for that.
"""
from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Sequence

from ..config import bad_value

DEFAULT_WEIGHT = 0.5  # DD-Ranking's leaderboard weight: IOR and HLR count equally


def _number(name: str, value, lo: float, hi: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
            or not lo <= float(value) <= hi:
        raise bad_value(name, value, what)
    return float(value)


def _accuracy(name: str, value) -> float:
    return _number(name, value, 0.0, 1.0, "an accuracy as a finite fraction in [0, 1] (not a percentage)")


def _difference(name: str, value) -> float:
    return _number(name, value, -1.0, 1.0, "a finite difference of accuracies (fractions), in [-1, 1]")


def _weight(value) -> float:
    return _number("weight", value, 0.0, 1.0, "a finite number in [0, 1]")


def hlr(acc_full: float, acc_syn_hard: float) -> float:
    """Hard-label recovery: full real training set minus synthetic images, both with hard labels (lower is better)."""
    return _accuracy("acc_full", acc_full) - _accuracy("acc_syn_hard", acc_syn_hard)


def ior(acc_syn_any: float, acc_rdm_any: float) -> float:
    """Improvement over random: the set under its own evaluation minus random real images under the same one."""
    return _accuracy("acc_syn_any", acc_syn_any) - _accuracy("acc_rdm_any", acc_rdm_any)


def ddrs(hlr_value: float, ior_value: float, weight: float = DEFAULT_WEIGHT) -> float:
    """(exp(w IOR - (1 - w) HLR) - exp(-1)) / (exp(1) - exp(-1)), in [0, 1] (higher is better)."""
    w = _weight(weight)
    a = w * _difference("ior", ior_value) - (1 - w) * _difference("hlr", hlr_value)
    return (math.exp(a) - math.exp(-1)) / (math.exp(1) - math.exp(-1))


def _rounds(name: str, value) -> list[float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, numbers.Real)) or isinstance(value, bool):
        raise bad_value(name, value, "an accuracy (a fraction in [0, 1]) or a list of per-round accuracies")
    items = list(value) if isinstance(value, Sequence) else [value]
    if not items:
        raise bad_value(name, value, "at least one accuracy")
    return [_accuracy(f"{name}[{k}]" if isinstance(value, Sequence) else name, v) for k, v in enumerate(items)]


def scores(acc_full, acc_syn_hard, acc_syn_any, acc_rdm_any, weight: float = DEFAULT_WEIGHT) -> dict:
    """HLR, IOR and DDRS: each accuracy is a fraction, or a list of one per evaluation round (round k pairs the
    k-th network of each evaluation; a single value serves every round). Returns the means over the rounds, their
    population std (`*_std`), the per-round values, the weight and the mean accuracies they came from."""
    w = _weight(weight)
    cols = {n: _rounds(n, v) for n, v in (("acc_full", acc_full), ("acc_syn_hard", acc_syn_hard),
                                          ("acc_syn_any", acc_syn_any), ("acc_rdm_any", acc_rdm_any))}
    n = max(len(c) for c in cols.values())
    for name, col in cols.items():
        if len(col) not in (1, n):
            raise bad_value(name, col, f"one accuracy or {n} (one per round, as the other lists have)")
    at = {name: (col * n if len(col) == 1 else col) for name, col in cols.items()}
    per_round = []
    for k in range(n):
        h = hlr(at["acc_full"][k], at["acc_syn_hard"][k])
        i = ior(at["acc_syn_any"][k], at["acc_rdm_any"][k])
        per_round.append({"hlr": h, "ior": i, "ddrs": ddrs(h, i, w)})
    out: dict = {}
    for key in ("hlr", "ior", "ddrs"):
        vals = [r[key] for r in per_round]
        out[key], out[f"{key}_std"] = statistics.fmean(vals), statistics.pstdev(vals) if n > 1 else 0.0
    out.update(weight=w, rounds=n, per_round=per_round,
               **{name: statistics.fmean(col) for name, col in cols.items()})
    return out


__all__ = ["DEFAULT_WEIGHT", "ddrs", "hlr", "ior", "scores"]
