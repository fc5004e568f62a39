"""`TensorLoader`: batches straight from an in-memory uint8 image tensor, deterministic and resumable.

Per epoch `e` every rank draws the same permutation (`torch.randperm` from a generator seeded by
`(seed, e)`), pads it by wrapping to a multiple of `world_size` (as `DistributedSampler` does) and takes
`perm[rank::world_size]`. Batch `b` of epoch `e` on rank `r` is augmented with a generator seeded by
`(seed, e, b, r)`, so `iter_from(step)` after a restart yields exactly the batches an uninterrupted epoch
would have yielded from `step` on.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Iterator, NamedTuple, Sequence

import torch

from .transforms import random_crop, random_hflip, to_float_normalized


class Batch(NamedTuple):
    """`images`: float32 normalised `[B,C,H,W]` on the loader's device; `labels`: int64 `[B]` on the device;
    `index`: int64 `[B]` dataset indices of the samples (on CPU), for cached teachers and per-sample losses."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (stable across runs, machines and Python versions)."""
    data = struct.pack(f"<{len(parts)}q", *(int(p) for p in parts))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def _generator(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(mix_seed(*parts))
    return g


class TensorLoader:
    """Iterate over `images[indices]` in batches of `batch_size`, yielding `Batch(images, labels, index)`.

    Training (defaults): shuffled, random crop (zero padding 4) + horizontal flip, then normalised with
    `mean`/`std`; eval: `augment=False, shuffle=False, drop_last=False` only normalises. The uint8 batch is
    moved to `device` before augmenting, so a GPU does that work when there is one; keep `images` on the
    device already (150 MB for CIFAR-10) to skip the per-batch copy. Call `set_epoch(e)` before each epoch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = True,
        augment: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        indices: torch.Tensor | Sequence[int] | None = None,
        padding: int = 4,
        flip_p: float = 0.5,
    ):
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        labels = torch.as_tensor(labels)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [N] = [{images.shape[0]}], got shape {tuple(labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        n = images.shape[0]
        if indices is None:
            base = torch.arange(n)
        else:
            base = torch.as_tensor(indices, dtype=torch.long).flatten().cpu()
            if base.numel() and (int(base.min()) < 0 or int(base.max()) >= n):
                raise ValueError(f"indices must lie in [0, {n}), got min {int(base.min())}, max {int(base.max())}")
        if base.numel() == 0:
            raise ValueError("the loader has no samples (empty `indices` or dataset)")
        self.images = images
        self.labels = labels
        self.batch_size = int(batch_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.shuffle = shuffle
        self.augment = augment
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.device = torch.device(device)
        self.base_indices = base
        self.padding = int(padding)
        self.flip_p = float(flip_p)
        self.epoch = 0
        if len(self) == 0:
            raise ValueError(
                f"{self.samples_per_rank} samples per rank make no full batch of {batch_size} with drop_last=True"
            )

    @classmethod
    def from_data(cls, data, batch_size: int, **kwargs) -> "TensorLoader":
        """Build from an `ImageTensors` (e.g. `load_cifar10()`), taking its `mean` and `std`."""
        kwargs.setdefault("mean", data.mean)
        kwargs.setdefault("std", data.std)
        return cls(data.images, data.labels, batch_size, **kwargs)

    @property
    def samples_per_rank(self) -> int:
        return -(-self.base_indices.numel() // self.world_size)

    def __len__(self) -> int:
        m = self.samples_per_rank
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_indices(self, epoch: int | None = None) -> torch.Tensor:
        """The dataset indices this rank visits in `epoch` (default: the current one), in order, before batching."""
        epoch = self.epoch if epoch is None else int(epoch)
        order = self.base_indices
        if self.shuffle:
            order = order[torch.randperm(order.numel(), generator=_generator(self.seed, epoch))]
        total = self.samples_per_rank * self.world_size
        if total > order.numel():  # wrap around so every rank gets the same number of samples
            reps = -(-total // order.numel())
            order = order.repeat(reps)[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, step: int) -> Iterator[Batch]:
        """Batches `step, step+1, ...` of the current epoch, identical to those of a full iteration."""
        n_batches = len(self)
        if not 0 <= step <= n_batches:
            raise ValueError(f"step must be in [0, {n_batches}], got {step}")
        return self._batches(self.epoch, step, n_batches)

    def _batches(self, epoch: int, start: int, stop: int) -> Iterator[Batch]:
        order = self.epoch_indices(epoch)
        for b in range(start, stop):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self._make_batch(idx, epoch, b)

    def _make_batch(self, idx: torch.Tensor, epoch: int, b: int) -> Batch:
        src = idx.to(self.images.device, non_blocking=True)
        x = self.images[src].to(self.device, non_blocking=True)
        y = self.labels[idx.to(self.labels.device)].to(self.device, non_blocking=True)
        if self.augment:
            g = _generator(self.seed, epoch, b, self.rank)
            x = random_crop(x, self.padding, g)
            x = random_hflip(x, self.flip_p, g)
        return Batch(to_float_normalized(x, self.mean, self.std), y, idx)

    def __repr__(self) -> str:
        return (
            f"TensorLoader(n={self.base_indices.numel()}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, augment={self.augment}, rank={self.rank}/{self.world_size}, "
            f"device={self.device}, epoch={self.epoch})"
        )
