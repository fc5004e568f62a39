"""SiD, score identity distillation (Zhou et al. 2024), as a second generator loss on the same engine.

With `x_t = x + sigma n`, teacher denoiser `f_r(x_t)` and fake denoiser `f_f(x_t)`, SiD's generator loss per
sample is `(f_r - f_f) . ((f_r - x) - alpha (f_r - f_f)) / mean|x - f_r|`, alpha = 1.2 by default, and its
gradient flows through both denoisers into x (their weights stay fixed). It needs no real data. SiD's own
settings: one fake-score update per generator update, EDM's log-normal sigma for the fake score, the
generator evaluated at sigma_init = 2.5, generator sigmas from the Karras ramp's t in [0, t_max = 0.8].

From a flow-matching teacher, t is flow matching's time (uniform, then SD3's shift `flow_shift`, the teacher's
own by default) and the fake score learns at SD3's logit-normal times: the teacher's own schedule (`edm.Schedule`).
"""
from __future__ import annotations

from typing import Literal

import torch

from ..config import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Probability
from ..method import register_method
from .engine import (GENERATOR_LOSSES, Betas, Decay, MethodContext, Schedule, ScoreDistillation,
                     generator_sigmas)
from .samplers import Generator


def sid_sigma(n: int, sched: Schedule, t_min: float, t_max: float, device) -> torch.Tensor:
    """sigma on the schedule's path at position `1 - t`, t ~ U(t_min, t_max) (SiD: t_min = 0, t_max = 0.8, i.e.
    sigma from sigma_min up to the Karras ramp's 20% point, ~24 for EDM's range; a flow teacher: its shifted t)."""
    t = t_min + torch.rand(n, device=device) * (t_max - t_min)
    return sched.sigma_at(1 - t)


@GENERATOR_LOSSES.register("sid")
def sid_loss(x: torch.Tensor, real, fake, labels, sched: Schedule, alpha: float = 1.2, t_min: float = 0.0,
             t_max: float = 0.8):
    """SiD's generator loss (summed over a sample's elements, averaged over the batch)."""
    sigma = sid_sigma(x.shape[0], sched, t_min, t_max, x.device)
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    noisy = x + s * torch.randn_like(x)
    d_real = real(noisy, sigma, labels)
    d_fake = fake(noisy, sigma, labels)
    dims = tuple(range(1, x.ndim))
    with torch.no_grad():
        weight = (x - d_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)
    diff = d_real - d_fake
    per = diff * ((d_real - x) - alpha * diff) / weight
    loss = per.sum(dim=dims).mean()
    return loss, {"sid": loss.detach()}


@register_method("diffusion", "sid")
def build_sid(ctx: MethodContext, *, alpha: NonNegFloat = 1.2, t_min: Probability = 0.0, t_max: Probability = 0.8,
              generator_sigma: PositiveFloat = 2.5, generator_steps: PositiveInt = 1, fake_steps: PositiveInt = 1,
              guidance_scale: PositiveFloat = 1.0, lr_generator: PositiveFloat = 1e-5, lr_fake: PositiveFloat = 1e-5,
              betas: Betas = (0.0, 0.999), ema_decay: Decay | None = 0.999, warmup_steps: NonNegInt = 0,
              warmup_pairs: PositiveInt = 20000, warmup_teacher_steps: PositiveInt = 32,
              warmup_lr: PositiveFloat = 1e-3, regression_weight: NonNegFloat = 0.0,
              regression_loss: Literal["mse", "huber"] = "mse", flow_shift: PositiveFloat | None = None,
              bf16: bool = False) -> ScoreDistillation:
    """SiD with the paper's CIFAR-10 settings: alpha 1.2, Adam lr 1e-5 (betas 0, 0.999) for both networks, one
    fake-score update per generator update, sigma_init 2.5, t_max 0.8; data-free (no GAN head). As for DMD2, a
    generator with no teacher weights to start from (the 2-D mixture) can be warmed up by regression onto teacher
    ODE pairs (`warmup_steps`, ...) and keep that regression as a term (`regression_weight`): see
    `engine.ScoreDistillation.prepare`. `flow_shift`: as DMD2's (None: the teacher's own)."""
    sched = ctx.sched.with_shift(flow_shift)
    gen = Generator(ctx.student_net(), generator_sigmas(generator_steps, sched, generator_sigma))
    return ScoreDistillation(ctx.teacher, gen, ctx.fake_net(), sched, generator_loss="sid",
                             loss_options={"alpha": alpha, "t_min": t_min, "t_max": t_max}, fake_steps=fake_steps,
                             guidance_scale=guidance_scale, lr_generator=lr_generator, lr_fake=lr_fake,
                             betas=tuple(betas), fake_sigma="lognormal", ema_decay=ema_decay,
                             batch_size=ctx.batch_size, capturable=ctx.capturable, bf16=bf16,
                             warmup_steps=warmup_steps, warmup_pairs=warmup_pairs,
                             warmup_teacher_steps=warmup_teacher_steps, warmup_lr=warmup_lr,
                             regression_weight=regression_weight, regression_loss=regression_loss)
