"""One-for-All KD (OFA-KD): branch heads that carry intermediate student stages into the logit space, each
trained with the OFA loss against the teacher's logits, so only the teacher's logits are needed and any
teacher architecture (CNN, ViT, MLP) works."""
import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NonNegFloat, NonNegInt, PositiveFloat, Range
from ..errors import ConfigError, ShapeMismatchError
from ..models.outputs import Outputs
from ..registry import LOSSES
from .base import DistillLoss, check_options

__all__ = ["ofa_loss", "ConvBranch", "TokenBranch", "OFALoss"]

# The reference merges token grids down to about 7x7 patches (ImageNet's last-stage size) before its blocks.
_FINAL_GRID = 7
_HEADS = 4  # attention heads of the token-branch blocks (reference: timm Block(dim, num_heads=4))


def _shape(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def ofa_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, eps: float = 1.0,
             T: float = 1.0) -> Tensor:
    """Hao et al., NeurIPS 2023, "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge
    Distillation": -sum_c w_c log p_s,c with w = (p_t + onehot(y))^eps - onehot(y), batch mean.

    The target class gets weight (1 + p_t,y)^eps - 1 and the others p_t,c^eps, as the official code
    (Hao840/OFAKD ``distillers/ofa.py::ofa_loss``); eps > 1 enhances the target more when the teacher is
    confident. eps = 1 is cross-entropy to the teacher's soft labels (KD at T without the T^2 factor). The
    hard-label cross-entropy of the paper's L_OFA is left to the trainer's ``ce_weight``.
    ``target`` holds class indices (``logits.shape[:-1]``) or soft labels (argmax taken, as the reference
    does under label smoothing / mixup). The teacher is a fixed target: no gradient flows into it.
    """
    if not T > 0:
        raise ConfigError(f"ofa_loss: temperature T must be > 0, got {T}")
    if not eps > 0:
        raise ConfigError(f"ofa_loss: eps must be > 0, got {eps}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 1:
        raise ShapeMismatchError(
            f"ofa_loss: student logits {_shape(student_logits.shape)} and teacher logits "
            f"{_shape(teacher_logits.shape)} must both be [..., num_classes] with the same shape")
    c = student_logits.shape[-1]
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    s = student_logits.to(dtype).reshape(-1, c)
    t = teacher_logits.detach().to(dtype).reshape(-1, c)
    if target.dim() == student_logits.dim() and target.shape == student_logits.shape:
        target = target.argmax(-1)
    target = target.reshape(-1)
    if target.numel() != s.shape[0]:
        raise ShapeMismatchError(
            f"ofa_loss: target of shape {_shape(target.shape)} does not match logits {_shape(student_logits.shape)};"
            " give one class index per logit row (logits.shape[:-1]) or soft labels of the logits' shape")
    onehot = F.one_hot(target.long().to(s.device), c).to(dtype)
    weight = (F.softmax(t / T, dim=-1) + onehot).pow(eps) - onehot
    return -(weight * F.log_softmax(s / T, dim=-1)).sum(-1).mean()


# ---------------------------------------------------------------- branch heads


def _init(module: nn.Module) -> None:
    """The reference's ``init_weights``: Kaiming (fan-out) convs, unit BatchNorm, trunc-normal(0.02) linears."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _sep_conv(c_in: int, c_out: int) -> nn.Sequential:
    """Depthwise-separable downsampling block (DARTS' SepConv): halves H and W (ceil), c_in -> c_out."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_in, 1, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU(),
        nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class ConvBranch(nn.Module):
    """OFA branch for a CNN stage ``[B, C, H, W]``: `downsample` SepConvs (channels doubling, the last one to
    `width`; a 1x1 conv when there are none) to the last stage's resolution, global pooling, a linear classifier."""

    def __init__(self, in_channels: int, width: int, num_classes: int, downsample: int):
        super().__init__()
        if downsample == 0:
            blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 1)]
        else:
            blocks, c = [], in_channels
            for i in range(downsample):
                out = width if i == downsample - 1 else 2 * c
                blocks.append(_sep_conv(c, out))
                c = out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x.to(self.head.weight.dtype))
        return self.head(x.mean((2, 3)))


class PatchMerging(nn.Module):
    """Swin's 2x2 patch merging on a square token grid: concat 2x2 neighbours, LayerNorm, linear 4*dim -> out."""

    def __init__(self, grid: int, dim: int, out_dim: int, act: bool):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        g = self.grid
        x = x.reshape(b, g, g, d)
        # Neighbour order (row, col): (0,0), (1,0), (0,1), (1,1), as Swin / the reference.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.act(self.reduction(self.norm(x.reshape(b, -1, 4 * d))))


class _Block(nn.Module):
    """Pre-norm transformer block (LayerNorm, multi-head self-attention, LayerNorm, 4x GELU MLP), as timm's ViT
    ``Block(dim, num_heads)``: qkv without bias, output projection with bias."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TokenBranch(nn.Module):
    """OFA branch for ViT/MLP tokens ``[B, N, D]`` = `prefix` class/register tokens + a square grid of patches.

    Patch tokens are merged 2x2 until the grid is about 7x7 (none for grids < 14, e.g. CIFAR's 8x8) while the
    prefix tokens pass by; then `blocks` transformer blocks of `width` channels (4 heads); the first prefix
    (class) token, or the token mean when there is none, goes to a linear classifier.
    """

    def __init__(self, num_tokens: int, dim: int, width: int, num_classes: int, blocks: int, prefix: int = 0):
        super().__init__()
        patches = num_tokens - prefix
        grid = math.isqrt(max(patches, 0))
        if prefix < 0 or patches < 1 or grid * grid != patches:
            raise ShapeMismatchError(
                f"token features of {num_tokens} tokens with {prefix} prefix (class) tokens leave {patches} patch "
                "tokens, not a square grid; set prefix_tokens to the number of class/register tokens")
        if width % _HEADS:
            raise ShapeMismatchError(f"token branch width {width} must be divisible by its {_HEADS} attention heads")
        self.prefix = prefix
        merges = max(math.floor(math.log2(grid / _FINAL_GRID)), 0)
        mergers, g, d = [], grid, dim
        for i in range(merges):
            if g % 2:
                raise ShapeMismatchError(f"token grid {g}x{g} is odd and cannot be merged 2x2 (from {grid}x{grid})")
            # The reference keeps GELU after every merge but the last, and always after the first.
            mergers.append(PatchMerging(g, d, width, act=(i == 0 or i != merges - 1)))
            g, d = g // 2, width
        self.merge = nn.Sequential(*mergers)
        # Tokens that no merge brought to `width` (all, or only the prefix) get a linear map (none if dim == width).
        self.token_proj = nn.Linear(dim, width) if dim != width else nn.Identity()
        self.blocks = nn.Sequential(*[_Block(width, _HEADS) for _ in range(blocks)])
        self.head = nn.Linear(width, num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.head.weight.dtype)
        p = self.prefix
        if len(self.merge):
            x = torch.cat([self.token_proj(x[:, :p]), self.merge(x[:, p:])], dim=1)
        else:
            x = self.token_proj(x)
        x = self.blocks(x)
        return self.head(x[:, 0] if p else x.mean(1))


# ---------------------------------------------------------------- the loss module


def _halvings(hw: tuple[int, int], target: tuple[int, int]) -> int:
    """How many stride-2 convs (ceil halving) bring spatial size `hw` down to `target` or below."""
    (h, w), n = hw, 0
    while h > target[0] or w > target[1]:
        h, w, n = -(-h // 2), -(-w // 2), n + 1
    return n


class OFALoss(DistillLoss):
    """Hao et al., NeurIPS 2023, "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge
    Distillation" (branch heads on student stages + final logits, OFA loss against the teacher's logits).

    ``stages`` are student module paths, shallow to deep (all four stages in the paper; CIFAR ResNets have
    three; the reference taps ViT/MLP blocks 1, 3, 9, 11 of 12). Each gets a branch head built in `setup` from
    its shape: `ConvBranch` for ``[B, C, H, W]`` maps (downsampled to the deepest tapped map's size), `TokenBranch`
    for ``[B, N, D]`` tokens (max(n - i, 1) blocks for stage i of n). Value: ``stage_weight * sum of branch
    losses + logit_weight * ofa_loss(student logits)``; the reference's defaults: eps 1, T 1, both weights 1
    (plus CE with weight 1: the recipe's ``ce_weight``). The branches are used only in training.
    """

    needs_labels = True

    def __init__(self, *, stages: str = "layer1,layer2,layer3", eps: PositiveFloat = 1.0, T: PositiveFloat = 1.0,
                 stage_weight: NonNegFloat = 1.0, logit_weight: NonNegFloat = 1.0, width: NonNegInt = 0,
                 prefix_tokens: Annotated[int, Range(ge=-1)] = -1):
        # eps: 1 = plain soft-label cross-entropy (the paper uses 1 to 1.5); width 0: the deepest tapped stage's
        # channels; prefix_tokens -1: inferred from the token count
        super().__init__()
        check_options(self, locals())
        paths = tuple(p.strip() for p in str(stages).split(",") if p.strip())
        if not paths:
            raise ConfigError(f"ofa: stages must name at least one student module path (comma-separated), "
                              f"got {stages!r}")
        if len(set(paths)) != len(paths):
            raise ConfigError(f"ofa: stages {stages!r} names a module twice")
        self.stages = paths
        self.student_taps = paths
        self.eps, self.T = float(eps), float(T)
        self.stage_weight, self.logit_weight = float(stage_weight), float(logit_weight)
        self.width, self.prefix_tokens = int(width), int(prefix_tokens)
        self.branches: nn.ModuleList | None = None
        self._setup_shapes: tuple | None = None

    def _feats(self, student: Outputs) -> list[Tensor]:
        feats = []
        for p in self.stages:
            f = student.feature(p, "student")
            if f.dim() not in (3, 4):
                raise ShapeMismatchError(
                    f"ofa: student stage '{p}' gives {_shape(f.shape)}; a branch head needs a CNN map [B, C, H, W] "
                    "or tokens [B, N, D] (tap a stage's output, not a pooled vector)")
            feats.append(f)
        return feats

    @staticmethod
    def _logits(student: Outputs, teacher: Outputs | None) -> tuple[Tensor, Tensor]:
        if teacher is None or teacher.logits is None:
            raise ValueError("ofa needs the teacher's logits, but none were passed")
        if student.logits is None:
            raise ValueError("ofa needs the student's logits, but the student returned none")
        if student.logits.shape != teacher.logits.shape:
            raise ShapeMismatchError(
                f"ofa: student logits {_shape(student.logits.shape)} and teacher logits "
                f"{_shape(teacher.logits.shape)} differ; teacher and student must predict the same classes")
        return student.logits, teacher.logits

    def _prefix(self, n: int) -> int:
        if self.prefix_tokens >= 0:
            return self.prefix_tokens
        return n - math.isqrt(n) ** 2  # class/register tokens = what a square patch grid leaves over

    def setup(self, student: Outputs, teacher: Outputs | None) -> None:
        s_logits, _ = self._logits(student, teacher)
        feats = self._feats(student)
        num_classes = int(s_logits.shape[-1])
        shapes = (num_classes, tuple(_shape(f.shape[1:]) for f in feats))
        if self.branches is not None and shapes == self._setup_shapes:
            return  # already built for these shapes (setup again on resume): keep the trained branches
        maps = [f for f in feats if f.dim() == 4]
        tokens = [f for f in feats if f.dim() == 3]
        deepest = min(maps, key=lambda f: f.shape[2] * f.shape[3]) if maps else None
        conv_width = self.width or (int(deepest.shape[1]) if deepest is not None else 0)
        token_width = self.width or (int(tokens[-1].shape[2]) if tokens else 0)
        n = len(feats)
        branches = []
        for i, (path, f) in enumerate(zip(self.stages, feats), start=1):
            try:
                if f.dim() == 4:
                    steps = _halvings(_shape(f.shape[2:]), _shape(deepest.shape[2:]))
                    branches.append(ConvBranch(int(f.shape[1]), conv_width, num_classes, steps))
                else:
                    branches.append(TokenBranch(int(f.shape[1]), int(f.shape[2]), token_width, num_classes,
                                                blocks=max(n - i, 1), prefix=self._prefix(int(f.shape[1]))))
            except ShapeMismatchError as e:
                raise ShapeMismatchError(f"ofa: student stage '{path}' ({_shape(f.shape)}): {e}") from None
        self.branches = nn.ModuleList(branches).to(feats[0].device)
        self._setup_shapes = shapes
        # One pass in eval mode (BatchNorm statistics untouched) so a wrong shape fails now, naming the stage.
        was = self.training
        self.eval()
        with torch.no_grad():
            for path, out in zip(self.stages, self.branch_logits(student)):
                if _shape(out.shape) != (int(s_logits.shape[0]), num_classes):
                    raise ShapeMismatchError(f"ofa: branch of stage '{path}' gives {_shape(out.shape)}, "
                                             f"expected {(int(s_logits.shape[0]), num_classes)}")
        self.train(was)

    def branch_logits(self, student: Outputs) -> list[Tensor]:
        """Each stage's branch logits ``[B, num_classes]``, in `stages` order."""
        if self.branches is None:
            raise RuntimeError(
                "OFALoss.setup(student_outputs, teacher_outputs) must be called before the loss is used: "
                "it builds the branch heads from the stage shapes")
        feats = self._feats(student)
        shapes = tuple(_shape(f.shape[1:]) for f in feats)
        if shapes != self._setup_shapes[1]:
            raise ShapeMismatchError(
                f"ofa: student stage shapes changed since setup ({dict(zip(self.stages, shapes))}; at setup "
                f"{dict(zip(self.stages, self._setup_shapes[1]))}); the branch heads were built for the setup shapes")
        return [branch(f) for branch, f in zip(self.branches, feats)]

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            raise ValueError("ofa needs the labels (its target-class weighting), but none were passed")
        s_logits, t_logits = self._logits(student, teacher)
        total = self.logit_weight * ofa_loss(s_logits, t_logits, labels, self.eps, self.T)
        for out in self.branch_logits(student):
            total = total + self.stage_weight * ofa_loss(out, t_logits, labels, self.eps, self.T)
        return total

    def extra_repr(self) -> str:
        return (f"stages={','.join(self.stages)!r}, eps={self.eps}, T={self.T}, stage_weight={self.stage_weight}, "
                f"logit_weight={self.logit_weight}, width={self.width}, prefix_tokens={self.prefix_tokens}")


if "ofa" not in LOSSES:  # tolerate a re-import
    LOSSES.register("ofa", OFALoss)
