"""Trajectory matching: MTT (Cazenavette et al. 2022), its constant-memory gradient (TESLA, Cui et al. 2023)
and the DATM refinements (Guo et al. 2024).

One iteration: pick an expert and a start epoch t, put a student at the expert's parameters θ*_t, take N SGD
steps on (DSA-augmented) synthetic batches with the learnable learning rate α, and score

    L = ||θ_N − θ*_{t+M}||² / ||θ*_t − θ*_{t+M}||²,

whose gradient moves the synthetic pixels (and α, and DATM's soft labels).

Two ways to get that gradient, equal up to float error (tested):
- `unrolled`: backprop through the whole unroll (MTT). Activation memory grows with N.
- `constant_memory`: a forward pass keeps only the N flat parameter vectors θ_i; the backward pass walks
  i = N−1..0, recomputes step i's graph alone and carries the adjoint λ (λ_N = ∂L/∂θ_N,
  λ_i = λ_{i+1} − α H_i λ_{i+1}, ∂L/∂X_i = −α ∂(g_i·λ_{i+1})/∂X_i, ∂L/∂α = −Σ g_i·λ_{i+1}). One step's
  activations live at a time, so activation memory does not grow with N (TESLA's point); the N parameter
  vectors (N·P floats, ~100 MB at N = 80 for ConvNet-3) are what remains. Unlike TESLA's published
  first-order form this keeps the Hessian terms, so it is exactly MTT's gradient.

DATM: soft labels initialised from an expert's logits on real images it classifies correctly, learned; the
start-epoch window [min_start, upper) whose upper bound grows from `current_max_start` to `max_start_epoch`
during training; and an EMA of the images, which is the set written at the end.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from .augment import DEFAULT_STRATEGY, dsa
from .convnet_functional import FlatConvNet
from .experts import load_expert
from .image_data import ImageSplit
from .tm_step import StepFunctions

def normalized_param_distance(theta_n: torch.Tensor, target: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """||θ_N − θ*_{t+M}||² / ||θ*_t − θ*_{t+M}||²: 1 for a student that did not move, 0 for a perfect match."""
    return ((theta_n - target) ** 2).sum() / ((start - target) ** 2).sum().clamp_min(1e-12)


@dataclass
class StepPlan:
    """The batches and augmentation seeds of the N student steps, drawn once so a recomputation sees the same."""

    batches: list[torch.Tensor]
    seeds: list[int]


def make_plan(n_images: int, steps: int, batch: int | None, g: torch.Generator) -> StepPlan:
    batch = n_images if not batch else min(batch, n_images)
    batches, perm, pos = [], torch.randperm(n_images, generator=g), 0
    for _ in range(steps):
        if pos + batch > n_images:
            perm, pos = torch.randperm(n_images, generator=g), 0
        batches.append(perm[pos:pos + batch])
        pos += batch
    seeds = [int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g)) for _ in range(steps)]
    return StepPlan(batches, seeds)


def _step_data(images, labels, plan: StepPlan, i: int, dsa_strategy: str):
    """Step i's (augmented) synthetic batch and its labels; differentiable in both."""
    idx = plan.batches[i]
    x = images[idx]
    if dsa_strategy != "none":
        x = dsa(x, dsa_strategy, seed=plan.seeds[i], siamese=False)
    return x, labels[idx]


def unrolled_matching_loss(net: FlatConvNet, start, target, images, labels, lr, plan: StepPlan,
                           dsa_strategy: str = DEFAULT_STRATEGY, fns: StepFunctions | None = None) -> torch.Tensor:
    """MTT's loss with the whole unroll in the autograd graph (memory grows with N)."""
    fns = fns or StepFunctions(net)
    theta = start.clone().requires_grad_(True)
    for i in range(len(plan.batches)):
        x, y = _step_data(images, labels, plan, i, dsa_strategy)
        theta = theta - lr * fns.differentiable_grad(theta, x, y)
    return normalized_param_distance(theta, target, start)


def constant_memory_grads(net: FlatConvNet, start, target, images, labels, lr, plan: StepPlan,
                          dsa_strategy: str = DEFAULT_STRATEGY, fns: StepFunctions | None = None):
    """(loss, dL/dimages, dL/dlabels or None, dL/dlr) by the adjoint recursion; one step's graph at a time."""
    fns = fns or StepFunctions(net)
    steps = len(plan.batches)
    lr_v = float(lr.detach()) if torch.is_tensor(lr) else float(lr)
    x_leaf = images.detach().requires_grad_(True)
    y_soft = labels.is_floating_point()
    y_leaf = labels.detach().requires_grad_(y_soft)
    thetas = [start.detach()]
    theta = start.detach()
    for i in range(steps):  # forward: parameters only, no graph kept
        x, y = _step_data(x_leaf.detach(), y_leaf.detach(), plan, i, dsa_strategy)
        theta = theta - lr_v * fns.grad(theta, x, y)
        thetas.append(theta)
    with torch.no_grad():
        dist = normalized_param_distance(thetas[-1], target, start)
        lam = 2 * (thetas[-1] - target) / ((start - target) ** 2).sum().clamp_min(1e-12)  # dL/dθ_N
    dx = torch.zeros_like(images)
    dy = torch.zeros_like(labels) if y_soft else None
    dlr = torch.zeros((), dtype=start.dtype, device=start.device)
    for i in reversed(range(steps)):  # backward: recompute step i alone, push the adjoint through it
        x, y = _step_data(x_leaf, y_leaf, plan, i, dsa_strategy)  # the (cheap) augmentation keeps its graph
        hv, gx, gy, dot = fns.adjoint(thetas[i], x, y, lam)
        outs, grads = [x], [gx]
        if y_soft and gy is not None:
            outs.append(y)
            grads.append(gy)
        back = torch.autograd.grad(outs, [x_leaf] + ([y_leaf] if y_soft else []), grads, allow_unused=True)
        dlr = dlr - dot
        if back[0] is not None:
            dx -= lr_v * back[0]
        if y_soft and back[1] is not None:
            dy -= lr_v * back[1]
        lam = lam - lr_v * hv
    return dist, dx, dy, dlr


class TrajectoryMatching:
    """MTT / DATM state: synthetic images (+ soft labels), learned lr, optimisers, EMA; `step(it)` is one iteration."""

    def __init__(self, expert_paths: list[Path], net: FlatConvNet, images: torch.Tensor, labels: torch.Tensor, *,
                 syn_steps: int, match_epochs: int, max_start_epoch: int, min_start_epoch: int = 0,
                 current_max_start: int | None = None, expand_until: int = 0, lr_img: float, lr_lr: float,
                 lr_teacher: float, lr_y: float | None = None, batch_syn: int | None = None,
                 dsa_strategy: str = DEFAULT_STRATEGY, constant_memory: bool = False, ema_decay: float | None = None,
                 seed: int = 0, expert_epochs: int, compiled: bool = False):
        self.paths, self.net = list(expert_paths), net
        self.fns = StepFunctions(net, compiled)
        if expert_epochs - match_epochs < 0:
            raise ConfigError(f"experts trained {expert_epochs} epochs cannot be matched {match_epochs} epochs ahead; "
                              "train experts longer (expert_epochs=...) or lower match_epochs")
        self.last_start = expert_epochs - match_epochs  # the last epoch a student can start from
        self.images = images.detach().clone().requires_grad_(True)
        self.labels = labels.detach().clone().requires_grad_(labels.is_floating_point())
        self.lr = torch.tensor(float(lr_teacher), device=self.images.device, requires_grad=True)
        self.opt_img = torch.optim.SGD([self.images], lr=lr_img, momentum=0.5)
        self.opt_lr = torch.optim.SGD([self.lr], lr=lr_lr, momentum=0.5)
        self.opt_y = torch.optim.SGD([self.labels], lr=lr_y, momentum=0.9) if self.labels.requires_grad else None
        self.ema = self.images.detach().clone() if ema_decay else None
        self.ema_decay = ema_decay
        self.syn_steps, self.match_epochs = syn_steps, match_epochs
        self.min_start, self.max_start = min_start_epoch, max_start_epoch
        self.current_max = current_max_start if current_max_start is not None else max_start_epoch
        self.expand_until = expand_until
        self.batch_syn, self.dsa_strategy = batch_syn, dsa_strategy
        self.constant_memory, self.seed = constant_memory, seed
        self._cache: dict[int, torch.Tensor] = {}

    def _trajectory(self, k: int) -> torch.Tensor:
        if k not in self._cache:
            if len(self._cache) >= 8:
                self._cache.pop(next(iter(self._cache)))
            self._cache[k] = load_expert(self.paths[k])
        return self._cache[k]

    def start_window(self, it: int) -> tuple[int, int]:
        """The start epochs drawn at iteration `it`: [low, high), upper bound excluded as in the reference's
        `np.random.randint(min_start, max_start)`; DATM's upper bound grows, MTT's is fixed. Capped so the target
        epoch t + match_epochs exists; a window that would be empty holds `min_start` alone."""
        if self.expand_until and self.current_max < self.max_start:
            frac = min(1.0, it / self.expand_until)
            up = self.current_max + frac * (self.max_start - self.current_max)
        else:
            up = self.max_start
        return self.min_start, max(self.min_start + 1, min(int(up), self.last_start + 1))

    def step(self, it: int) -> dict:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + it * 7919) % (2 ** 31 - 1))
        k = int(torch.randint(0, len(self.paths), (1,), generator=g))
        t = int(torch.randint(*self.start_window(it), (1,), generator=g))
        traj = self._trajectory(k)
        start, target = traj[t].to(self.images.device), traj[t + self.match_epochs].to(self.images.device)
        plan = make_plan(self.images.shape[0], self.syn_steps, self.batch_syn, g)
        if self.constant_memory:
            loss, dx, dy, dlr = constant_memory_grads(self.net, start, target, self.images, self.labels, self.lr, plan,
                                                      self.dsa_strategy, self.fns)
            self.images.grad, self.lr.grad = dx, dlr.reshape(())
            if self.opt_y is not None:
                self.labels.grad = dy
        else:
            for p in (self.images, self.lr, self.labels):
                p.grad = None
            loss = unrolled_matching_loss(self.net, start, target, self.images, self.labels, self.lr, plan,
                                          self.dsa_strategy, self.fns)
            loss.backward()
            loss = loss.detach()
        self.opt_img.step()
        self.opt_lr.step()
        if self.opt_y is not None:
            self.opt_y.step()
        if self.ema is not None:
            self.ema.mul_(self.ema_decay).add_(self.images.detach(), alpha=1 - self.ema_decay)
        return {"loss": float(loss), "lr": float(self.lr.detach()), "start_epoch": t, "expert": k}

    def synthetic(self) -> dict:
        images = self.ema if self.ema is not None else self.images.detach()
        return {"images": images.clone(), "labels": self.labels.detach().clone(), "lr": float(self.lr.detach())}

    def state_dict(self) -> dict:
        state = {"images": self.images.detach().clone(), "labels": self.labels.detach().clone(),
                 "lr": self.lr.detach().clone(), "opt_img": self.opt_img.state_dict(), "opt_lr": self.opt_lr.state_dict()}
        if self.opt_y is not None:
            state["opt_y"] = self.opt_y.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"])
            self.labels.copy_(state["labels"])
            self.lr.copy_(state["lr"])
        self.opt_img.load_state_dict(state["opt_img"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        if self.opt_y is not None:
            self.opt_y.load_state_dict(state["opt_y"])
        if self.ema is not None:
            self.ema.copy_(state["ema"])


@torch.no_grad()
def datm_init(train: ImageSplit, expert_flat: torch.Tensor, net: FlatConvNet, ipc: int, seed: int):
    """DATM's initialisation: per class, `ipc` real images the expert classifies correctly, labelled by its logits."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c, idx in enumerate(train.indices_by_class()):
        idx = idx[torch.randperm(idx.numel(), generator=g).to(idx.device)]
        logits = torch.cat([net(expert_flat, train.images[idx[i:i + 500]]) for i in range(0, idx.numel(), 500)])
        right = logits.argmax(1) == c
        order = torch.cat([torch.nonzero(right).flatten(), torch.nonzero(~right).flatten()])[:ipc]
        xs.append(train.images[idx[order]])
        ys.append(logits[order])
    return torch.cat(xs).clone(), torch.cat(ys).clone()
