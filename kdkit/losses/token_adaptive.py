"""Token KD whose target or whose tokens adapt during training: TAID (an interpolated, moving target) and AdaKD
(hardest-token selection and per-token temperatures), each on top of any divergence of `kdkit.losses.token`.

Both read training progress, a fraction in [0, 1]: the LM trainer calls ``set_progress(step / total_steps)``
before every step; a trainer that only reports epochs reaches it through ``set_epoch`` when the loss was given
``total_epochs``. Their adaptive state lives in buffers (saved in ``state_dict``, so a resumed run continues
exactly) and moves only in training mode (``loss.train()``), once per forward call -- once per micro-batch under
gradient accumulation, as in both official codes. Under DDP the module's buffers are broadcast from rank 0 at
every forward, so rank 0's losses drive the state.
"""
import math
import typing
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import NonNegFloat, PositiveFloat, Probability, Range
from ..errors import ConfigError
from ..models.outputs import Outputs
from ..registry import LOSSES
from .base import DistillLoss, check_options
from ..divergence import Divergence
from ..signals import TeacherSignal
from .token import (DivergenceName, JSDBeta, Skew, compute_dtype, divergence_from_logprobs, masked_token_mean,
                    token_logits, token_mask, token_weights)

# a share in (0, 1]: at 0 AdaKD would keep no token, TAID's target would never leave the student
NonZeroShare = Annotated[float, Range(gt=0, le=1)]
# a momentum, an EMA decay or a relative step in [0, 1): at 1 an average would never move, a ratio would drop to 0
BelowOne = Annotated[float, Range(ge=0, lt=1)]

__all__ = ["TAIDLoss", "AdaKDLoss", "taid_per_token", "taid_next_t", "hellinger_per_token", "hardest_tokens",
           "idts_temperatures", "adakd_per_token"]


class _ProgressLoss(DistillLoss):
    """A token loss with a training-progress fraction (`set_progress`, or `set_epoch` / ``total_epochs``)."""

    needs_labels = True
    progress: float = 0.0

    def _init_common(self, divergence: str, T: float, beta: float, skew: float, ignore_index: int,
                     total_epochs: float) -> None:
        self.div = Divergence(divergence, T, beta, skew)
        self.ignore_index = int(ignore_index)
        self.total_epochs = float(total_epochs)

    divergence = property(lambda self: self.div.name)
    T = property(lambda self: self.div.T)
    beta = property(lambda self: self.div.beta)
    skew = property(lambda self: self.div.skew)

    def set_progress(self, fraction: float) -> None:
        """Training progress in [0, 1] (the LM trainer: step / total_steps, before each step)."""
        self.progress = min(max(float(fraction), 0.0), 1.0)

    def set_epoch(self, epoch: float) -> None:
        super().set_epoch(epoch)
        if self.total_epochs > 0:
            self.set_progress(self.epoch / self.total_epochs)


# ---------------------------------------------------------------- TAID


def taid_per_token(student_logits: Tensor, teacher_logits: Tensor, t: Tensor | float, divergence: str = "fkl", *,
                   T: float = 1.0, beta: float = 0.5, skew: float = 0.1) -> Tensor:
    """TAID's T^2 * D(p_t, q) per token: p_t = softmax(((1 - t) stopgrad(s) + t z) / T), q = softmax(s / T).

    Interpolating logits or log-probabilities gives the same p_t (log-softmax only shifts each row by a constant);
    the official code interpolates logits.
    """
    dtype = compute_dtype(student_logits, teacher_logits)
    s = student_logits.to(dtype) / T
    z = (1 - t) * s.detach() + t * (teacher_logits.to(dtype) / T)
    log_q, log_p = F.log_softmax(s, dim=-1), F.log_softmax(z, dim=-1)
    return divergence_from_logprobs(log_q, log_p, divergence, beta=beta, skew=skew) * (T * T)


def taid_next_t(t: Tensor, m: Tensor, prev_loss: Tensor, loss: Tensor, progress: float, *, t_start: float,
                t_end: float, alpha: float, momentum: float, adaptive: bool = True) -> tuple[Tensor, Tensor]:
    """One TAID update of (t, m) after a step whose loss was `loss` (the official ``TAID.update_t``).

    rel = (prev_loss - loss) / (prev_loss + 1e-15); m <- momentum * m + (1 - momentum) * rel;
    t <- min(t_end, max(t_linear, t + alpha * sigmoid(m) * (1 - t))), t_linear = t_start + (t_end - t_start) * progress.
    On the first call (prev_loss = inf) nothing moves. ``adaptive=False``: t = t_linear.
    """
    first = torch.isinf(prev_loss)
    rel = (prev_loss - loss) / (prev_loss + 1e-15)
    m_new = torch.where(first, m, momentum * m + (1 - momentum) * rel)
    linear = torch.full_like(t, t_start + (t_end - t_start) * progress)
    if adaptive:
        t_new = torch.clamp(torch.maximum(linear, t + alpha * torch.sigmoid(m_new) * (1 - t)), max=t_end)
    else:
        t_new = linear
    return torch.where(first, t, t_new), m_new


class TAIDLoss(_ProgressLoss):
    """Shing et al., ICLR 2025, "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge Transfer in Language Models".

    arXiv 2501.16937; follows the official code (SakanaAI/TAID, ``src/distil_losses/taid.py``).

    The target is the teacher seen from the student: p_t = softmax((1 - t) * stopgrad(student) + t * teacher), and
    the loss is ``D(p_t, q_student)`` (`taid_per_token`; forward KL as in the paper, or any divergence of
    `DIVERGENCES`), masked and averaged over tokens like ``token_kd`` (per-token weights in
    ``student.features["token_weights"]``). At t = 0 the target is the student itself (loss 0), at t = 1 the teacher.

    t starts at ``t_start`` and after every training forward moves by the official rule (`taid_next_t`): the
    momentum (``momentum``, the paper's beta = 0.99) of the loss's relative decrease drives a step
    ``alpha * sigmoid(m) * (1 - t)`` (alpha = 5e-4), never below the linear schedule from ``t_start`` to ``t_end``
    over training progress, never above ``t_end``; ``adaptive=False`` follows the linear schedule alone.
    Defaults are the official ones (its scripts use t_start 0.4 for Phi-3 -> TinyLlama, 0.2 for the others).
    The relative change is that of the value this loss returns; the official code's value is the cross-entropy
    H(p_t, q) = KL(p_t || q) + H(p_t) (same gradient, slightly smaller relative changes). Unlike the official
    code, evaluation forwards (``loss.eval()``) leave t alone. ``T`` (default 1, none in the paper) divides both
    logits before the interpolation, and the loss is multiplied by T^2.
    """

    def __init__(self, *, divergence: DivergenceName = "fkl", t_start: Probability = 0.4, t_end: NonZeroShare = 1.0,
                 alpha: Probability = 5e-4, momentum: BelowOne = 0.99, adaptive: bool = True, T: PositiveFloat = 1.0,
                 beta: JSDBeta = 0.5, skew: Skew = 0.1, total_epochs: NonNegFloat = 0.0, ignore_index: int = -100):
        super().__init__()
        check_options(self, locals())
        if t_start > t_end:
            raise ConfigError(f"taid needs t_start <= t_end (t rises from t_start to t_end), got t_start={t_start}, "
                              f"t_end={t_end}")
        self._init_common(divergence, T, beta, skew, ignore_index, total_epochs)
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.alpha, self.momentum, self.adaptive = float(alpha), float(momentum), bool(adaptive)
        self.register_buffer("t", torch.tensor(self.t_start))  # the interpolation parameter
        self.register_buffer("m", torch.zeros(()))  # momentum of the loss's relative change
        self.register_buffer("prev_loss", torch.tensor(math.inf))

    @torch.no_grad()
    def update_t(self, loss: Tensor) -> None:
        """Move t after a training step whose loss was `loss` (called by `forward` in training mode)."""
        loss = loss.detach().to(self.t)
        t, m = taid_next_t(self.t, self.m, self.prev_loss, loss, self.progress, t_start=self.t_start,
                           t_end=self.t_end, alpha=self.alpha, momentum=self.momentum, adaptive=self.adaptive)
        self.t.copy_(t)
        self.m.copy_(m)
        self.prev_loss.copy_(loss)

    def forward(self, student: Outputs, teacher: Outputs | TeacherSignal | None, labels: Tensor | None = None) -> Tensor:
        s, z = token_logits(student, teacher, "taid", self.T)
        d = taid_per_token(s, z, self.t, self.divergence, T=self.T, beta=self.beta, skew=self.skew)
        mask = token_mask(d.shape, labels, self.ignore_index, d.device)
        loss = masked_token_mean(d, mask, token_weights(student, d.shape))
        if self.training:
            self.update_t(loss)
        return loss

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, t_start={self.t_start}, t_end={self.t_end}, alpha={self.alpha}, "
                f"momentum={self.momentum}, adaptive={self.adaptive}, T={self.T}")


# ---------------------------------------------------------------- AdaKD

Score = Literal["hellinger", "divergence"]
SCORES: tuple[str, ...] = typing.get_args(Score)


def hellinger_per_token(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Hellinger distance sqrt(sum (sqrt p - sqrt q)^2) / sqrt 2 per row, in [0, 1] (AdaKD's token difficulty)."""
    return ((0.5 * log_p).exp() - (0.5 * log_q).exp()).pow(2).sum(-1).sqrt() / math.sqrt(2.0)


def hardest_tokens(scores: Tensor, mask: Tensor, ratio: Tensor | float) -> Tensor:
    """Mask of the max(1, floor(ratio * #counted)) counted tokens with the largest scores (ties: first position).

    As the official ``torch.topk`` over the counted tokens of the whole batch, without a host sync.
    """
    flat = torch.where(mask, scores, -math.inf).flatten()
    n = mask.sum().to(torch.float64)
    k = torch.floor(n * torch.as_tensor(ratio, dtype=torch.float64, device=n.device)).clamp(min=1)
    order = torch.argsort(flat, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return (rank < k).reshape(mask.shape) & mask


def idts_temperatures(scores: Tensor, keep: Tensor, T: float, T_scale: float) -> Tensor:
    """Inverse Difficulty Temperature Scaling: T * exp(-T_scale * tanh(log(score / median))) on the kept tokens.

    The median is the lower median (``torch.median``) of the kept tokens' scores: harder-than-median tokens get a
    temperature below T (down to T * exp(-T_scale)), easier ones above (up to T * exp(T_scale)); a negative
    ``T_scale`` inverts it (the official ``--temperature-soften``). Tokens not kept get T.
    """
    med = torch.nanmedian(torch.where(keep, scores, math.nan))
    rel = torch.where(med > 0, scores / med, torch.ones_like(scores)).clamp(min=1e-8)
    return torch.where(keep, T * torch.exp(-T_scale * torch.tanh(torch.log(rel))), torch.full_like(scores, T))


def adakd_per_token(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, ratio: Tensor | float,
                    divergence: str = "rkl", *, T: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                    adaptive_T: bool = True, T_scale: float = 0.5, score: str = "hellinger"
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """(per-token T_i^2 * D at T_i, the kept tokens, T_i): the hardest `ratio` of the counted tokens by `score`
    (at temperature T), each at its IDTS temperature T_i (T when ``adaptive_T`` is off). Scores, selection and
    temperatures carry no gradient."""
    if score not in SCORES:
        raise ConfigError(f"unknown AdaKD difficulty score {score!r}; choose one of {', '.join(SCORES)}")
    dtype = compute_dtype(student_logits, teacher_logits)
    s, z = student_logits.to(dtype), teacher_logits.to(dtype)
    with torch.no_grad():
        log_q, log_p = F.log_softmax(s.detach() / T, dim=-1), F.log_softmax(z.detach() / T, dim=-1)
        if score == "hellinger":
            scores = hellinger_per_token(log_q, log_p)
        else:
            scores = divergence_from_logprobs(log_q, log_p, divergence, beta=beta, skew=skew)
        keep = hardest_tokens(scores, mask, ratio)
        temps = idts_temperatures(scores, keep, T, T_scale) if adaptive_T else torch.full_like(scores, T)
    tau = temps.unsqueeze(-1)
    d = divergence_from_logprobs(F.log_softmax(s / tau, dim=-1), F.log_softmax(z / tau, dim=-1), divergence,
                                 beta=beta, skew=skew)
    return d * temps.pow(2), keep, temps


class AdaKDLoss(_ProgressLoss):
    """Xie et al., AAAI 2026 (arXiv 2510.11615, 2025), "LLM-Oriented Token-Adaptive Knowledge Distillation" (AdaKD).

    Follows the official code (SassyRong/AdaKD: ``loss/losses.py`` ``AdaKD``, ``distillation.py`` LATF).
    A wrapper on any divergence (``divergence``; the official scripts use reverse KL). Each token's difficulty is
    the Hellinger distance between teacher and student at temperature T (``score="divergence"`` uses the
    divergence itself), computed without gradient.

    - LATF, token focusing: only the hardest ``ratio`` of the counted tokens of the batch are distilled, the loss
      being the mean over those tokens (`hardest_tokens`). ratio starts at ``keep_ratio`` (official: 1) and, with
      ``adaptive_ratio``, follows the loss: an EMA (``ema_decay`` 0.99) of this loss's value is compared with a
      reference EMA, set once progress reaches ``warmup`` (official 0.05, the LR warm-up); a fall by more than
      ``loss_eps`` (relative, 0.05) of the reference shrinks ratio by the factor 1 - ``ratio_step`` (0.05, floor
      ``min_keep_ratio`` 0.1), a rise by more than that grows it by 1 + ``ratio_step`` (cap 1), and either resets
      the reference to the current EMA.
    - IDTS, inverse-difficulty temperature (``adaptive_T``): token i uses
      T_i = T * exp(-T_scale * tanh(log(s_i / median s))) over the kept tokens (`idts_temperatures`), on both
      sides, and its divergence is multiplied by T_i^2: hard tokens are sharpened, easy ones smoothed.
      T_scale 0.5 as the official scripts.

    With ``keep_ratio=1, adaptive_ratio=False, adaptive_T=False`` this is ``token_kd``. Per-token weights:
    ``student.features["token_weights"]``. kdkit's deviations: the temperature applies once (the official divides
    by the global T and again by T_i = T * ...; the same at T = 1, its setting), and the temperatures carry no
    gradient (the official lets it flow through the score); the optional random "review" of all tokens
    (official default 0) is left out.
    """

    def __init__(self, *, divergence: DivergenceName = "rkl", T: PositiveFloat = 1.0, beta: JSDBeta = 0.5,
                 skew: Skew = 0.1, keep_ratio: NonZeroShare = 1.0, adaptive_ratio: bool = True,
                 min_keep_ratio: NonZeroShare = 0.1, ratio_step: BelowOne = 0.05, loss_eps: NonNegFloat = 0.05,
                 ema_decay: BelowOne = 0.99, warmup: Probability = 0.05, adaptive_T: bool = True,
                 T_scale: NonNegFloat = 0.5, score: Score = "hellinger", total_epochs: NonNegFloat = 0.0,
                 ignore_index: int = -100):
        super().__init__()
        check_options(self, locals())
        self._init_common(divergence, T, beta, skew, ignore_index, total_epochs)
        self.keep_ratio, self.adaptive_ratio, self.min_keep_ratio = float(keep_ratio), bool(adaptive_ratio), \
            float(min_keep_ratio)
        self.ratio_step, self.loss_eps, self.ema_decay, self.warmup = float(ratio_step), float(loss_eps), \
            float(ema_decay), float(warmup)
        self.adaptive_T, self.T_scale, self.score = bool(adaptive_T), float(T_scale), score
        # float64 so floor(ratio * n) counts as the official Python floats do
        self.register_buffer("ratio", torch.tensor(self.keep_ratio, dtype=torch.float64))
        self.register_buffer("ema", torch.tensor(math.nan, dtype=torch.float64))  # nan: no loss seen yet
        self.register_buffer("ref", torch.tensor(math.nan, dtype=torch.float64))  # nan: warm-up not over

    @torch.no_grad()
    def update_ratio(self, loss: Tensor) -> None:
        """LATF after a training step whose loss was `loss` (called by `forward` in training mode)."""
        loss = loss.detach().to(self.ema)
        ema = torch.where(torch.isnan(self.ema), loss, self.ema_decay * self.ema + (1 - self.ema_decay) * loss)
        have_ref = ~torch.isnan(self.ref)
        delta, eps = self.ref - ema, self.ref * self.loss_eps
        rose, fell = have_ref & (delta < -eps), have_ref & (delta > eps)
        ratio = torch.where(rose, torch.clamp(self.ratio * (1 + self.ratio_step), max=1.0), self.ratio)
        ratio = torch.where(fell, torch.clamp(self.ratio * (1 - self.ratio_step), min=self.min_keep_ratio), ratio)
        ref = torch.where(rose | fell, ema, self.ref)
        if self.progress >= self.warmup:
            ref = torch.where(have_ref, ref, ema)
        self.ema.copy_(ema)
        self.ref.copy_(ref)
        if self.adaptive_ratio:
            self.ratio.copy_(ratio)

    def forward(self, student: Outputs, teacher: Outputs | TeacherSignal | None, labels: Tensor | None = None) -> Tensor:
        s, z = token_logits(student, teacher, "adakd", self.T)
        mask = token_mask(s.shape[:-1], labels, self.ignore_index, s.device)
        d, keep, _ = adakd_per_token(s, z, mask, self.ratio, self.divergence, T=self.T, beta=self.beta,
                                     skew=self.skew, adaptive_T=self.adaptive_T, T_scale=self.T_scale,
                                     score=self.score)
        loss = masked_token_mean(d, keep, token_weights(student, d.shape))
        if self.training:
            self.update_ratio(loss)
        return loss

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, T={self.T}, keep_ratio={self.keep_ratio}, "
                f"adaptive_ratio={self.adaptive_ratio}, adaptive_T={self.adaptive_T}, T_scale={self.T_scale}, "
                f"score={self.score!r}")


for _name, _cls in (("taid", TAIDLoss), ("adakd", AdaKDLoss)):
    if _name not in LOSSES:  # tolerate a re-import (importlib.reload)
        LOSSES.register(_name, _cls)
