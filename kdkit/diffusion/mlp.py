"""An MLP denoiser for low-dimensional data (the 2-D mixtures), EDM-preconditioned, optionally
class-conditional; and `ResidualDenoiser`, which starts as a copy of any (even analytic) teacher."""
from __future__ import annotations

import torch
from torch import nn

from ..config import NonNegInt, PositiveFloat, PositiveInt
from .edm import Denoiser, EvenInt, as_sigma, fourier_embedding, precondition


class MLPDenoiser(Denoiser):
    """`D(x, sigma) = c_skip x + c_out F(c_in x, emb(c_noise) + emb(label))` with F a SiLU MLP.

    `return_features=True` also returns the last hidden layer (what a GAN head on the fake score reads)."""

    def __init__(self, dim: PositiveInt = 2, width: PositiveInt = 256, depth: PositiveInt = 4,
                 sigma_data: PositiveFloat = 1.0, num_classes: NonNegInt = 0, emb_dim: EvenInt = 64,
                 zero_out: bool = False):
        super().__init__()
        self.sample_shape, self.sigma_data, self.num_classes = (dim,), float(sigma_data), num_classes
        self.feature_dim = width
        self.emb_dim = emb_dim
        self.noise_mlp = nn.Sequential(nn.Linear(emb_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.label_emb = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.act = nn.SiLU()
        self.out = nn.Linear(width, dim)
        if zero_out:  # F = 0 at init: used by ResidualDenoiser so it starts equal to its base
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def raw(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None):
        emb = self.noise_mlp(fourier_embedding(c_noise.flatten(), self.emb_dim))
        if self.label_emb is not None:
            labels = self.null_labels(x_in.shape[0], x_in.device) if labels is None else labels
            emb = emb + self.label_emb(labels)
        h = self.act(self.inp(x_in) + emb)
        for blk in self.blocks:
            h = self.act(blk(h) + emb)
        return self.out(h), h

    def forward(self, x, sigma, labels=None, return_features=False):
        s = as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = precondition(s, self.sigma_data)
        f, h = self.raw(c_in * x, c_noise, labels)
        x0 = c_skip * x + c_out * f
        return (x0, h) if return_features else x0


class ResidualDenoiser(Denoiser):
    """`D(x, sigma) = base(x, sigma) + c_out R(c_in x, c_noise)` with R zero at init and `base` frozen.

    This is how a fake score is "initialised from the teacher" when the teacher has no weights to copy (the
    analytic mixture denoiser): it is the teacher exactly at step 0 and learns only the difference."""

    def __init__(self, base: Denoiser, width: int = 256, depth: int = 4):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.sample_shape, self.sigma_data, self.num_classes = base.sample_shape, base.sigma_data, base.num_classes
        self.residual = MLPDenoiser(base.sample_shape[0], width, depth, base.sigma_data, base.num_classes,
                                    zero_out=True)
        self.feature_dim = width

    def forward(self, x, sigma, labels=None, return_features=False):
        s = as_sigma(sigma, x)
        _, c_out, c_in, c_noise = precondition(s, self.sigma_data)
        f, h = self.residual.raw(c_in * x, c_noise, labels)
        x0 = self.base(x, sigma, labels) + c_out * f
        return (x0, h) if return_features else x0
