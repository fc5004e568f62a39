"""Image sets for condensation: any labelled image dataset in `kdkit.data`, as normalised float tensors.

Condensation works in normalised pixel space (mean/std per channel, optionally ZCA-whitened as in MTT), so
synthetic images, real batches and the evaluation all live in one space. ZCA is computed here (no kornia):
W = U diag(1/sqrt(S + eps)) U^T of the training set's pixel covariance, eps = 0.1 as in MTT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..registry import DATASETS


@dataclass
class ImageSplit:
    images: torch.Tensor      # float32 [N,C,H,W], normalised (and whitened when zca)
    labels: torch.Tensor      # int64 [N]
    num_classes: int
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def indices_by_class(self) -> list[torch.Tensor]:
        return [torch.nonzero(self.labels == c).flatten() for c in range(self.num_classes)]


def _load_raw(dataset: str, split: str):
    name = dataset.strip().lower()
    if name not in DATASETS:
        import kdkit.data  # noqa: F401  (importing it registers the loaders)
    if name not in DATASETS:
        raise ConfigError(f"unknown image dataset '{dataset}'; image datasets in kdkit.data: "
                          f"{', '.join(n for n in DATASETS.names())}")
    data = DATASETS.get(name)(split)
    labels = getattr(data, "labels", None)
    images = getattr(data, "images", None)
    if labels is None or images is None:
        raise ConfigError(f"dataset '{dataset}' has no labels (or no images): condensation needs a labelled "
                          "image classification set with `.images` [N,C,H,W] and `.labels` [N]")
    return data


def _to_split(data, subset: int | None, seed: int) -> ImageSplit:
    images, labels = data.images, torch.as_tensor(data.labels).long()
    if labels.ndim != 1 or labels.numel() != images.shape[0]:
        raise ConfigError(f"dataset '{data.name}' labels have shape {tuple(labels.shape)}; expected [N] class ids "
                          f"for {images.shape[0]} images")
    if subset:
        from ..data.subsets import balanced_subset

        num_classes = int(labels.max()) + 1
        idx = balanced_subset(labels, max(1, subset // num_classes), seed=seed)
        images, labels = images[idx], labels[idx]
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    x = (x - mean) / std
    classes = list(getattr(data, "classes", [str(i) for i in range(int(labels.max()) + 1)]))
    return ImageSplit(x.contiguous(), labels, len(classes), classes, tuple(data.mean), tuple(data.std))


def load_image_splits(dataset: str, train_subset: int | None = None, test_subset: int | None = None,
                      zca: bool = False, seed: int = 0) -> tuple[ImageSplit, ImageSplit]:
    """(train, test) of `dataset`, normalised; class-balanced subsets when `*_subset` (for CPU-sized runs)."""
    train = _to_split(_load_raw(dataset, "train"), train_subset, seed)
    test = _to_split(_load_raw(dataset, "test"), test_subset, seed)
    if zca:
        w, mu = zca_matrix(train.images)
        train.images = apply_zca(train.images, w, mu)
        test.images = apply_zca(test.images, w, mu)
    return train, test


def zca_matrix(x: torch.Tensor, eps: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """ZCA whitening matrix and mean of images `x` [N,C,H,W] (in float64 for a stable eigendecomposition)."""
    flat = x.reshape(x.shape[0], -1).double()
    mu = flat.mean(0)
    centred = flat - mu
    cov = centred.T @ centred / max(1, flat.shape[0] - 1)
    s, u = torch.linalg.eigh(cov)
    w = (u * (1.0 / torch.sqrt(s.clamp_min(0) + eps))) @ u.T
    return w.float(), mu.float()


def apply_zca(x: torch.Tensor, w: torch.Tensor, mu: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    out = torch.empty_like(x)
    for i in range(0, x.shape[0], chunk):
        part = x[i:i + chunk].reshape(-1, w.shape[0])
        out[i:i + chunk] = ((part - mu) @ w).view_as(x[i:i + chunk])
    return out


def random_real(train: ImageSplit, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`ipc` randomly chosen real images per class (the baseline, and every method's initialisation)."""
    g = torch.Generator().manual_seed(int(seed))
    xs, ys = [], []
    for c, idx in enumerate(train.indices_by_class()):
        if idx.numel() < ipc:
            raise ConfigError(f"class {c} has {idx.numel()} training images, fewer than ipc={ipc}")
        pick = idx[torch.randperm(idx.numel(), generator=g).to(idx.device)[:ipc]]
        xs.append(train.images[pick])
        ys.append(torch.full((ipc,), c, dtype=torch.long, device=train.labels.device))
    return torch.cat(xs).clone(), torch.cat(ys)
