"""The one noise parametrisation kdkit's diffusion pillar uses: EDM's (Karras et al. 2022) sigma form.

`x_sigma = x_0 + sigma * n`, and every network is a *denoiser* `D(x_sigma, sigma, labels) ~ E[x_0 | x_sigma]`.
The score is `(D - x) / sigma^2`, so teacher, fake score and generator all speak the same language, and
a flow-matching velocity model joins through `FlowMatchingAdapter` (sigma = t / (1 - t)).

`Schedule` is where a method's noise levels come from: EDM's Karras ramp, or, for a flow-matching teacher, flow
matching's uniform time with SD3's timestep shift `t' = s t / (1 + (s - 1) t)` (Flux's resolution-dependent
shift is another s). In sigma form the shift is a scale, `sigma' = s sigma`, so SD3's logit-normal time is EDM's
log-normal sigma with P_mean = ln s, P_std = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
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
    return Schedule(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho).sample_grid(n, lo, hi, grid, device)


# ---------------------------------------------------------------- flow matching's time and its shift


def shift_time(t, shift: float):
    """SD3's timestep shift `t' = s t / (1 + (s - 1) t)` (s > 1 spends more time at high noise)."""
    return shift * t / (1 + (shift - 1) * t)


def unshift_time(t, shift: float):
    """The inverse of `shift_time`: `t = t' / (s - (s - 1) t')`."""
    return t / (shift - (shift - 1) * t)


def flow_sigma(t):
    """Flow matching's time as EDM's sigma: `x_t = (1 - t) x_0 + t n = (x_0 + sigma n) / (1 + sigma)`."""
    return t / (1 - t)


def flow_time(sigma):
    """EDM's sigma as flow matching's time, `t = sigma / (1 + sigma)`."""
    return sigma / (1 + sigma)


@dataclass
class Schedule:
    """The noise levels a method works at, as sigmas, and the data scale. A position `u` in [0, 1] along the
    sampling path (0: sigma_max, 1: sigma_min) is a sigma on EDM's Karras ramp, or, with `flow_shift` set (a
    flow-matching teacher's), on flow matching's: time uniform between those of sigma_max and sigma_min, shifted.
    The same positions serve DMD2's grid fractions, SiD's times, the generator's steps and the many-step sampler's
    grid, so a flow teacher is queried where it was trained and sampled as it samples itself (its Euler on shifted
    t is EDM's Euler on that grid: the two ODE forms give the same steps)."""

    sigma_data: float = 0.5
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = RHO
    flow_shift: float | None = None  # None: EDM's schedule

    @classmethod
    def of(cls, denoiser: nn.Module, **fields) -> "Schedule":
        """A denoiser's own schedule: a flow-matching model's (its `flow_shift`) or EDM's."""
        return cls(**{"sigma_data": getattr(denoiser, "sigma_data", 0.5),
                      "flow_shift": getattr(denoiser, "flow_shift", None), **fields})

    def with_shift(self, flow_shift: float | None) -> "Schedule":
        """This schedule with flow matching's time shifted by `flow_shift` (None: unchanged)."""
        return self if flow_shift is None else replace(self, flow_shift=float(flow_shift))

    def sigma_at(self, u):
        """sigma at position `u` (a number or tensor in [0, 1]) along the sampling path."""
        if self.flow_shift is None:
            lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
            return (hi + u * (lo - hi)) ** self.rho
        s = self.flow_shift
        t_hi, t_lo = unshift_time(flow_time(self.sigma_max), s), unshift_time(flow_time(self.sigma_min), s)
        return flow_sigma(shift_time(t_hi + u * (t_lo - t_hi), s))

    def sigmas(self, n: int, device=None) -> torch.Tensor:
        """A many-step sampler's `n` sigmas, sigma_max down to sigma_min (no trailing 0)."""
        if self.flow_shift is None:
            return karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho, device)
        if n == 1:
            return torch.tensor([self.sigma_max], device=device)
        return self.sigma_at(torch.linspace(0, 1, n, device=device, dtype=torch.float64)).float()

    def sample_grid(self, n: int, lo: float = 0.0, hi: float = 1.0, grid: int = 1000, device=None) -> torch.Tensor:
        """sigmas at positions drawn uniformly among the indices [lo, hi) (fractions) of a `grid`-point path:
        DMD2's timestep sampling (min/max step percent), for a flow teacher uniform t then shifted (FastGen)."""
        first, last = int(lo * grid), max(int(lo * grid) + 1, int(hi * grid))
        return self.sigma_at(torch.randint(first, last, (n,), device=device).float() / (grid - 1))

    def sample_training(self, n: int, device=None) -> torch.Tensor:
        """The teacher family's training distribution, within [sigma_min, sigma_max]: EDM's log-normal sigma, or
        SD3's logit-normal time (0, 1) shifted, i.e. ln sigma ~ N(ln s, 1)."""
        if self.flow_shift is None:
            sigma = sample_lognormal_sigma(n, device=device)
        else:
            sigma = sample_lognormal_sigma(n, math.log(self.flow_shift), 1.0, device=device)
        return sigma.clamp(self.sigma_min, self.sigma_max)


class Denoiser(nn.Module):
    """What every teacher, fake score and generator network is: `forward(x, sigma, labels=None,
    return_features=False) -> x0` (and a feature tensor for GAN heads when asked).

    Attributes: `sigma_data`, `num_classes` (0: unconditional; label `num_classes` is the null label that
    classifier-free guidance uses), `sample_shape` (one sample's shape, e.g. (2,) or (3, 32, 32)), `flow_shift`
    (set on a flow-matching model: its schedule is flow matching's, see `Schedule`).
    """

    sigma_data: float = 0.5
    num_classes: int = 0
    sample_shape: tuple[int, ...] = ()
    feature_dim: int = 0
    flow_shift: float | None = None  # a flow-matching model's timestep shift: its own `Schedule` (None: EDM's)

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
    `v = n - x_0`, seen as an EDM denoiser: `sigma = t/(1-t)`, `x_t = x / (1 + sigma)`, `x_0 = x_t - t v`.

    `flow_shift` is the timestep shift the model was trained and samples with (SD3: 3.0; Flux: its resolution's);
    it does not change what the model computes, only where methods and samplers query it (`Schedule.of`). A
    velocity model with a `feature_dim` and a `return_features` argument (`FlowVelocity`) lends its features to a
    GAN head on the fake score."""

    def __init__(self, velocity: nn.Module, sample_shape: tuple[int, ...], sigma_data: float = 0.5,
                 num_classes: int = 0, time_scale: float = 1.0, flow_shift: float = 1.0):
        super().__init__()
        self.velocity = velocity
        self.sample_shape, self.sigma_data, self.num_classes = tuple(sample_shape), sigma_data, num_classes
        self.time_scale = time_scale  # models trained on t in [0, 1000] take time_scale=1000
        self.flow_shift = float(flow_shift)
        self.feature_dim = int(getattr(velocity, "feature_dim", 0))

    def forward(self, x, sigma, labels=None, return_features=False):
        s = as_sigma(sigma, x)
        t = s / (1 + s)
        xt = x / (1 + s)
        args = (xt, t.flatten() * self.time_scale) + ((labels,) if labels is not None else ())
        if return_features and self.feature_dim:
            v, h = self.velocity(*args, return_features=True)
        else:
            v, h = self.velocity(*args), None
        x0 = xt - t * v
        return (x0, h) if return_features else x0


class FlowVelocity(nn.Module):
    """A kdkit denoiser's network (`MLPDenoiser`, `UNetDenoiser`: their `raw(x_in, c_noise, labels)`) as a velocity
    model `v(x_t, t, labels)`, what `kdkit diffusion train-teacher objective=flow` trains: x_t scaled to unit
    variance (`c_in = 1 / sqrt((1-t)^2 sigma_data^2 + t^2)`), the noise embedding at EDM's `ln(sigma) / 4` =
    `logit(t) / 4`, the output scaled by `sqrt(sigma_data^2 + 1)` (the std of `v = n - x_0`)."""

    def __init__(self, net: Denoiser):
        super().__init__()
        self.net = net
        self.feature_dim = int(getattr(net, "feature_dim", 0))

    def forward(self, xt, t, labels=None, return_features=False):
        t = as_sigma(t, xt).clamp(1e-7, 1 - 1e-7)
        d2 = self.net.sigma_data ** 2
        c_in = ((1 - t) ** 2 * d2 + t * t).rsqrt()
        f, h = self.net.raw(c_in * xt, (t.log() - (-t).log1p()) / 4, labels)
        v = (d2 + 1) ** 0.5 * f.to(xt.dtype)
        return (v, h) if return_features else v
