"""Feature and relation losses: FitNets hints (with RepDistiller's learned regressor), attention transfer,
similarity-preserving and relational KD, as functions of tensors plus thin `DistillLoss` modules."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NonNegFloat, PositiveFloat
from ..errors import ConfigError, ShapeMismatchError
from ..models.outputs import Outputs
from ..registry import LOSSES
from .base import DistillLoss, check_options

__all__ = [
    "fitnet_loss", "ConvRegressor", "FitNetLoss",
    "attention_map", "at_loss", "ATLoss",
    "sp_loss", "SPLoss",
    "rkd_loss", "RKDLoss",
]


def _shape(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def fitnet_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Romero et al., ICLR 2015, "FitNets: Hints for Thin Deep Nets": mean squared error of (projected) features."""
    if student_feat.shape != teacher_feat.shape:
        raise ShapeMismatchError(
            f"fitnet_loss: student feature {_shape(student_feat.shape)} and teacher feature "
            f"{_shape(teacher_feat.shape)} differ; project the student feature to the teacher's shape first"
        )
    dtype = torch.promote_types(torch.promote_types(student_feat.dtype, teacher_feat.dtype), torch.float32)
    return F.mse_loss(student_feat.to(dtype), teacher_feat.to(dtype))


class ConvRegressor(nn.Module):
    """Learned student -> teacher feature projector, as RepDistiller's ``ConvReg`` (FitNets' regressor).

    ``[B, C, H, W]`` features: conv (1x1 for equal spatial size, 3x3 stride 2 for a 2x larger student,
    4x4 stride-2 transposed conv for a 2x smaller one) + BatchNorm + ReLU. ``[B, D]`` (or ``[B, ..., D]``)
    features: a linear map over the last dimension. Other combinations raise `ShapeMismatchError`.
    """

    def __init__(self, s_shape, t_shape, use_relu: bool = True):
        super().__init__()
        s, t = _shape(s_shape), _shape(t_shape)
        self.s_shape, self.t_shape = s, t
        self.use_relu = use_relu
        if len(s) == 4 and len(t) == 4:
            (_, s_c, s_h, s_w), (_, t_c, t_h, t_w) = s, t
            if (s_h, s_w) == (t_h, t_w):
                # RepDistiller: kernel (1 + s_H - t_H, 1 + s_W - t_W), i.e. 1x1 for equal sizes.
                self.proj: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=1)
            elif (s_h, s_w) == (2 * t_h, 2 * t_w):
                self.proj = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
            elif (2 * s_h, 2 * s_w) == (t_h, t_w):
                self.proj = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
            else:
                raise ShapeMismatchError(
                    f"cannot project student feature {s} to teacher feature {t}: the student's spatial size "
                    f"{s_h}x{s_w} must equal the teacher's {t_h}x{t_w} or be exactly 2x larger "
                    f"({2 * t_h}x{2 * t_w}) or 2x smaller ({t_h // 2}x{t_w // 2}); tap layers whose sizes match that"
                )
            self.norm: nn.Module = nn.BatchNorm2d(t_c)
        elif len(s) == len(t) >= 2 and s[1:-1] == t[1:-1]:
            self.proj = nn.Linear(s[-1], t[-1])
            self.norm = nn.Identity()
            self.use_relu = False  # a linear map: hidden states may be negative
        else:
            raise ShapeMismatchError(
                f"cannot project student feature {s} to teacher feature {t}: both must be conv maps [B, C, H, W] "
                "(spatial sizes equal or 2x apart) or vectors [B, D] / [B, ..., D] with equal middle dimensions"
            )

    def forward(self, x: Tensor) -> Tensor:
        w = self.proj.weight
        x = self.norm(self.proj(x.to(w.dtype)))
        return F.relu(x) if self.use_relu else x


class FitNetLoss(DistillLoss):
    """Romero et al., ICLR 2015, "FitNets: Hints for Thin Deep Nets" (MSE of regressed student vs teacher hints)."""

    def __init__(self, *, student_layer: str = "layer2", teacher_layer: str = "layer2", projector: bool = True):
        super().__init__()
        check_options(self, locals())
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.student_taps = (student_layer,)
        self.teacher_taps = (teacher_layer,)
        self.use_projector = bool(projector)
        self.projector: nn.Module | None = None
        self._setup_shapes: tuple | None = None

    def _feats(self, student: Outputs, teacher: Outputs | None) -> tuple[Tensor, Tensor]:
        if teacher is None:
            raise ValueError("fitnet needs the teacher's outputs, but none were passed")
        return student.feature(self.student_layer, "student"), teacher.feature(self.teacher_layer, "teacher")

    def setup(self, student: Outputs, teacher: Outputs | None) -> None:
        s, t = self._feats(student, teacher)
        shapes = (_shape(s.shape[1:]), _shape(t.shape[1:]))
        if self.projector is not None and shapes == self._setup_shapes:
            return  # already built for these shapes (e.g. setup again on resume): keep the trained projector
        if self.use_projector:
            try:
                proj = ConvRegressor(s.shape, t.shape)
            except ShapeMismatchError as e:
                raise ShapeMismatchError(
                    f"fitnet: student layer '{self.student_layer}' and teacher layer '{self.teacher_layer}': {e}"
                ) from None
            self.projector = proj.to(s.device)
        else:
            if s.shape != t.shape:
                raise ShapeMismatchError(
                    f"fitnet with projector=False needs equal feature shapes, but student layer "
                    f"'{self.student_layer}' gives {_shape(s.shape)} and teacher layer '{self.teacher_layer}' gives "
                    f"{_shape(t.shape)}; set projector=True or tap layers of the same shape"
                )
            self.projector = nn.Identity()
        self._setup_shapes = shapes

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        if self.projector is None:
            raise RuntimeError(
                "FitNetLoss.setup(student_outputs, teacher_outputs) must be called before the loss is used: "
                "it builds the projector from the feature shapes"
            )
        s, t = self._feats(student, teacher)
        return fitnet_loss(self.projector(s), t)

    def extra_repr(self) -> str:
        return (f"student_layer={self.student_layer!r}, teacher_layer={self.teacher_layer!r}, "
                f"projector={self.use_projector}")


# ---------------------------------------------------------------- shared helpers


def _float(*ts: Tensor) -> list[Tensor]:
    """Upcast to >= float32 (float64 stays float64), as every loss here computes."""
    dtype = torch.float32
    for t in ts:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in ts]


def _need_teacher(name: str, teacher: Outputs | None) -> Outputs:
    if teacher is None:
        raise ValueError(f"{name} needs the teacher's outputs, but none were passed")
    return teacher


def _layers(option: str, value: str) -> tuple[str, ...]:
    paths = tuple(p.strip() for p in str(value).split(",") if p.strip())
    if not paths:
        raise ConfigError(f"{option} must name at least one module path (comma-separated), got {value!r}")
    return paths


# ---------------------------------------------------------------- AT (Zagoruyko & Komodakis 2017)


def attention_map(feat: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention": L2-normalised mean_c |f|^p, [B, H*W]."""
    if feat.dim() != 4:
        raise ShapeMismatchError(f"attention_map: expected a conv feature [B, C, H, W], got {_shape(feat.shape)}")
    (f,) = _float(feat)
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student_feat: Tensor, teacher_feat: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention": mean squared attention-map difference.

    One layer pair (RepDistiller's ``Attention.at_loss``); the batch sizes and spatial sizes must match
    (channels may differ). Sum it over layer pairs and weight it (beta = 1000 in RepDistiller).
    """
    if student_feat.dim() != 4 or teacher_feat.dim() != 4:
        raise ShapeMismatchError(
            f"at_loss: needs conv features [B, C, H, W], got student {_shape(student_feat.shape)} and teacher "
            f"{_shape(teacher_feat.shape)}"
        )
    if student_feat.shape[0] != teacher_feat.shape[0] or student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise ShapeMismatchError(
            f"at_loss: student feature {_shape(student_feat.shape)} and teacher feature "
            f"{_shape(teacher_feat.shape)} must have the same batch and spatial size (H, W); tap layers of equal "
            "resolution"
        )
    return (attention_map(student_feat, p) - attention_map(teacher_feat, p)).pow(2).mean()


class ATLoss(DistillLoss):
    """Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention" (attention transfer, summed over pairs)."""

    def __init__(self, *, student_layers: str = "layer1,layer2,layer3", teacher_layers: str = "layer1,layer2,layer3",
                 p: PositiveFloat = 2.0):
        super().__init__()
        check_options(self, locals())
        s, t = _layers("student_layers", student_layers), _layers("teacher_layers", teacher_layers)
        if len(s) != len(t):
            raise ConfigError(
                f"at: student_layers {student_layers!r} ({len(s)} paths) and teacher_layers {teacher_layers!r} "
                f"({len(t)} paths) must pair up one to one"
            )
        self.student_layers, self.teacher_layers, self.p = s, t, float(p)
        self.student_taps, self.teacher_taps = s, t

    def _pairs(self, student: Outputs, teacher: Outputs | None):
        teacher = _need_teacher("at", teacher)
        for sl, tl in zip(self.student_layers, self.teacher_layers):
            yield sl, tl, student.feature(sl, "student"), teacher.feature(tl, "teacher")

    def setup(self, student: Outputs, teacher: Outputs | None) -> None:
        for sl, tl, s, t in self._pairs(student, teacher):
            if s.dim() != 4 or t.dim() != 4 or s.shape[2:] != t.shape[2:]:
                raise ShapeMismatchError(
                    f"at: student layer '{sl}' gives {_shape(s.shape)} and teacher layer '{tl}' gives "
                    f"{_shape(t.shape)}; attention transfer needs conv features [B, C, H, W] of equal H, W"
                )

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        total = None
        for sl, tl, s, t in self._pairs(student, teacher):
            try:
                value = at_loss(s, t, self.p)
            except ShapeMismatchError as e:
                raise ShapeMismatchError(f"at: student layer '{sl}' vs teacher layer '{tl}': {e}") from None
            total = value if total is None else total + value
        return total

    def extra_repr(self) -> str:
        return (f"student_layers={','.join(self.student_layers)!r}, "
                f"teacher_layers={','.join(self.teacher_layers)!r}, p={self.p}")


# ---------------------------------------------------------------- SP (Tung & Mori 2019)


def sp_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Tung & Mori, ICCV 2019, "Similarity-Preserving Knowledge Distillation": ||norm(G_t) - norm(G_s)||_F^2 / B^2.

    G = F F^T of the flattened ``[B, ...]`` features (a B x B Gram), rows L2-normalised; feature sizes may differ.
    """
    if student_feat.dim() < 2 or student_feat.shape[0] != teacher_feat.shape[0]:
        raise ShapeMismatchError(
            f"sp_loss: student feature {_shape(student_feat.shape)} and teacher feature "
            f"{_shape(teacher_feat.shape)} must be [B, ...] with the same batch size B"
        )
    s, t = _float(student_feat.flatten(1), teacher_feat.flatten(1))
    b = s.shape[0]
    g_s = F.normalize(s @ s.t(), dim=1)
    g_t = F.normalize(t @ t.t(), dim=1)
    return (g_t - g_s).pow(2).sum() / (b * b)


class SPLoss(DistillLoss):
    """Tung & Mori, ICCV 2019, "Similarity-Preserving Knowledge Distillation" (batch similarity matrices)."""

    def __init__(self, *, student_layer: str = "layer3", teacher_layer: str = "layer3"):
        super().__init__()
        check_options(self, locals())
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.student_taps, self.teacher_taps = (student_layer,), (teacher_layer,)

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        teacher = _need_teacher("sp", teacher)
        s, t = student.feature(self.student_layer, "student"), teacher.feature(self.teacher_layer, "teacher")
        return sp_loss(s, t)

    def extra_repr(self) -> str:
        return f"student_layer={self.student_layer!r}, teacher_layer={self.teacher_layer!r}"


# ---------------------------------------------------------------- RKD (Park et al. 2019)


def _pdist(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distance matrix with a zero diagonal (RepDistiller's ``RKDLoss.pdist``: clamp(d^2, eps).sqrt())."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def _rkd_distance(e: Tensor) -> Tensor:
    d = _pdist(e)
    return d / d[d > 0].mean()


def _rkd_angle(e: Tensor) -> Tensor:
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # [i, j] = unit(e_j - e_i)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_loss(student_feat: Tensor, teacher_feat: Tensor, w_d: float = 25.0, w_a: float = 50.0) -> Tensor:
    """Park et al., CVPR 2019, "Relational Knowledge Distillation": w_d * distance-wise + w_a * angle-wise smooth L1.

    Distances are divided by their mean over distinct pairs; the teacher side carries no gradient
    (RepDistiller's ``RKDLoss``). Features ``[B, ...]`` are flattened; widths may differ; B >= 2.
    """
    if student_feat.dim() < 2 or student_feat.shape[0] != teacher_feat.shape[0] or student_feat.shape[0] < 2:
        raise ShapeMismatchError(
            f"rkd_loss: student feature {_shape(student_feat.shape)} and teacher feature "
            f"{_shape(teacher_feat.shape)} must be [B, ...] with the same batch size B >= 2"
        )
    s, t = _float(student_feat.flatten(1), teacher_feat.flatten(1))
    t = t.detach()
    loss_d = F.smooth_l1_loss(_rkd_distance(s), _rkd_distance(t))
    loss_a = F.smooth_l1_loss(_rkd_angle(s), _rkd_angle(t))
    return w_d * loss_d + w_a * loss_a


class RKDLoss(DistillLoss):
    """Park et al., CVPR 2019, "Relational Knowledge Distillation" (distance + angle on penultimate embeddings)."""

    def __init__(self, *, student_layer: str = "in:fc", teacher_layer: str = "in:fc", w_d: NonNegFloat = 25.0,
                 w_a: NonNegFloat = 50.0):
        super().__init__()
        check_options(self, locals())
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.student_taps, self.teacher_taps = (student_layer,), (teacher_layer,)
        self.w_d, self.w_a = float(w_d), float(w_a)

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        teacher = _need_teacher("rkd", teacher)
        s, t = student.feature(self.student_layer, "student"), teacher.feature(self.teacher_layer, "teacher")
        return rkd_loss(s, t, self.w_d, self.w_a)

    def extra_repr(self) -> str:
        return (f"student_layer={self.student_layer!r}, teacher_layer={self.teacher_layer!r}, "
                f"w_d={self.w_d}, w_a={self.w_a}")


for _name, _cls in (("fitnet", FitNetLoss), ("at", ATLoss), ("sp", SPLoss), ("rkd", RKDLoss)):
    if _name not in LOSSES:  # tolerate a re-import (importlib.reload)
        LOSSES.register(_name, _cls)
