"""Many-step ODE samplers for a teacher (EDM's Heun and Euler on the Karras grid, or on a flow-matching
teacher's shifted uniform time: its own Euler sampler), the few-step sampler of a distilled generator, and
classifier-free guidance folded into one denoiser call."""
from __future__ import annotations

import torch
from torch import nn

from .edm import SIGMA_MAX, SIGMA_MIN, Denoiser, Schedule, karras_sigmas


class GuidedDenoiser(Denoiser):
    """Classifier-free guidance as a denoiser: `D_u + w (D_c - D_u)`, the conditional and unconditional
    halves batched into one forward pass. `scale=1` is the plain conditional model."""

    def __init__(self, model: Denoiser, scale: float):
        super().__init__()
        self.model, self.scale = model, float(scale)
        self.sigma_data, self.num_classes, self.sample_shape = model.sigma_data, model.num_classes, model.sample_shape
        self.flow_shift = getattr(model, "flow_shift", None)

    def forward(self, x, sigma, labels=None, return_features=False):
        if labels is None or self.scale == 1.0 or not self.num_classes:
            return self.model(x, sigma, labels, return_features=return_features)
        n = x.shape[0]
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        s = s.expand(n) if s.ndim == 0 else s.reshape(n)
        both = self.model(torch.cat([x, x]), torch.cat([s, s]),
                          torch.cat([labels, self.model.null_labels(n, x.device)]))
        cond, uncond = both[:n], both[n:]
        out = uncond + self.scale * (cond - uncond)
        return (out, None) if return_features else out


def sampler_sigmas(denoiser: nn.Module, steps: int, noise: torch.Tensor, sigma_min: float, sigma_max: float,
                   rho: float, sched: Schedule | None) -> torch.Tensor:
    """A many-step sampler's sigmas with the trailing 0: `sched`'s grid, else the denoiser's own (`Schedule.of`: a
    flow-matching teacher's shifted uniform t, EDM's Karras ramp otherwise) over [sigma_min, sigma_max]."""
    sched = sched or Schedule.of(denoiser, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    return torch.cat([sched.sigmas(steps, noise.device), noise.new_zeros(1)])


@torch.no_grad()
def heun_sample(denoiser: nn.Module, noise: torch.Tensor, steps: int = 64, labels: torch.Tensor | None = None,
                sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 7.0,
                sched: Schedule | None = None) -> torch.Tensor:
    """EDM Algorithm 1 (deterministic Heun, 2*steps - 1 denoiser calls) from `noise ~ N(0, I)`, on `sched`'s grid
    or the denoiser's own (see `sampler_sigmas`)."""
    sigmas = sampler_sigmas(denoiser, steps, noise, sigma_min, sigma_max, rho, sched)
    x = noise * sigmas[0]
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoiser(x, s, labels)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - denoiser(x_next, s_next, labels)) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d2)
        x = x_next
    return x


@torch.no_grad()
def heun_trajectory(denoiser: nn.Module, noise: torch.Tensor, sigmas: torch.Tensor, substeps: int = 4,
                    labels: torch.Tensor | None = None, rho: float = 7.0) -> torch.Tensor:
    """The probability-flow ODE solution from `noise * sigmas[0]` observed at each of the descending `sigmas`:
    `[len(sigmas), *noise.shape]`, with `substeps` Heun steps on a Karras ramp between neighbouring sigmas (what a
    consistency function must map every point of, at its sigma, to the last)."""
    x = noise * sigmas[0]
    out = [x]
    for i in range(sigmas.numel() - 1):
        sub = karras_sigmas(substeps + 1, float(sigmas[i + 1]), float(sigmas[i]), rho, noise.device)
        for s, s_next in zip(sub[:-1], sub[1:]):
            d = (x - denoiser(x, s, labels)) / s
            x_eul = x + (s_next - s) * d
            d2 = (x_eul - denoiser(x_eul, s_next, labels)) / s_next
            x = x + (s_next - s) * 0.5 * (d + d2)
        out.append(x)
    return torch.stack(out)


@torch.no_grad()
def euler_sample(denoiser: nn.Module, noise: torch.Tensor, steps: int = 64, labels: torch.Tensor | None = None,
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 7.0,
                 sched: Schedule | None = None) -> torch.Tensor:
    """First-order Euler on the probability-flow ODE (`steps` denoiser calls). On a flow teacher's grid this is
    its own sampler, Euler on `dx_t/dt = v` at the shifted times: `x_t' = (t'/t) x_t + (1 - t'/t) x_0` either way."""
    sigmas = sampler_sigmas(denoiser, steps, noise, sigma_min, sigma_max, rho, sched)
    x = noise * sigmas[0]
    for i in range(steps):
        s = sigmas[i]
        x = x + (sigmas[i + 1] - s) * (x - denoiser(x, s, labels)) / s
    return x


SAMPLERS = {"heun": heun_sample, "euler": euler_sample}


def nfe(sampler: str, steps: int) -> int:
    """Denoiser evaluations a sampler spends."""
    return 2 * steps - 1 if sampler == "heun" else steps


class Generator(nn.Module):
    """A few-step generator: a denoiser evaluated at fixed sigmas. One step: `x = G(sigma_1 z, sigma_1)`;
    K steps: re-noise each prediction to the next sigma with fresh noise (DMD2's multi-step sampler)."""

    def __init__(self, net: Denoiser, sigmas: list[float]):
        super().__init__()
        self.net = net
        self.register_buffer("sigmas", torch.tensor([float(s) for s in sigmas]))

    @property
    def steps(self) -> int:
        return int(self.sigmas.numel())

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """All steps; gradients flow only through the last one when called under autograd."""
        x = z * self.sigmas[0]
        for k in range(self.steps):
            if k < self.steps - 1:
                with torch.no_grad():
                    x0 = self.net(x, self.sigmas[k], labels)
                x = x0 + self.sigmas[k + 1] * torch.randn_like(x0)
            else:
                x0 = self.net(x, self.sigmas[k], labels)
        return x0

    def simulate(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward simulation (DMD2): a random step k per sample, its input made by running the generator's own
        first k steps without gradient, then step k with gradient. Static shapes (every sample runs K-1
        no-grad steps; each keeps the input of its own k), so the same code is CUDA-graph capturable."""
        K = self.steps
        if K == 1:
            return self.net(z * self.sigmas[0], self.sigmas[0], labels), self.sigmas[:1].expand(z.shape[0])
        k = torch.randint(0, K, (z.shape[0],), device=z.device)
        x = z * self.sigmas[0]
        inputs = [x]
        with torch.no_grad():
            for j in range(K - 1):
                x0 = self.net(x, self.sigmas[j], labels)
                x = x0 + self.sigmas[j + 1] * torch.randn_like(x0)
                inputs.append(x)
        stacked = torch.stack(inputs)  # [K, B, ...]
        idx = k.reshape(1, -1, *([1] * (z.ndim - 1))).expand(1, *z.shape)
        x_in = stacked.gather(0, idx)[0]
        sig = self.sigmas[k]
        return self.net(x_in, sig, labels), sig
