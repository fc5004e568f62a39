"""Evaluation protocols for condensed image sets; their numbers are not comparable, so they are kept apart.

(a) `convnet`: the MTT/DM/DATM protocol. A fresh ConvNet-3 (instance norm) is trained on the synthetic set
    with hard labels or the learned soft labels, SGD momentum 0.9, weight decay 5e-4, the learned learning
    rate when the set has one (else 0.01), lr x0.1 at half the epochs, batch 256, DSA on every batch;
    1,000 epochs by default. Mean ± std of test accuracy over `nets` fresh networks.
(b) `resnet18`: the relabel protocol (SRe2L / CV-DD): a CIFAR ResNet-18 trained on the synthetic images
    against the set's labels (learned soft labels when it has them), SGD with cosine decay; reported separately.
    With crop labels (`evaluate_crop_labels`: CV-DD's committee relabelling) the student replays FKD crops.

`label_bytes` is reported beside `image_bytes`: soft labels can cost more storage than the pixels.

`full_data_accuracy` is DD-Ranking's Acc(real-hard) (`dd_ranking.py`): the protocol's network trained once on
the whole training (sub)set with hard labels, cached per data and setting.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .augment import DEFAULT_STRATEGY, dsa
from .convnet_functional import make_convnet
from .networks import cifar_resnet18, member_model

PROTOCOLS = ("convnet", "resnet18")


@dataclass
class EvalSettings:
    protocol: str = "convnet"
    epochs: int = 1000
    nets: int = 5
    batch_size: int = 256
    lr: float | None = None          # None: the set's learned lr, else 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dsa_strategy: str = DEFAULT_STRATEGY
    width: int = 128
    seed: int = 0
    test_batch: int = 1000
    student: str | None = None       # protocol (b)'s network; None: ResNet-18 (any committee member name works)
    temperature: float = 20.0        # crop-label protocol: KL temperature
    adamw_lr: float = 1e-3           # crop-label protocol: AdamW learning rate


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE against class ids [N] or against (unnormalised-logit) soft labels [N,C]."""
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets)
    return -(F.softmax(targets, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch):
        correct += (model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
    model.train()
    return correct / max(1, images.shape[0])


def train_on_synthetic(images: torch.Tensor, labels: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                       settings: EvalSettings, seed: int, lr: float | None = None) -> float:
    """Train one fresh network on (images, labels) and return its test accuracy."""
    torch.manual_seed(seed)
    num_classes = int(labels.shape[1]) if labels.ndim == 2 else int(test_y.max()) + 1
    if settings.protocol == "convnet":
        model = make_convnet(num_classes, width=settings.width, im_size=images.shape[-1],
                             in_channels=images.shape[1])
    elif settings.protocol == "resnet18":
        model = relabel_student(settings, num_classes, images)
    else:
        raise ConfigError(f"unknown evaluation protocol '{settings.protocol}'; choices: {', '.join(PROTOCOLS)}")
    model = model.to(images.device)
    step_lr = float(settings.lr if settings.lr is not None else (lr if lr is not None else 0.01))
    opt = torch.optim.SGD(model.parameters(), lr=step_lr, momentum=settings.momentum,
                          weight_decay=settings.weight_decay)
    if settings.protocol == "convnet":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, settings.epochs // 2)], 0.1)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, settings.epochs))
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = images.detach(), labels.detach()
    n = x_all.shape[0]
    for _ in range(settings.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, settings.batch_size):
            idx = perm[i:i + settings.batch_size]
            x = x_all[idx]
            seed_aug = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g).item())
            x = dsa(x, settings.dsa_strategy, seed=seed_aug, siamese=False) if settings.dsa_strategy != "none" else x
            loss = soft_cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return accuracy(model, test_x, test_y, settings.test_batch)


def relabel_student(settings: EvalSettings, num_classes: int, images: torch.Tensor) -> nn.Module:
    """Protocol (b)'s fresh network: ResNet-18 unless `settings.student` names another one."""
    if settings.student in (None, "resnet18"):
        return cifar_resnet18(num_classes)
    return member_model(settings.student, num_classes, images.shape[-1], images.shape[1])


def evaluate_crop_labels(images: torch.Tensor, store, test_x: torch.Tensor, test_y: torch.Tensor,
                         settings: EvalSettings, hard_labels: torch.Tensor | None = None) -> dict:
    """Protocol (b) with FKD crop labels: fresh students replay the stored crops/labels for `settings.epochs`.
    With `hard_labels` the same crops are trained against the class ids instead (CE, CutMix-mixed)."""
    from .crop_labels import train_student_on_crops

    if settings.nets < 1 or settings.epochs < 1:
        raise ConfigError(f"evaluation needs nets >= 1 and epochs >= 1, got nets={settings.nets}, "
                          f"epochs={settings.epochs}")
    accs = []
    for k in range(settings.nets):
        torch.manual_seed(settings.seed + k)
        model = relabel_student(settings, store.num_classes, images).to(images.device)
        train_student_on_crops(model, images, store, settings.epochs, lr=settings.adamw_lr,
                               temperature=settings.temperature, hard_labels=hard_labels)
        accs.append(accuracy(model, test_x, test_y, settings.test_batch))
    return {"protocol": settings.protocol, "student": settings.student or "resnet18", "accs": accs,
            "mean": statistics.fmean(accs), "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "epochs": settings.epochs, "nets": settings.nets, "lr": settings.adamw_lr,
            "image_bytes": images.numel() * 4,
            "label_bytes": store.nbytes() if hard_labels is None else hard_labels.numel(),
            "label_epochs": store.epochs, "soft_labels": hard_labels is None, "crop_labels": True}


def evaluate_synthetic(images: torch.Tensor, labels: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                       settings: EvalSettings | None = None, lr: float | None = None) -> dict:
    """Mean ± std test accuracy of `settings.nets` fresh networks trained on the set; plus storage figures."""
    settings = settings or EvalSettings()
    if settings.nets < 1 or settings.epochs < 1:
        raise ConfigError(f"evaluation needs nets >= 1 and epochs >= 1, got nets={settings.nets}, "
                          f"epochs={settings.epochs}")
    accs = [train_on_synthetic(images, labels, test_x, test_y, settings, seed=settings.seed + k, lr=lr)
            for k in range(settings.nets)]
    label_bytes = labels.numel() * (4 if labels.ndim == 2 else 1)  # fp32 soft labels vs uint8 class ids
    return {"protocol": settings.protocol, "accs": accs, "mean": statistics.fmean(accs),
            "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0, "epochs": settings.epochs,
            "nets": settings.nets, "lr": lr if settings.lr is None else settings.lr,
            "image_bytes": images.numel() * 4, "label_bytes": label_bytes,
            "soft_labels": labels.ndim == 2}


# DD-Ranking's real-data config for CIFAR-10 ConvNet-3 (`ddranking/utils/train_and_eval.py` lines 54-64): SGD
# lr 0.01, momentum 0.9, weight decay 5e-4, 200 epochs, lr x0.1 every 100; no augmentation on real data
# (`ddranking/metrics/hard_label.py` line 273). (Its loop runs the evaluation's `num_epochs` instead, line 266,
# with that step decay every 100 epochs, and keeps the best test accuracy seen; kdkit trains min(200, eval
# epochs) with the protocol's one decay at half and reports the final accuracy, as for every other network.)
FULL_DATA_EPOCHS = 200
FULL_DATA_LR = 0.01
FULL_DATA_VERSION = 1  # bump when the full-data training changes, so cached numbers are not reused


def full_data_epochs(requested: int | None, eval_epochs: int) -> int:
    """`full_epochs` as set, else DD-Ranking's 200 epochs, never more than the evaluation's own epochs (so a
    shortened CPU run also shortens its full-data network)."""
    return int(requested) if requested else max(1, min(FULL_DATA_EPOCHS, int(eval_epochs)))


def evaluate_full_data(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                       settings: EvalSettings, epochs: int) -> dict:
    """Acc(real-hard): one fresh network of the protocol (ConvNet-3, or protocol (b)'s student) trained on every
    image of the training set with hard labels: SGD lr 0.01 (momentum and weight decay as the protocol), batch
    `settings.batch_size`, the protocol's schedule (x0.1 at half the epochs, or cosine), no augmentation, as
    DD-Ranking trains its real-data network (`hard_label.py` lines 246-263, 273); final test accuracy."""
    if epochs < 1:
        raise ConfigError(f"the full-data network needs epochs >= 1, got {epochs}")
    s = replace(settings, epochs=int(epochs), nets=1, lr=FULL_DATA_LR, dsa_strategy="none")
    t0 = time.perf_counter()
    acc = train_on_synthetic(train_x, train_y, test_x, test_y, s, seed=settings.seed)
    n = int(train_x.shape[0])
    return {"protocol": s.protocol, "student": s.student if s.protocol == "resnet18" else None, "accs": [acc],
            "mean": acc, "std": 0.0, "nets": 1, "epochs": s.epochs, "images": n,
            "steps": s.epochs * math.ceil(n / s.batch_size), "batch_size": s.batch_size, "lr": s.lr,
            "momentum": s.momentum, "weight_decay": s.weight_decay, "width": s.width, "augmentation": "none",
            "seconds": time.perf_counter() - t0, "device": str(train_x.device)}


def data_fingerprint(*tensors: torch.Tensor) -> str:
    """A short hash of image/label tensors: shapes, every label, every 1009th value and the float64 sum."""
    h = hashlib.blake2b(digest_size=12)
    for t in tensors:
        t = t.detach()
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        flat = t.reshape(-1)
        part = flat if not t.is_floating_point() else flat[::1009]
        h.update(part.cpu().contiguous().numpy().tobytes())
        if t.is_floating_point():
            h.update(repr(float(flat.sum(dtype=torch.float64))).encode())
    return h.hexdigest()


def full_data_accuracy(dataset: str, train, test, settings: EvalSettings, epochs: int, *, cache_root=None,
                       log=None) -> dict:
    """`evaluate_full_data` on the `ImageSplit`s, cached as JSON under `$KDKIT_CACHE_DIR/condense-full-data/`
    keyed by the data (`data_fingerprint`) and every setting that changes the number, so the runs of a bench that
    share them (every method and IPC) train it once. Adds `cache` (the file) and `cached` (reused or not)."""
    from ..checkpoint import atomic_path
    from ..data.paths import cache_dir

    key = {"version": FULL_DATA_VERSION, "dataset": dataset, "protocol": settings.protocol,
           "student": settings.student if settings.protocol == "resnet18" else None, "width": settings.width,
           "epochs": int(epochs), "lr": FULL_DATA_LR, "batch_size": settings.batch_size,
           "momentum": settings.momentum, "weight_decay": settings.weight_decay, "seed": settings.seed,
           "train": [int(train.images.shape[0]), data_fingerprint(train.images, train.labels)],
           "test": [int(test.images.shape[0]), data_fingerprint(test.images, test.labels)]}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_root or cache_dir() / "condense-full-data") / f"{dataset}-{settings.protocol}-{digest}.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored.get("key") == key:
                return {**stored["result"], "cache": str(path), "cached": True}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # damaged: train again and overwrite it
        if log:
            log(f"{path} does not hold this full-data network's result; training it again")
    if log:
        net = settings.student if settings.protocol == "resnet18" else "convnet"
        log(f"full-data network (DD-Ranking's Acc(real-hard)): {net}, {train.images.shape[0]} training "
            f"images, {epochs} epochs; cached at {path}")
    result = evaluate_full_data(train.images, train.labels, test.images, test.labels, settings, epochs)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"key": key, "settings": asdict(settings), "result": result}, indent=1))
    return {**result, "cache": str(path), "cached": False}
