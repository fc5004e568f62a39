"""The straightforward PyTorch KD loop that kdkit's throughput is measured against.

What RepDistiller / mdistiller users run: a map-style dataset of PIL images with torchvision's per-sample
`RandomCrop(32, 4)` + `RandomHorizontalFlip` + `ToTensor` + `Normalize`, a `DataLoader` with worker processes,
fp32, the teacher under `no_grad`, `0.1 * CE + 0.9 * KD(T=4)` and SGD. Same models, same batch, same process.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F


class _PILDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std):
        from torchvision import transforms

        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()  # HWC uint8, as torchvision's CIFAR
        self.labels = labels.tolist()
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def measure_plain(teacher: str | None, student: str, batch: int, steps: int, warmup: int,
                  workers: int | None = None) -> float:
    """Images/s of the plain loop over `steps` optimiser steps after `warmup` steps (KD if `teacher`, else CE)."""
    from ..data import load_dataset_by_name
    from ..models import build_model

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = (4 if dev.type == "cuda" else 0) if workers is None else workers
    train = load_dataset_by_name("cifar10", "train")
    n = (steps + warmup) * batch
    ds = _PILDataset(train.images[:n], train.labels[:n], train.mean, train.std)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         pin_memory=dev.type == "cuda", persistent_workers=False)
    torch.manual_seed(0)
    model = build_model(student).to(dev).train()
    t_model = build_model(teacher).to(dev).eval() if teacher else None
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    stamps = []
    for x, y in loader:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if t_model is not None:
            with torch.no_grad():
                t_logits = t_model(x)
            kd = F.kl_div(F.log_softmax(logits / 4, 1), F.softmax(t_logits / 4, 1), reduction="batchmean") * 16
            loss = 0.1 * loss + 0.9 * kd
        opt.zero_grad()
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    timed = stamps[warmup - 1:]
    return (len(timed) - 1) * batch / (timed[-1] - timed[0])
