"""Several teachers, self-distillation and online (mutual) distillation, as tensor functions plus `DistillLoss` modules.

Trainer interface (the losses here go beyond one frozen teacher):

* ``multi_teacher`` (`MultiTeacherKDLoss`): when several teachers are configured the trainer passes ``teacher`` as a
  **list** of `Outputs`, one per teacher, in the configured order (a single `Outputs` is accepted when
  ``num_teachers == 1``). With ``weighting="routing"`` the loss reads the student feature ``gate_layer`` (default
  ``in:fc``, the penultimate embedding) and owns a gating MLP, trained with the student. Teacher dropping draws from
  ``loss.generator`` (a `torch.Generator`; set it for reproducible runs, e.g. seeded from the run seed).
* ``pskd`` (`PSKDLoss`): ``needs_teacher=False``, ``needs_index=True``: the trainer passes ``teacher=None`` and
  ``index=`` (dataset sample indices) and calls ``set_epoch`` every step. The prediction cache is a buffer, so it is
  saved in the loss's ``state_dict`` and must be checkpointed with it to resume. Recipe: ``ce_weight: 0`` (the loss
  is the cross-entropy with the refined target).
* ``dml`` (`DMLLoss`): ``teacher`` is the jointly trained **peer**'s `Outputs`, *not* detached and not produced under
  ``inference_mode``: the trainer builds the peer as a trainable `Student` (train mode), gives it its own optimizer
  and LR schedule, runs it on the same batch, and after ``loss.backward()`` steps both optimizers. The returned value
  is ``KL(p_peer || p_student) + KL(p_student || p_peer) [+ CE(peer)]`` where each KL's target is detached, so one
  backward gives each network exactly its own DML gradient.
"""
import math
import typing
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Probability, Range
from ..errors import ConfigError, ShapeMismatchError
from ..models.outputs import Outputs
from ..registry import LOSSES
from .base import DistillLoss, check_options
from .logits import _check_T, _kl_rows, _logits

__all__ = [
    "stack_teacher_logits",
    "teacher_mixture_log_probs",
    "mean_teacher_probs",
    "multi_teacher_kd_loss",
    "drop_teachers",
    "route_weights",
    "MultiTeacherKDLoss",
    "pskd_alpha",
    "pskd_loss",
    "PredictionCache",
    "PSKDLoss",
    "dml_loss",
    "DMLLoss",
]


def _float_dtype(*ts: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in ts:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ---------------------------------------------------------------- multi-teacher


def stack_teacher_logits(logits) -> Tensor:
    """Shen & Savvides 2020, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet without Tricks": teacher logits as one ``[K, N, C]`` tensor.

    Accepts a list/tuple of ``[..., C]`` tensors (one per teacher, equal shapes) or a stacked ``[K, ..., C]`` tensor.
    """
    if isinstance(logits, (list, tuple)):
        if not logits:
            raise ShapeMismatchError("multi-teacher loss: got an empty list of teacher logits")
        shapes = [tuple(t.shape) for t in logits]
        if len(set(shapes)) != 1:
            raise ShapeMismatchError(f"multi-teacher loss: teacher logits differ in shape: {shapes}")
        logits = torch.stack(list(logits))
    if logits.dim() < 3:
        raise ShapeMismatchError(
            f"multi-teacher loss: stacked teacher logits must be [num_teachers, batch, num_classes], "
            f"got {tuple(logits.shape)}"
        )
    return logits.reshape(logits.shape[0], -1, logits.shape[-1])


def _mixture_weights(weights: Tensor | None, k: int, n: int, dtype, device) -> Tensor:
    """Weights as ``[N, K]`` (uniform when None; ``[K]`` is shared by all rows)."""
    if weights is None:
        return torch.full((n, k), 1.0 / k, dtype=dtype, device=device)
    w = weights.to(dtype)
    if w.dim() == 1 and w.shape[0] == k:
        return w.expand(n, k)
    if w.dim() >= 2 and w.shape[-1] == k and w[..., 0].numel() == n:
        return w.reshape(n, k)
    raise ShapeMismatchError(
        f"multi-teacher weights of shape {tuple(weights.shape)} do not fit {k} teachers and {n} rows; "
        f"use [{k}] (one weight per teacher) or [{n}, {k}] (per sample)"
    )


def teacher_mixture_log_probs(teacher_logits, T: float = 1.0, weights: Tensor | None = None) -> Tensor:
    """Shen & Savvides 2020, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet without Tricks": log of sum_k w_k softmax(t_k / T), ``[N, C]``.

    Computed as a logsumexp of ``log w_k + log_softmax(t_k / T)``, so it stays finite where probabilities underflow.
    Weights are used as given (they should be >= 0 and sum to 1 per row); zero weights drop a teacher exactly.
    """
    _check_T(T)
    t = stack_teacher_logits(teacher_logits)
    k, n, _ = t.shape
    t = t.to(_float_dtype(t))
    w = _mixture_weights(weights, k, n, t.dtype, t.device)  # [N, K]
    pos = w > 0
    # log of a zero weight is -inf; the where keeps its gradient at 0 instead of 0 * inf.
    log_w = torch.where(pos, torch.where(pos, w, 1.0).log(), float("-inf"))
    log_p = F.log_softmax(t / T, dim=-1)  # [K, N, C]
    return torch.logsumexp(log_w.t()[:, :, None] + log_p, dim=0)


def mean_teacher_probs(teacher_logits, T: float = 1.0, weights: Tensor | None = None) -> Tensor:
    """Shen & Savvides 2020, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet without Tricks": the (weighted) average of the teachers' softmax outputs, ``[N, C]``."""
    return teacher_mixture_log_probs(teacher_logits, T, weights).exp()


def multi_teacher_kd_loss(student_logits: Tensor, teacher_logits, T: float = 4.0,
                          weights: Tensor | None = None) -> Tensor:
    """Shen & Savvides 2020, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet without Tricks": T^2 * KL(sum_k w_k p_k^T || p_s^T), batch-averaged.

    MEAL V2 itself uses T = 1 and the cross-entropy with the averaged probabilities, which differs from this KL
    by the targets' entropy (a constant for the student: same gradients).
    """
    t = stack_teacher_logits(teacher_logits)
    c = student_logits.shape[-1]
    if t.shape[-1] != c or t.shape[1] * c != student_logits.numel():
        raise ShapeMismatchError(
            f"multi-teacher loss: student logits {tuple(student_logits.shape)} do not match teacher logits "
            f"{tuple(t.shape)} ([num_teachers, N, C] with N * C equal to the student's size)"
        )
    s = student_logits.reshape(-1, c)
    s = s.to(_float_dtype(s, t))
    log_q = teacher_mixture_log_probs(t, T, weights).to(s.dtype)
    log_p_s = F.log_softmax(s / T, dim=-1)
    return _kl_rows(log_q, log_p_s).mean() * (T**2)


def drop_teachers(num_teachers: int, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Random teacher dropping (each teacher dropped with probability p, at least one kept): a bool keep-mask ``[K]``.

    Deterministic for a given `generator` state: one uniform draw per teacher, plus one draw choosing the teacher
    to keep when all were dropped (only then).
    """
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"teacher drop probability must be in [0, 1), got {p}")
    keep = torch.rand(num_teachers, generator=generator) >= p
    if not keep.any():
        keep[int(torch.randint(num_teachers, (1,), generator=generator))] = True
    return keep


def route_weights(gate_logits: Tensor, top_k: int = 0, keep: Tensor | None = None) -> Tensor:
    """Li et al., ACM MM 2025, "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation": per-sample teacher weights.

    softmax over the gate logits ``[N, K]`` restricted to the kept teachers (``keep``, bool ``[K]``) and, with
    ``top_k > 0``, to each row's ``top_k`` largest; the result is renormalised per row and is differentiable in the
    gate logits.
    """
    z = gate_logits.to(_float_dtype(gate_logits))
    if keep is not None:
        z = z.masked_fill(~keep.to(z.device)[None, :], float("-inf"))
    k = z.shape[-1]
    if 0 < top_k < k:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    return torch.softmax(z, dim=-1)


def _parse_weights(spec: str, k: int) -> list[float]:
    try:
        vals = [float(v) for v in spec.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"multi_teacher weights must be comma-separated numbers like '0.7,0.3', got {spec!r}") from None
    if len(vals) != k:
        raise ConfigError(f"multi_teacher weights {spec!r} give {len(vals)} values for num_teachers={k}")
    if any(v < 0 or not math.isfinite(v) for v in vals) or sum(vals) <= 0:
        raise ConfigError(f"multi_teacher weights {spec!r} must be finite, >= 0 and not all 0")
    return [v / sum(vals) for v in vals]


class _Gate(nn.Module):
    """Li et al., ACM MM 2025, "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation": a small routing MLP, feature -> teacher logits."""

    def __init__(self, in_dim: int, num_teachers: int):
        super().__init__()
        hidden = max(2 * num_teachers, in_dim // 2)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_teachers))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.to(self.net[0].weight.dtype))


def _flat_feature(f: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> global average pool; ``[B, ..., D]`` -> ``[B, D]`` (mean over the middle)."""
    if f.dim() == 4:
        return f.mean(dim=(2, 3))
    if f.dim() > 2:
        return f.reshape(f.shape[0], -1, f.shape[-1]).mean(dim=1)
    if f.dim() == 2:
        return f
    raise ShapeMismatchError(f"routing gate needs a [B, D] or [B, C, H, W] student feature, got {tuple(f.shape)}")


# how the teachers' distributions are mixed (see MultiTeacherKDLoss)
Weighting = Literal["mean", "fixed", "learned", "routing"]


class MultiTeacherKDLoss(DistillLoss):
    """Shen & Savvides 2020, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet without Tricks" (averaged teachers), with learned weights and MST-Distill-style routing (Li et al., ACM MM 2025).

    ``weighting``: ``mean`` (uniform), ``fixed`` (``weights="0.7,0.3"``, normalised), ``learned`` (softmax of a
    learnable vector, trained with the student), ``routing`` (per-sample softmax of a gating MLP on the detached
    student feature ``gate_layer``; ``top_k > 0`` keeps each sample's top_k teachers; ``balance > 0`` adds MST-Distill's
    load-balancing term ``balance * KL(uniform || mean gate probabilities)``). ``drop_p``: in training, each teacher
    is dropped with this probability per step (at least one kept) and the weights are renormalised over the rest.
    ``teacher`` must be a list of `Outputs`, one per teacher. The learned weights / gate receive gradients through
    the mixture target (the teachers' logits are constants).
    """

    WEIGHTINGS = typing.get_args(Weighting)
    takes_teacher_list = True

    def __init__(self, *, num_teachers: PositiveInt = 2, weighting: Weighting = "mean", weights: str = "",
                 T: PositiveFloat = 4.0, drop_p: Annotated[float, Range(ge=0, lt=1)] = 0.0, top_k: NonNegInt = 0,
                 gate_layer: str = "in:fc", balance: NonNegFloat = 0.0):
        super().__init__()
        check_options(self, locals())
        if weights and weighting != "fixed":
            raise ConfigError(f"multi_teacher weights={weights!r} is only used with weighting='fixed', not {weighting!r}")
        if weighting == "fixed" and not weights:
            raise ConfigError("multi_teacher weighting='fixed' needs weights, e.g. weights='0.5,0.5'")
        if top_k > num_teachers:
            raise ConfigError(f"multi_teacher top_k must be in [0, num_teachers={num_teachers}], got {top_k}")
        if top_k and weighting != "routing":
            raise ConfigError(f"multi_teacher top_k is only used with weighting='routing', not {weighting!r}")
        self.num_teachers = int(num_teachers)
        self.weighting = weighting
        self.T = float(T)
        self.drop_p = float(drop_p)
        self.top_k = int(top_k)
        self.gate_layer = gate_layer
        self.balance = float(balance)
        self.generator: torch.Generator | None = None
        self.gate: nn.Module | None = None
        self.logit_weights: nn.Parameter | None = None
        if weighting == "fixed":
            self.register_buffer("fixed_weights", torch.tensor(_parse_weights(weights, num_teachers), dtype=torch.float64),
                                 persistent=False)
        elif weighting == "learned":
            self.logit_weights = nn.Parameter(torch.zeros(num_teachers))
        elif weighting == "routing":
            self.student_taps = (gate_layer,)
        self.last_weights: Tensor | None = None  # the weights of the latest step (for logging)

    def _teacher_logits(self, teacher) -> list[Tensor]:
        if isinstance(teacher, Outputs) and self.num_teachers == 1:
            teacher = [teacher]
        if not isinstance(teacher, (list, tuple)):
            raise ValueError(
                f"multi_teacher needs a list of {self.num_teachers} teacher Outputs (one per configured teacher), "
                f"got {type(teacher).__name__}"
            )
        if len(teacher) != self.num_teachers:
            raise ShapeMismatchError(
                f"multi_teacher was built for num_teachers={self.num_teachers} but got {len(teacher)} teacher outputs"
            )
        return [_logits(t, f"teacher {i}", "multi_teacher") for i, t in enumerate(teacher)]

    def setup(self, student: Outputs, teacher) -> None:
        ts = self._teacher_logits(teacher)
        stack_teacher_logits(ts)  # shape check
        if self.weighting != "routing":
            return
        f = _flat_feature(student.feature(self.gate_layer, "student"))
        if self.gate is not None and self.gate.net[0].in_features == f.shape[-1]:
            return  # already built (setup again on resume): keep the trained gate
        self.gate = _Gate(f.shape[-1], self.num_teachers).to(f.device)

    def teacher_weights(self, student: Outputs, n: int) -> Tensor:
        """The mixture weights for this step: ``[K]`` or ``[N, K]``, with dropped teachers at 0."""
        k = self.num_teachers
        keep = drop_teachers(k, self.drop_p, self.generator) if (self.training and self.drop_p > 0) else None
        if self.weighting == "routing":
            if self.gate is None:
                raise RuntimeError("MultiTeacherKDLoss.setup(student_outputs, teacher_outputs) must be called before "
                                   "the loss is used: it builds the routing gate from the student feature's size")
            f = _flat_feature(student.feature(self.gate_layer, "student")).detach()
            return route_weights(self.gate(f), self.top_k, keep)
        # float64: K numbers, and 1/3 in float32 would limit a float64 loss to float32 precision.
        if self.weighting == "learned":
            z = self.logit_weights.double()
        elif self.weighting == "fixed":
            z = self.fixed_weights.double().log()  # log 0 = -inf: a zero-weight teacher stays out
        else:
            z = torch.zeros(k, dtype=torch.float64)
        if keep is not None:
            keep = keep.to(z.device)
            if self.weighting == "fixed" and not bool((self.fixed_weights.to(z.device) > 0)[keep].any()):
                z = torch.zeros(k, device=z.device)  # only zero-weight teachers survived the drop: use them equally
            z = z.masked_fill(~keep, float("-inf"))
        return torch.softmax(z, dim=-1)

    def forward(self, student: Outputs, teacher, labels: Tensor | None = None) -> Tensor:
        s = _logits(student, "student", "multi_teacher")
        ts = [t.detach() for t in self._teacher_logits(teacher)]
        n = s.numel() // s.shape[-1]
        w = self.teacher_weights(student, n)
        self.last_weights = w.detach()
        loss = multi_teacher_kd_loss(s, ts, self.T, w.to(s.device))
        if self.weighting == "routing" and self.balance > 0:
            mean_w = w.mean(dim=0)
            k = self.num_teachers
            # MST-Distill's load balancing: KL(uniform || mean routing probabilities).
            loss = loss + self.balance * (-(mean_w.clamp_min(1e-12).log()).mean() - math.log(k))
        return loss

    def extra_repr(self) -> str:
        return (f"num_teachers={self.num_teachers}, weighting={self.weighting!r}, T={self.T}, drop_p={self.drop_p}, "
                f"top_k={self.top_k}")


# ---------------------------------------------------------------- PS-KD


def pskd_alpha(epoch: float, alpha_T: float = 0.8, epochs: int = 240) -> float:
    """Kim et al., ICCV 2021, "Self-Knowledge Distillation with Progressive Refinement of Targets": alpha_t = alpha_T * t / T_total.

    As the official code (lgcnsai/PS-KD-Pytorch ``main.py``): during 0-based epoch e, ``alpha_T * (e + 1) / epochs``,
    constant through the epoch; kdkit's fractional epoch is floored, and alpha stops at alpha_T after ``epochs``.
    """
    if epochs < 1:
        raise ConfigError(f"pskd epochs must be >= 1, got {epochs}")
    e = min(math.floor(max(epoch, 0.0)) + 1, epochs)
    return alpha_T * e / epochs


def pskd_loss(student_logits: Tensor, labels: Tensor, prev_probs: Tensor, alpha: float) -> Tensor:
    """Kim et al., ICCV 2021, "Self-Knowledge Distillation with Progressive Refinement of Targets": CE with target (1 - alpha) * onehot + alpha * prev_probs.

    Batch-averaged: ``mean_rows(-sum_c target_c * log_softmax(student)_c)``, as the official ``Custom_CrossEntropy_PSKD``.
    """
    if student_logits.dim() != 2:
        raise ShapeMismatchError(f"pskd_loss: student logits must be [batch, num_classes], got {tuple(student_logits.shape)}")
    n, c = student_logits.shape
    if prev_probs.shape != student_logits.shape:
        raise ShapeMismatchError(
            f"pskd_loss: previous predictions {tuple(prev_probs.shape)} must match student logits {tuple(student_logits.shape)}"
        )
    labels = labels.reshape(-1)
    if labels.numel() != n:
        raise ShapeMismatchError(f"pskd_loss: labels {tuple(labels.shape)} must hold one class index per row of {n}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"pskd alpha must be in [0, 1], got {alpha}")
    s = student_logits.to(_float_dtype(student_logits, prev_probs))
    onehot = F.one_hot(labels.long().to(s.device), c).to(s.dtype)
    target = (1.0 - alpha) * onehot + alpha * prev_probs.to(s.device, s.dtype)
    return -(target * F.log_softmax(s, dim=-1)).sum(dim=-1).mean()


class PredictionCache(nn.Module):
    """Kim et al., ICCV 2021, "Self-Knowledge Distillation with Progressive Refinement of Targets": a per-sample, double-buffered store of past predictions.

    ``latest[i]`` is sample i's newest prediction, written in epoch ``written[i]``; when a sample is first written in
    a new epoch its previous value moves to ``previous[i]``. `read` at epoch e returns the prediction from the latest
    epoch before e (``previous`` if already written in e, else ``latest``) -- never one from epoch e itself, and
    unvisited samples keep their older prediction. ``has`` is False for samples never written before epoch e.
    """

    def __init__(self, num_samples: int, num_classes: int):
        super().__init__()
        if num_samples < 1 or num_classes < 1:
            raise ConfigError(f"pskd cache needs num_samples >= 1 and num_classes >= 1, got {num_samples}, {num_classes}")
        self.register_buffer("latest", torch.zeros(num_samples, num_classes))
        self.register_buffer("previous", torch.zeros(num_samples, num_classes))
        self.register_buffer("written", torch.full((num_samples,), -1, dtype=torch.long))
        self.register_buffer("written_before", torch.full((num_samples,), -1, dtype=torch.long))

    def _index(self, index: Tensor) -> Tensor:
        index = torch.as_tensor(index).reshape(-1).long()
        n = self.written.shape[0]
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ShapeMismatchError(
                f"pskd: sample index out of range [0, {n}): got min {int(index.min())}, max {int(index.max())}; "
                f"set num_samples to the training set's size"
            )
        return index.to(self.written.device)

    def read(self, index: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        i = self._index(index)
        now = self.written[i] == epoch
        probs = torch.where(now[:, None], self.previous[i], self.latest[i])
        has = torch.where(now, self.written_before[i], self.written[i]) >= 0
        return probs, has

    def write(self, index: Tensor, probs: Tensor, epoch: int) -> None:
        i = self._index(index)
        if probs.shape != (i.numel(), self.latest.shape[1]):
            raise ShapeMismatchError(
                f"pskd: predictions {tuple(probs.shape)} do not fit {i.numel()} indices x {self.latest.shape[1]} classes"
            )
        first = self.written[i] != epoch  # first write of these samples in this epoch: keep the old value
        j = i[first]
        self.previous[j] = self.latest[j]
        self.written_before[j] = self.written[j]
        self.latest[i] = probs.detach().to(self.latest.dtype)
        self.written[i] = epoch


class PSKDLoss(DistillLoss):
    """Kim et al., ICCV 2021, "Self-Knowledge Distillation with Progressive Refinement of Targets" (PS-KD).

    Target = (1 - alpha_t) * onehot + alpha_t * (the student's softmax for that sample in the previous epoch),
    alpha_t = `pskd_alpha` (alpha_T * (e + 1) / epochs); samples with no previous prediction (epoch 0) use the
    one-hot label, as the official code. Each step writes the detached softmax into the cache. The returned loss is
    the full CE, so recipes set ``ce_weight: 0``. ``num_samples`` must be the training set's size.
    """

    needs_labels = True
    needs_teacher = False
    needs_index = True

    def __init__(self, *, num_samples: PositiveInt = 50000, num_classes: PositiveInt = 10, alpha_T: Probability = 0.8,
                 epochs: PositiveInt = 240):
        super().__init__()
        check_options(self, locals())
        self.alpha_T = float(alpha_T)
        self.epochs = int(epochs)
        self.num_classes = int(num_classes)
        self.cache = PredictionCache(num_samples, num_classes)

    def alpha(self) -> float:
        return pskd_alpha(self.epoch, self.alpha_T, self.epochs)

    def forward(self, student: Outputs, teacher: Outputs | None = None, labels: Tensor | None = None,
                index: Tensor | None = None) -> Tensor:
        if labels is None:
            raise ValueError("pskd needs the ground-truth labels (needs_labels=True), but none were passed")
        if index is None:
            raise ValueError("pskd needs the batch's dataset sample indices (needs_index=True): pass index=")
        s = _logits(student, "student", "pskd")
        if s.dim() != 2 or s.shape[1] != self.num_classes:
            raise ShapeMismatchError(f"pskd was built for num_classes={self.num_classes}, got logits {tuple(s.shape)}")
        epoch = math.floor(max(self.epoch, 0.0))
        prev, has = self.cache.read(index, epoch)
        onehot = F.one_hot(labels.reshape(-1).long().to(prev.device), self.num_classes).to(prev.dtype)
        prev = torch.where(has[:, None], prev, onehot)
        loss = pskd_loss(s, labels, prev, self.alpha())
        if self.training:
            self.cache.write(index, torch.softmax(s.detach().float(), dim=-1), epoch)
        return loss

    def extra_repr(self) -> str:
        n, c = self.cache.latest.shape
        return f"num_samples={n}, num_classes={c}, alpha_T={self.alpha_T}, epochs={self.epochs}"


# ---------------------------------------------------------------- DML


def dml_loss(logits_a: Tensor, logits_b: Tensor) -> tuple[Tensor, Tensor]:
    """Zhang et al., CVPR 2018, "Deep Mutual Learning": ``(KL(p_b || p_a), KL(p_a || p_b))`` at T = 1, batch-averaged.

    The first term trains peer a (p_b detached), the second peer b (p_a detached).
    """
    if logits_a.shape != logits_b.shape:
        raise ShapeMismatchError(
            f"dml_loss: peer logits {tuple(logits_a.shape)} and {tuple(logits_b.shape)} differ; both must be [..., C]"
        )
    c = logits_a.shape[-1]
    dtype = _float_dtype(logits_a, logits_b)
    a, b = logits_a.to(dtype).reshape(-1, c), logits_b.to(dtype).reshape(-1, c)
    log_a, log_b = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
    return _kl_rows(log_b.detach(), log_a).mean(), _kl_rows(log_a.detach(), log_b).mean()


class DMLLoss(DistillLoss):
    """Zhang et al., CVPR 2018, "Deep Mutual Learning": both peers' mimicry terms (each against the other's detached prediction), plus the peer's CE.

    ``teacher`` is the jointly trained peer's `Outputs` (with gradients; see the module docstring). Returns
    ``KL(p_peer || p_student) + KL(p_student || p_peer) + peer_ce * CE(peer, labels)``; the student's own CE is the
    trainer's ``ce_weight`` term. Recipe: ``ce_weight: 1``, dml weight 1, kd 0.
    """

    needs_labels = True

    def __init__(self, *, peer_ce: bool = True):
        super().__init__()
        check_options(self, locals())
        self.peer_ce = bool(peer_ce)

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        s = _logits(student, "student", "dml")
        p = _logits(teacher, "peer (teacher)", "dml")
        to_student, to_peer = dml_loss(s, p)
        loss = to_student + to_peer
        if self.peer_ce:
            if labels is None:
                raise ValueError("dml with peer_ce=True needs the labels to train the peer, but none were passed")
            if not p.requires_grad:
                raise ValueError("dml: the peer's logits carry no gradient -- the peer must be a trainable model run "
                                 "outside inference_mode/no_grad (not a frozen Teacher)")
            loss = loss + F.cross_entropy(p.float().reshape(-1, p.shape[-1]), labels.reshape(-1).long().to(p.device))
        return loss

    def extra_repr(self) -> str:
        return f"peer_ce={self.peer_ce}"


for _name, _cls in (("multi_teacher", MultiTeacherKDLoss), ("pskd", PSKDLoss), ("dml", DMLLoss)):
    if _name not in LOSSES:  # tolerate a re-import
        LOSSES.register(_name, _cls)
