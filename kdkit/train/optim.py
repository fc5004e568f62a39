"""The optimiser and learning-rate recipes of the KD literature (SGD + step or cosine, optional warm-up)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig, SchedulerConfig


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay, optional Nesterov) or AdamW over the given parameters."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))


def lr_at(epoch: float, total_epochs: float, base_lr: float, cfg: SchedulerConfig) -> float:
    """Learning rate at fractional `epoch` (0-based); stateless, so a resumed run gets exactly the same LRs.

    step: ×gamma at each milestone epoch (CRD/mdistiller: 150, 180, 210 of 240); cosine: from base_lr
    down to min_lr over the run after warm-up; linear: straight down to min_lr after warm-up (with a warm-up, the
    triangular one-cycle of fast CIFAR training, as airbench); constant: base_lr. A linear warm-up over
    `warmup_epochs` scales the result from 0.
    """
    if cfg.name == "step":
        lr = base_lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    elif cfg.name in ("cosine", "linear"):
        t = min(max(epoch - cfg.warmup_epochs, 0.0) / max(total_epochs - cfg.warmup_epochs, 1e-8), 1.0)
        shape = 0.5 * (1.0 + math.cos(math.pi * t)) if cfg.name == "cosine" else 1.0 - t
        lr = cfg.min_lr + (base_lr - cfg.min_lr) * shape
    else:
        lr = base_lr
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        lr *= epoch / cfg.warmup_epochs
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
