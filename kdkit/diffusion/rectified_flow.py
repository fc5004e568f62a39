"""The paired-regression baseline: solve the teacher's ODE from noise once, then regress a one-step generator
onto the pairs (Luhman & Luhman 2021's knowledge distillation; the distillation stage of rectified flow /
InstaFlow, whose straight 1-rectified couplings are exactly these noise -> teacher-sample pairs).

The pairs are made once, up front, by the teacher's many-step Heun sampler; the loss is the pseudo-Huber
distance between `G(z)` and the teacher's sample from the same `z` (`huber_c=0` makes it the L2 norm).
The pairs are not checkpointed: they are a deterministic function of `seed`, remade on resume.
"""
from __future__ import annotations

import torch

from ..config import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt
from ..errors import ConfigError
from ..method import register_method
from .consistency import pseudo_huber
from .edm import Denoiser
from .engine import Betas, Decay, DistillMethod, MethodContext, Schedule, make_adam
from .samplers import Generator, heun_sample


class PairedRegression(DistillMethod):
    def __init__(self, teacher: Denoiser, student_net: Denoiser, sched: Schedule, *, pairs: int = 20000,
                 teacher_steps: int = 32, lr: float = 1e-4, betas=(0.9, 0.999), huber_c: float | None = None,
                 ema_decay: float | None = 0.999, batch_size: int = 64, pair_batch: int = 1000,
                 capturable: bool = False, seed: int = 0):
        if pairs < batch_size:
            raise ConfigError(f"rectflow needs at least batch_size={batch_size} teacher pairs, got pairs={pairs}")
        super().__init__(teacher, Generator(student_net, [sched.sigma_max]), sched, ema_decay)
        self.batch_size, self.huber_c = batch_size, huber_c
        self.pairs, self.teacher_steps, self.pair_batch, self.seed = pairs, teacher_steps, pair_batch, seed
        self.register_buffer("z", torch.empty(0), persistent=False)
        self.register_buffer("x", torch.empty(0), persistent=False)
        self.register_buffer("y", torch.empty(0, dtype=torch.long), persistent=False)
        self.opt = make_adam(self.generator.parameters(), lr, betas, 0.0, capturable)

    def optimizers(self):
        return {"opt_generator": self.opt}

    @torch.no_grad()
    def make_pairs(self) -> None:
        """Noise -> teacher sample couplings (kept as buffers, so a resumed run reuses the same ones)."""
        if self.z.numel():
            return
        device = self.generator.sigmas.device
        g = torch.Generator(device=device).manual_seed(self.seed)
        zs, xs, ys = [], [], []
        for i in range(0, self.pairs, self.pair_batch):
            n = min(self.pair_batch, self.pairs - i)
            z = torch.randn(n, *self.sample_shape, generator=g, device=device)
            y = torch.randint(0, self.num_classes, (n,), generator=g, device=device) if self.num_classes else None
            xs.append(heun_sample(self.teacher, z, self.teacher_steps, y, self.sched.sigma_min, self.sched.sigma_max,
                                  self.sched.rho))
            zs.append(z)
            ys.append(y if y is not None else torch.zeros(n, dtype=torch.long, device=device))
        self.z, self.x, self.y = torch.cat(zs), torch.cat(xs), torch.cat(ys)

    def prepare(self, run, resuming: bool) -> None:
        self.make_pairs()

    def train_step(self, batch):
        idx = torch.randint(0, self.z.shape[0], (self.batch_size,), device=self.z.device)
        labels = self.y[idx] if self.num_classes else None
        loss = pseudo_huber(self.generator(self.z[idx], labels), self.x[idx], self.huber_c).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.generator)
        return {"regression": loss.detach()}


@register_method("diffusion", "rectflow")
def build_rectflow(ctx: MethodContext, *, pairs: PositiveInt = 20000, teacher_steps: PositiveInt = 32,
                   lr: PositiveFloat = 2e-4, betas: Betas = (0.9, 0.999), huber_c: NonNegFloat | None = None,
                   ema_decay: Decay | None = 0.999, seed: NonNegInt = 0) -> PairedRegression:
    """Paired regression onto `pairs` teacher samples (Heun, `teacher_steps` steps) from fixed noise."""
    return PairedRegression(ctx.teacher, ctx.student_net(), ctx.sched, pairs=pairs, teacher_steps=teacher_steps,
                            lr=lr, betas=tuple(betas), huber_c=huber_c, ema_decay=ema_decay,
                            batch_size=ctx.batch_size, capturable=ctx.capturable, seed=seed)
