"""Class-balanced subsets of a labelled dataset."""
from __future__ import annotations

import torch


def balanced_subset(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of `per_class` samples of every class present in `labels`, sorted ascending.

    Takes, for each class, the first `per_class` of its indices under a `torch.randperm` seeded by `seed`,
    so the same `(labels, per_class, seed)` always gives the same subset and a larger `per_class` extends
    a smaller one. Raises `ValueError` if some class has fewer than `per_class` samples.
    """
    labels = torch.as_tensor(labels).flatten().cpu()
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(labels.numel(), generator=g)
    shuffled = labels[perm]
    classes, counts = torch.unique(labels, return_counts=True)
    short = [(int(c), int(k)) for c, k in zip(classes, counts) if k < per_class]
    if short:
        detail = ", ".join(f"class {c}: {k}" for c, k in short)
        raise ValueError(f"balanced_subset needs {per_class} samples per class, but {detail}")
    picked = [perm[shuffled == c][:per_class] for c in classes]
    return torch.cat(picked).sort().values
