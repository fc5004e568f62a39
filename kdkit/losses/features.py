"""Feature-matching losses: FitNets hints with RepDistiller's learned regressor from student to teacher shape."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeMismatchError
from ..models.outputs import Outputs
from .base import DistillLoss

__all__ = ["fitnet_loss", "ConvRegressor", "FitNetLoss"]


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
