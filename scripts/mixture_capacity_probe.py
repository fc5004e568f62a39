"""How well can a one-step MLP generator fit the exact teacher's noise -> sample ODE map by regression alone?

The capacity floor behind the diffusion quality bar (README, "Few-step diffusion distillation"): usage
`python scripts/mixture_capacity_probe.py WIDTH DEPTH STEPS LR`, e.g. `128 3 3000 1e-3` (sliced-W2 0.040, 9.2% of
samples between the modes) vs `256 4 6000 1e-3` (0.020, 3.7%); the teacher's own 64-step samples score 0.019 here.
"""
import sys
import time

import torch

from kdkit.diffusion.engine import Schedule
from kdkit.diffusion.metrics import sliced_w2
from kdkit.diffusion.mixture import MixtureDenoiser, ring_mixture
from kdkit.diffusion.mlp import MLPDenoiser
from kdkit.diffusion.samplers import heun_sample


def main(width: int, depth: int, steps: int, lr: float, pairs: int = 20000) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mixture, sched = ring_mixture(), Schedule()
    teacher = MixtureDenoiser(mixture)

    def ode(z):
        with torch.no_grad():
            return torch.cat([heun_sample(teacher, z[i:i + 2000], 64, None, sched.sigma_min, sched.sigma_max, sched.rho)
                              for i in range(0, len(z), 2000)])

    z, z_test = torch.randn(pairs, 2), torch.randn(20000, 2)
    x, x_test = ode(z), ode(z_test)
    true = mixture.sample(20000, torch.Generator().manual_seed(5))
    print(f"teacher 64-step Heun sliced-W2 {sliced_w2(x_test, true):.4f}")
    net = MLPDenoiser(2, width, depth, sigma_data=sched.sigma_data)
    opt = torch.optim.Adam(net.parameters(), lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    s1, t0 = torch.tensor(sched.sigma_max), time.time()
    for _ in range(steps):
        idx = torch.randint(0, pairs, (256,))
        loss = ((net(z[idx] * s1, s1) - x[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        cosine.step()
    with torch.no_grad():
        y = net(z_test * s1, s1)
    between = (torch.cdist(y, mixture.means).min(1).values > 0.6).float().mean()
    print(f"width {width} depth {depth}, {steps} steps: {time.time() - t0:.0f}s, map MSE {((y - x_test) ** 2).mean():.4f}, "
          f"sliced-W2 {sliced_w2(y, true):.4f}, {100 * between:.1f}% of samples > 0.6 from every mode mean")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
