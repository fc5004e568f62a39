"""2-D Gaussian mixtures whose exact denoiser is known, so a teacher with no error can be distilled.

For `x_0 ~ sum_k w_k N(mu_k, s_k^2 I)` and `x = x_0 + sigma n`, component k's evidence is
`N(x; mu_k, (s_k^2 + sigma^2) I)` and `E[x_0 | x, k] = mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)`, so
`E[x_0 | x]` is their responsibility-weighted sum: `MixtureDenoiser` computes exactly that, differentiably.
Class label k conditions on component k (label K = unconditional), so classifier-free guidance has an exact
conditional teacher too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .edm import Denoiser, as_sigma


@dataclass
class GaussianMixture:
    """Means `[K, D]`, per-component isotropic std `[K]`, weights `[K]` (summing to 1)."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self):
        self.means = torch.as_tensor(self.means, dtype=torch.float32)
        k = self.means.shape[0]
        self.stds = torch.as_tensor(self.stds, dtype=torch.float32).expand(k).clone()
        self.weights = torch.as_tensor(self.weights, dtype=torch.float32).expand(k).clone()
        if self.means.ndim != 2 or (self.stds <= 0).any() or (self.weights < 0).any():
            raise ConfigError("a Gaussian mixture needs means [K, D], positive stds and non-negative weights")
        self.weights = self.weights / self.weights.sum()

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def data_std(self) -> float:
        """Root-mean-square per-coordinate std of the whole mixture (EDM's sigma_data)."""
        mean = (self.weights[:, None] * self.means).sum(0)
        spread = (self.weights * ((self.means - mean) ** 2).sum(1)).sum() / self.dim
        second = spread + (self.weights * self.stds ** 2).sum()
        return float(second.sqrt())

    def sample(self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
               return_labels: bool = False):
        """`n` samples (and their component indices); `labels` fixes the components."""
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator)
        x = self.means[labels] + self.stds[labels, None] * noise
        return (x, labels) if return_labels else x

    def denoiser(self, conditional: bool = False) -> "MixtureDenoiser":
        return MixtureDenoiser(self, conditional)


def ring_mixture(modes: int = 8, radius: float = 2.0, std: float = 0.2,
                 weights: list[float] | None = None) -> GaussianMixture:
    """`modes` Gaussians evenly on a circle; default weights are unequal (1..modes, normalised) so that
    per-mode mass is something a mode-dropping or mode-averaging student visibly gets wrong."""
    angles = torch.arange(modes, dtype=torch.float32) * (2 * math.pi / modes)
    means = radius * torch.stack([angles.cos(), angles.sin()], 1)
    w = torch.tensor(weights if weights is not None else [float(i + 1) for i in range(modes)])
    if w.numel() != modes:
        raise ConfigError(f"ring_mixture: {w.numel()} weights for {modes} modes")
    return GaussianMixture(means, torch.tensor(std), w)


class MixtureDenoiser(Denoiser):
    """The exact `E[x_0 | x_sigma]` of a `GaussianMixture` (an analytic teacher: no training, no error).

    `conditional=True` makes it a class-conditional teacher (`num_classes` = components, so methods draw labels
    and guidance applies); either way labels, when passed, condition on a component (label K = none)."""

    def __init__(self, mixture: GaussianMixture, conditional: bool = False):
        super().__init__()
        self.register_buffer("means", mixture.means.clone())
        self.register_buffer("vars", mixture.stds.clone() ** 2)
        self.register_buffer("log_weights", mixture.weights.clamp_min(1e-30).log())
        self.sigma_data = mixture.data_std
        self.components = mixture.num_components
        self.num_classes = mixture.num_components if conditional else 0
        self.sample_shape = (mixture.dim,)

    def responsibilities(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior over components given the noisy point, `[B, K]`."""
        s2 = as_sigma(sigma, x) ** 2  # [B, 1]
        total = self.vars[None, :] + s2  # [B, K]
        d2 = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)
        logits = self.log_weights[None] - 0.5 * x.shape[1] * total.log() - 0.5 * d2 / total
        if labels is not None:
            keep = (labels[:, None] == torch.arange(self.components, device=x.device)[None]) | \
                   (labels[:, None] >= self.components)
            logits = logits.masked_fill(~keep, float("-inf"))
        return torch.softmax(logits, dim=1)

    def forward(self, x, sigma, labels=None, return_features=False):
        s2 = as_sigma(sigma, x) ** 2
        r = self.responsibilities(x, sigma, labels)  # [B, K]
        shrink = self.vars[None, :] / (self.vars[None, :] + s2)  # [B, K]
        x0_k = self.means[None] + shrink[..., None] * (x[:, None, :] - self.means[None])  # [B, K, D]
        x0 = (r[..., None] * x0_k).sum(1)
        return (x0, None) if return_features else x0


def nearest_mode(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Index of the closest mixture mean for each point."""
    return torch.cdist(x.float(), means.float()).argmin(1)
