"""Expert trajectories for trajectory matching: ConvNet-3s trained on the real set, a snapshot per epoch.

MTT's buffer: SGD lr 0.01, no momentum, no weight decay, batch 256, DSA on, 50 epochs, 100 experts at paper
scale. Each expert is one safetensors file `expert_<k>.safetensors` holding `trajectory` [epochs + 1, P]: the
flat parameters (order of `named_parameters()`) at the start and after every epoch, fp16 by default (half the
bytes; matching works in fp32 after loading), written atomically. Experts already on disk are kept, so training
them resumes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..budget import Budget, CostLine
from ..checkpoint import clean_stale, read_safetensors, save_tensors
from ..errors import CheckpointError
from .augment import DEFAULT_STRATEGY, dsa
from .convnet_functional import FlatConvNet, make_convnet
from .image_data import ImageSplit


def expert_path(folder: Path, k: int) -> Path:
    return Path(folder) / f"expert_{k}.safetensors"


BATCH_SIZE = 256  # buffer.py's batch_train


class ExpertTrainer:
    """One expert's network, optimiser and data order; `epoch()` is one pass over the set (`buffer.py`'s
    `epoch("train", ...)`: SGD, DSA on every batch, a fresh permutation per epoch). `compiled`: the network's
    forward and backward through `torch.compile` (1.6x on a 2-core CPU at width 128; same math)."""

    def __init__(self, train: ImageSplit, *, lr: float = 0.01, batch_size: int = BATCH_SIZE, width: int = 128,
                 dsa_strategy: str = DEFAULT_STRATEGY, seed: int = 0, compiled: bool = False):
        torch.manual_seed(seed)
        self.train, self.batch_size, self.dsa_strategy = train, batch_size, dsa_strategy
        self.model = make_convnet(train.num_classes, width=width, im_size=train.images.shape[-1],
                                  in_channels=train.images.shape[1]).to(train.images.device)
        self.flat = FlatConvNet(self.model)
        self.forward = torch.compile(self.model, dynamic=False) if compiled else self.model
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
        self.g = torch.Generator().manual_seed(seed)

    def epoch(self, on_batch: Callable[[], None] = lambda: None) -> None:
        images, labels, n = self.train.images, self.train.labels, self.train.images.shape[0]
        perm = torch.randperm(n, generator=self.g)
        for i in range(0, n, self.batch_size):
            idx = perm[i:i + self.batch_size]
            x = images[idx]
            if self.dsa_strategy != "none":
                x = dsa(x, self.dsa_strategy, seed=int(torch.randint(0, 2 ** 31 - 1, (1,), generator=self.g)),
                        siamese=False)
            loss = F.cross_entropy(self.forward(x), labels[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            on_batch()


def train_expert(train: ImageSplit, epochs: int, *, lr: float = 0.01, batch_size: int = BATCH_SIZE, width: int = 128,
                 dsa_strategy: str = DEFAULT_STRATEGY, seed: int = 0, compiled: bool = False,
                 on_batch: Callable[[], None] = lambda: None) -> torch.Tensor:
    """One expert: [epochs + 1, P] flat parameter snapshots (fp32)."""
    trainer = ExpertTrainer(train, lr=lr, batch_size=batch_size, width=width, dsa_strategy=dsa_strategy, seed=seed,
                            compiled=compiled)
    snaps = [trainer.flat.flatten()]
    for _ in range(epochs):
        trainer.epoch(on_batch)
        snaps.append(trainer.flat.flatten())
    return torch.stack(snaps).cpu()


def train_experts(train: ImageSplit, folder: Path, count: int, epochs: int, *, lr: float = 0.01, width: int = 128,
                  dsa_strategy: str = DEFAULT_STRATEGY, seed: int = 0, fp16: bool = True,
                  progress: bool = True, compiled: bool = False, budget: Budget | None = None,
                  log: Callable[[str], None] = print) -> list[Path]:
    """Train the missing experts of `folder` (expert k uses seed + k); returns all `count` paths. Early on, one
    line says what the missing experts will cost (`kdkit/budget.py`): the paper's 100 x 50 epochs take days here."""
    from tqdm import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale(folder)  # what a killed write left behind
    paths = [expert_path(folder, k) for k in range(count)]
    missing, per_epoch = sum(not p.is_file() for p in paths), -(-train.images.shape[0] // BATCH_SIZE)
    cost = CostLine(missing * epochs * per_epoch, log, f"expert batches ({missing} expert(s) x {epochs} epochs x "
                    f"{per_epoch})", unit="batch", budget=budget)

    for k in tqdm(range(count), desc="experts", disable=not progress):
        if paths[k].is_file():
            continue
        traj = train_expert(train, epochs, lr=lr, width=width, dsa_strategy=dsa_strategy, seed=seed + k,
                            compiled=compiled, on_batch=cost.tick)
        save_tensors(paths[k], {"trajectory": traj.half() if fp16 else traj},
                     metadata={"epochs": epochs, "lr": lr, "width": width})
    return paths


def load_expert(path: Path) -> torch.Tensor:
    """An expert's [epochs + 1, P] snapshots in fp32 (safetensors only; a damaged file is named)."""
    tensors, _ = read_safetensors(path)
    if "trajectory" not in tensors:
        raise CheckpointError(f"{path} is not an expert trajectory (no 'trajectory' tensor); delete it so the "
                              "expert is trained again")
    return tensors["trajectory"].float()
