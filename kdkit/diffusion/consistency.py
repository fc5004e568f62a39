"""Consistency distillation (Song et al. 2023): a student f(x, sigma) that maps any point of a teacher's ODE
trajectory to its end, learned by making f agree on two adjacent points of one trajectory.

Per step: real `x`, a random grid index n, `x_{n+1} = x + sigma_{n+1} z`, one teacher Heun step back to
`sigma_n` gives `x_n`, and the loss is `d(f_theta(x_{n+1}, sigma_{n+1}), f_target(x_n, sigma_n))` with the
target network an EMA of the student (mu = 0.95 as in the paper's CIFAR-10 CD) and `d` the pseudo-Huber
metric `sqrt(|a-b|^2 + c^2) - c`, c = 0.00054 sqrt(dim) (Song & Dhariwal 2023), no LPIPS network needed.

On images the student starts as a copy of the teacher. Beside a teacher with no weights (the analytic 2-D mixture)
it starts from scratch, and the one-step map then takes far longer to form than a run lasts; `warmup_steps` fits f
first by regression onto teacher ODE trajectories (each point of a trajectory, at its grid sigma, to the
trajectory's end: what a consistency function is, with the ODE solved more finely than CD's one Heun step per
interval), and `regression_weight` keeps that term during CD.
"""
from __future__ import annotations

import json
from typing import Annotated

import torch

from ..config import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Range
from ..method import register_method
from .edm import Denoiser, as_sigma, pseudo_huber
from .engine import (EMA, Betas, Decay, DistillMethod, MethodContext, Schedule, generator_sigmas, make_adam,
                     regression_warm_start, teacher_pairs)
from .samplers import Generator, heun_trajectory
from .teachers import save_weights


class ConsistencyFunction(Denoiser):
    """`f(x, sigma) = a x + (1 - a) D(x, sigma)` with `a = sigma_d^2 / ((sigma - eps)^2 + sigma_d^2)`: exactly the
    identity at sigma = eps (the boundary condition) and the denoiser D (a copy of the teacher) elsewhere."""

    def __init__(self, net: Denoiser, eps: float):
        super().__init__()
        self.net, self.eps = net, float(eps)
        self.sigma_data, self.num_classes, self.sample_shape = net.sigma_data, net.num_classes, net.sample_shape
        self.feature_dim = getattr(net, "feature_dim", 0)

    def forward(self, x, sigma, labels=None, return_features=False):
        s = as_sigma(sigma, x)
        d2 = self.sigma_data ** 2
        a = d2 / ((s - self.eps) ** 2 + d2)
        out = self.net(x, sigma, labels, return_features=return_features)
        x0, feats = out if return_features else (out, None)
        y = a * x + (1 - a) * x0
        return (y, feats) if return_features else y


class ConsistencyDistillation(DistillMethod):
    needs_real = True

    def __init__(self, teacher: Denoiser, student_net: Denoiser, sched: Schedule, *, grid: int = 18,
                 target_decay: float = 0.95, lr: float = 4e-4, betas=(0.9, 0.999), huber_c: float | None = None,
                 ema_decay: float | None = 0.9999, sample_sigmas: list[float] | None = None, batch_size: int = 64,
                 capturable: bool = False, warmup_steps: int = 0, warmup_pairs: int = 20000,
                 warmup_substeps: int = 4, warmup_lr: float = 1e-3, regression_weight: float = 0.0):
        f = ConsistencyFunction(student_net, sched.sigma_min)
        super().__init__(teacher, Generator(f, sample_sigmas or [sched.sigma_max]), sched, ema_decay)
        self.target = EMA(f, target_decay)
        # the teacher's own discretisation (EDM's Karras ramp; a flow teacher's shifted uniform times), ascending
        self.register_buffer("grid_sigmas", sched.sigmas(grid).flip(0))
        self.huber_c, self.batch_size = huber_c, batch_size
        self.warmup = (warmup_steps, warmup_pairs, warmup_substeps)
        self.warmup_lr, self.regression_weight = warmup_lr, regression_weight
        self.register_buffer("traj", torch.empty(0), persistent=False)  # [pairs, grid - 1, ...]: sigma_max first
        self.register_buffer("traj_end", torch.empty(0), persistent=False)  # [pairs, ...] at sigma_min
        self.register_buffer("traj_y", torch.empty(0, dtype=torch.long), persistent=False)
        self.opt = make_adam(self.generator.parameters(), lr, betas, 0.0, capturable)

    def optimizers(self):
        return {"opt_generator": self.opt}

    def prepare(self, run, resuming: bool) -> None:
        """The optional warm start (module docstring): `warmup_pairs` teacher ODE trajectories from fixed noise,
        observed at the grid sigmas (`warmup_substeps` Heun steps between neighbours), then `warmup_steps` steps of
        regression (own Adam, `warmup_lr`), after which the target and sampling EMAs start from the result. The
        trajectories are remade on resume (deterministic); the warm-up training is not (the checkpoint holds it)."""
        steps, pairs, substeps = self.warmup
        if not (steps or self.regression_weight):
            return
        desc = self.grid_sigmas.flip(0)
        traj, self.traj_y = teacher_pairs(self, pairs, self.grid_sigmas.device, lambda z, y: (
            heun_trajectory(self.teacher, z, desc, substeps, y, self.sched.rho).transpose(0, 1),))
        self.traj, self.traj_end = traj[:, :-1].contiguous(), traj[:, -1].contiguous()
        if resuming or not steps:
            return
        regression_warm_start(run, self.generator.parameters(), self.regression, steps, self.warmup_lr,
                              f"{pairs} teacher ODE trajectories")
        for ema in (self.target, self.ema):
            if ema is not None:
                ema.module.load_state_dict(self.generator.net.state_dict() if ema is self.target
                                           else self.generator.state_dict())

    def regression(self) -> torch.Tensor:
        """f at a random grid point of a stored teacher trajectory against the trajectory's end."""
        b, levels = self.batch_size, self.traj.shape[1]
        idx = torch.randint(0, self.traj.shape[0], (b,), device=self.traj.device)
        lvl = torch.randint(0, levels, (b,), device=self.traj.device)
        sigma = self.grid_sigmas.flip(0)[lvl]
        labels = self.traj_y[idx] if self.num_classes else None
        return pseudo_huber(self.generator.net(self.traj[idx, lvl], sigma, labels), self.traj_end[idx],
                            self.huber_c).mean()

    def loss(self, x: torch.Tensor, labels: torch.Tensor | None):
        f = self.generator.net
        n = torch.randint(0, self.grid_sigmas.numel() - 1, (x.shape[0],), device=x.device)
        s_lo, s_hi = self.grid_sigmas[n], self.grid_sigmas[n + 1]  # ascending grid: sigma_n < sigma_{n+1}
        shape = (-1,) + (1,) * (x.ndim - 1)
        x_hi = x + s_hi.reshape(shape) * torch.randn_like(x)
        with torch.no_grad():  # one Heun step of the teacher's probability-flow ODE, sigma_{n+1} -> sigma_n
            d1 = (x_hi - self.teacher(x_hi, s_hi, labels)) / s_hi.reshape(shape)
            x_eul = x_hi + (s_lo - s_hi).reshape(shape) * d1
            d2 = (x_eul - self.teacher(x_eul, s_lo, labels)) / s_lo.reshape(shape)
            x_lo = x_hi + (s_lo - s_hi).reshape(shape) * 0.5 * (d1 + d2)
            target = self.target.module(x_lo, s_lo, labels)
        pred = f(x_hi, s_hi, labels)
        loss = pseudo_huber(pred, target, self.huber_c).mean()
        return loss, {"consistency": loss.detach()}

    def train_step(self, batch):
        real = batch["real"][0]
        labels = batch["labels"][0] if self.num_classes and batch.get("labels") is not None else None
        loss, logs = self.loss(real, labels)
        if self.regression_weight:
            reg = self.regression()
            logs = {**logs, "regression": reg.detach()}
            loss = loss + self.regression_weight * reg
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.target.update(self.generator.net)
        if self.ema is not None:
            self.ema.update(self.generator)
        return logs

    def save_generator(self, path, meta: dict[str, str]) -> None:
        """The denoiser inside the consistency function, with the function's eps (its boundary)."""
        gen = self.sampler()
        save_weights(gen.net.net, path, {"generator_sigmas": json.dumps(gen.sigmas.tolist()),
                                         "consistency_eps": str(gen.net.eps), **meta})


@register_method("diffusion", "cd")
def build_cd(ctx: MethodContext, *, grid: Annotated[int, Range(ge=2)] = 18, target_decay: Decay = 0.95,
             lr: PositiveFloat = 4e-4, betas: Betas = (0.9, 0.999), huber_c: NonNegFloat | None = None,
             ema_decay: Decay | None = 0.9999, generator_steps: PositiveInt = 1, warmup_steps: NonNegInt = 0,
             warmup_pairs: PositiveInt = 20000, warmup_substeps: PositiveInt = 4, warmup_lr: PositiveFloat = 1e-3,
             regression_weight: NonNegFloat = 0.0) -> ConsistencyDistillation:
    """Consistency distillation with the paper's CIFAR-10 settings: N = 18 Karras sigmas, target EMA 0.95,
    lr 4e-4, sampling EMA 0.9999; pseudo-Huber instead of LPIPS. Needs real data (noised, then one teacher step).
    `warmup_*` and `regression_weight`: the regression warm start onto teacher ODE trajectories (module docstring;
    off by default, on in the 2-D mixture recipe)."""
    return ConsistencyDistillation(ctx.teacher, ctx.student_net(), ctx.sched, grid=grid, target_decay=target_decay,
                                   lr=lr, betas=tuple(betas), huber_c=huber_c, ema_decay=ema_decay,
                                   sample_sigmas=generator_sigmas(generator_steps, ctx.sched),
                                   batch_size=ctx.batch_size, capturable=ctx.capturable, warmup_steps=warmup_steps,
                                   warmup_pairs=warmup_pairs, warmup_substeps=warmup_substeps, warmup_lr=warmup_lr,
                                   regression_weight=regression_weight)
