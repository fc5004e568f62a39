"""The files an image-condensation run leaves beside its checkpoints: the synthetic set, its picture, its curves.

- `synthetic.safetensors`: `images` (normalised space), `labels` (class ids or learned soft labels), `lr` (the
  learned student learning rate when the method learns one);
- `grid.png`: the synthetic images, one row per class;
- `curves.json` / `curves.png`: the matching loss (and the method's other terms) per iteration.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import atomic_path, read_safetensors, save_tensors
from ..errors import CheckpointError
from .image_data import ImageSplit


def save_synthetic(path: Path, syn: dict) -> None:
    tensors = {"images": syn["images"], "labels": syn["labels"]}
    if syn.get("lr") is not None:
        tensors["lr"] = torch.as_tensor(syn["lr"], dtype=torch.float32).reshape(1)
    save_tensors(path, tensors)


def load_synthetic(path) -> dict:
    t, _ = read_safetensors(path)
    if "images" not in t or "labels" not in t:
        raise CheckpointError(f"{path} is not a synthetic set written by kdkit (no images/labels)")
    return {"images": t["images"], "labels": t["labels"], "lr": float(t["lr"]) if "lr" in t else None}


def save_grid(images: torch.Tensor, ipc: int, split: ImageSplit, path: Path, zca: bool) -> None:
    """PNG of the synthetic set, one row per class (per-image min-max scaled when ZCA-whitened)."""
    from torchvision.utils import save_image

    x = images.detach().float().cpu()
    if zca:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    else:
        x = x * torch.tensor(split.std).view(1, -1, 1, 1) + torch.tensor(split.mean).view(1, -1, 1, 1)
    with atomic_path(Path(path)) as tmp:
        save_image(x.clamp(0, 1), str(tmp), nrow=ipc, padding=1, format="png")


def save_curves(curves: list[dict], run_dir: Path) -> None:
    with atomic_path(Path(run_dir) / "curves.json") as tmp:
        tmp.write_text(json.dumps(curves))
    if not curves:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([c["it"] for c in curves], [c["loss"] for c in curves])
    ax.set_xlabel("iteration")
    ax.set_ylabel("matching loss")
    fig.tight_layout()
    with atomic_path(Path(run_dir) / "curves.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def curve_columns(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Per-iteration rows as one tensor per term (what a checkpoint stores of them: compact, exact)."""
    if not rows:
        return {}
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        out[key] = torch.tensor(values, dtype=torch.int64 if ints else torch.float64)
    return out


def curve_rows(columns: dict[str, torch.Tensor]) -> list[dict]:
    lists = {k: v.tolist() for k, v in columns.items()}
    n = len(next(iter(lists.values()))) if lists else 0
    return [{k: lists[k][i] for k in lists} for i in range(n)]
