"""CV-DD (Cui et al., 2025, "Dataset Distillation via Committee Voting"): recover images against a committee, relabel.

Recovery. Synthetic images start from real patches (RDED-style: random crops of real images of the class,
scored by the best member's confidence, the chosen difficulty band kept, `factor x factor` of them stitched into
one image). Images are optimised one batch at a time; a batch holds image `k` of every class, and batch `k` is
optimised against a subset of `voters` members (the k-th of all `voters`-sized combinations of the committee,
in order, as the reference's IPC-10 schedule over its five models). Each step the batch is augmented (one
random-resized crop + flip for the whole batch, then a random roll of up to `jitter` pixels) and the loss is

    sum_i  w_i * ( CE(f_i(x), y) + r_bn * sum_l  m_l * ( ||mu_l(x) - mu_l^run||_2 + ||var_l(x) - var_l^run||_2 ) )

with w = softmax(prior% / T_recover) over the chosen voters (the committee vote), m_1 = `first_bn_multiplier`
and m_l = 1 after: per-layer mean/var of the synthetic batch against each member's BatchNorm running stats.
Adam (betas 0.5, 0.9), cosine lr, pixels clipped to the valid range after each step.

Relabelling ("batch-specific soft labels"). The committee's soft label of a crop is sum_i w_i f_i(x) with
w = softmax(prior% / T_relabel) over all members, where every member runs with its BatchNorm layers in
train mode: normalised with the statistics of the synthetic batch itself (in sub-batches of `bn_batch`), not
with the running statistics of the real data. Running statistics are left untouched. Labels are stored per
student epoch and crop (see `crop_labels.py`).

Paper/reference defaults (CIFAR-10; `recipes/condense-cifar10-cvdd.yaml`): 4,000 iterations per batch, Adam
lr 0.25, r_bn 0.01, first-layer BN multiplier 10, jitter 4, 2 voters, T_recover 5, T_relabel 10; crops scale
0.08-1, CutMix, batch 16 split in two for batch norm, fp16 labels, 300 student epochs with AdamW lr 1e-3, wd
0.01, cosine, KL at T = 20.
"""
from __future__ import annotations

import itertools
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .committee import Member, committee_weights
from .crop_labels import apply_crops, sample_crop_boxes
from .image_data import ImageSplit

DIFFICULTIES = ("easy", "medium", "hard")


# --- batch-norm statistics -----------------------------------------------------------------------------------

class BNStatHooks:
    """Forward hooks on every BatchNorm2d of `model` that record ||mu(x) - mu_run|| + ||var(x) - var_run|| per layer.

    mu and var are the per-channel mean and biased variance of the layer's input over (batch, H, W): what batch
    norm would normalise with in train mode. The norms are plain L2 norms, as in SRe2L and the CV-DD code.
    """

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self.losses: list[torch.Tensor] = [torch.zeros(())] * len(self.layers)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int):
        def fn(module, inputs, output):
            x = inputs[0]
            mean = x.mean(dim=(0, 2, 3))
            var = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).var(dim=1, unbiased=False)
            self.losses[i] = torch.linalg.vector_norm(var - module.running_var) + \
                torch.linalg.vector_norm(mean - module.running_mean)
        return fn

    def total(self, first_multiplier: float = 1.0) -> torch.Tensor:
        return sum(l * (first_multiplier if i == 0 else 1.0) for i, l in enumerate(self.losses))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def bn_statistic_loss(model: nn.Module, x: torch.Tensor,
                      first_multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, BN-statistic loss) of one forward pass of `x` through `model` (whatever its train/eval mode)."""
    hooks = BNStatHooks(model)
    try:
        logits = model(x)
        return logits, hooks.total(first_multiplier)
    finally:
        hooks.remove()


@contextmanager
def batch_statistics(model: nn.Module):
    """BatchNorm layers normalise with the current batch's statistics (train mode) without updating the running
    statistics (momentum 0); everything else stays in eval mode. Restores the model afterwards."""
    saved = [(m, m.training, getattr(m, "momentum", None)) for m in model.modules()]
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.momentum = 0.0
    try:
        yield model
    finally:
        for m, training, momentum in saved:
            m.train(training)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = momentum


@torch.no_grad()
def committee_soft_labels(members: list[Member], x: torch.Tensor, temperature: float = 10.0, bn_batch: int | None = 8,
                          batch_specific: bool = True) -> torch.Tensor:
    """sum_i w_i f_i(x), w = softmax(prior% / temperature); BN on the batch's own statistics (per `bn_batch`
    sub-batch) when `batch_specific`, else on the running statistics (plain eval mode)."""
    w = committee_weights([100 * m.prior for m in members], temperature).to(x.device)
    chunks = [x] if not bn_batch or x.shape[0] <= bn_batch else list(x.split(bn_batch))
    out = []
    for chunk in chunks:
        total = 0.0
        for wi, m in zip(w, members):
            if batch_specific and chunk.shape[0] > 1:
                with batch_statistics(m.model):
                    total = total + wi * m.model(chunk)
            else:
                m.model.eval()
                total = total + wi * m.model(chunk)
        out.append(total)
    return torch.cat(out)


# --- patch initialisation ------------------------------------------------------------------------------------

@torch.no_grad()
def patch_init(train: ImageSplit, observer: nn.Module, ipc: int, *, factor: int = 2, difficulty: str = "medium",
               candidates: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """RDED-style initial images: per class, `candidates` random crops (scale 0.5-1) of distinct real images,
    scored by the observer's probability of the class; `ipc * factor^2` of them taken from the `difficulty`
    band (easy: most confident, medium: around the median, hard: least confident), each `factor x factor`
    stitched into one image (patches resized to side/factor). Returns images (class-major) and labels."""
    if difficulty not in DIFFICULTIES:
        raise ConfigError(f"patch_difficulty must be one of {', '.join(DIFFICULTIES)}, got '{difficulty}'")
    if factor < 1 or train.images.shape[-1] % factor:
        raise ConfigError(f"patch_factor must be >= 1 and divide the image side {train.images.shape[-1]}, got {factor}")
    g = torch.Generator().manual_seed(int(seed))
    side = train.images.shape[-1]
    need = ipc * factor * factor
    xs, ys = [], []
    observer.eval()
    for c, idx in enumerate(train.indices_by_class()):
        if idx.numel() == 0:
            raise ConfigError(f"class {c} has no training images to take patches from")
        k = max(need, min(candidates, idx.numel()))
        pick = idx[torch.randperm(idx.numel(), generator=g)[:k].to(idx.device)] if k <= idx.numel() else \
            idx[torch.randint(0, idx.numel(), (k,), generator=g).to(idx.device)]
        boxes = sample_crop_boxes(k, g, scale=(0.5, 1.0), side=side)
        crops = apply_crops(train.images[pick], boxes, None, side)
        conf = torch.cat([F.softmax(observer(crops[i:i + 256]), 1)[:, c] for i in range(0, k, 256)])
        ranked = torch.argsort(conf, descending=True)
        if difficulty == "easy":
            chosen = ranked[:need]
        elif difficulty == "hard":
            chosen = ranked[-need:]
        else:
            start = max(0, (k - need) // 2)
            chosen = ranked[start:start + need]
        chosen = chosen[torch.randperm(need, generator=g).to(chosen.device)]
        patches = crops[chosen]
        if factor > 1:
            patches = F.interpolate(patches, size=(side // factor, side // factor), mode="bilinear",
                                    align_corners=False, antialias=True)
            patches = patches.view(ipc, factor, factor, patches.shape[1], side // factor, side // factor)
            patches = patches.permute(0, 3, 1, 4, 2, 5).reshape(ipc, patches.shape[3], side, side)
        xs.append(patches)
        ys.append(torch.full((ipc,), c, dtype=torch.long, device=train.labels.device))
    return torch.cat(xs).contiguous(), torch.cat(ys)


# --- recovery ------------------------------------------------------------------------------------------------

def voter_schedule(num_members: int, voters: int, ipc: int) -> list[tuple[int, ...]]:
    """Which members recover batch k: the k-th (cyclically) of all `voters`-sized combinations, in order."""
    if num_members < 1:
        raise ConfigError("the CV-DD committee is empty; give at least one member")
    v = max(1, min(voters, num_members))
    combos = list(itertools.combinations(range(num_members), v))
    return [combos[k % len(combos)] for k in range(ipc)]


def pixel_bounds(split: ImageSplit, device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(split.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(split.std, device=device).view(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


class CommitteeVoting:
    """CV-DD recovery as a resumable iteration: global step `it` optimises batch `it // iterations`."""

    def __init__(self, members: list[Member], x0: torch.Tensor, y0: torch.Tensor, ipc: int, *, iterations: int,
                 lr: float, r_bn: float, first_bn_multiplier: float, jitter: int, voters: int,
                 temperature: float, bounds: tuple[torch.Tensor, torch.Tensor], min_scale: float = 0.08,
                 seed: int = 0):
        if not members:
            raise ConfigError("the CV-DD committee is empty; give at least one member")
        self.members, self.ipc, self.iterations = members, ipc, max(1, iterations)
        self.images, self.labels = x0.detach().clone(), y0.clone()
        self.num_classes = int(y0.max()) + 1
        self.lr, self.r_bn, self.first_mult, self.jitter = lr, r_bn, first_bn_multiplier, jitter
        self.temperature, self.bounds, self.min_scale, self.seed = temperature, bounds, min_scale, seed
        self.schedule = voter_schedule(len(members), voters, ipc)
        self.batch_k: int | None = None
        self.param: torch.Tensor | None = None
        self.opt: torch.optim.Optimizer | None = None

    @property
    def total_iterations(self) -> int:
        return self.ipc * self.iterations

    def batch_index(self, k: int) -> torch.Tensor:
        """Positions of batch k (image k of every class) in the class-major synthetic set."""
        return torch.arange(self.num_classes, device=self.images.device) * self.ipc + k

    def _open_batch(self, k: int) -> None:
        if self.param is not None:
            self.images[self.batch_index(self.batch_k)] = self.param.detach()
        self.batch_k = k
        self.param = self.images[self.batch_index(k)].clone().requires_grad_(True)
        self.opt = torch.optim.Adam([self.param], lr=self.lr, betas=(0.5, 0.9), eps=1e-8)

    def weights(self, k: int) -> torch.Tensor:
        return committee_weights([100 * self.members[i].prior for i in self.schedule[k]], self.temperature)

    def step(self, it: int) -> dict:
        k, t = divmod(it, self.iterations)
        if self.batch_k != k:
            self._open_batch(k)
        for group in self.opt.param_groups:  # cosine from lr to 0 over the batch's iterations
            group["lr"] = 0.5 * (1 + math.cos(math.pi * t / self.iterations)) * self.lr
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + it)
        x = self.param
        n, side = x.shape[0], x.shape[-1]
        box = sample_crop_boxes(1, g, scale=(self.min_scale, 1.0), side=side).expand(n, 4)
        flip = (torch.rand(1, generator=g) < 0.5).expand(n)
        x = apply_crops(x, box, flip, side)
        dy, dx = (int(torch.randint(0, self.jitter + 1, (1,), generator=g)) for _ in range(2))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        target = self.labels[self.batch_index(k)]
        loss, ce_total, bn_total = 0.0, 0.0, 0.0
        for w, i in zip(self.weights(k).to(x.device), self.schedule[k]):
            logits, bn = bn_statistic_loss(self.members[i].model, x, self.first_mult)
            ce = F.cross_entropy(logits, target)
            loss = loss + w * (ce + self.r_bn * bn)
            ce_total, bn_total = ce_total + ce.item(), bn_total + bn.item()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.param.data = torch.maximum(torch.minimum(self.param.data, self.bounds[1]), self.bounds[0])
        return {"loss": loss.item(), "ce": ce_total / len(self.schedule[k]), "bn": bn_total / len(self.schedule[k]),
                "batch": k}

    def synthetic(self) -> dict:
        images = self.images.clone()
        if self.param is not None:
            images[self.batch_index(self.batch_k)] = self.param.detach()
        return {"images": images, "labels": self.labels.clone(), "lr": None}

    def state_dict(self) -> dict:
        return {"images": self.synthetic()["images"].cpu(), "batch_k": self.batch_k, "iterations": self.iterations,
                "opt": self.opt.state_dict() if self.opt is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("iterations", self.iterations) != self.iterations:
            raise ConfigError(f"the checkpoint recovered {state['iterations']} iterations per batch, this run asks "
                              f"for {self.iterations}; keep iterations={state['iterations']} to resume, or start "
                              "over (resume=false)")
        self.images = state["images"].to(self.images.device)
        self.param, self.batch_k, self.opt = None, None, None
        if state.get("batch_k") is not None:
            self._open_batch(int(state["batch_k"]))
            if state.get("opt") is not None:
                self.opt.load_state_dict(state["opt"])


def relabel(method: CommitteeVoting, images: torch.Tensor, epochs: int, seed: int = 0, progress: bool = False):
    """FKD crop labels of `images` from the method's whole committee (batch-specific BN statistics)."""
    from .crop_labels import make_crop_labels

    s = method.settings
    members = method.members

    def teacher(x: torch.Tensor) -> torch.Tensor:
        return committee_soft_labels(members, x, float(s["relabel_temperature"]), int(s["bn_batch"]))

    return make_crop_labels(images, teacher, epochs, batch_size=int(s["label_batch"]), seed=seed,
                            cutmix=bool(s["cutmix"]), min_scale=float(s["min_scale"]), fp16=True,
                            topk=s["label_topk"], progress=progress)
