"""Contrastive Representation Distillation: NCE against momentum memory banks of student and teacher embeddings.

As RepDistiller's ``crd/`` (``CRDLoss``, ``ContrastMemory``, ``ContrastLoss``, ``Embed``): both penultimate
features are embedded (linear + L2 norm) into ``feat_dim``; each sample's embedding is scored against the
*other* network's memory rows of its positive (its own dataset index) and K negatives; the scores
exp(v . m / T) / Z are turned into NCE posteriors against a uniform noise distribution 1/N.

Negatives: ``mode="exact"`` (the default, as RepDistiller's CIFAR-100 runs: ``train_student.py --mode exact``
with ``dataset/cifar100.py`` ``CIFAR100InstanceSample``) draws them only from samples of *other classes*
(``cls_negative``), so the loss needs every training sample's label: call `CRDLoss.set_dataset_labels` once
before training. ``mode="uniform"`` draws them from every other sample and needs no labels.
"""
import math
import typing
from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from ..config import PositiveFloat, PositiveInt, Range
from ..errors import ConfigError, ShapeMismatchError
from ..models.outputs import Outputs
from ..registry import LOSSES
from .base import DistillLoss, check_options

__all__ = ["nce_loss", "crd_scores", "crd_loss", "sample_negatives", "CRDEmbed", "CRDLoss", "CRD_MODES"]

# "exact": positive = the sample itself, negatives from other classes (RepDistiller's CIFAR default);
# "uniform": negatives from all other samples.
CRDMode = Literal["exact", "uniform"]
CRD_MODES: tuple[str, ...] = typing.get_args(CRDMode)

# RepDistiller's ContrastLoss adds this to the denominators.
_EPS = 1e-7


def _shape(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def nce_loss(scores: Tensor, n_data: int) -> Tensor:
    """Tian et al., ICLR 2020, "Contrastive Representation Distillation", Eq. 18: NCE loss of [B, 1+K] scores.

    Column 0 holds the positive's normalised score P, the rest the K negatives'; with noise probability
    Pn = 1/n_data, loss = -(sum_b log P_pos/(P_pos + K Pn) + sum_{b,k} log K Pn/(P_neg + K Pn)) / B
    (RepDistiller's ``ContrastLoss``, eps 1e-7 in the denominators).
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ShapeMismatchError(f"nce_loss: scores must be [B, 1 + K] with K >= 1, got {_shape(scores.shape)}")
    x = scores.to(torch.promote_types(scores.dtype, torch.float32))
    m = x.shape[1] - 1
    mpn = m / float(n_data)
    p_pos, p_neg = x[:, 0], x[:, 1:]
    log_d1 = torch.log(p_pos / (p_pos + mpn + _EPS))
    log_d0 = torch.log(mpn / (p_neg + mpn + _EPS))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


def crd_scores(anchor: Tensor, memory: Tensor, sample_index: Tensor, T: float = 0.07) -> Tensor:
    """Tian et al., ICLR 2020, "Contrastive Representation Distillation": exp(m_j . v / T) for memory rows j, [B, 1+K].

    ``anchor`` [B, D] embeddings, ``memory`` [N, D] (no gradient), ``sample_index`` [B, 1+K] rows of it.
    Not yet divided by the normalisation constant Z.
    """
    rows = memory.detach()[sample_index.reshape(-1)].reshape(*sample_index.shape, memory.shape[1])
    return torch.exp(torch.einsum("bkd,bd->bk", rows.to(anchor.dtype), anchor) / T)


def crd_loss(student_embed: Tensor, teacher_embed: Tensor, student_memory: Tensor, teacher_memory: Tensor,
             sample_index: Tensor, z_student: float, z_teacher: float, n_data: int, T: float = 0.07) -> Tensor:
    """Tian et al., ICLR 2020, "Contrastive Representation Distillation": the two-sided CRD NCE loss.

    The student embedding is scored against the teacher memory (normalised by ``z_student``) and the
    teacher embedding against the student memory (by ``z_teacher``); the loss is the sum of the two
    `nce_loss` terms. ``sample_index`` [B, 1+K]: column 0 the positive (the sample's own index), then negatives.
    """
    _check(student_embed, teacher_embed, student_memory, teacher_memory, sample_index)
    dtype = torch.promote_types(torch.promote_types(student_embed.dtype, teacher_embed.dtype), torch.float32)
    v_s, v_t = student_embed.to(dtype), teacher_embed.to(dtype)
    out_s = crd_scores(v_s, teacher_memory, sample_index, T) / z_student
    out_t = crd_scores(v_t, student_memory, sample_index, T) / z_teacher
    return nce_loss(out_s, n_data) + nce_loss(out_t, n_data)


def _check(v_s: Tensor, v_t: Tensor, m_s: Tensor, m_t: Tensor, idx: Tensor) -> None:
    b = v_s.shape[0]
    if (v_s.dim() != 2 or v_t.shape != v_s.shape or m_s.dim() != 2 or m_s.shape != m_t.shape
            or m_s.shape[1] != v_s.shape[1]):
        raise ShapeMismatchError(
            f"crd_loss: embeddings must be [B, D] (student {_shape(v_s.shape)}, teacher {_shape(v_t.shape)}) and "
            f"both memories [N, D] (student {_shape(m_s.shape)}, teacher {_shape(m_t.shape)}) with the same D"
        )
    if idx.dim() != 2 or idx.shape[0] != b or idx.shape[1] < 2:
        raise ShapeMismatchError(
            f"crd_loss: sample_index must be [B, 1 + K] = [{b}, 1 + K] with K >= 1, got {_shape(idx.shape)}"
        )


def sample_negatives(index: Tensor, num_samples: int, k: int, generator: torch.Generator | None = None,
                     labels: Tensor | None = None) -> Tensor:
    """Tian et al., ICLR 2020, "Contrastive Representation Distillation": [B, 1+K] = positive, then K negatives.

    Without ``labels``, the K negatives of each row are distinct dataset indices drawn uniformly from all
    ``num_samples`` except the row's positive. With ``labels`` (the ``[num_samples]`` class of every dataset
    sample), they are drawn uniformly from the samples whose class differs from the positive's (RepDistiller's
    ``cls_negative[target]``, ``mode='exact'``): distinct, or with replacement for a row whose class leaves fewer
    than K other-class samples (as its ``np.random.choice(..., replace=k > len(cls_negative))``).
    """
    index = index.reshape(-1).long()
    device = generator.device if generator is not None else index.device
    pos = index.to(device)[:, None]
    if labels is None:
        if k > num_samples - 1:
            raise ConfigError(f"crd: nce_k={k} negatives need num_samples > nce_k, got num_samples={num_samples}")
        # Top-k of uniform noise = a uniform k-subset of range(num_samples - 1); shift past the positive.
        noise = torch.rand(index.shape[0], num_samples - 1, generator=generator, device=device)
        neg = noise.topk(k, dim=1, sorted=False).indices
        neg = neg + (neg >= pos).long()
        return torch.cat([pos, neg], dim=1)
    labels = labels.reshape(-1).to(device)
    if labels.shape[0] != num_samples:
        raise ShapeMismatchError(f"crd: labels has {labels.shape[0]} entries for num_samples={num_samples}")
    allowed = labels[None, :] != labels[pos]  # [B, N]: samples of another class than the row's positive
    count = allowed.sum(1)
    if bool((count == 0).any()):
        raise ConfigError("crd: mode='exact' draws negatives from other classes, but a sample's class is the only "
                          "class in the labels; use mode='uniform'")
    # Top-k of uniform noise over the allowed columns (the rest pushed below 0) = a uniform k-subset of them.
    noise = torch.rand(index.shape[0], num_samples, generator=generator, device=device).masked_fill_(~allowed, -1.0)
    neg = noise.topk(min(k, num_samples), dim=1, sorted=False).indices[:, :k]
    short = count < k
    if bool(short.any()):
        neg = neg.clone() if neg.shape[1] == k else torch.empty(index.shape[0], k, dtype=torch.long, device=device)
        rows = short.nonzero().flatten()
        neg[rows] = torch.multinomial(allowed[rows].float(), k, replacement=True, generator=generator)
    return torch.cat([pos, neg], dim=1)


class CRDEmbed(nn.Module):
    """Tian et al., ICLR 2020, "Contrastive Representation Distillation": linear head to feat_dim, then L2-normalise."""

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1).to(self.linear.weight.dtype)
        # RepDistiller's Normalize: x / ||x||_2 (no eps).
        y = self.linear(x)
        return y / y.pow(2).sum(1, keepdim=True).sqrt()


class CRDLoss(DistillLoss):
    """Tian et al., ICLR 2020, "Contrastive Representation Distillation" (embed heads, memory banks, NCE).

    ``mode="exact"`` (default, RepDistiller's CIFAR setting) draws the ``nce_k`` negatives of each sample from
    samples of other classes; it needs the label of every training sample, given once before training with
    `set_dataset_labels` (kept in the ``dataset_labels`` buffer, so it is checkpointed). Each batch's ``labels``
    are checked against it. ``mode="uniform"`` draws negatives from all other samples and needs no labels.
    """

    needs_index = True

    def __init__(self, *, num_samples: Annotated[int, Range(ge=2)] = 50000, feat_dim: PositiveInt = 128,
                 nce_k: PositiveInt = 16384, nce_t: PositiveFloat = 0.07,
                 nce_m: Annotated[float, Range(ge=0, lt=1)] = 0.5, mode: CRDMode = "exact",
                 student_layer: str = "in:fc", teacher_layer: str = "in:fc"):
        super().__init__()
        check_options(self, locals())
        if nce_k > num_samples - 1:
            raise ConfigError(f"crd: nce_k={nce_k} must be < num_samples={num_samples} (distinct negatives)")
        self.num_samples, self.feat_dim, self.nce_k = int(num_samples), int(feat_dim), int(nce_k)
        self.nce_t, self.nce_m = float(nce_t), float(nce_m)
        self.mode = mode
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.student_taps, self.teacher_taps = (student_layer,), (teacher_layer,)
        # RepDistiller's ContrastMemory init: uniform in [-stdv, stdv], stdv = 1 / sqrt(feat_dim / 3).
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(num_samples, feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_teacher", torch.rand(num_samples, feat_dim).mul_(2 * stdv).sub_(stdv))
        # Z for the student-anchored and teacher-anchored scores; < 0 until estimated on the first batch.
        self.register_buffer("z", torch.full((2,), -1.0))
        # Steps taken: seeds the negative sampling, so a resumed run draws the same negatives.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # The class of every dataset sample (-1 = not given), for mode="exact".
        self.register_buffer("dataset_labels", torch.full((num_samples,), -1, dtype=torch.long))
        self.embed_student: CRDEmbed | None = None
        self.embed_teacher: CRDEmbed | None = None

    def set_dataset_labels(self, labels) -> None:
        """Record the class of every training sample (``[num_samples]``, dataset-index order) for ``mode="exact"``.

        The trainer calls this once before training with the full training set's labels (the ``index`` the loss
        receives indexes this vector). Harmless in ``mode="uniform"``.
        """
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.shape[0] != self.num_samples:
            raise ShapeMismatchError(
                f"crd: dataset labels must be a vector of num_samples={self.num_samples} class ids, got shape "
                f"{_shape(labels.shape)}; set num_samples to the training set size"
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ConfigError(f"crd: dataset labels must be integer class ids, got dtype {labels.dtype}")
        if labels.numel() and int(labels.min()) < 0:
            raise ConfigError(f"crd: dataset labels must be >= 0, got {int(labels.min())}")
        self.dataset_labels.copy_(labels.to(self.dataset_labels))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checkpoints written before mode="exact" existed have no dataset_labels: keep the current ones.
        key = prefix + "dataset_labels"
        if key not in state_dict:
            state_dict[key] = self.dataset_labels.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _feats(self, student: Outputs, teacher: Outputs | None) -> tuple[Tensor, Tensor]:
        if teacher is None:
            raise ValueError("crd needs the teacher's outputs, but none were passed")
        s, t = student.feature(self.student_layer, "student"), teacher.feature(self.teacher_layer, "teacher")
        if s.shape[0] != t.shape[0]:
            raise ShapeMismatchError(
                f"crd: student '{self.student_layer}' {_shape(s.shape)} and teacher '{self.teacher_layer}' "
                f"{_shape(t.shape)} have different batch sizes"
            )
        return s, t

    def setup(self, student: Outputs, teacher: Outputs | None) -> None:
        s, t = self._feats(student, teacher)
        s_dim, t_dim = int(s[0].numel()), int(t[0].numel())
        e_s, e_t = self.embed_student, self.embed_teacher
        if e_s is not None and e_s.linear.in_features == s_dim and e_t.linear.in_features == t_dim:
            return  # already built for these sizes (setup again on resume): keep the trained heads
        self.embed_student = CRDEmbed(s_dim, self.feat_dim).to(s.device)
        self.embed_teacher = CRDEmbed(t_dim, self.feat_dim).to(s.device)

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None,
                index: Tensor | None = None) -> Tensor:
        if self.embed_student is None:
            raise RuntimeError(
                "CRDLoss.setup(student_outputs, teacher_outputs) must be called before the loss is used: "
                "it builds the embedding heads from the feature sizes"
            )
        if index is None:
            raise ValueError("crd needs index= (the batch's dataset sample indices) for its memory banks")
        s, t = self._feats(student, teacher)
        index = torch.as_tensor(index).reshape(-1).long()
        if index.shape[0] != s.shape[0]:
            raise ShapeMismatchError(f"crd: index has {index.shape[0]} entries for a batch of {s.shape[0]}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_samples):
            raise ConfigError(
                f"crd: sample index {int(index.max())} is outside the memory bank of num_samples="
                f"{self.num_samples}; set num_samples to the training set size"
            )
        device = self.memory_student.device
        dataset_labels = self._exact_labels(index, labels) if self.mode == "exact" else None
        gen = torch.Generator(device=device)
        gen.manual_seed(int(self.step))
        sample_index = sample_negatives(index.to(device), self.num_samples, self.nce_k, gen, dataset_labels)
        return self.loss_on(s, t, sample_index)

    def _exact_labels(self, index: Tensor, labels: Tensor | None) -> Tensor:
        known = self.dataset_labels
        if bool((known < 0).any()):
            raise RuntimeError(
                "crd mode='exact' draws each sample's negatives from other classes and needs the label of every "
                "training sample: call loss.set_dataset_labels(train_labels) once before training (the trainer does), "
                "or set mode='uniform'"
            )
        labels = None if labels is None else torch.as_tensor(labels)
        # Hard class labels of the batch (not soft / mixed targets): they must be the recorded ones.
        if labels is not None and labels.dim() == 1 and not labels.is_floating_point() and labels.shape == index.shape:
            if not torch.equal(labels.to(known.device).long(), known[index.to(known.device)]):
                raise ValueError(
                    "crd: the batch labels differ from the dataset labels at the batch's index; index must be the "
                    "samples' positions in the training set given to set_dataset_labels"
                )
        return known

    def loss_on(self, student_feat: Tensor, teacher_feat: Tensor, sample_index: Tensor) -> Tensor:
        """The loss with given [B, 1+K] sample indices (column 0 = positive); updates Z, memories, step."""
        v_s = self.embed_student(student_feat)
        v_t = self.embed_teacher(teacher_feat)
        sample_index = sample_index.to(self.memory_student.device)
        if bool((self.z < 0).any()):
            # RepDistiller: Z = mean(exp(scores / T)) * N on the first batch, then fixed.
            with torch.no_grad():
                z_s = crd_scores(v_s, self.memory_teacher, sample_index, self.nce_t).mean() * self.num_samples
                z_t = crd_scores(v_t, self.memory_student, sample_index, self.nce_t).mean() * self.num_samples
                self.z.copy_(torch.stack([z_s, z_t]).to(self.z))
        loss = crd_loss(v_s, v_t, self.memory_student, self.memory_teacher, sample_index,
                        float(self.z[0]), float(self.z[1]), self.num_samples, self.nce_t)
        if self.training:
            self._update_memory(v_s.detach(), v_t.detach(), sample_index[:, 0])
            self.step += 1
        return loss

    @torch.no_grad()
    def _update_memory(self, v_s: Tensor, v_t: Tensor, pos: Tensor) -> None:
        m = self.nce_m
        for memory, v in ((self.memory_student, v_s), (self.memory_teacher, v_t)):
            rows = memory[pos] * m + v.to(memory.dtype) * (1 - m)
            # RepDistiller divides by the norm with no eps.
            memory.index_copy_(0, pos, rows / rows.norm(dim=1, keepdim=True))

    def extra_repr(self) -> str:
        return (f"num_samples={self.num_samples}, feat_dim={self.feat_dim}, nce_k={self.nce_k}, "
                f"nce_t={self.nce_t}, nce_m={self.nce_m}, mode={self.mode!r}")


if "crd" not in LOSSES:  # tolerate a re-import (importlib.reload)
    LOSSES.register("crd", CRDLoss)
