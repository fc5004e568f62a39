"""DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis").

The generator loss is the distribution-matching gradient: at a noise level sigma, the teacher's ("real") and
the fake score's denoisers disagree on G's noised sample; moving x along `D_real - D_fake` raises
`log p_real - log p_fake` (the scores are `(D - x)/sigma^2`). DMD normalises that direction per sample by the
mean `|x - D_real|`, and applies it as the gradient of `0.5 * mse(x, stopgrad(x - grad))`. Neither network is
backpropagated through. DMD2 adds the two time-scale rule (5 fake-score updates per generator update), an
optional GAN head on the fake score's features, a multi-step generator trained by backward simulation, and
classifier-free guidance folded into the real score. The engine is `engine.ScoreDistillation`.

From a flow-matching teacher (`FlowMatchingAdapter`, or a `train-teacher objective=flow` run) the noise levels
follow the teacher: t uniform over the grid fractions, then SD3's shift (`flow_shift`, the teacher's own by
default), as FastGen and SD3's DMD do; the same schedule places the generator's steps and the warm start's
teacher ODE grid (`edm.Schedule`).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..config import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Probability
from ..errors import ConfigError
from ..method import register_method
from .engine import (GENERATOR_LOSSES, Betas, Decay, MethodContext, Schedule, ScoreDistillation,
                     generator_sigmas)
from .samplers import Generator


def dmd_direction(x: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """`(D_fake - D_real) / mean|x - D_real|` per sample: the gradient the generator's output receives
    (descending it moves x towards the teacher's distribution). NaNs (a zero normaliser) become 0."""
    dims = tuple(range(1, x.ndim))
    norm = (x - d_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((d_fake - d_real) / norm)


@GENERATOR_LOSSES.register("dmd")
def dmd_loss(x: torch.Tensor, real, fake, labels, sched: Schedule, sigma_lo: float = 0.02, sigma_hi: float = 0.98):
    """DMD's distribution-matching loss; sigma uniform over the middle `[sigma_lo, sigma_hi)` share of a
    1000-point grid of the schedule (DMD2's min/max step percent; for a flow teacher, shifted uniform t)."""
    n = x.shape[0]
    sigma = sched.sample_grid(n, sigma_lo, sigma_hi, device=x.device)
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    with torch.no_grad():
        xd = x.detach()
        noisy = xd + s * torch.randn_like(xd)
        d_real = real(noisy, sigma, labels)
        d_fake = fake(noisy, sigma, labels)
        grad = dmd_direction(xd, d_real, d_fake)
    loss = 0.5 * F.mse_loss(x, (x - grad).detach())
    return loss, {"dmd": loss.detach(), "dmd_grad_abs": grad.abs().mean()}


@register_method("diffusion", "dmd2")
def build_dmd2(ctx: MethodContext, *, generator_steps: PositiveInt = 1, fake_steps: PositiveInt = 5,
               guidance_scale: PositiveFloat = 1.0, lr_generator: PositiveFloat = 2e-6, lr_fake: PositiveFloat = 2e-6,
               betas: Betas = (0.9, 0.999), weight_decay: NonNegFloat = 0.01, gan: bool = True,
               gan_generator_weight: NonNegFloat = 3e-3, gan_fake_weight: NonNegFloat = 1e-2,
               sigma_lo: Probability = 0.02, sigma_hi: Probability = 0.98, fake_sigma_lo: Probability = 0.0,
               fake_sigma_hi: Probability = 1.0, warmup_steps: NonNegInt = 0, warmup_pairs: PositiveInt = 20000,
               warmup_teacher_steps: PositiveInt = 32, warmup_lr: PositiveFloat = 1e-3,
               regression_weight: NonNegFloat = 0.0, regression_loss: Literal["mse", "huber"] = "mse",
               generator_sigma: PositiveFloat | None = None, flow_shift: PositiveFloat | None = None,
               ema_decay: Decay | None = 0.999, bf16: bool = False) -> ScoreDistillation:
    """DMD2 with the paper's ImageNet-64 settings: 5 fake-score updates per generator update, lr 2e-6 (AdamW),
    GAN head on the fake score's features (weights 3e-3 generator / 1e-2 fake score), sigma over 2%-98% of the
    grid, the generator conditioned at sigma = 80, guidance folded into the real score. `warmup_*`,
    `regression_weight`, `regression_loss`: a regression warm start onto teacher ODE pairs, kept as DMD (v1)'s
    regression term (off by default; on in the 2-D mixture recipe, where G has no teacher weights to start from).
    `flow_shift`: the timestep shift of flow matching's schedule (see the module docstring); None: the teacher's
    own (a flow teacher's recorded shift; EDM's Karras schedule for other teachers, which a value switches to flow
    matching's)."""
    sched = ctx.sched.with_shift(flow_shift)
    fake = ctx.fake_net()
    head = ctx.gan_head(int(getattr(fake, "feature_dim", 0))) if gan else None
    if gan and not getattr(fake, "feature_dim", 0):
        raise ConfigError(f"gan=true needs a fake score with features for the GAN head; {type(fake).__name__} has "
                          "none (set gan=false)")
    gen = Generator(ctx.student_net(), generator_sigmas(generator_steps, sched, generator_sigma))
    return ScoreDistillation(ctx.teacher, gen, fake, sched, generator_loss="dmd",
                             loss_options={"sigma_lo": sigma_lo, "sigma_hi": sigma_hi}, fake_steps=fake_steps,
                             guidance_scale=guidance_scale, lr_generator=lr_generator, lr_fake=lr_fake,
                             betas=tuple(betas), weight_decay=weight_decay, fake_sigma="grid", gan_head=head,
                             gan_generator_weight=gan_generator_weight, gan_fake_weight=gan_fake_weight,
                             ema_decay=ema_decay, batch_size=ctx.batch_size, capturable=ctx.capturable, bf16=bf16,
                             fake_sigma_range=(fake_sigma_lo, fake_sigma_hi), warmup_steps=warmup_steps,
                             warmup_pairs=warmup_pairs, warmup_teacher_steps=warmup_teacher_steps,
                             warmup_lr=warmup_lr, regression_weight=regression_weight,
                             regression_loss=regression_loss)
