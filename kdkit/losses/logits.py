"""Logit-matching losses: Hinton KD and Decoupled KD, as functions of tensors plus thin `DistillLoss` modules.

Every function computes in float32 (or float64 if given float64) whatever the input dtype, so bf16/fp16
logits give float32 losses. Logits may have any number of leading dimensions (``[..., C]``, e.g.
``[B, L, V]`` for language models); the loss is averaged over all leading positions.

Per-sample values: the row-wise losses (KD, reverse KL, JSD, DKD, NKD, label-free, BinaryKL(-Norm)) take
``reduction="none"`` (one value per logit row, shaped like ``logits.shape[:-1]``; ``"mean"``, the default, averages
them), and their modules have ``per_sample(student, teacher, labels)``, whose mean is exactly the module's scalar
value. That is what per-sample weighting (`kdkit.losses.wrappers.WeightedLoss`) builds on. DIST relates samples
across the batch, so it has no per-sample form.
"""
import math
import typing
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import NonNegFloat, NonNegInt, PositiveFloat, Probability
from ..divergence import Divergence
from ..errors import ConfigError, ShapeMismatchError
from ..models.outputs import Outputs
from ..registry import LOSSES
from .base import DistillLoss, check_options

__all__ = ["kd_loss", "dkd_parts", "dkd_loss", "KDLoss", "DKDLoss"]

# mdistiller masks the target class out of the non-target distribution by subtracting this from logits / T.
_NCKD_MASK = 1000.0


def _flat_logits(student_logits: Tensor, teacher_logits: Tensor, what: str,
                 min_classes: int = 1) -> tuple[Tensor, Tensor]:
    """Check shapes (and at least `min_classes` classes), upcast to >= float32, flatten ``[..., C]`` to ``[N, C]``."""
    if student_logits.shape != teacher_logits.shape:
        raise ShapeMismatchError(
            f"{what}: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; both must be [..., num_classes] with the same shape"
        )
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ShapeMismatchError(f"{what}: logits must be [..., num_classes], got {tuple(student_logits.shape)}")
    if student_logits.shape[-1] < min_classes:
        raise ShapeMismatchError(
            f"{what} needs at least {min_classes} classes, got logits of shape {tuple(student_logits.shape)}")
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    c = student_logits.shape[-1]
    return student_logits.to(dtype).reshape(-1, c), teacher_logits.to(dtype).reshape(-1, c)


def _kl_rows(log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
    """sum_c p_t * (log p_t - log p_s) per row, with 0 * log 0 = 0 (teacher classes at -inf contribute nothing)."""
    p_t = log_p_t.exp()
    keep = p_t > 0
    # Zero both logs where p_t == 0 so neither the value nor the gradients see 0 * inf.
    diff = torch.where(keep, log_p_t, 0.0) - torch.where(keep, log_p_s, 0.0)
    return (p_t * diff).sum(dim=-1)


def _check_T(T: float) -> None:
    if not T > 0:
        raise ConfigError(f"temperature T must be > 0, got {T}")


Reduction = Literal["mean", "none"]  # one value per logit row averaged, or kept
_REDUCTIONS = typing.get_args(Reduction)


def _reduce(rows: Tensor, reduction: Reduction, lead: torch.Size) -> Tensor:
    """``rows`` ([N], one value per logit row) averaged (``"mean"``) or shaped back to ``lead`` (``"none"``)."""
    if reduction == "mean":
        return rows.mean()
    if reduction == "none":
        return rows.reshape(lead)
    raise ConfigError(f"reduction must be one of {', '.join(map(repr, _REDUCTIONS))}, got {reduction!r}")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 4.0,
            reduction: Reduction = "mean") -> Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": T^2 * KL(softmax(t/T) || softmax(s/T)).

    Averaged over the batch (``batchmean``; for ``[..., C]`` logits, over all leading positions); per row with
    ``reduction="none"``. The divergence is `kdkit.divergence.Divergence` ("fkl"), the one the LM losses use.
    """
    return _divergence_loss("kd_loss", student_logits, teacher_logits, Divergence("fkl", _checked_T(T)), reduction)


def _checked_T(T: float) -> float:
    _check_T(T)
    return T


def _divergence_loss(what: str, student_logits: Tensor, teacher_logits: Tensor, div: Divergence,
                     reduction: Reduction) -> Tensor:
    """`div.per_row` (T^2 · D) of the flattened logits, reduced: the classifier face of the shared divergences."""
    s, t = _flat_logits(student_logits, teacher_logits, what)
    return _reduce(div.per_row(s, t), reduction, student_logits.shape[:-1])


def _log_binary(z: Tensor, target: Tensor, gt_mask: Tensor) -> Tensor:
    """[log p_target, log(1 - p_target)] of softmax(z), per row: shape [N, 2].

    log(1 - p) is taken as log1p(-p) while p < 1/2 and as logsumexp(non-target) - logsumexp(all) above,
    so it keeps full relative precision at both ends (and stays finite where p rounds to 1).
    """
    lse = z.logsumexp(-1)
    log_gt = z.gather(-1, target[:, None]).squeeze(-1) - lse
    log_rest = z.masked_fill(gt_mask, float("-inf")).logsumexp(-1) - lse
    small = log_gt < -math.log(2.0)
    # The unused branch gets a harmless input so its gradient is 0, not 0 * inf.
    log_other = torch.where(small, torch.log1p(-torch.where(small, log_gt, -1.0).exp()), log_rest)
    return torch.stack([log_gt, log_other], dim=-1)


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, T: float = 4.0,
              reduction: Reduction = "mean") -> tuple[Tensor, Tensor]:
    """Decoupled KD (Zhao et al., CVPR 2022) split into ``(tckd, nckd)``, each batch-averaged (per row with
    ``reduction="none"``) and times T^2.

    TCKD is the KL between the binary distributions [p_target, 1 - p_target] of teacher and student;
    NCKD is the KL between the distributions over the non-target classes, obtained as in mdistiller by
    subtracting 1000 from the target class's logit / T before the softmax. Mathematically identical to
    mdistiller's ``dkd_loss``, but in log space (no log of a sum of probabilities), so it stays finite and
    precise where probabilities underflow.
    """
    _check_T(T)
    s, t = _flat_logits(student_logits, teacher_logits, "dkd_loss", min_classes=2)
    n, c = s.shape
    target = target.reshape(-1)
    if target.numel() != n:
        raise ShapeMismatchError(
            f"dkd_loss: target of shape {tuple(target.shape)} does not match logits {tuple(student_logits.shape)}; "
            "target must hold one class index per logit row (logits.shape[:-1])"
        )
    target = target.long().to(s.device)
    gt_mask = F.one_hot(target, c).bool()

    s, t = s / T, t / T
    # TCKD: binary distribution [p_gt, 1 - p_gt], in log space.
    log_b_s = _log_binary(s, target, gt_mask)
    log_b_t = _log_binary(t, target, gt_mask)
    tckd = _reduce(_kl_rows(log_b_t, log_b_s) * (T**2), reduction, student_logits.shape[:-1])

    # NCKD: distribution over the non-target classes.
    log_p_s2 = F.log_softmax(s - _NCKD_MASK * gt_mask, dim=-1)
    log_p_t2 = F.log_softmax(t - _NCKD_MASK * gt_mask, dim=-1)
    nckd = _reduce(_kl_rows(log_p_t2, log_p_s2) * (T**2), reduction, student_logits.shape[:-1])
    return tckd, nckd


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    T: float = 4.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD`` (see `dkd_parts`)."""
    tckd, nckd = dkd_parts(student_logits, teacher_logits, target, T, reduction)
    return alpha * tckd + beta * nckd


def _logits(outputs: Outputs | None, who: str, loss: str) -> Tensor:
    if outputs is None or outputs.logits is None:
        raise ValueError(f"{loss} needs {who} logits, but the {who} returned none")
    return outputs.logits


class _TemperatureLoss(DistillLoss):
    """A divergence `fn(student_logits, teacher_logits, T)` at temperature T, optionally on standardised logits."""

    fn = staticmethod(kd_loss)
    loss_name = "kd"

    def __init__(self, *, T: PositiveFloat = 4.0, standardize: bool = False):
        super().__init__()
        check_options(self, locals())
        self.T = float(T)
        self.standardize = bool(standardize)

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        s, t = _pair(student, teacher, self.loss_name, self.standardize)
        return type(self).fn(s, t, self.T)

    def per_sample(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        """One value per logit row (``logits.shape[:-1]``); its mean is `forward`'s value."""
        s, t = _pair(student, teacher, self.loss_name, self.standardize)
        return type(self).fn(s, t, self.T, reduction="none")

    def extra_repr(self) -> str:
        return f"T={self.T}, standardize={self.standardize}"


class KDLoss(_TemperatureLoss):
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (soft targets at temperature T, times T^2).

    ``standardize=True`` z-scores both logits first (Sun et al., CVPR 2024, `standardize_logits`); the official
    CIFAR-100 setting for that is T = 2 with KD weight 9 and CE weight 0.1.
    """


class DKDLoss(DistillLoss):
    """Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation" (alpha * TCKD + beta * NCKD, linear warm-up).

    Warm-up: the loss is scaled by ``min(epoch / warmup, 1)``. kdkit's ``epoch`` (set by the trainer via
    `set_epoch`) is fractional and 0-based, so the factor rises linearly from 0 at the start of training to
    1 after ``warmup`` full epochs. mdistiller counts epochs from 1 and holds the value constant through an
    epoch, so during its epoch e (kdkit epochs [e-1, e)) it uses e / warmup -- the value kdkit reaches at
    the end of that epoch; the two schedules differ by less than 1 / warmup and both reach 1 at the end of
    epoch ``warmup``. ``warmup=0`` disables the warm-up.

    ``standardize=True`` z-scores both logits first (Sun et al., CVPR 2024, `standardize_logits`); the official
    CIFAR-100 setting for that is T = 2 with alpha and beta both multiplied by 9.
    """

    needs_labels = True

    def __init__(self, *, alpha: NonNegFloat = 1.0, beta: NonNegFloat = 8.0, T: PositiveFloat = 4.0,
                 warmup: NonNegInt = 20, standardize: bool = False):
        super().__init__()
        check_options(self, locals())
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.T = float(T)
        self.warmup = warmup
        self.standardize = bool(standardize)

    def warmup_factor(self) -> float:
        if self.warmup <= 0:
            return 1.0
        return min(max(self.epoch, 0.0) / self.warmup, 1.0)

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        return self.per_sample(student, teacher, labels).mean()

    def per_sample(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        """One value per logit row, warm-up factor included; its mean is `forward`'s value."""
        if labels is None:
            raise ValueError("dkd needs the ground-truth labels (needs_labels=True), but none were passed")
        s, t = _pair(student, teacher, "dkd", self.standardize)
        loss = dkd_loss(s, t, labels, self.alpha, self.beta, self.T, reduction="none")
        return self.warmup_factor() * loss

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, T={self.T}, warmup={self.warmup}, standardize={self.standardize}"


# ---------------------------------------------------------------- standardisation, NKD, DIST, RKL, JSD, label-free

__all__ += [
    "standardize_logits",
    "nkd_loss",
    "dist_loss",
    "rkl_loss",
    "jsd_loss",
    "label_free_kd_loss",
    "NKDLoss",
    "DISTLoss",
    "RKLLoss",
    "JSDLoss",
    "LabelFreeKDLoss",
]


def standardize_logits(x: Tensor, eps: float = 1e-7) -> Tensor:
    """Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation": Z-score over the last dimension.

    ``(x - mean) / (eps + std)`` with the unbiased (n - 1) standard deviation and eps added to the std, exactly as
    the official ``normalize()`` (sunshangquan/logit-standardization-KD, ``mdistiller/distillers/KD.py``).
    Computed in float32 (float64 for float64 input).
    """
    if x.dim() < 1 or x.shape[-1] < 2:
        raise ShapeMismatchError(
            f"standardize_logits needs logits [..., num_classes] with at least 2 classes (the std of one "
            f"value is undefined), got {tuple(x.shape)}"
        )
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True)  # unbiased, as torch.Tensor.std's default in the official code
    return (x - mean) / (eps + std)


def _flat_target(target: Tensor, n: int, c: int, shape, what: str) -> Tensor:
    """Class indices, one per logit row, as a flat LongTensor; errors name the shapes."""
    target = target.reshape(-1)
    if target.numel() != n:
        raise ShapeMismatchError(
            f"{what}: target of shape {tuple(target.shape)} does not match logits {tuple(shape)}; "
            "target must hold one class index per logit row (logits.shape[:-1])"
        )
    target = target.long()
    if n and (int(target.min()) < 0 or int(target.max()) >= c):
        raise ShapeMismatchError(f"{what}: target class indices must lie in [0, {c}), got {target.tolist()[:8]}")
    return target


def nkd_loss(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temp: float = 3.0, gamma: float = 3.5,
    reduction: Reduction = "mean",
) -> Tensor:
    """Yang et al., ICCV 2023, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels": NKD.

    ``-mean(t_gt * log s_gt) - gamma * temp^2 * mean(sum_{c != gt} q_t(c) log q_s(c))``: the target term at
    temperature 1 with the teacher's target probability ``t_gt`` detached, plus the cross-entropy between the
    *normalized* non-target distributions ``q`` (softmax over the non-target logits / temp). As the official
    ``NKDLoss`` (yzd-v/cls_KD), whose values are cross-entropies (KL plus the teacher's constant entropy).
    Defaults: the official CIFAR-100 config (temp 3, gamma 3.5); its ImageNet configs use temp 1, gamma 1.5.
    """
    _check_T(temp)
    s, t = _flat_logits(student_logits, teacher_logits, "nkd_loss", min_classes=2)
    n, c = s.shape
    target = _flat_target(target, n, c, student_logits.shape, "nkd_loss").to(s.device)
    tgt = target[:, None]
    log_s_gt = F.log_softmax(s, dim=-1).gather(1, tgt)
    t_gt = F.softmax(t, dim=-1).gather(1, tgt).detach()
    loss_t = -(t_gt * log_s_gt).squeeze(1)
    # Non-target columns in class order: column j < gt is class j, column j >= gt is class j + 1.
    cols = torch.arange(c - 1, device=s.device)[None, :]
    idx = cols + (cols >= tgt).long()
    s_non, t_non = s.gather(1, idx), t.gather(1, idx)
    log_q_s = F.log_softmax(s_non / temp, dim=-1)
    q_t = F.softmax(t_non / temp, dim=-1)
    loss_non = -gamma * temp**2 * (q_t * log_q_s).sum(dim=-1)
    if reduction == "mean":  # as the official code: two means, added
        return loss_t.mean() + loss_non.mean()
    return _reduce(loss_t + loss_non, reduction, student_logits.shape[:-1])


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of matching rows: DIST's ``cosine_similarity`` of centred rows, eps in the denominator."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(
    student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0, gamma: float = 1.0, tau: float = 4.0
) -> Tensor:
    """Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher": DIST.

    ``tau^2 * (beta * (1 - mean_i pearson(p_s[i, :], p_t[i, :])) + gamma * (1 - mean_c pearson(p_s[:, c], p_t[:, c])))``
    with ``p = softmax(logits / tau)``: inter-class relations per sample plus intra-class relations per class
    across the batch (for ``[..., C]`` logits, across all leading positions). As the official ``DIST``
    (hunto/image_classification_sota ``lib/models/losses/dist_kd.py``). Default tau = 4: the repo's CIFAR-100
    setting (``kd: dist_t4`` in ``dist_cifar.yaml``, with ``kd_loss_weight: 2``); ImageNet uses tau = 1.
    """
    _check_T(tau)
    s, t = _flat_logits(student_logits, teacher_logits, "dist_loss")
    if s.shape[0] < 2 and gamma != 0:
        raise ShapeMismatchError(
            f"dist_loss: the intra-class term (gamma={gamma}) correlates each class across the batch and needs at "
            f"least 2 logit rows, got logits of shape {tuple(student_logits.shape)}"
        )
    if s.shape[1] < 2:
        raise ShapeMismatchError(
            f"dist_loss needs at least 2 classes, got logits of shape {tuple(student_logits.shape)}"
        )
    p_s = F.softmax(s / tau, dim=-1)
    p_t = F.softmax(t / tau, dim=-1)
    inter = 1 - _pearson_rows(p_s, p_t).mean()
    intra = 1 - _pearson_rows(p_s.t(), p_t.t()).mean()
    return tau**2 * (beta * inter + gamma * intra)


def rkl_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 4.0,
             reduction: Reduction = "mean") -> Tensor:
    """Reverse KL distillation (as in Gu et al., ICLR 2024, "MiniLLM"; Agarwal et al., ICLR 2024, GKD): T^2 * KL(softmax(s/T) || softmax(t/T)).

    Averaged over all leading positions (``batchmean`` for ``[B, C]``); mode-seeking where KD is mode-covering.
    Classes both models put at -inf contribute nothing.
    """
    return _divergence_loss("rkl_loss", student_logits, teacher_logits, Divergence("rkl", _checked_T(T)), reduction)


def jsd_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5, T: float = 1.0,
             reduction: Reduction = "mean") -> Tensor:
    """Agarwal et al., ICLR 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes" (GKD): generalized JSD.

    ``T^2 * (beta * KL(p_t || m) + (1 - beta) * KL(p_s || m))`` with ``m = beta * p_t + (1 - beta) * p_s`` and
    ``p = softmax(logits / T)``, averaged over all leading positions. The T^2 factor is kdkit's one convention
    (`kdkit.divergence`; the LM ``token_kd`` jsd is the same number); at T = 1 it is TRL's
    ``GKDTrainer.generalized_jsd_loss``, including its end points: ``beta = 0`` gives the forward KL(p_t || p_s)
    and ``beta = 1`` the reverse KL(p_s || p_t) (the limits of JSD(beta) / beta and / (1 - beta)). TRL's
    ``batchmean`` divides ``[B, L, V]`` sums by B only; kdkit averages over all B * L positions.
    """
    _check_T(T)
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"jsd beta must be in [0, 1], got {beta}")
    return _divergence_loss("jsd_loss", student_logits, teacher_logits, Divergence("jsd", T, beta), reduction)


def label_free_kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 1.0,
                       reduction: Reduction = "mean") -> Tensor:
    """Shen & Savvides 2020, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet without Tricks": soft-label cross-entropy.

    ``-T^2 * mean(sum_c softmax(t/T)_c * log_softmax(s/T)_c)``, as MEAL V2's ``KLLoss`` (its value is the
    cross-entropy, i.e. the KL plus the teacher's entropy, a constant: gradients equal those of `kd_loss`).
    """
    _check_T(T)
    s, t = _flat_logits(student_logits, teacher_logits, "label_free_kd_loss")
    log_p_s = F.log_softmax(s / T, dim=-1)
    p_t = F.softmax(t / T, dim=-1)
    # Skip classes the teacher gives probability 0 (0 * -inf would be nan).
    rows = -(torch.where(p_t > 0, p_t * log_p_s, 0.0)).sum(dim=-1) * (T**2)
    return _reduce(rows, reduction, student_logits.shape[:-1])


def _pair(student: Outputs, teacher: Outputs | None, loss: str, standardize: bool) -> tuple[Tensor, Tensor]:
    """Student and teacher logits, z-scored (`standardize_logits`) when ``standardize``."""
    s, t = _logits(student, "student", loss), _logits(teacher, "teacher", loss)
    if standardize:
        if s.shape != t.shape:  # say it before standardize_logits, which would work on each alone
            _flat_logits(s, t, loss)
        s, t = standardize_logits(s), standardize_logits(t)
    return s, t


class NKDLoss(DistillLoss):
    """Yang et al., ICCV 2023, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels" (NKD).

    Official CIFAR-100 setting (yzd-v/cls_KD ``configs/distillers/cifar100``): temp 3, gamma 3.5, added to CE
    (weight 1) with weight 1. ``standardize=True`` z-scores both logits first (`standardize_logits`).
    """

    needs_labels = True

    def __init__(self, *, temp: PositiveFloat = 3.0, gamma: NonNegFloat = 3.5, standardize: bool = False):
        super().__init__()
        check_options(self, locals())
        self.temp = float(temp)
        self.gamma = float(gamma)
        self.standardize = bool(standardize)

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        return self.per_sample(student, teacher, labels).mean()

    def per_sample(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        """One value per logit row; its mean is `forward`'s value."""
        if labels is None:
            raise ValueError("nkd needs the ground-truth labels (needs_labels=True), but none were passed")
        s, t = _pair(student, teacher, "nkd", self.standardize)
        return nkd_loss(s, t, labels, self.temp, self.gamma, reduction="none")

    def extra_repr(self) -> str:
        return f"temp={self.temp}, gamma={self.gamma}, standardize={self.standardize}"


class DISTLoss(DistillLoss):
    """Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher" (DIST: inter- + intra-class Pearson relations).

    The official CIFAR-100 setting: tau 4, beta 1, gamma 1, loss weight 2 with CE weight 1. The intra-class term
    correlates across the batch, so the value depends on the batch. ``standardize=True`` z-scores both logits first.
    """

    def __init__(self, *, beta: NonNegFloat = 1.0, gamma: NonNegFloat = 1.0, tau: PositiveFloat = 4.0,
                 standardize: bool = False):
        super().__init__()
        check_options(self, locals())
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.tau = float(tau)
        self.standardize = bool(standardize)

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        s, t = _pair(student, teacher, "dist", self.standardize)
        return dist_loss(s, t, self.beta, self.gamma, self.tau)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, tau={self.tau}, standardize={self.standardize}"


class RKLLoss(_TemperatureLoss):
    """Reverse-KL distillation, T^2 * KL(student || teacher) at temperature T (Gu et al., ICLR 2024, "MiniLLM").

    ``standardize=True`` z-scores both logits first (`standardize_logits`).
    """

    fn = staticmethod(rkl_loss)
    loss_name = "rkl"


class JSDLoss(DistillLoss):
    """Agarwal et al., ICLR 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes" (generalized JSD, TRL's convention).

    ``standardize=True`` z-scores both logits first (`standardize_logits`).
    """

    def __init__(self, *, beta: Probability = 0.5, T: PositiveFloat = 1.0, standardize: bool = False):
        super().__init__()
        check_options(self, locals())
        self.beta = float(beta)
        self.T = float(T)
        self.standardize = bool(standardize)

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        s, t = _pair(student, teacher, "jsd", self.standardize)
        return jsd_loss(s, t, self.beta, self.T)

    def per_sample(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        """One value per logit row; its mean is `forward`'s value."""
        s, t = _pair(student, teacher, "jsd", self.standardize)
        return jsd_loss(s, t, self.beta, self.T, reduction="none")

    def extra_repr(self) -> str:
        return f"beta={self.beta}, T={self.T}, standardize={self.standardize}"


class LabelFreeKDLoss(DistillLoss):
    """Label-free KD as in SSLD (Cui et al. 2021, "Beyond Self-Supervision: A Simple Yet Effective Network Distillation Alternative to Improve Backbones") and MEAL V2 (Shen & Savvides 2020): teacher soft labels only.

    The student learns only from the teacher's soft labels at T = 1 (`label_free_kd_loss`); there is no
    hard-label term, so the recipe must set ``ce_weight: 0``. MEAL V2's discriminator is not included.
    """

    def __init__(self, *, T: PositiveFloat = 1.0):
        super().__init__()
        check_options(self, locals())
        self.T = float(T)

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        s, t = _logits(student, "student", "label_free"), _logits(teacher, "teacher", "label_free")
        return label_free_kd_loss(s, t, self.T)

    def per_sample(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        """One value per logit row; its mean is `forward`'s value."""
        s, t = _logits(student, "student", "label_free"), _logits(teacher, "teacher", "label_free")
        return label_free_kd_loss(s, t, self.T, reduction="none")

    def extra_repr(self) -> str:
        return f"T={self.T}"


# ---------------------------------------------------------------- BinaryKL, BinaryKL-Norm (Yang et al. 2024)

__all__ += ["binary_kl_loss", "binary_kl_norm_loss", "BinaryKLLoss", "BinaryKLNormLoss"]


def binary_kl_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 2.0,
                   reduction: Reduction = "mean") -> Tensor:
    """Yang et al. 2024, "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary Head": BinaryKL.

    ``T^2 * sum_c KL(Bernoulli(sigmoid(t_c / T)) || Bernoulli(sigmoid(s_c / T)))`` per row, averaged over rows: each
    class is its own binary problem, so the loss sees logit values softmax would hide (a shift of all logits).
    As the official ``BinaryKL`` (penghui-yang/DHKD ``distiller_zoo/BinaryKL.py``), computed in log space with
    ``logsigmoid`` where the official clamps probabilities to [1e-8, 1 - 1e-8] (same values for |logit / T| < 18).
    """
    _check_T(T)
    s, t = _flat_logits(student_logits, teacher_logits, "binary_kl_loss")
    s, t = s / T, t / T
    log_t, log_1mt = F.logsigmoid(t), F.logsigmoid(-t)
    p_t = log_t.exp()
    rows = (p_t * (log_t - F.logsigmoid(s)) + (1 - p_t) * (log_1mt - F.logsigmoid(-s))).sum(dim=-1)
    return _reduce(rows * (T**2), reduction, student_logits.shape[:-1])


def binary_kl_norm_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 2.0,
                        reduction: Reduction = "mean") -> Tensor:
    """Yang et al. 2024, "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary Head": BinaryKL-Norm.

    ``T^2 * sum_c KL(Bernoulli(1/2) || Bernoulli(sigmoid((s_c - t_c) / T)))`` per row, averaged over rows, as the
    official ``BinaryKLNorm`` (penghui-yang/DHKD ``distiller_zoo/BinaryKLNorm.py``, the loss of its ``dhkd`` mode).
    In closed form each class contributes ``log cosh((s_c - t_c) / (2T))``: a smooth logit-matching loss, zero
    exactly when the logits agree; computed so (the official clamps sigmoid to [1e-8, 1 - 1e-8]: same values for
    |s - t| / T < 18). Default T = 2, the official ``--BinaryKL_T``.
    """
    _check_T(T)
    s, t = _flat_logits(student_logits, teacher_logits, "binary_kl_norm_loss")
    half = (s - t) / (2 * T)
    rows = (torch.logaddexp(half, -half) - math.log(2.0)).sum(dim=-1)  # log cosh, stable for any size
    return _reduce(rows * (T**2), reduction, student_logits.shape[:-1])


class BinaryKLLoss(_TemperatureLoss):
    """Yang et al. 2024, "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary Head" (BinaryKL, a logit-level loss).

    On the student's own head it conflicts with the cross-entropy (the paper's motivating failure); use it through
    ``dual_head`` (an auxiliary head). ``standardize=True`` z-scores both logits first (`standardize_logits`).
    """

    fn = staticmethod(binary_kl_loss)
    loss_name = "binary_kl"

    def __init__(self, *, T: PositiveFloat = 2.0, standardize: bool = False):
        super().__init__(T=T, standardize=standardize)


class BinaryKLNormLoss(_TemperatureLoss):
    """Yang et al. 2024, "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary Head" (BinaryKL-Norm, DHKD's logit-level loss).

    Meant for the auxiliary head of ``dual_head`` (its default inner loss), not the student's own head.
    ``standardize=True`` z-scores both logits first (`standardize_logits`).
    """

    fn = staticmethod(binary_kl_norm_loss)
    loss_name = "binary_kl_norm"

    def __init__(self, *, T: PositiveFloat = 2.0, standardize: bool = False):
        super().__init__(T=T, standardize=standardize)


for _name, _cls in (
    ("binary_kl", BinaryKLLoss),
    ("binary_kl_norm", BinaryKLNormLoss),
    ("nkd", NKDLoss),
    ("kd", KDLoss),
    ("dkd", DKDLoss),
    ("dist", DISTLoss),
    ("rkl", RKLLoss),
    ("jsd", JSDLoss),
    ("label_free", LabelFreeKDLoss),
):
    if _name not in LOSSES:  # tolerate a re-import (importlib.reload)
        LOSSES.register(_name, _cls)
