"""A compact class-conditional U-Net for 32x32 images (the CIFAR-10 teacher, fake score and generator),
EDM-preconditioned like `MLPDenoiser`.

Levels of `channels * mult` with `blocks` residual blocks each (GroupNorm, SiLU, 3x3 convs, the noise+label
embedding added after the first conv), self-attention at the resolutions listed in `attn`, skip connections
by concatenation. `return_features=True` returns the bottleneck averaged over space (the GAN head's input).
Label `num_classes` is the null label: train with `label_dropout` and guide with `GuidedDenoiser`.
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NonNegInt, PositiveFloat, PositiveInt, Range
from .edm import Denoiser, EvenInt, as_sigma, fourier_embedding, precondition


def _norm(c: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels: the largest such count that divides `c` (so any
    `channels`, e.g. 48, builds)."""
    return nn.GroupNorm(next(g for g in range(min(32, max(c // 4, 1)), 0, -1) if c % g == 0), c)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, dropout: float):
        super().__init__()
        self.n1, self.c1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.n2, self.c2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)

    def forward(self, x, emb):
        h = self.c1(F.silu(self.n1(x))) + self.emb(emb)[:, :, None, None]
        h = self.c2(self.drop(F.silu(self.n2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, c: int, heads: int = 1):
        super().__init__()
        self.norm, self.qkv, self.out, self.heads = _norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1), heads
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        o = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(o.transpose(-1, -2).reshape(b, c, h, w))


class UNetDenoiser(Denoiser):
    def __init__(self, in_channels: PositiveInt = 3, image_size: PositiveInt = 32, channels: PositiveInt = 64,
                 mult: list[PositiveInt] = (1, 2, 2), blocks: PositiveInt = 2, attn: list[PositiveInt] = (8,),
                 num_classes: NonNegInt = 0, dropout: Annotated[float, Range(ge=0, lt=1)] = 0.1,
                 sigma_data: PositiveFloat = 0.5, emb_dim: EvenInt = 128):
        super().__init__()
        self.sample_shape = (in_channels, image_size, image_size)
        self.sigma_data, self.num_classes, self.emb_dim = float(sigma_data), num_classes, emb_dim
        e = channels * 4
        self.noise_mlp = nn.Sequential(nn.Linear(emb_dim, e), nn.SiLU(), nn.Linear(e, e))
        self.label_emb = nn.Embedding(num_classes + 1, e) if num_classes else None
        self.inp = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down, skips, c, res = nn.ModuleList(), [channels], channels, image_size
        for i, m in enumerate(mult):
            for _ in range(blocks):
                self.down.append(nn.ModuleList([ResBlock(c, channels * m, e, dropout),
                                                Attention(channels * m) if res in attn else nn.Identity()]))
                c = channels * m
                skips.append(c)
            if i < len(mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                skips.append(c)
                res //= 2
        self.mid1, self.mid_attn, self.mid2 = ResBlock(c, c, e, dropout), Attention(c), ResBlock(c, c, e, dropout)
        self.feature_dim = c
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(c + skips.pop(), channels * m, e, dropout),
                                              Attention(channels * m) if res in attn else nn.Identity()]))
                c = channels * m
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(c, c, 3, padding=1)]))
                res *= 2
        self.out_norm, self.out = _norm(c), nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def raw(self, x, c_noise, labels):
        emb = self.noise_mlp(fourier_embedding(c_noise.flatten(), self.emb_dim))
        if self.label_emb is not None:
            labels = self.null_labels(x.shape[0], x.device) if labels is None else labels
            emb = emb + self.label_emb(labels)
        emb = F.silu(emb)
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            if len(layer) == 1:
                h = layer[0](h)
            else:
                h = layer[1](layer[0](h, emb))
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        feats = h.mean(dim=(2, 3))
        for layer in self.up:
            if isinstance(layer[0], nn.Upsample):
                h = layer[1](layer[0](h))
            else:
                h = layer[1](layer[0](torch.cat([h, hs.pop()], 1), emb))
        return self.out(F.silu(self.out_norm(h))), feats

    def forward(self, x, sigma, labels=None, return_features=False):
        s = as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = precondition(s, self.sigma_data)
        f, feats = self.raw(c_in * x, c_noise, labels)
        x0 = c_skip * x + c_out * f.to(x.dtype)
        return (x0, feats) if return_features else x0
