"""Distribution matching (DM, Zhao & Bilen, WACV 2023).

Per iteration: a freshly, randomly initialised ConvNet (never trained) embeds a batch of real images of each
class and that class's synthetic images, both under the same DSA transform (one seed per class), and the
synthetic pixels move to bring the class-mean embeddings together:

    L = sum_c || mean_i f(A(x_real_c,i)) - mean_j f(A(x_syn_c,j)) ||^2

SGD on pixels (lr 1, momentum 0.5), synthetic images initialised from random real ones, real batch 256 per
class, 20,000 iterations: the paper's settings, the same for IPC 1/10/50 (`recipes/condense-cifar10-dm.yaml`).

All randomness of iteration `it` (network init, real batch, DSA seeds) is derived from (seed, it), so a run
resumed from a checkpoint continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import torch

from .augment import DEFAULT_STRATEGY, dsa
from .convnet_functional import make_convnet
from .image_data import ImageSplit

def embed(model, x: torch.Tensor) -> torch.Tensor:
    """ConvNet features before the classifier (the `embed` of the DM paper), flattened."""
    for d in range(model.depth):
        x = getattr(model, f"layer{d + 1}")(x)
    return x.flatten(1)


def mean_embedding_loss(real_emb: list[torch.Tensor], syn_emb: list[torch.Tensor]) -> torch.Tensor:
    """Sum over classes of the squared distance between mean embeddings."""
    return sum(((r.mean(0) - s.mean(0)) ** 2).sum() for r, s in zip(real_emb, syn_emb))


def _iter_seed(seed: int, it: int, salt: int = 0) -> int:
    return (int(seed) * 1_000_003 + int(it) * 7919 + salt * 104729) % (2 ** 31 - 1)


class DistributionMatching:
    """DM state: synthetic images (a leaf tensor) and their optimizer; `step(it)` does one iteration."""

    def __init__(self, train: ImageSplit, images: torch.Tensor, labels: torch.Tensor, *, lr_img: float = 1.0,
                 momentum: float = 0.5, batch_real: int = 256, width: int = 128, dsa_strategy: str = DEFAULT_STRATEGY,
                 seed: int = 0):
        self.train = train
        self.by_class = train.indices_by_class()
        self.images = images.detach().clone().requires_grad_(True)
        self.labels = labels
        self.opt = torch.optim.SGD([self.images], lr=lr_img, momentum=momentum)
        self.batch_real, self.width, self.dsa_strategy, self.seed = batch_real, width, dsa_strategy, seed
        self.ipc = int((labels == 0).sum())

    def loss(self, it: int) -> torch.Tensor:
        torch.manual_seed(_iter_seed(self.seed, it, 1))
        net = make_convnet(self.train.num_classes, width=self.width, im_size=self.images.shape[-1],
                           in_channels=self.images.shape[1]).to(self.images.device)
        for p in net.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(_iter_seed(self.seed, it, 2))
        real_emb, syn_emb = [], []
        for c, idx in enumerate(self.by_class):
            pick = idx[torch.randperm(idx.numel(), generator=g).to(idx.device)[: self.batch_real]]
            real = self.train.images[pick].to(self.images.device)
            syn = self.images[self.labels == c]
            s = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g).item())
            if self.dsa_strategy != "none":
                real, syn = dsa(real, self.dsa_strategy, seed=s), dsa(syn, self.dsa_strategy, seed=s)
            with torch.no_grad():
                real_emb.append(embed(net, real))
            syn_emb.append(embed(net, syn))
        return mean_embedding_loss(real_emb, syn_emb)

    def step(self, it: int) -> dict:
        loss = self.loss(it)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": float(loss.detach()) / self.train.num_classes}

    def synthetic(self) -> dict:
        return {"images": self.images.detach().clone(), "labels": self.labels.clone()}

    def state_dict(self) -> dict:
        return {"images": self.images.detach().clone(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"])
        self.opt.load_state_dict(state["opt"])
