"""V_kD: student features through an orthogonal (Stiefel-manifold) projection, matched to standardised teacher
features with a smooth-L1 distance. Follows the official code (github.com/roymiles/vkd, ``train.py`` /
``engine.py``): ``orthogonal(nn.Linear(d_s, d_t, bias=False))`` on pooled student features, teacher pooled
features through ``F.layer_norm`` without affine, ``F.smooth_l1_loss``, weight alpha = 1.
"""
import typing
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from ..errors import ConfigError, ShapeMismatchError
from ..models.outputs import Outputs
from ..registry import LOSSES
from .base import DistillLoss, check_options

__all__ = ["pool_features", "standardize_features", "orthogonal_projector", "vkd_loss", "VkDLoss"]

# F.layer_norm's default, as the official code uses it.
_LN_EPS = 1e-5
Normalize = Literal["standardize", "none"]  # the teacher's features z-scored (the paper's), or as they are
_NORMALIZE: tuple[str, ...] = typing.get_args(Normalize)


def _shape(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def pool_features(x: Tensor) -> Tensor:
    """[B, D] as is; token features [B, N, D] averaged over tokens; conv maps [B, C, H, W] over space.

    The official code pools the student's ViT patch tokens with ``mean(1)`` and the teacher's conv map with
    ``view(b, c, h * w).mean(-1)``; a CNN's ``in:fc`` tap is already that pooled vector.
    """
    if x.dim() == 2:
        return x
    if x.dim() == 3:
        return x.mean(1)
    if x.dim() == 4:
        return x.flatten(2).mean(-1)
    raise ShapeMismatchError(
        f"pool_features: expected [B, D], tokens [B, N, D] or a conv map [B, C, H, W], got {_shape(x.shape)}"
    )


def standardize_features(x: Tensor, eps: float = _LN_EPS) -> Tensor:
    """Miles et al., CVPR 2024, "V_kD: Improving Knowledge Distillation using Orthogonal Projections": the
    classification normalisation of teacher features, (x - mean) / sqrt(var + eps) over each row's D features
    (biased variance; ``F.layer_norm`` without affine, as the official code)."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def orthogonal_projector(in_dim: int, out_dim: int) -> nn.Module:
    """Miles et al., CVPR 2024, "V_kD: Improving Knowledge Distillation using Orthogonal Projections": a bias-free
    linear map kept on the Stiefel manifold (orthonormal columns if in_dim <= out_dim, else orthonormal rows).

    ``torch.nn.utils.parametrizations.orthogonal`` (matrix exponential when square, Householder otherwise), as
    the official code; the initial weight is the default ``nn.Linear`` draw made orthogonal.
    """
    if in_dim < 1 or out_dim < 1:
        raise ShapeMismatchError(f"orthogonal_projector: dimensions must be >= 1, got {in_dim} -> {out_dim}")
    return orthogonal(nn.Linear(int(in_dim), int(out_dim), bias=False))


def vkd_loss(student_proj: Tensor, teacher_feat: Tensor, normalize: str = "standardize") -> Tensor:
    """Miles et al., CVPR 2024, "V_kD: Improving Knowledge Distillation using Orthogonal Projections": smooth-L1
    (beta 1, mean over all entries) between projected student features and normalised teacher features.

    ``student_proj`` [B, D] is the student feature already projected to the teacher's width; ``teacher_feat``
    [B, D] gets the task-specific normalisation (``standardize``: per-row standardisation, the paper's choice
    for classification; ``none``) and carries no gradient.
    """
    if normalize not in _NORMALIZE:
        raise ConfigError(f"vkd_loss: normalize must be one of {', '.join(_NORMALIZE)}, got {normalize!r}")
    if student_proj.dim() != 2 or student_proj.shape != teacher_feat.shape:
        raise ShapeMismatchError(
            f"vkd_loss: projected student feature {_shape(student_proj.shape)} and teacher feature "
            f"{_shape(teacher_feat.shape)} must both be [B, D] with the same shape"
        )
    dtype = torch.promote_types(torch.promote_types(student_proj.dtype, teacher_feat.dtype), torch.float32)
    s, t = student_proj.to(dtype), teacher_feat.detach().to(dtype)
    if normalize == "standardize":
        t = standardize_features(t)
    return F.smooth_l1_loss(s, t)


class VkDLoss(DistillLoss):
    """Miles et al., CVPR 2024, "V_kD: Improving Knowledge Distillation using Orthogonal Projections" (orthogonal
    projection of pooled student features onto standardised teacher features, smooth-L1).

    Features are the pooled penultimate ones (``in:fc`` on kdkit's CNNs; token or conv features are mean-pooled
    first, as the official classification code). The projector is built by `setup` from the two widths and
    trained with the student.
    """

    def __init__(self, *, student_layer: str = "in:fc", teacher_layer: str = "in:fc",
                 normalize: Normalize = "standardize"):
        super().__init__()
        check_options(self, locals())
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.student_taps, self.teacher_taps = (student_layer,), (teacher_layer,)
        self.normalize = normalize
        self.projector: nn.Module | None = None

    def _feats(self, student: Outputs, teacher: Outputs | None) -> tuple[Tensor, Tensor]:
        if teacher is None:
            raise ValueError("vkd needs the teacher's outputs, but none were passed")
        s, t = student.feature(self.student_layer, "student"), teacher.feature(self.teacher_layer, "teacher")
        try:
            s, t = pool_features(s), pool_features(t)
        except ShapeMismatchError as e:
            raise ShapeMismatchError(
                f"vkd: student layer '{self.student_layer}' gives {_shape(s.shape)}, teacher layer "
                f"'{self.teacher_layer}' gives {_shape(t.shape)}: {e}") from None
        if s.shape[0] != t.shape[0]:
            raise ShapeMismatchError(
                f"vkd: student layer '{self.student_layer}' and teacher layer '{self.teacher_layer}' have batch "
                f"sizes {s.shape[0]} and {t.shape[0]}")
        return s, t

    def _dims(self) -> tuple[int, int] | None:
        if self.projector is None:
            return None
        return int(self.projector.in_features), int(self.projector.out_features)

    def setup(self, student: Outputs, teacher: Outputs | None) -> None:
        s, t = self._feats(student, teacher)
        dims = (int(s.shape[1]), int(t.shape[1]))
        if self._dims() == dims:
            return  # already built for these widths (setup again on resume): keep the trained projector
        self.projector = orthogonal_projector(*dims).to(s.device)

    def project(self, student_feat: Tensor) -> Tensor:
        """The orthogonal projection of a pooled [B, d_s] student feature to the teacher's width."""
        if self.projector is None:
            raise RuntimeError(
                "VkDLoss.setup(student_outputs, teacher_outputs) must be called before the loss is used: "
                "it builds the orthogonal projector from the feature widths"
            )
        if student_feat.shape[-1] != self.projector.in_features:
            raise ShapeMismatchError(
                f"vkd: student layer '{self.student_layer}' has width {student_feat.shape[-1]}, but the projector "
                f"was built for {self.projector.in_features}")
        dtype = self.projector.parametrizations.weight.original.dtype
        return self.projector(student_feat.to(dtype))

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        s, t = self._feats(student, teacher)
        p = self.project(s)
        try:
            return vkd_loss(p, t, self.normalize)
        except ShapeMismatchError as e:
            raise ShapeMismatchError(
                f"vkd: student layer '{self.student_layer}' vs teacher layer '{self.teacher_layer}': {e}") from None

    def extra_repr(self) -> str:
        return (f"student_layer={self.student_layer!r}, teacher_layer={self.teacher_layer!r}, "
                f"normalize={self.normalize!r}")


if "vkd" not in LOSSES:  # tolerate a re-import (importlib.reload)
    LOSSES.register("vkd", VkDLoss)
