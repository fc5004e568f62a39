"""Differentiable Siamese augmentation (DSA, Zhao & Bilen 2021) for dataset distillation.

Every op is differentiable in the pixels, so gradients of a matching loss reach the synthetic images through
the augmentation. "Siamese" means the real and the synthetic batch get the *same* transform: both calls pass
the same `seed`, and under `siamese=True` one parameter draw is shared by the whole batch (as in the DSA
paper's code), so batches of different sizes (256 real vs 10 synthetic) are transformed identically.

Parameters are the DC/DSA paper's: scale 1.2, rotate 15 degrees, crop (translation) 1/8, cutout 1/2,
brightness 1.0, saturation 2.0, contrast 0.5. The default mode "S" applies one op of the strategy, chosen by
the seed, per call ("color" counts as one op: brightness, saturation and contrast together).

Draws come from a CPU `torch.Generator`, so a seed gives the same transform on CPU and GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F

from ..errors import ConfigError

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DSAParams:
    scale: float = 1.2
    rotate: float = 15.0
    crop: float = 0.125
    cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


def parse_strategy(strategy: str) -> list[str]:
    ops = [s for s in strategy.split("_") if s]
    bad = [s for s in ops if s not in OPS]
    if bad or not ops:
        raise ConfigError(f"unknown DSA op(s) {bad or strategy!r}; ops are {', '.join(OPS)} joined by '_' "
                          f"(default '{DEFAULT_STRATEGY}'), or 'none'")
    return ops


@dataclass(frozen=True)
class Ops:
    """A DSA strategy option: ops joined by '_', or 'none' (checked beside the option's type)."""

    def ok(self, v) -> bool:
        ops = [s for s in str(v).split("_") if s]
        return v == "none" or (bool(ops) and all(s in OPS for s in ops))

    def describe(self) -> str:
        return f"DSA ops ({', '.join(OPS)}) joined by '_', or 'none'"


Strategy = Annotated[str, Ops()]


def _rand(n: int, g: torch.Generator, siamese: bool) -> torch.Tensor:
    if siamese:  # one draw for the whole batch, so batches of any size consume the generator alike
        return torch.rand(1, generator=g).expand(n).clone()
    return torch.rand(n, generator=g)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _color(x, g, siamese, p: DSAParams):
    n = x.shape[0]
    b = (_rand(n, g, siamese) - 0.5).to(x) * p.brightness
    x = x + b.view(-1, 1, 1, 1)
    s = (_rand(n, g, siamese) * p.saturation).to(x)
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * s.view(-1, 1, 1, 1) + m
    c = (_rand(n, g, siamese) + p.contrast).to(x)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * c.view(-1, 1, 1, 1) + m


def _scale(x, g, siamese, p: DSAParams):
    n = x.shape[0]
    sx = _rand(n, g, siamese) * (p.scale - 1.0 / p.scale) + 1.0 / p.scale
    sy = _rand(n, g, siamese) * (p.scale - 1.0 / p.scale) + 1.0 / p.scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = sx
    theta[:, 1, 1] = sy
    return _affine(x, theta)


def _rotate(x, g, siamese, p: DSAParams):
    n = x.shape[0]
    a = (_rand(n, g, siamese) - 0.5) * 2 * p.rotate / 180 * math.pi
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(a)
    theta[:, 0, 1] = torch.sin(-a)
    theta[:, 1, 0] = torch.sin(a)
    theta[:, 1, 1] = torch.cos(a)
    return _affine(x, theta)


def _flip(x, g, siamese, p: DSAParams):
    flip = (_rand(x.shape[0], g, siamese) < 0.5).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def _randint(lo: int, hi: int, n: int, g: torch.Generator, siamese: bool) -> torch.Tensor:
    if siamese:
        return torch.randint(lo, hi, (1,), generator=g).expand(n).clone()
    return torch.randint(lo, hi, (n,), generator=g)


def _crop(x, g, siamese, p: DSAParams):
    """Translate by whole pixels in [-shift, shift] (zero fill): a pad-and-crop written as a gather."""
    n, _, h, w = x.shape
    sh, sw = int(h * p.crop + 0.5), int(w * p.crop + 0.5)
    tx = _randint(-sh, sh + 1, n, g, siamese).to(x.device)
    ty = _randint(-sw, sw + 1, n, g, siamese).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + tx.view(n, 1, 1) + 1
    cols = torch.arange(w, device=x.device).view(1, 1, w) + ty.view(n, 1, 1) + 1
    rows = rows.clamp(0, h + 1).expand(n, h, w)
    cols = cols.clamp(0, w + 1).expand(n, h, w)
    padded = F.pad(x, (1, 1, 1, 1))
    idx = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
    return padded.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)


def _cutout(x, g, siamese, p: DSAParams):
    n, _, h, w = x.shape
    ch, cw = int(h * p.cutout + 0.5), int(w * p.cutout + 0.5)
    ox = _randint(0, h + (1 - ch % 2), n, g, siamese).to(x.device)
    oy = _randint(0, w + (1 - cw % 2), n, g, siamese).to(x.device)
    r = torch.arange(h, device=x.device).view(1, h, 1)
    c = torch.arange(w, device=x.device).view(1, 1, w)
    lo_r, lo_c = ox.view(n, 1, 1) - ch // 2, oy.view(n, 1, 1) - cw // 2
    inside = (r >= lo_r) & (r < lo_r + ch) & (c >= lo_c) & (c < lo_c + cw)
    return x * (~inside).to(x.dtype).unsqueeze(1)


_FNS = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}


def dsa(x: torch.Tensor, strategy: str = DEFAULT_STRATEGY, seed: int | None = None, siamese: bool = True,
        params: DSAParams = DSAParams(), mode: str = "S") -> torch.Tensor:
    """Augment `x` `[N,C,H,W]` differentiably.

    With `seed` set, the same seed gives the same op and the same parameters (shared across the batch when
    `siamese`), so `dsa(real, seed=s)` and `dsa(syn, seed=s)` are the Siamese pair. `seed=None` draws a fresh
    seed and per-sample parameters (what training on the synthetic set uses). `mode="M"` applies every op.
    """
    if strategy in ("none", ""):
        return x
    ops = parse_strategy(strategy)
    if seed is None:
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
        siamese = False
    g = torch.Generator().manual_seed(int(seed))
    if mode == "S":
        ops = [ops[int(torch.randint(0, len(ops), (1,), generator=g).item())]]
    for op in ops:
        x = _FNS[op](x, g, siamese, params)
    return x
