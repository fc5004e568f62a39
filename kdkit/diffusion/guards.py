"""Guards: readings of a distillation run that say early when it goes wrong (samples saturating or collapsing,
the fake score losing track of the generator), and one warning line when a reading crosses its threshold.

The readings, logged in metrics.jsonl every `log_every` steps (averaged over those steps) and summarised in
metrics.json's `guards` (first, last, min and max value; whether, when and at which value its guard tripped):

    sample_std_ratio     G's samples' std over the data's, the largest over channels (coordinates of a 2-D point,
                         colours of an image): above `guards.std_ratio` the samples are spreading out / saturating
    sample_mean_shift    G's samples' mean minus the data's, in data stds, the largest over channels: above
                         `guards.mean_shift` they drift off the data (a colour cast on images)
    sample_clipped       images: share of G's values at or beyond the [-1, 1] range; above the data's own share plus
                         `guards.clipped` they are saturating
    modes_reached        2-D mixture: share of the modes with a sample within 3 std; below `guards.coverage`: mode
                         collapse
    class_entropy        images with `fd_classifier`, at evaluations: the normalised entropy of the classifier's
                         predicted classes for the generated samples; below `guards.entropy`: mode collapse
    dmd_grad_abs         DMD2: the distribution-matching gradient's mean |D_fake - D_real| per unit of DMD's
                         normaliser mean|x - D_real|; above `guards.dmd_grad` G's samples are far from the teacher's
    generator_grad_norm  score distillation: the L2 norm of G's parameter gradient (a reading, no guard)
    fake_denoise         the fake score's denoising loss; above `guards.fake_growth` times its lowest logged value
                         the fake score no longer follows the generator

Readings from a score-distillation step come from the generated batch the step already has (pure tensor work,
inside a captured CUDA graph too); for the other methods, at each log the sampler draws one batch from fixed noise
(under a forked RNG, so training is unchanged). Thresholds are checked at log time, in Python, on the numbers the
log already synced. Each guard warns once, on the console and in train.log.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch

from ..config import NonNegInt, PositiveFloat, Probability, Range
from .metrics import channel_stats, modes_reached, sample_drift

Factor = Annotated[float, Range(gt=1)]


@dataclass
class GuardSpec:
    """`guards.NAME=VALUE`: the thresholds of the run's guards (see `kdkit/diffusion/guards.py`)."""

    std_ratio: Factor = 1.5  # samples' std over the data's (worst channel) above this: saturating
    mean_shift: PositiveFloat = 1.0  # samples' mean off the data's, in data stds (worst channel)
    clipped: Probability = 0.1  # images: share of values at/over [-1, 1] above the data's share by more than this
    coverage: Probability = 0.75  # 2-D mixture: share of modes reached below this: mode collapse
    entropy: Probability = 0.75  # images with fd_classifier: normalised entropy of predicted classes below this
    dmd_grad: PositiveFloat = 0.6  # DMD2's gradient per unit of its normaliser above this
    fake_growth: Factor = 10.0  # the fake score's loss above this many times its lowest logged value
    start: NonNegInt = 0  # the first step at which guards may trip (readings are recorded from the start)


@dataclass(frozen=True)
class Guard:
    """One guard: the reading it watches, the GuardSpec field with its threshold, how it trips ("above", "below",
    or "growth": above threshold x the lowest value logged so far), what the reading says, and what to do."""

    reading: str
    setting: str
    rule: str
    says: str
    advice: str


SATURATING = "samples are saturating; lower guidance_scale or lr_generator"
COLLAPSING = "samples collapse onto few modes; lower guidance_scale or lr_generator, or raise fake_steps / lr_fake"
GUARDS = (
    Guard("sample_std_ratio", "std_ratio", "above", "generated std {v:.2f}x the data's (guard: > {t:.3g}x)",
          SATURATING),
    Guard("sample_mean_shift", "mean_shift", "above",
          "generated mean {v:.2f} data stds off the data's (guard: > {t:.3g})",
          "samples drift off the data (a colour cast on images); lower lr_generator or guidance_scale"),
    Guard("sample_clipped", "clipped", "above",
          "{v:.1%} of generated values at or beyond [-1, 1], the data's {d:.1%} (guard: > {t:.1%})", SATURATING),
    Guard("modes_reached", "coverage", "below", "generated samples reach {v:.0%} of the modes (guard: < {t:.0%})",
          COLLAPSING),
    Guard("class_entropy", "entropy", "below",
          "predicted classes of generated samples have normalised entropy {v:.2f} (guard: < {t:.2f})", COLLAPSING),
    Guard("dmd_grad_abs", "dmd_grad", "above",
          "DMD gradient {v:.2f} of its normaliser (guard: > {t:.3g})",
          "the fake score sees samples far from the teacher's; lower lr_generator or guidance_scale, or raise "
          "fake_steps"),
    Guard("fake_denoise", "fake_growth", "growth",
          "fake-score loss {v:.3g}, {r:.1f}x its lowest {lo:.3g} (guard: > {t:.3g}x)",
          "the fake score no longer follows the generator; raise fake_steps or lr_fake, or lower lr_generator"),
)
SAMPLE_READINGS = ("sample_std_ratio", "sample_mean_shift", "sample_clipped", "modes_reached")
READINGS = (*SAMPLE_READINGS, "class_entropy", "dmd_grad_abs", "generator_grad_norm", "fake_denoise")


def grad_norm(params) -> torch.Tensor:
    """The L2 norm of the parameters' gradients (one multi-tensor pass; graph-capturable)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class Guards:
    """A run's guards: the data's reference statistics (from 4,096 real samples drawn under a forked RNG), the
    readings of a generated batch, the threshold checks at log time and their summary."""

    def __init__(self, spec: GuardSpec, data, device: torch.device, batch_size: int = 256, seed: int = 0):
        self.spec, self.device, self.batch_size, self.seed = spec, device, batch_size, seed
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(40_000 + seed)
            x = torch.cat([data.batch(1024)[0] for _ in range(4)]).float()
        mean, std = channel_stats(x)
        self.mean, self.std = mean.to(device), std.clamp_min(1e-6).to(device)
        self.images = x.ndim == 4
        self.data_clipped = float((x.abs() >= 1).float().mean()) if self.images else None
        mix = getattr(data, "mixture", None)
        self.modes = (mix.means.to(device), mix.stds.to(device)) if mix is not None else None
        self.stats: dict[str, dict] = {}
        self.warnings: list[str] = []
        self._fixed: tuple | None = None

    # ------------------------------------------------------------ readings

    def read(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The sample readings of a generated batch (pure tensor work, static shapes)."""
        x = x.detach()
        ratio, shift = sample_drift(x, self.mean, self.std)
        out = {"sample_std_ratio": ratio, "sample_mean_shift": shift}
        if self.images:
            out["sample_clipped"] = (x.abs() >= 1).float().mean()
        if self.modes is not None:
            out["modes_reached"] = modes_reached(x, *self.modes)
        return out

    @torch.no_grad()
    def read_sampler(self, gen, sample_shape: tuple[int, ...], num_classes: int) -> dict[str, float]:
        """The sample readings of one batch of `gen` from fixed noise (methods whose step has no generated batch)."""
        if self._fixed is None:
            g = torch.Generator().manual_seed(50_000 + self.seed)
            z = torch.randn(self.batch_size, *sample_shape, generator=g).to(self.device)
            y = torch.randint(0, num_classes, (self.batch_size,), generator=g).to(self.device) if num_classes else None
            self._fixed = (z, y)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            x = gen(*self._fixed)
        return {k: float(v) for k, v in self.read(x).items()}

    # ------------------------------------------------------------ checks

    def check(self, run, step: int, row: dict) -> None:
        """Update each reading's summary from a logged row (or an evaluation's report) and warn, once per guard,
        when one crosses its threshold."""
        lowest = {}  # each reading's lowest value before this row (what a growth guard compares with)
        for name in READINGS:
            v = row.get(name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                continue
            s = self.stats.setdefault(name, {"first": v, "min": v, "max": v, "first_step": step, "tripped": False})
            lowest[name] = s["min"]
            s.update(last=v, min=min(s["min"], v), max=max(s["max"], v), last_step=step)
        for guard in GUARDS:
            s = self.stats.get(guard.reading)
            if guard.reading not in lowest or s["tripped"] or step < self.spec.start:
                continue
            v, t, lo = s["last"], getattr(self.spec, guard.setting), lowest[guard.reading]
            limit = self._limit(guard, t, lo)
            s["threshold"] = limit
            if not (v < limit if guard.rule == "below" else v > limit):
                continue
            says = guard.says.format(v=v, t=t if guard.rule == "growth" else limit, d=self.data_clipped or 0.0,
                                     lo=lo, r=v / lo if lo > 0 else float("inf"))
            line = f"kdkit: warning: step {step}: {says} — {guard.advice}"
            s.update(tripped=True, tripped_step=step, tripped_value=v)
            self.warnings.append(line)
            run.log(line)

    def _limit(self, guard: Guard, t: float, lowest: float) -> float:
        if guard.reading == "sample_clipped":
            return (self.data_clipped or 0.0) + t
        return t * lowest if guard.rule == "growth" else t

    def summary(self) -> dict:
        """metrics.json's `guards`: per reading its first/last/min/max (and steps), its threshold and whether and
        where its guard tripped; the data's reference statistics; the warnings shown."""
        return {"readings": self.stats, "warnings": self.warnings, "thresholds": vars(self.spec).copy(),
                "data": {"mean": [round(float(v), 4) for v in self.mean], "std": [round(float(v), 4) for v in self.std],
                         **({"clipped": round(self.data_clipped, 4)} if self.data_clipped is not None else {})}}

    def state_dict(self) -> dict:
        return {"stats": self.stats, "warnings": self.warnings}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.stats, self.warnings = dict(state["stats"]), list(state["warnings"])
