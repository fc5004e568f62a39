"""FKD-style stored crop labels: per student epoch, the crops each synthetic image is seen through, and their labels.

Relabel methods (FKD, SRe2L, CV-DD) do not give a synthetic image one label: every epoch of the student sees a
new random-resized crop (plus flip and CutMix) of it, and the teacher's soft label for *that* crop is computed
once, ahead of time, and stored. The student then replays exactly those crops with exactly those labels, so no
teacher runs while it trains, and the label storage is an honest, countable cost.

A `CropLabels` store holds, for `epochs` epochs of `n` images in batches of `batch_size`:
- `order` [E, n] (int32): the image index at each position of the epoch (positions are consecutive batches);
- `coords` [E, n, 4] (fp16): the crop box (top, left, height, width) as fractions of the image side;
- `flips` [E, n] (bool);
- `mix_src` [E, n] (int32, position inside the batch whose pixels are pasted) and `mix_box` [E, batches, 4]
  (int32 pixel box y0, x0, y1, x1 per batch) when CutMix is on, as in CV-DD's relabel/validate scripts;
- `labels` [E, n, C] fp16 logits, or with `topk` only the top-k logits `label_values` [E, n, k] and their
  class ids `label_index` [E, n, k] (the rest of the classes get -inf logit when rebuilt).

Crops are cut with one bilinear `grid_sample` (`apply_crops`), used both when the labels are made and when the
student replays them, so the student sees bit-for-bit the crops the teacher labelled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..checkpoint import read_safetensors, save_tensors
from ..errors import CheckpointError, ConfigError


@dataclass
class CropLabels:
    order: torch.Tensor
    coords: torch.Tensor
    flips: torch.Tensor
    mix_src: torch.Tensor | None
    mix_box: torch.Tensor | None
    batch_size: int
    labels: torch.Tensor | None = None          # [E, n, C] fp16/fp32 logits
    label_values: torch.Tensor | None = None    # top-k form
    label_index: torch.Tensor | None = None
    num_classes: int = 0

    @property
    def epochs(self) -> int:
        return int(self.order.shape[0])

    @property
    def size(self) -> int:
        return int(self.order.shape[1])

    def soft_labels(self, epoch: int, pos: slice) -> torch.Tensor:
        """Stored logits of the positions `pos` of `epoch` as fp32 [B, C] (top-k: -inf outside the top k)."""
        if self.labels is not None:
            return self.labels[epoch, pos].float()
        vals, idx = self.label_values[epoch, pos].float(), self.label_index[epoch, pos].long()
        out = torch.full((vals.shape[0], self.num_classes), float("-inf"), dtype=torch.float32, device=vals.device)
        return out.scatter_(1, idx, vals)

    def nbytes(self) -> int:
        """Bytes of everything stored (crop parameters, mix parameters and labels)."""
        parts = [self.order, self.coords, self.flips, self.mix_src, self.mix_box, self.labels, self.label_values,
                 self.label_index]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("order", "coords", "flips", "mix_src", "mix_box", "labels", "label_values", "label_index")
        return {k: getattr(self, k).detach().cpu().contiguous() for k in names if getattr(self, k) is not None}


def save_crop_labels(store: CropLabels, path) -> None:
    """The store as one safetensors file, written atomically."""
    save_tensors(path, store.tensors(), metadata={"batch_size": store.batch_size, "num_classes": store.num_classes})


def load_crop_labels(path) -> CropLabels:
    t, meta = read_safetensors(path)
    if "order" not in t or "batch_size" not in meta:
        raise CheckpointError(f"{path} is not a crop-label store written by kdkit")
    return CropLabels(order=t["order"], coords=t["coords"], flips=t["flips"], mix_src=t.get("mix_src"),
                      mix_box=t.get("mix_box"), batch_size=int(meta["batch_size"]), labels=t.get("labels"),
                      label_values=t.get("label_values"), label_index=t.get("label_index"),
                      num_classes=int(meta.get("num_classes", 0)))


def sample_crop_boxes(n: int, g: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                      side: int = 32) -> torch.Tensor:
    """torchvision `RandomResizedCrop.get_params` for `n` square images of `side` pixels, as fractions [n, 4].

    Ten tries at a random area in `scale` and aspect ratio in `ratio` (log-uniform), whole-pixel boxes; the
    fallback is the central crop clamped to `ratio`, as torchvision does.
    """
    out = torch.empty(n, 4)
    area = side * side
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for i in range(n):
        for _ in range(10):
            target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=g).item())
            ar = math.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand((), generator=g).item())
            w = int(round(math.sqrt(target * ar)))
            h = int(round(math.sqrt(target / ar)))
            if 0 < w <= side and 0 < h <= side:
                top = int(torch.randint(0, side - h + 1, (1,), generator=g))
                left = int(torch.randint(0, side - w + 1, (1,), generator=g))
                break
        else:
            h = w = side
            top = left = 0
        out[i] = torch.tensor([top, left, h, w], dtype=torch.float32) / side
    return out


def apply_crops(images: torch.Tensor, coords: torch.Tensor, flips: torch.Tensor | None = None,
                size: int | None = None) -> torch.Tensor:
    """Cut box `coords[i]` = (top, left, height, width) (fractions) out of `images[i]`, resize to `size` (bilinear),
    mirror where `flips[i]`. Differentiable in `images`; one `grid_sample` for the whole batch."""
    n, _, h, w = images.shape
    size = size or h
    c = coords.to(images.device, torch.float32)
    top, left, hh, ww = c[:, 0], c[:, 1], c[:, 2], c[:, 3]
    sx = ww.clone()
    if flips is not None:
        sx = torch.where(flips.to(images.device).bool(), -sx, sx)
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = sx                      # x_in = sx * u + (2 * left + width - 1)
    theta[:, 0, 2] = 2 * left + ww - 1
    theta[:, 1, 1] = hh
    theta[:, 1, 2] = 2 * top + hh - 1
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def cutmix_box(side: int, lam: float, g: torch.Generator) -> tuple[int, int, int, int]:
    """CutMix's box for mixing ratio `lam`: side sqrt(1 - lam), uniform centre, clipped (y0, x0, y1, x1)."""
    cut = int(side * math.sqrt(1.0 - lam))
    cy, cx = (int(torch.randint(0, side, (1,), generator=g)) for _ in range(2))
    return (max(cy - cut // 2, 0), max(cx - cut // 2, 0), min(cy + cut // 2, side), min(cx + cut // 2, side))


def apply_cutmix(x: torch.Tensor, src: torch.Tensor, box) -> torch.Tensor:
    y0, x0, y1, x1 = (int(v) for v in box)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[src.long().to(x.device), :, y0:y1, x0:x1]
    return out


def make_crop_labels(images: torch.Tensor, teacher: Callable[[torch.Tensor], torch.Tensor], epochs: int, *,
                     batch_size: int = 16, seed: int = 0, cutmix: bool = True, cutmix_alpha: float = 1.0,
                     min_scale: float = 0.08, fp16: bool = True, topk: int | None = None,
                     progress: bool = False) -> CropLabels:
    """Draw every epoch's crops (and CutMix) for `images` and store `teacher(crops)` for each."""
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"crop labels need epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}")
    n, side = images.shape[0], images.shape[-1]
    g = torch.Generator().manual_seed(int(seed))
    nb = (n + batch_size - 1) // batch_size
    order = torch.empty(epochs, n, dtype=torch.int32)
    coords = torch.empty(epochs, n, 4, dtype=torch.float16)
    flips = torch.empty(epochs, n, dtype=torch.bool)
    mix_src = torch.empty(epochs, n, dtype=torch.int32) if cutmix else None
    mix_box = torch.zeros(epochs, nb, 4, dtype=torch.int32) if cutmix else None
    chunks: list[list[torch.Tensor]] = []
    from tqdm import tqdm

    for e in tqdm(range(epochs), desc="crop labels", disable=not progress):
        order[e] = torch.randperm(n, generator=g).int()
        # fp16 boxes are what gets stored, so the teacher sees the fp16-rounded crop too
        coords[e] = sample_crop_boxes(n, g, scale=(min_scale, 1.0), side=side).half()
        flips[e] = torch.rand(n, generator=g) < 0.5
        per_epoch = []
        for b in range(nb):
            pos = slice(b * batch_size, min(n, (b + 1) * batch_size))
            x = apply_crops(images[order[e, pos].long()], coords[e, pos], flips[e, pos], side)
            if cutmix:
                m = x.shape[0]
                mix_src[e, pos] = torch.randperm(m, generator=g).int()
                lam = _beta(cutmix_alpha, g)
                mix_box[e, b] = torch.tensor(cutmix_box(side, lam, g), dtype=torch.int32)
                x = apply_cutmix(x, mix_src[e, pos], mix_box[e, b])
            with torch.no_grad():
                per_epoch.append(teacher(x).detach().float().cpu())
        chunks.append(per_epoch)
    logits = torch.stack([torch.cat(c) for c in chunks])  # [E, n, C]
    dtype = torch.float16 if fp16 else torch.float32
    store = CropLabels(order, coords, flips, mix_src, mix_box, batch_size, num_classes=int(logits.shape[-1]))
    if topk:
        vals, idx = logits.topk(min(topk, logits.shape[-1]), dim=-1)
        index_dtype = torch.uint8 if logits.shape[-1] <= 256 else torch.int32
        store.label_values, store.label_index = vals.to(dtype), idx.to(index_dtype)
    else:
        store.labels = logits.to(dtype)
    return store


def _beta(alpha: float, g: torch.Generator) -> float:
    """Beta(alpha, alpha) drawn from the generator (so stores are reproducible): alpha = 1 (CutMix's default) is
    uniform; other alphas use Johnk's algorithm."""
    if alpha == 1.0:
        return float(torch.rand((), generator=g))
    while True:  # Johnk's algorithm
        u, v = torch.rand(2, generator=g).tolist()
        x, y = u ** (1 / alpha), v ** (1 / alpha)
        if 0 < x + y <= 1:
            return x / (x + y)


def replay_batches(store: CropLabels, images: torch.Tensor, epoch: int,
                   with_meta: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """The student's batches of `epoch`: exactly the stored crops (and CutMix) with their stored soft labels.
    With `with_meta` also (image ids, CutMix source positions or None, fraction of pixels pasted)."""
    if epoch >= store.epochs:
        raise ConfigError(f"the crop-label store holds {store.epochs} epochs; epoch {epoch} was asked for "
                          "(relabel with at least as many epochs as the student trains)")
    if images.shape[0] != store.size:
        raise ConfigError(f"the crop-label store is for {store.size} images, got {images.shape[0]}")
    n, side, bs = store.size, images.shape[-1], store.batch_size
    for b in range((n + bs - 1) // bs):
        pos = slice(b * bs, min(n, (b + 1) * bs))
        ids = store.order[epoch, pos].long().to(images.device)
        x = apply_crops(images[ids], store.coords[epoch, pos], store.flips[epoch, pos], side)
        src, pasted = None, 0.0
        if store.mix_src is not None:
            x = apply_cutmix(x, store.mix_src[epoch, pos], store.mix_box[epoch, b])
            src = store.mix_src[epoch, pos].long().to(images.device)
            y0, x0, y1, x1 = store.mix_box[epoch, b].tolist()
            pasted = max(0, y1 - y0) * max(0, x1 - x0) / float(side * side)
        y = store.soft_labels(epoch, pos).to(images.device)
        yield (x, y, (ids, src, pasted)) if with_meta else (x, y)


def kl_soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)), batch mean, without the T^2 factor (as CV-DD's validate script)."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean")


def train_student_on_crops(model: torch.nn.Module, images: torch.Tensor, store: CropLabels, epochs: int, *,
                           lr: float = 1e-3, weight_decay: float = 0.01, temperature: float = 20.0,
                           accumulation: int = 2, on_batch: Callable | None = None,
                           hard_labels: torch.Tensor | None = None) -> torch.nn.Module:
    """CV-DD's student training: AdamW, cosine over `epochs`, KL at temperature T against the stored crop labels;
    each stored batch is fed in `accumulation` forward chunks (so batch norm sees half-batches, as in the paper's
    gradient accumulation 2 at batch 16). `on_batch(epoch, x, labels)` sees every batch (for tests).

    With `hard_labels` (class id per image) the stored soft labels are ignored and the student is trained with
    CE on the class ids instead (CutMix-mixed by the pasted area, as CutMix does): the baseline "same crops,
    same optimiser, hard labels"."""
    if epochs > store.epochs:
        raise ConfigError(f"the student trains {epochs} epochs but only {store.epochs} epochs of crop labels are "
                          "stored; relabel with more epochs or train fewer")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1.0 + math.cos(math.pi * e / epochs)))
    model.train()
    for e in range(epochs):
        for x, y, (ids, src, pasted) in replay_batches(store, images, e, with_meta=True):
            if on_batch is not None:
                on_batch(e, x, y)
            opt.zero_grad(set_to_none=True)
            chunks = accumulation if x.shape[0] >= 2 * accumulation else 1
            if hard_labels is not None:
                cls = hard_labels.to(x.device)[ids]
                y = torch.stack([cls, cls[src] if src is not None else cls], 1)
            for xp, yp in zip(x.tensor_split(chunks), y.tensor_split(chunks)):
                out = model(xp)
                if hard_labels is None:
                    loss = kl_soft_loss(out, yp, temperature)
                else:
                    loss = (1 - pasted) * F.cross_entropy(out, yp[:, 0]) + pasted * F.cross_entropy(out, yp[:, 1])
                (loss * xp.shape[0] / x.shape[0]).backward()
            opt.step()
        sched.step()
    return model
