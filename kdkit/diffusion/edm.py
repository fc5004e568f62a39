"""The one noise parametrisation kdkit's diffusion pillar uses: EDM's (Karras et al. 2022) sigma form.

`x_sigma = x_0 + sigma * n`, and every network is a *denoiser* `D(x_sigma, sigma, labels) ~ E[x_0 | x_sigma]`.
The score is `(D - x) / sigma^2`, so teacher, fake score and generator all speak the same language, and
a flow-matching velocity model joins through `FlowMatchingAdapter` (sigma = t / (1 - t)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import nn

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0


def as_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """`sigma` (a number, `[B]` or broadcastable) as a tensor of shape `[B, 1, ...]` matching `x`."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    return s.reshape(s.shape[0], *([1] * (x.ndim - 1)))


def precondition(sigma: torch.Tensor, sigma_data: float):
    """EDM's c_skip, c_out, c_in, c_noise for a denoiser `c_skip x + c_out F(c_in x, c_noise)`."""
    s2, d2 = sigma * sigma, sigma_data * sigma_data
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1.0 / (s2 + d2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2: unit effective loss per sigma."""
    return (sigma * sigma + sigma_data * sigma_data) / (sigma * sigma_data) ** 2


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Per-sample `sqrt(|a - b|^2 + c^2) - c`, c = 0.00054 sqrt(elements per sample) by default (Song & Dhariwal
    2023): the regression distance of consistency distillation, paired regression and DMD's regression term."""
    d = (a - b).flatten(1)
    c = 0.00054 * d.shape[1] ** 0.5 if c is None else c
    return ((d * d).sum(1) + c * c).sqrt() - c


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                  device=None) -> torch.Tensor:
    """`n` sigmas from sigma_max down to sigma_min on EDM's rho-warped grid (no trailing 0)."""
    if n == 1:
        return torch.tensor([sigma_max], device=device)
    ramp = torch.linspace(0, 1, n, device=device, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).float()


def sample_lognormal_sigma(n: int, p_mean: float = -1.2, p_std: float = 1.2, device=None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM's training distribution: ln(sigma) ~ N(p_mean, p_std^2)."""
    return (torch.randn(n, device=device, generator=generator) * p_std + p_mean).exp()


def sample_grid_sigma(n: int, lo: float = 0.0, hi: float = 1.0, grid: int = 1000, sigma_min: float = SIGMA_MIN,
                      sigma_max: float = SIGMA_MAX, rho: float = RHO, device=None) -> torch.Tensor:
    """sigmas drawn uniformly among the indices [lo, hi) (fractions) of a `grid`-point Karras grid, index 0 being
    sigma_max: DMD2's timestep sampling (its min/max step percent 0.02/0.98) in sigma form."""
    first, last = int(lo * grid), max(int(lo * grid) + 1, int(hi * grid))
    ramp = torch.randint(first, last, (n,), device=device).float() / (grid - 1)
    lo_r, hi_r = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi_r + ramp * (lo_r - hi_r)) ** rho


class Denoiser(nn.Module):
    """What every teacher, fake score and generator network is: `forward(x, sigma, labels=None,
    return_features=False) -> x0` (and a feature tensor for GAN heads when asked).

    Attributes: `sigma_data`, `num_classes` (0: unconditional; label `num_classes` is the null label that
    classifier-free guidance uses), `sample_shape` (one sample's shape, e.g. (2,) or (3, 32, 32)).
    """

    sigma_data: float = 0.5
    num_classes: int = 0
    sample_shape: tuple[int, ...] = ()
    feature_dim: int = 0

    def null_labels(self, n: int, device=None) -> torch.Tensor:
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)


@dataclass(frozen=True)
class Even:
    """An even integer >= 2 (the width of a sinusoidal embedding: cosines and sines in halves)."""

    def ok(self, v) -> bool:
        return v >= 2 and v % 2 == 0

    def describe(self) -> str:
        return "an even integer >= 2"


EvenInt = Annotated[int, Even()]


def fourier_embedding(c_noise: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the noise level, `[B] -> [B, dim]` (dim even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
    args = (c_noise.reshape(-1, 1).float() * 250.0) * freqs  # c_noise = ln(sigma)/4 spans ~[-1.6, 1.1]
    return torch.cat([args.cos(), args.sin()], dim=1).to(c_noise.dtype)


class FlowMatchingAdapter(Denoiser):
    """A rectified-flow / flow-matching velocity model `v(x_t, t, labels)` with `x_t = (1-t) x_0 + t n` and
    `v = n - x_0`, seen as an EDM denoiser: `sigma = t/(1-t)`, `x_t = x / (1 + sigma)`, `x_0 = x_t - t v`."""

    def __init__(self, velocity: nn.Module, sample_shape: tuple[int, ...], sigma_data: float = 0.5,
                 num_classes: int = 0, time_scale: float = 1.0):
        super().__init__()
        self.velocity = velocity
        self.sample_shape, self.sigma_data, self.num_classes = tuple(sample_shape), sigma_data, num_classes
        self.time_scale = time_scale  # models trained on t in [0, 1000] take time_scale=1000

    def forward(self, x, sigma, labels=None, return_features=False):
        s = as_sigma(sigma, x)
        t = s / (1 + s)
        xt = x / (1 + s)
        args = (xt, t.flatten() * self.time_scale) + ((labels,) if labels is not None else ())
        v = self.velocity(*args)
        x0 = xt - t * v
        return (x0, None) if return_features else x0
