"""Logit-matching losses: Hinton KD and Decoupled KD, as functions of tensors plus thin `DistillLoss` modules.

Every function computes in float32 (or float64 if given float64) whatever the input dtype, so bf16/fp16
logits give float32 losses. Logits may have any number of leading dimensions (``[..., C]``, e.g.
``[B, L, V]`` for language models); the loss is averaged over all leading positions.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, ShapeMismatchError
from ..models.outputs import Outputs
from .base import DistillLoss

__all__ = ["kd_loss", "dkd_parts", "dkd_loss", "KDLoss", "DKDLoss"]

# mdistiller masks the target class out of the non-target distribution by subtracting this from logits / T.
_NCKD_MASK = 1000.0


def _flat_logits(student_logits: Tensor, teacher_logits: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Check shapes, upcast to >= float32, flatten ``[..., C]`` to ``[N, C]``."""
    if student_logits.shape != teacher_logits.shape:
        raise ShapeMismatchError(
            f"{what}: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; both must be [..., num_classes] with the same shape"
        )
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ShapeMismatchError(f"{what}: logits must be [..., num_classes], got {tuple(student_logits.shape)}")
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


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 4.0) -> Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": T^2 * KL(softmax(t/T) || softmax(s/T)).

    Averaged over the batch (``batchmean``; for ``[..., C]`` logits, over all leading positions).
    """
    _check_T(T)
    s, t = _flat_logits(student_logits, teacher_logits, "kd_loss")
    log_p_s = F.log_softmax(s / T, dim=-1)
    log_p_t = F.log_softmax(t / T, dim=-1)
    return _kl_rows(log_p_t, log_p_s).mean() * (T**2)


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


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, T: float = 4.0) -> tuple[Tensor, Tensor]:
    """Decoupled KD (Zhao et al., CVPR 2022) split into ``(tckd, nckd)``, each batch-averaged and times T^2.

    TCKD is the KL between the binary distributions [p_target, 1 - p_target] of teacher and student;
    NCKD is the KL between the distributions over the non-target classes, obtained as in mdistiller by
    subtracting 1000 from the target class's logit / T before the softmax. Mathematically identical to
    mdistiller's ``dkd_loss``, but in log space (no log of a sum of probabilities), so it stays finite and
    precise where probabilities underflow.
    """
    _check_T(T)
    s, t = _flat_logits(student_logits, teacher_logits, "dkd_loss")
    n, c = s.shape
    if c < 2:
        raise ShapeMismatchError(
            f"dkd_loss needs at least 2 classes, got logits of shape {tuple(student_logits.shape)}"
        )
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
    tckd = _kl_rows(log_b_t, log_b_s).mean() * (T**2)

    # NCKD: distribution over the non-target classes.
    log_p_s2 = F.log_softmax(s - _NCKD_MASK * gt_mask, dim=-1)
    log_p_t2 = F.log_softmax(t - _NCKD_MASK * gt_mask, dim=-1)
    nckd = _kl_rows(log_p_t2, log_p_s2).mean() * (T**2)
    return tckd, nckd


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    T: float = 4.0,
) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD`` (see `dkd_parts`)."""
    tckd, nckd = dkd_parts(student_logits, teacher_logits, target, T)
    return alpha * tckd + beta * nckd


def _logits(outputs: Outputs | None, who: str, loss: str) -> Tensor:
    if outputs is None or outputs.logits is None:
        raise ValueError(f"{loss} needs {who} logits, but the {who} returned none")
    return outputs.logits


class KDLoss(DistillLoss):
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (soft targets at temperature T, times T^2)."""

    def __init__(self, *, T: float = 4.0):
        super().__init__()
        _check_T(T)
        self.T = float(T)

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        return kd_loss(_logits(student, "student", "kd"), _logits(teacher, "teacher", "kd"), self.T)

    def extra_repr(self) -> str:
        return f"T={self.T}"


class DKDLoss(DistillLoss):
    """Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation" (alpha * TCKD + beta * NCKD, linear warm-up).

    Warm-up: the loss is scaled by ``min(epoch / warmup, 1)``. kdkit's ``epoch`` (set by the trainer via
    `set_epoch`) is fractional and 0-based, so the factor rises linearly from 0 at the start of training to
    1 after ``warmup`` full epochs. mdistiller counts epochs from 1 and holds the value constant through an
    epoch, so during its epoch e (kdkit epochs [e-1, e)) it uses e / warmup -- the value kdkit reaches at
    the end of that epoch; the two schedules differ by less than 1 / warmup and both reach 1 at the end of
    epoch ``warmup``. ``warmup=0`` disables the warm-up.
    """

    needs_labels = True

    def __init__(self, *, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0, warmup: int = 20):
        super().__init__()
        _check_T(T)
        if warmup < 0:
            raise ConfigError(f"dkd warmup must be >= 0 epochs, got {warmup}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.T = float(T)
        self.warmup = warmup

    def warmup_factor(self) -> float:
        if self.warmup <= 0:
            return 1.0
        return min(max(self.epoch, 0.0) / self.warmup, 1.0)

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            raise ValueError("dkd needs the ground-truth labels (needs_labels=True), but none were passed")
        s, t = _logits(student, "student", "dkd"), _logits(teacher, "teacher", "dkd")
        loss = dkd_loss(s, t, labels, self.alpha, self.beta, self.T)
        return self.warmup_factor() * loss

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, T={self.T}, warmup={self.warmup}"
