"""The one definition of kdkit's divergences between two distributions over classes or tokens.

Both the loss zoo (`kdkit.losses.logits`, `kdkit.losses.token`) and the fused kernels (`kdkit.kernels`) take a
`Divergence`, so a divergence's name, its parameters, their valid ranges and its per-row math live here once.
With p = softmax(teacher / T) (the target) and q = softmax(student / T), per row, summed over the last axis:

- ``fkl``  forward KL,  KL(p || q)                                   (Hinton; the usual "KD")
- ``rkl``  reverse KL,  KL(q || p)                                   (MiniLLM's mode-seeking objective)
- ``jsd``  generalised JSD(beta) = beta KL(p || m) + (1-beta) KL(q || m), m = beta p + (1-beta) q; its end points
  are defined as beta=0 forward KL and beta=1 reverse KL, as in TRL's GKD and Liger's ``LigerFusedLinearJSDLoss``
- ``skl``  skew forward KL,  KL(p || skew p + (1-skew) q)           (DistiLLM, Ko et al. 2024, skew=0.1)
- ``srkl`` skew reverse KL,  KL(q || skew q + (1-skew) p)           (DistiLLM)
- ``tvd``  total variation,  0.5 sum |p - q|

**The T² convention**: every loss built on a `Divergence` (classifier and LM) is ``T² · D(p, q)`` (`per_row`), as
in Hinton et al. 2015: the gradient's size then does not depend on T, and at T = 1 it is D itself. (The classifier
``jsd`` loss had no T² before; at T = 2 its value is now 4× the old one, equal to the LM ``token_kd`` jsd.)

Teacher rows may hold log-probabilities with ``-inf`` entries (sparse signals): terms with zero teacher mass
contribute 0. A new divergence is one branch in `rows` and one in `scaled_grad` (and, to be fast on CUDA, one in
the Triton kernel: `kdkit.kernels.fused_linear_kd_triton`; a divergence it lacks runs on the torch backend).
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import PositiveFloat, Probability, Range, bad_value
from .errors import ConfigError, ShapeMismatchError

DivergenceName = Literal["fkl", "rkl", "jsd", "skl", "srkl", "tvd"]
DIVERGENCES: tuple[str, ...] = typing.get_args(DivergenceName)
# GKD's beta, the teacher's share of the mixture m = beta p + (1 - beta) q: 0 is forward KL, 1 reverse KL.
JSDBeta = Probability
# DistiLLM's skew alpha, the first distribution's share of the mixture: 0 is the plain KL; at 1 the mixture is the
# first distribution itself and the divergence is 0 whatever the student does, so 1 is refused.
Skew = Annotated[float, Range(ge=0, lt=1)]


def check_divergence(divergence: str, beta: float = 0.5, skew: float = 0.1, T: float = 1.0) -> None:
    """Fail early, naming the choices, on an unknown divergence or an out-of-range parameter (NaN included)."""
    if divergence not in DIVERGENCES:
        raise ConfigError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    for key, value, ok, allowed in (("beta", beta, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
                                    ("skew", skew, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
                                    ("T", T, lambda v: 0.0 < v < math.inf, "a finite number > 0")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
            raise bad_value(key, value, allowed)


@dataclass(frozen=True)
class Divergence:
    """A divergence with its parameters: what a KD loss compares (see the module docstring for each name)."""

    name: DivergenceName = "fkl"
    T: PositiveFloat = 1.0
    beta: JSDBeta = 0.5  # jsd only
    skew: Skew = 0.1  # skl / srkl only

    def __post_init__(self):
        check_divergence(self.name, self.beta, self.skew, self.T)
        for key in ("T", "beta", "skew"):
            object.__setattr__(self, key, float(getattr(self, key)))

    # ------------------------------------------------------------ values

    def rows(self, log_q: Tensor, log_p: Tensor) -> Tensor:
        """D(p, q) per row [...] from student log-probs `log_q` and teacher log-probs `log_p` ([..., V]); no T²."""
        name = self._plain_name()
        if name == "fkl":
            d = _plogp_ratio(log_p, log_q)
        elif name == "rkl":
            d = _plogp_ratio(log_q, log_p)
        elif name == "jsd":
            log_m = _log_mix(log_p, log_q, self.beta)
            d = self.beta * _plogp_ratio(log_p, log_m) + (1.0 - self.beta) * _plogp_ratio(log_q, log_m)
        elif name == "skl":
            d = _plogp_ratio(log_p, _log_mix(log_p, log_q, self.skew))
        elif name == "srkl":
            d = _plogp_ratio(log_q, _log_mix(log_q, log_p, self.skew))
        else:  # tvd
            d = 0.5 * (log_p.exp() - log_q.exp()).abs()
        return d.sum(-1)

    def per_row(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """T² · D(softmax(teacher / T), softmax(student / T)) per row: logits [..., V] -> [...], in float32
        (float64 when an input is float64), differentiable through autograd."""
        if student_logits.shape != teacher_logits.shape:
            raise ShapeMismatchError(
                f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
                "differ; KD needs the same positions and the same classes or vocabulary (a tokenizer mismatch? "
                "see `kdkit check`)")
        dtype = compute_dtype(student_logits, teacher_logits)
        log_q = F.log_softmax(student_logits.to(dtype) / self.T, dim=-1)
        log_p = F.log_softmax(teacher_logits.to(dtype) / self.T, dim=-1)
        return self.rows(log_q, log_p) * (self.T * self.T)

    # ------------------------------------------------------------ analytic gradient

    def value_and_grad(self, student_logits: Tensor, log_p: Tensor, scale: Tensor | None = None
                       ) -> tuple[Tensor, Tensor]:
        """(T² D per row, d(sum of scale · T² D) / d student_logits) without autograd: the fused kernels' rows.

        `log_p` is the teacher's log-softmax at T ([N, V]); `scale` [N] (or None: 1) weights each row (token
        weights, masks, 1 / #tokens). With s = z / T and q = softmax(s), for any g = dD/dq (constants cancel):
        dD/ds = q ⊙ (g - <q, g>), and d(T² D)/dz = T · dD/ds. `scaled_grad` gives q ⊙ g per divergence.
        Computes in the dtype of `student_logits` (float32 or float64; the caller upcasts).
        """
        log_q = F.log_softmax(student_logits / self.T, dim=-1)
        q = log_q.exp()
        d, qg = self.scaled_grad(log_q, q, log_p)
        name = self._plain_name()
        if name == "fkl":  # q ⊙ g = -p and p sums to 1 (log_p is a log-softmax): no second pass over the row
            grad = qg.add_(q)
        elif name == "rkl":  # q ⊙ g = q (log q - log p), whose row sum is D itself
            grad = qg - q * d[..., None]
        else:
            grad = qg - q * qg.sum(-1, keepdim=True)
        factor = self.T if scale is None else scale[:, None] * self.T
        return d * (self.T * self.T), grad.mul_(factor)

    def scaled_grad(self, log_q: Tensor, q: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
        """(D per row, q ⊙ dD/dq) from log q, q and log p: each divergence's closed form, in as few passes over
        the row as it allows (the fused kernels call this on cache-sized blocks of rows)."""
        name = self._plain_name()
        if name in ("fkl", "tvd"):
            p = log_p.exp()
            if name == "fkl":  # g = -p / q
                return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1), -p
            return 0.5 * (p - q).abs().sum(-1), 0.5 * q * torch.sign(q - p)  # g = sign(q - p) / 2
        if name == "rkl":  # g = log q - log p (+ 1)
            r = q * (log_q - log_p)
            return r.sum(-1), r
        p = log_p.exp()
        tiny = torch.finfo(q.dtype).tiny  # m >= (1 - w) q > 0 wherever q is; the clamp only guards q underflow
        if name == "jsd":  # g = (1 - b)(log q - log m): the p / m terms of both KLs cancel
            b = self.beta
            log_m = (b * p + (1.0 - b) * q).clamp_min(tiny).log()
            qr = q * (log_q - log_m)
            d = b * torch.where(p > 0, p * (log_p - log_m), 0.0).sum(-1) + (1.0 - b) * qr.sum(-1)
            return d, qr.mul_(1.0 - b)
        a = self.skew
        if name == "skl":  # m = a p + (1 - a) q, g = -(1 - a) p / m
            m = (a * p + (1.0 - a) * q).clamp_min(tiny)
            return torch.where(p > 0, p * (log_p - m.log()), 0.0).sum(-1), -(1.0 - a) * p * q / m
        m = (a * q + (1.0 - a) * p).clamp_min(tiny)  # srkl: m = a q + (1 - a) p, g = log q - log m - a q / m
        ratio = log_q - m.log()
        return (q * ratio).sum(-1), q * (ratio - a * q / m)

    def _plain_name(self) -> str:
        """jsd at its end points is the plain KL it is defined as."""
        if self.name == "jsd" and self.beta == 0.0:
            return "fkl"
        if self.name == "jsd" and self.beta == 1.0:
            return "rkl"
        return self.name

    def options(self) -> dict:
        """The keyword form (divergence=, T=, beta=, skew=) the losses and kernels take."""
        return {"divergence": self.name, "T": self.T, "beta": self.beta, "skew": self.skew}


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 when any input is float64 (so gradcheck can run)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _plogp_ratio(log_a: Tensor, log_b: Tensor) -> Tensor:
    """a * (log a - log b) elementwise, 0 where a == 0 (so -inf log-probs in a sparse teacher are harmless)."""
    a = log_a.exp()
    keep = a > 0
    # both logs zeroed where a == 0: neither the value nor the gradient sees 0 * inf (autograd differentiates both
    # branches of a where)
    return torch.where(keep, a * (torch.where(keep, log_a, 0.0) - torch.where(keep, log_b, 0.0)), 0.0)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w a + (1 - w) b) from log a and log b, stable."""
    if w <= 0.0:
        return log_b
    if w >= 1.0:
        return log_a
    # classes both put at -inf (masked): 0 for both logs keeps the mixture's gradient finite; they then contribute
    # nothing, since a == 0 there
    both = torch.isneginf(log_a) & torch.isneginf(log_b)
    log_a, log_b = torch.where(both, 0.0, log_a), torch.where(both, 0.0, log_b)
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def divergence_from_logprobs(log_q: Tensor, log_p: Tensor, divergence: str = "fkl", *, beta: float = 0.5,
                             skew: float = 0.1) -> Tensor:
    """Per-row divergence [...] between student log-probs `log_q` and teacher log-probs `log_p` ([..., V])."""
    return Divergence(divergence, 1.0, beta, skew).rows(log_q, log_p)
