"""The CV-DD committee: diverse batch-norm classifiers trained on the real set, each with its prior performance.

CV-DD (Cui et al., 2025) recovers images against several models at once and weighs each model by how well
it did on held-out data (its "prior performance"), so a member is stored together with that accuracy.
The paper's CIFAR committee is ResNet-18/50, ShuffleNetV2, MobileNetV2 and DenseNet-121 trained for hundreds
of GPU epochs; the members here are named as in `networks.member_model` (`convnet3_bn_w32`, `resnet18`, zoo
batch-norm networks) so that a CPU run can use small ones.

Every member needs BatchNorm2d layers: recovery matches their running statistics. A member trains with SGD
(momentum 0.9, weight decay 5e-4, cosine schedule, random crop + flip) on `1 - val_fraction` of the given
training split and is scored on the rest. Members are saved as safetensors under
`$KDKIT_CACHE_DIR/condense-committee/<key>/<name>.safetensors` (metadata: the val accuracy and the settings),
where `key` names the dataset and every training setting, so a second run with the same settings reuses them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..budget import Budget, CostLine
from ..checkpoint import clean_stale, load_model, read_metadata, save_model
from ..errors import CheckpointError, ConfigError
from .image_data import ImageSplit
from .networks import member_model  # noqa: F401  (re-exported: `committee.member_model`)


@dataclass
class Member:
    """One committee member: its name, the trained module (eval mode, frozen) and its val accuracy in [0, 1]."""

    name: str
    model: nn.Module
    prior: float


def parse_members(spec) -> list[str]:
    """`"a,b,c"` or a list -> member names; an empty committee is an error."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else list(spec or [])) if s.strip()]
    if not names:
        raise ConfigError("the CV-DD committee is empty; give members=name1,name2,... "
                          "(e.g. members=convnet3_bn_w32,convnet3_bn_w16)")
    return names


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    from ..data.transforms import random_crop, random_hflip

    return random_hflip(random_crop(x, 4, g), 0.5, g)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    hits = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return hits / max(1, len(x))


def train_member(name: str, train: ImageSplit, *, epochs: int, lr: float = 0.05, batch_size: int = 128,
                 val_fraction: float = 0.1, seed: int = 0, progress: bool = False,
                 log: Callable[[str], None] = print, budget: Budget | None = None) -> Member:
    """Train one member on the split (less a class-balanced val slice) and record its val accuracy. Early on, one
    line says what the member will cost (`kdkit/budget.py`): the paper's ResNets x 200 epochs take days here."""
    g = torch.Generator().manual_seed(seed)
    n = train.images.shape[0]
    perm = torch.randperm(n, generator=g)
    n_val = max(train.num_classes, int(round(n * val_fraction)))
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    x_fit, y_fit = train.images[fit_idx], train.labels[fit_idx]
    torch.manual_seed(seed)
    model = member_model(name, train.num_classes, train.images.shape[-1], train.images.shape[1]).to(train.images.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * ((len(fit_idx) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)
    from tqdm import tqdm

    per_epoch = sum(1 for i in range(0, len(fit_idx), batch_size) if len(fit_idx) - i >= 2)
    cost = CostLine(epochs * per_epoch, log, f"batches of committee member {name} ({epochs} epochs x {per_epoch})",
                    unit="batch", budget=budget)
    for _ in tqdm(range(epochs), desc=f"member {name}", disable=not progress):
        model.train()
        order = torch.randperm(len(fit_idx), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if idx.numel() < 2:  # batch norm needs two samples
                continue
            loss = F.cross_entropy(model(_augment(x_fit[idx], g)), y_fit[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            cost.tick()
    prior = _accuracy(model, train.images[val_idx], train.labels[val_idx])
    return Member(name, freeze(model), prior)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def committee_key(dataset: str, train: ImageSplit, settings: dict) -> str:
    """Folder name for a committee: the dataset, its size and a hash of every training setting."""
    blob = json.dumps({"n": int(train.images.shape[0]), **settings}, sort_keys=True)
    return f"{dataset}-n{train.images.shape[0]}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def committee_dir(dataset: str, train: ImageSplit, settings: dict, root: str | Path | None = None) -> Path:
    from ..data.paths import cache_dir

    base = Path(root) if root else cache_dir() / "condense-committee"
    return base / committee_key(dataset, train, settings)


def save_member(member: Member, path: Path, settings: dict) -> None:
    """The member's weights as safetensors (atomic), its prior and settings in the metadata."""
    save_model(member.model, path, metadata={"prior": repr(member.prior), "name": member.name,
                                             "settings": json.dumps(settings, sort_keys=True)})


def load_member(name: str, path: Path, num_classes: int, im_size: int = 32, in_channels: int = 3,
                device: torch.device | str = "cpu") -> Member:
    """A cached member (safetensors only; a damaged file is named, never half-read)."""
    meta = read_metadata(path)
    if "prior" not in meta:
        raise CheckpointError(f"{path} has no 'prior' metadata; delete it so the member is trained again")
    model = member_model(name, num_classes, im_size, in_channels)
    load_model(model, path)
    return Member(name, freeze(model.to(device)), float(meta["prior"]))


def build_committee(names, train: ImageSplit, *, dataset: str = "cifar10", epochs: int = 10, lr: float = 0.05,
                    batch_size: int = 128, val_fraction: float = 0.1, seed: int = 0, root=None,
                    progress: bool = True, log: Callable[[str], None] = print,
                    budget: Budget | None = None) -> list[Member]:
    """Load the committee from the cache, training (and saving) the members that are missing."""
    names = parse_members(names)
    settings = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "val_fraction": val_fraction, "seed": seed,
                "dataset": dataset}
    folder = committee_dir(dataset, train, settings, root)
    clean_stale(folder)  # what a killed write left behind
    members = []
    for k, name in enumerate(names):
        path = folder / f"{name}.safetensors"
        if path.is_file():
            members.append(load_member(name, path, train.num_classes, train.images.shape[-1], train.images.shape[1],
                                       train.images.device))
            continue
        member = train_member(name, train, epochs=epochs, lr=lr, batch_size=batch_size, val_fraction=val_fraction,
                              seed=seed + 1000 * k, progress=progress, log=log, budget=budget)
        save_member(member, path, settings)
        members.append(member)
    return members


def committee_weights(priors, temperature: float) -> torch.Tensor:
    """CV-DD's voting weights: softmax over members of prior performance (in %) / temperature.

    The reference code uses accuracies in percent (e.g. 63.0, 65.3) with temperature 5 during recovery and 10
    during relabelling, so a few points of accuracy shift the weights noticeably but no member is silenced.
    """
    p = torch.as_tensor([float(x) for x in priors], dtype=torch.float64)
    if p.numel() == 0:
        raise ConfigError("committee weights need at least one member")
    if temperature <= 0:
        raise ConfigError(f"the committee temperature must be > 0, got {temperature}")
    return torch.softmax(p / float(temperature), dim=0).float()
