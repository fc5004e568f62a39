"""ReviewKD: student stage features fused top-down by attention-based fusion (ABF) modules, matched to the
teacher's with the hierarchical context loss (HCL). Follows mdistiller's ``distillers/ReviewKD.py`` (the same code
as the official dvlab-research/ReviewKD CIFAR-100 code).
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NonNegInt
from ..errors import ConfigError, ShapeMismatchError
from ..models.outputs import Outputs
from ..registry import LOSSES
from .base import DistillLoss, check_options

__all__ = ["hcl_loss", "ABF", "ReviewKDLoss", "reviewkd_taps"]

# Pyramid levels of the hierarchical context loss (pooled to l x l), each weighted half the previous one.
_HCL_LEVELS = (4, 2, 1)


def _shape(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def hcl_loss(student_feats, teacher_feats) -> Tensor:
    """Chen et al., CVPR 2021, "Distilling Knowledge via Knowledge Review": hierarchical context loss.

    For each pair of ``[B, C, H, W]`` maps: MSE at full resolution (weight 1) plus MSE of the maps
    adaptive-average-pooled to 4x4, 2x2, 1x1 (weights 1/2, 1/4, 1/8; a level is skipped unless it is smaller
    than H), divided by the sum of the weights used; summed over pairs.
    """
    student_feats, teacher_feats = list(student_feats), list(teacher_feats)
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ShapeMismatchError(
            f"hcl_loss needs as many student as teacher feature maps (at least one), got {len(student_feats)} "
            f"and {len(teacher_feats)}"
        )
    total = None
    for i, (fs, ft) in enumerate(zip(student_feats, teacher_feats)):
        if fs.dim() != 4 or fs.shape != ft.shape:
            raise ShapeMismatchError(
                f"hcl_loss: student map {i} {_shape(fs.shape)} and teacher map {_shape(ft.shape)} must both be "
                "[B, C, H, W] with the same shape"
            )
        dtype = torch.promote_types(torch.promote_types(fs.dtype, ft.dtype), torch.float32)
        fs, ft = fs.to(dtype), ft.to(dtype)
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft)
        weight, weights = 1.0, 1.0
        for level in _HCL_LEVELS:
            if level >= h:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
            weights += weight
        loss = loss / weights
        total = loss if total is None else total + loss
    return total


class ABF(nn.Module):
    """Chen et al., CVPR 2021, "Distilling Knowledge via Knowledge Review": attention-based fusion module.

    1x1 conv + BN to ``mid_channel``; if ``fuse``, the residual from the deeper level (nearest-upsampled to this
    level's size) is mixed in with two sigmoid attention maps from a 1x1 conv; the result is resized (nearest)
    to the teacher's size and mapped by a 3x3 conv + BN to the teacher's channels. Returns ``(output, residual)``.
    Submodule names and initialisation are those of the reference code.
    """

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, kernel_size=3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channel))
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None = None, out_size: tuple[int, int] | None = None):
        x = self.conv1(x.to(self.conv1[0].weight.dtype))
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("a fusing ABF needs the residual of the deeper level")
            y = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0:1] + y * z[:, 1:2]
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def _as_map(x: Tensor, path: str, who: str) -> Tensor:
    """``[B, C, H, W]`` as is, a pooled ``[B, C]`` embedding as ``[B, C, 1, 1]``."""
    if x.dim() == 2:
        return x[:, :, None, None]
    if x.dim() != 4:
        raise ShapeMismatchError(
            f"reviewkd: {who} feature '{path}' has shape {_shape(x.shape)}; it must be a map [B, C, H, W] or a "
            "pooled vector [B, C]"
        )
    return x


def reviewkd_taps(model: nn.Module, preact: bool) -> str:
    """The ``student_layers`` / ``teacher_layers`` value for a kdkit CIFAR zoo model, as the reference taps it.

    Chen et al., CVPR 2021, "Distilling Knowledge via Knowledge Review" (official CIFAR-100 code, ``train.py`` and
    ``model/*``): each stage's output, then the pooled embedding ``in:fc``. ``preact=True`` (the teacher's
    ``is_feat=True, preact=True``) gives the pre-ReLU stage outputs: the residual sum of a ResNet stage's last
    block (``in:layerK.<last>.relu2``), a VGG group's last batch norm, and for a WRN the batch norm the next block
    (or the final ``bn1``) applies to the stage output. ``preact=False`` (the student's features) gives the stage
    outputs (post-ReLU for ResNet/VGG, the residual sum for WRN, post-shuffle for ShuffleNetV2).
    """
    from ..models.cifar.resnet import CifarResNet
    from ..models.cifar.vgg import CifarVGG
    from ..models.cifar.wrn import WideResNet
    from ..models.zoo import stage_paths

    stages = stage_paths(model)
    if not preact:
        return ",".join([*stages, "in:fc"])
    modules = dict(model.named_modules())
    taps = []
    for i, stage in enumerate(stages):
        if isinstance(model, CifarResNet):
            taps.append(f"in:{stage}.{len(modules[stage]) - 1}.relu2")
        elif isinstance(model, WideResNet):
            taps.append(f"{stages[i + 1]}.0.bn1" if i + 1 < len(stages) else "bn1")
        elif isinstance(model, CifarVGG):
            last_bn = max(j for j, m in enumerate(modules[stage]) if isinstance(m, nn.BatchNorm2d))
            taps.append(f"{stage}.{last_bn}")
        else:
            raise ConfigError(
                f"reviewkd: no pre-activation taps known for {type(model).__name__}; list teacher_layers explicitly "
                "(or use preact=False for post-activation stage outputs)"
            )
    return ",".join([*taps, "in:fc"])


def _paths(spec: str, option: str) -> tuple[str, ...]:
    paths = tuple(p.strip() for p in spec.split(",") if p.strip())
    if not paths:
        raise ConfigError(f"reviewkd: {option} must list module paths separated by commas, got {spec!r}")
    return paths


class ReviewKDLoss(DistillLoss):
    """Chen et al., CVPR 2021, "Distilling Knowledge via Knowledge Review" (ABF fusion + HCL, linear warm-up).

    ``student_layers`` / ``teacher_layers``: comma-separated taps, shallow to deep, one per level; the deepest is
    usually the pooled embedding ``in:fc``. As the official CIFAR-100 code (and mdistiller, ``STU_PREACT=False``),
    the student gives its stage outputs and the teacher its pre-activation ones (`reviewkd_taps` derives both
    from a zoo model). The defaults are resnet32x4 -> resnet8x4: the student's ``layer1..3`` and pooled feature,
    the teacher's pre-ReLU stage outputs ``in:layerK.4.relu2`` (the last of resnet32x4's 5 blocks per stage) and
    pooled feature. Other pairs need their own taps (the block index differs, e.g. resnet56 ``.8``): see
    ``recipes/reviewkd-*.yaml`` for resnet56 -> resnet20, wrn_40_2 -> wrn_16_2, vgg13 -> vgg8 (five levels) and
    resnet32x4 -> shufflenetv2 (student maps half the teacher's size: the ABF outputs are upsampled to it).

    ``mid_channel=0`` uses the reference's ``min(512, channels of the deepest student feature)`` (256 here).
    Warm-up: the loss is scaled by ``min(epoch / warmup, 1)`` with kdkit's fractional 0-based epoch (see
    `DKDLoss`; mdistiller uses the 1-based epoch number, the official code the 0-based one); ``warmup=0`` disables it.
    The ABF modules are built by `setup` from the tapped shapes and trained with the student.
    """

    def __init__(
        self,
        *,
        student_layers: str = "layer1,layer2,layer3,in:fc",
        teacher_layers: str = "in:layer1.4.relu2,in:layer2.4.relu2,in:layer3.4.relu2,in:fc",
        mid_channel: NonNegInt = 0,
        warmup: NonNegInt = 20,
    ):
        super().__init__()
        check_options(self, locals())
        s_paths, t_paths = _paths(student_layers, "student_layers"), _paths(teacher_layers, "teacher_layers")
        if len(s_paths) != len(t_paths):
            raise ConfigError(
                f"reviewkd: student_layers has {len(s_paths)} levels {list(s_paths)} and teacher_layers "
                f"{len(t_paths)} {list(t_paths)}; they must pair up level by level"
            )
        self.student_layers, self.teacher_layers = s_paths, t_paths
        self.student_taps, self.teacher_taps = s_paths, t_paths
        self.mid_channel = int(mid_channel)
        self.warmup = int(warmup)
        self.abfs: nn.ModuleList | None = None  # deepest level first, as the reference
        self._setup_shapes: tuple | None = None

    def warmup_factor(self) -> float:
        if self.warmup <= 0:
            return 1.0
        return min(max(self.epoch, 0.0) / self.warmup, 1.0)

    def _feats(self, student: Outputs, teacher: Outputs | None) -> tuple[list[Tensor], list[Tensor]]:
        if teacher is None:
            raise ValueError("reviewkd needs the teacher's outputs, but none were passed")
        s = [_as_map(student.feature(p, "student"), p, "student") for p in self.student_layers]
        t = [_as_map(teacher.feature(p, "teacher"), p, "teacher") for p in self.teacher_layers]
        return s, t

    @staticmethod
    def _shapes(s: list[Tensor], t: list[Tensor]) -> tuple:
        return tuple(_shape(x.shape[1:]) for x in s), tuple(_shape(x.shape[1:]) for x in t)

    def setup(self, student: Outputs, teacher: Outputs | None) -> None:
        s, t = self._feats(student, teacher)
        shapes = self._shapes(s, t)
        if self.abfs is not None and shapes == self._setup_shapes:
            return  # already built for these shapes (setup again on resume): keep the trained modules
        in_channels = [x.shape[1] for x in s]
        out_channels = [x.shape[1] for x in t]
        mid = self.mid_channel or min(512, in_channels[-1])
        n = len(s)
        abfs = nn.ModuleList(ABF(c_in, mid, c_out, i < n - 1) for i, (c_in, c_out) in enumerate(zip(in_channels,
                                                                                                  out_channels)))
        self.abfs = nn.ModuleList(abfs[::-1]).to(s[0].device)
        self._setup_shapes = shapes

    def fused(self, s: list[Tensor], t_sizes: list[tuple[int, int]]) -> list[Tensor]:
        """The ABF outputs, shallow to deep, each of its teacher map's channels and size."""
        assert self.abfs is not None
        xs = s[::-1]
        sizes = t_sizes[::-1]
        out, res = self.abfs[0](xs[0], out_size=sizes[0])
        results = [out]
        for x, abf, size in zip(xs[1:], self.abfs[1:], sizes[1:]):
            out, res = abf(x, res, size)
            results.insert(0, out)
        return results

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        if self.abfs is None:
            raise RuntimeError(
                "ReviewKDLoss.setup(student_outputs, teacher_outputs) must be called before the loss is used: "
                "it builds the ABF modules from the feature shapes"
            )
        s, t = self._feats(student, teacher)
        shapes = self._shapes(s, t)
        if shapes != self._setup_shapes:
            raise ShapeMismatchError(
                f"reviewkd: feature shapes changed since setup (student {shapes[0]}, teacher {shapes[1]}; at setup "
                f"student {self._setup_shapes[0]}, teacher {self._setup_shapes[1]}); the ABF modules were built "
                "for the setup shapes"
            )
        results = self.fused(s, [tuple(x.shape[-2:]) for x in t])
        return self.warmup_factor() * hcl_loss(results, t)

    def extra_repr(self) -> str:
        return (f"student_layers={','.join(self.student_layers)!r}, teacher_layers={','.join(self.teacher_layers)!r}, "
                f"mid_channel={self.mid_channel}, warmup={self.warmup}")


if "reviewkd" not in LOSSES:  # tolerate a re-import
    LOSSES.register("reviewkd", ReviewKDLoss)
