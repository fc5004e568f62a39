"""Pictures a person would rather look at: scatter plots of 2-D samples side by side, and image grids."""
from __future__ import annotations

from pathlib import Path

import torch


def scatter_png(path: Path, sets: dict[str, torch.Tensor], max_points: int = 4000) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 4), squeeze=False)
    lim = max(float(v[:max_points].abs().max()) for v in sets.values()) * 1.05
    for ax, (title, pts) in zip(axes[0], sets.items()):
        p = pts[:max_points].detach().float().cpu()
        ax.scatter(p[:, 0], p[:, 1], s=1, alpha=0.4)
        ax.set(title=title, xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def image_grid_png(path: Path, images: torch.Tensor, nrow: int = 8) -> Path:
    """Images in [-1, 1], `[N, C, H, W]`, tiled into one PNG."""
    from PIL import Image

    from .data import to_uint8

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = to_uint8(images.detach().float().cpu())
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.zeros(c, rows * (h + 2) + 2, nrow * (w + 2) + 2, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(path)
    return path
