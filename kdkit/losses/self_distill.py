"""Self-distillation with auxiliary classifiers (BYOT): the network's deepest classifier teaches heads on its shallow stages.

Teacher-free (``needs_teacher = False``): the trainer passes ``teacher=None``. The auxiliary heads are parameters of
the loss, built in `setup` from the tapped stage shapes and trained with the student (they are saved in the loss's
``state_dict``); they are not part of the student model and are dropped at test time.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NonNegFloat, PositiveFloat, Probability
from ..errors import ConfigError, ShapeMismatchError
from ..models.outputs import Outputs
from ..registry import LOSSES
from .base import DistillLoss, check_options
from .logits import _check_T

__all__ = ["byot_loss", "BYOTHead", "BYOTLoss"]


def _float(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def byot_loss(aux_logits: Sequence[Tensor], aux_features: Sequence[Tensor], final_logits: Tensor,
              final_features: Tensor, labels: Tensor, T: float = 3.0, alpha: float = 0.1,
              lam: float = 1e-6) -> Tensor:
    """Zhang et al., ICCV 2019, "Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks via Self Distillation": the shallow classifiers' loss.

    ``sum_i [(1 - alpha) CE(z_i, y) + alpha T^2 CE(softmax(z_C / T), softmax(z_i / T)) + lam hint_i]`` over the
    auxiliary classifiers i, with the deepest classifier's logits ``z_C`` and features ``F_C`` as detached targets and
    ``hint_i = sum((f_i - F_C)^2 * [(f_i > 0) | (F_C > 0)])`` summed over batch and channels -- all as the reference
    implementation (luanyunteng/pytorch-be-your-own-teacher ``train.py``: ``kd_loss_function``,
    ``feature_loss_function``; paper's alpha, lambda there ``--alpha 0.1``, ``--beta 1e-6``, ``--temperature 3``).
    The soft term's value is the cross-entropy, as the reference (the paper writes KL; they differ by the entropy of
    the detached target, so the gradients are the same). The deepest classifier's own ``(1 - alpha) CE`` is not in
    here: in kdkit it is the trainer's ``ce_weight`` term.
    """
    _check_T(T)
    if len(aux_logits) != len(aux_features) or not aux_logits:
        raise ShapeMismatchError(f"byot_loss: got {len(aux_logits)} auxiliary logits and {len(aux_features)} "
                                 "auxiliary features; need one of each per auxiliary classifier (at least one)")
    z_c = _float(final_logits).detach()
    f_c = _float(final_features).detach()
    y = labels.reshape(-1).long().to(z_c.device)
    target = F.softmax(z_c / T, dim=-1)
    total = z_c.new_zeros(())
    for i, (z, f) in enumerate(zip(aux_logits, aux_features)):
        z, f = _float(z), _float(f)
        if z.shape != z_c.shape:
            raise ShapeMismatchError(f"byot_loss: auxiliary logits {i} {tuple(z.shape)} and the deepest logits "
                                     f"{tuple(z_c.shape)} differ")
        if f.shape != f_c.shape:
            raise ShapeMismatchError(f"byot_loss: auxiliary features {i} {tuple(f.shape)} and the deepest features "
                                     f"{tuple(f_c.shape)} differ")
        ce = F.cross_entropy(z, y)
        log_q = F.log_softmax(z / T, dim=-1)
        soft = -(torch.where(target > 0, target * log_q, 0.0)).sum(dim=-1).mean() * T**2
        hint = ((f - f_c) ** 2 * ((f > 0) | (f_c > 0))).sum()
        total = total + (1 - alpha) * ce + alpha * soft + lam * hint
    return total


class BYOTHead(nn.Module):
    """Zhang et al., ICCV 2019, "Be Your Own Teacher": an auxiliary classifier -- bottleneck, global pool, FC.

    The bottleneck maps a stage's ``[B, C, H, W]`` map to the deepest features' width and resolution, as the
    reference's ``branchBottleNeck``: 1x1 conv to ``width // 4``, a ``k x k`` conv with stride ``k`` (``k`` = this
    stage's resolution / the last stage's), 1x1 conv to ``width``, each with BatchNorm and ReLU. Returns
    ``(logits, pooled features [B, width])``.
    """

    def __init__(self, in_channels: int, width: int, kernel: tuple[int, int], num_classes: int):
        super().__init__()
        mid = max(1, width // 4)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels, mid, kernel_size=1), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, kernel_size=kernel, stride=kernel), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, width, kernel_size=1), nn.BatchNorm2d(width), nn.ReLU(),
        )
        self.fc = nn.Linear(width, num_classes)
        for m in self.modules():  # the reference model's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        self.shape_key = (in_channels, width, tuple(kernel), num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.to(self.fc.weight.dtype)
        f = self.bottleneck(x).mean(dim=(2, 3))
        return self.fc(f), f


def _stages(value: str) -> tuple[str, ...]:
    paths = tuple(p.strip() for p in str(value).split(",") if p.strip())
    if not paths:
        raise ConfigError(f"byot: stages must name at least one module path (comma-separated), got {value!r}")
    return paths


class BYOTLoss(DistillLoss):
    """Zhang et al., ICCV 2019, "Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks via Self Distillation" (BYOT): auxiliary classifiers on the student's stages, taught by its deepest classifier.

    ``stages``: the shallow stages that get a head (``layer1,layer2`` for the CIFAR ResNets; the deepest classifier
    is the student's own ``fc``). ``last_stage`` (its resolution sets each head's stride) and ``feature_layer``
    (the deepest features, the hint target; default ``in:fc``) are tapped too. Defaults are the reference's
    (T 3, alpha 0.1, lambda 1e-6; see `byot_loss`). Recipe: ``ce_weight: 0.9`` (= 1 - alpha, the deepest
    classifier's CE), byot weight 1, ``kdkit train`` (no teacher).
    """

    needs_teacher = False
    needs_labels = True

    def __init__(self, *, stages: str = "layer1,layer2", last_stage: str = "layer3", feature_layer: str = "in:fc",
                 T: PositiveFloat = 3.0, alpha: Probability = 0.1, lam: NonNegFloat = 1e-6):
        # alpha: the soft targets' share of each head's loss (1 - alpha is its CE); lam: the feature hint's weight
        super().__init__()
        check_options(self, locals())
        self.stages = _stages(stages)
        if last_stage in self.stages:
            raise ConfigError(f"byot: last_stage {last_stage!r} is also in stages {stages!r}; the last stage feeds the "
                              "student's own classifier and gets no auxiliary head")
        self.last_stage, self.feature_layer = last_stage, feature_layer
        self.T, self.alpha, self.lam = float(T), float(alpha), float(lam)
        self.student_taps = (*self.stages, last_stage, feature_layer)
        self.heads = nn.ModuleList()

    def _final_features(self, student: Outputs) -> Tensor:
        f = student.feature(self.feature_layer, "student")
        if f.dim() == 4:
            return f.mean(dim=(2, 3))
        if f.dim() != 2:
            raise ShapeMismatchError(f"byot: feature_layer '{self.feature_layer}' must give [B, D] or [B, C, H, W], "
                                     f"got {tuple(f.shape)}")
        return f

    def setup(self, student: Outputs, teacher: Outputs | None) -> None:
        if student.logits is None:
            raise ValueError("byot needs the student's logits (its deepest classifier), but the student returned none")
        last = student.feature(self.last_stage, "student")
        if last.dim() != 4:
            raise ShapeMismatchError(f"byot: last_stage '{self.last_stage}' must give a [B, C, H, W] map, got "
                                     f"{tuple(last.shape)}")
        width, classes = self._final_features(student).shape[-1], student.logits.shape[-1]
        keys = []
        for name in self.stages:
            f = student.feature(name, "student")
            if f.dim() != 4 or f.shape[2] % last.shape[2] or f.shape[3] % last.shape[3]:
                raise ShapeMismatchError(
                    f"byot: stage '{name}' gives {tuple(f.shape)}; it must be a [B, C, H, W] map whose H and W are "
                    f"multiples of last_stage '{self.last_stage}' {tuple(last.shape)} (the head's stride)"
                )
            keys.append((f.shape[1], width, (f.shape[2] // last.shape[2], f.shape[3] // last.shape[3]), classes))
        if [h.shape_key for h in self.heads] == keys:
            return  # already built for these shapes (setup again on resume): keep the trained heads
        self.heads = nn.ModuleList(BYOTHead(*k) for k in keys).to(last.device)

    def forward(self, student: Outputs, teacher: Outputs | None = None, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            raise ValueError("byot needs the ground-truth labels (needs_labels=True), but none were passed")
        if len(self.heads) != len(self.stages):
            raise RuntimeError("BYOTLoss.setup(student_outputs, None) must be called before the loss is used: "
                               "it builds the auxiliary heads from the stage shapes")
        outs = [head(student.feature(name, "student")) for name, head in zip(self.stages, self.heads)]
        return byot_loss([o[0] for o in outs], [o[1] for o in outs], student.logits, self._final_features(student),
                         labels, self.T, self.alpha, self.lam)

    def extra_repr(self) -> str:
        return (f"stages={','.join(self.stages)!r}, last_stage={self.last_stage!r}, "
                f"feature_layer={self.feature_layer!r}, T={self.T}, alpha={self.alpha}, lam={self.lam}")


if "byot" not in LOSSES:  # tolerate a re-import (importlib.reload)
    LOSSES.register("byot", BYOTLoss)
