"""Batched image transforms on tensors (CPU or GPU, uint8 or float), no PIL and no per-sample Python loop.

Random draws come from `generator` (or torch's default one) on the generator's device and are then moved
to the batch's device, so a CPU generator with a fixed seed gives the same augmentation on CPU and GPU.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _channel_const(values: Sequence[float] | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    if t.shape[0] not in (1, x.shape[-3]):
        raise ValueError(f"{t.shape[0]} per-channel values for images with {x.shape[-3]} channels")
    return t


def to_float_normalized(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """uint8 images in [0, 255] (or float images already in [0, 1]), `[..., C, H, W]` -> float32 `(x - mean) / std`.

    `mean` and `std` are per channel, in [0, 1] units (e.g. CIFAR-10's (0.4914, 0.4822, 0.4465)).
    """
    xf = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return (xf - _channel_const(mean, xf)).div_(_channel_const(std, xf))


def crop_offsets(
    n: int, padding: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent crop offsets `(top, left)`, each uniform in [0, 2*padding], for `n` samples (on CPU/generator device)."""
    dev = _draw_device(generator)
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    return top, left


def crop_at(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad `x` `[N,C,H,W]` by `padding` on every side and cut the `H x W` window at (`top[i]`, `left[i]`) per sample."""
    if x.dim() != 4:
        raise ValueError(f"expected a batch [N, C, H, W], got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if padding == 0:
        return x.clone()
    padded = F.pad(x, (padding, padding, padding, padding))
    pw = w + 2 * padding
    top = top.to(x.device, torch.long)
    left = left.to(x.device, torch.long)
    rows = top[:, None] + torch.arange(h, device=x.device)  # [N,H]
    cols = left[:, None] + torch.arange(w, device=x.device)  # [N,W]
    # One gather over the flattened padded plane: much faster than 4-way advanced indexing on CPU.
    flat = (rows[:, :, None] * pw + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return padded.reshape(n, c, -1).gather(2, flat).reshape(n, c, h, w)


def random_crop(
    x: torch.Tensor,
    padding: int = 4,
    generator: torch.Generator | None = None,
    *,
    return_offsets: bool = False,
):
    """torchvision's `RandomCrop(size=(H, W), padding=padding)` applied independently to every sample of `x`.

    Each sample is zero padded by `padding` pixels per side and an `H x W` window is cut at a uniformly drawn
    offset `(top, left)` in [0, 2*padding]^2 of the padded image. With `return_offsets=True` also returns
    `(top, left)` (LongTensors on the generator's device) so the result can be checked or replayed.
    """
    top, left = crop_offsets(x.shape[0], padding, generator)
    out = crop_at(x, top, left, padding)
    return (out, (top, left)) if return_offsets else out


def random_hflip(
    x: torch.Tensor,
    p: float = 0.5,
    generator: torch.Generator | None = None,
    *,
    return_mask: bool = False,
):
    """Mirror each sample of `x` `[N,C,H,W]` left-right with probability `p`, independently per sample."""
    flip = torch.rand(x.shape[0], generator=generator, device=_draw_device(generator)) < p
    mask = flip.to(x.device)
    out = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return (out, flip) if return_mask else out
