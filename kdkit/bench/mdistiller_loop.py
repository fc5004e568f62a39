"""mdistiller's own KD training step, timed beside kdkit's `Distiller` (`kdkit bench throughput variants=mdistiller`).

Why: kdkit's goal is to train faster than the code people run, and megvii-research/mdistiller is that code. So this
runs mdistiller itself, imported at run time from a git-ignored copy in `.refs/mdistiller` (or
`$KDKIT_REFS_DIR/mdistiller`; see `scripts/fetch-refs.sh`), never copied into kdkit: its `CFG` merged with its
`configs/cifar100/kd.yaml` (or `vanilla.yaml` for the student alone: T=4, 0.1 CE + 0.9 KD, SGD lr 0.05, momentum 0.9,
wd 5e-4), its `KD`/`Vanilla` distiller inside `nn.DataParallel` as in its `tools/train.py`, `BaseTrainer.init_optimizer`,
and `BaseTrainer.train_iter` for every step (zero_grad, forward_train, the sum of the losses, backward, step and the
AverageMeter/top-k bookkeeping). Data goes through its `CIFAR100Instance` class, holding kdkit's CIFAR-10 arrays in
memory, with its train transform (RandomCrop(32, 4) + flip + ToTensor + Normalize; CIFAR-100's mean/std, which cost
the same) and a shuffling DataLoader with `CFG.DATASET.NUM_WORKERS` workers (2) like its own. Models are kdkit's zoo.

Patched at run time, never in their files:
- kdkit's models return logits; mdistiller's distillers unpack `(logits, feats)`: each model is wrapped to return
  `(logits, {})` (KD reads no features);
- `BaseTrainer.__init__` only adds log folders, a tensorboardX writer and wandb: the trainer is made with
  `object.__new__` and given its cfg, distiller and optimizer;
- `train_iter` moves the batch with `.cuda(non_blocking=True)`: without CUDA, `torch.Tensor.cuda` returns the tensor
  itself while the steps run (restored after);
- `tensorboardX`, which `engine/trainer.py` imports only for that writer, is a stub module when not installed.
`yacs` (their config system) must be installed; without it or the code, the variant is skipped with one line.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
import types
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from .results import REPO

FETCH = "bash scripts/fetch-refs.sh mdistiller"


def refs_dir() -> Path:
    return Path(os.environ.get("KDKIT_REFS_DIR") or REPO / ".refs") / "mdistiller"


def missing() -> str | None:
    """Why the variant cannot run here (one line), or None."""
    if not (refs_dir() / "mdistiller" / "distillers" / "KD.py").is_file():
        return f"skipped: no mdistiller code in {refs_dir()} (fetch it: {FETCH})"
    if importlib.util.find_spec("yacs") is None:
        return f"skipped: mdistiller's config needs yacs (pip install yacs, or {FETCH})"
    return None


class _LogitsAndFeats(nn.Module):
    """A kdkit zoo model as mdistiller's distillers call it: `(logits, feats)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x), {}


@contextmanager
def _cuda_is_a_no_op():
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


def _import_mdistiller():
    root = str(refs_dir())
    if root not in sys.path:
        sys.path.append(root)  # last, so its top-level `tools`, `configs`, `setup.py` shadow nothing
    if "tensorboardX" not in sys.modules and importlib.util.find_spec("tensorboardX") is None:
        sys.modules["tensorboardX"] = stub = types.ModuleType("tensorboardX")
        stub.SummaryWriter = None
    from mdistiller.dataset.cifar100 import CIFAR100Instance, get_cifar100_train_transform
    from mdistiller.distillers import KD, Vanilla
    from mdistiller.engine.cfg import CFG
    from mdistiller.engine.trainer import BaseTrainer
    from mdistiller.engine.utils import AverageMeter

    return CFG, KD, Vanilla, BaseTrainer, AverageMeter, CIFAR100Instance, get_cifar100_train_transform


def measure_mdistiller(teacher: str | None, student: str, batch: int, steps: int, warmup: int,
                       losses: list[float] | None = None) -> float:
    """Images/s of mdistiller's `train_iter` over `steps` steps after `warmup` (KD if `teacher`, else `Vanilla`);
    each step's summed loss is appended to `losses` when given."""
    from ..data import load_dataset_by_name
    from ..models import build_model

    CFG, KD, Vanilla, BaseTrainer, AverageMeter, CIFAR100Instance, train_transform = _import_mdistiller()
    cfg = CFG.clone()
    cfg.merge_from_file(str(refs_dir() / "configs" / "cifar100" / ("kd.yaml" if teacher else "vanilla.yaml")))
    cfg.merge_from_list(["SOLVER.BATCH_SIZE", batch])
    cuda = torch.cuda.is_available()
    torch.backends.cudnn.benchmark = True  # as tools/train.py

    train = load_dataset_by_name("cifar10", "train")
    n = (steps + warmup) * batch
    data = CIFAR100Instance.__new__(CIFAR100Instance)  # its dataset class, without its file loading
    data.data = train.images[:n].permute(0, 2, 3, 1).contiguous().numpy()
    data.targets, data.transform, data.target_transform = train.labels[:n].tolist(), train_transform(), None
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.SOLVER.BATCH_SIZE, shuffle=True,
                                         num_workers=min(cfg.DATASET.NUM_WORKERS, 2))

    torch.manual_seed(0)
    net = _LogitsAndFeats(build_model(student))
    distiller = KD(net, _LogitsAndFeats(build_model(teacher)), cfg) if teacher else Vanilla(net)
    distiller = nn.DataParallel(distiller.cuda() if cuda else distiller)
    trainer = BaseTrainer.__new__(BaseTrainer)
    trainer.cfg, trainer.distiller = cfg, distiller
    trainer.optimizer = trainer.init_optimizer(cfg)
    meters = {k: AverageMeter() for k in ("training_time", "data_time", "losses", "top1", "top5")}
    stamps = []
    distiller.train()
    with nullcontext() if cuda else _cuda_is_a_no_op():
        for data_batch in loader:
            trainer.train_iter(data_batch, 1, meters)
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            if losses is not None:
                losses.append(float(meters["losses"].val))
    timed = stamps[warmup - 1:]
    return (len(timed) - 1) * batch / (timed[-1] - timed[0])

