"""The engine every few-step method shares: a generator G, a frozen teacher T and (for score distillation)
an online fake score F initialised from T, with their optimisers, EMA, sampling and checkpointable state.

`DistillMethod` is the `kdkit.method.Method` every diffusion method is: `train_step(batch)` is one training
iteration (pure tensor work with static shapes: no `.item()`, no data-dependent Python branches, so
`fast_step.py` can compile it or capture it as one CUDA graph), `step(batch)` runs it through the run's fast
step, and `state_dict()` holds the trainable networks, the EMA, every optimiser and the evaluation history.
A new method is one file: a `DistillMethod` subclass and a factory `@register_method("diffusion", NAME)` whose
typed keyword-only arguments (ranges beside their types) are its options (`kdkit diffusion NAME key=value`);
the package imports every module in it, so nothing else is edited. Its 2-D presets, if any, are a recipe
`recipes/diffusion-NAME-mixture.yaml`.

`ScoreDistillation` is DMD2 and SiD at once: one step is `fake_steps` updates of F (denoising on G's samples,
plus a GAN head on F's features when asked) and one update of G by a *generator loss* looked up by name in
`GENERATOR_LOSSES`. A new generator loss is one function

    fn(x, real, fake, labels, sched, **options) -> (loss, {name: tensor})

of the generated batch `x` (with gradient), the teacher's and the fake score's denoisers (`real(x_t, sigma,
labels)`, `fake(...)`) and the noise schedule.
"""
from __future__ import annotations

import abc
import copy
import json
import time
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Range
from ..errors import CheckpointError, ConfigError, ShapeMismatchError
from ..method import Method
from ..registry import Registry
from .edm import Denoiser, Schedule, loss_weight, pseudo_huber
from .fast_step import make_step
from .guards import grad_norm
from .samplers import Generator, GuidedDenoiser, heun_sample
from .teachers import save_weights

GENERATOR_LOSSES: Registry = Registry("generator loss")


@dataclass(frozen=True)
class BetaPair:
    """Adam's betas: a list of exactly two values."""

    def ok(self, v) -> bool:
        return len(v) == 2

    def describe(self) -> str:
        return "two numbers in [0, 1), e.g. [0.9, 0.999]"


# option types the methods share, each range declared here once
Betas = Annotated[list[Annotated[float, Range(ge=0, lt=1)]], BetaPair()]
Decay = Annotated[float, Range(ge=0, lt=1)]  # EMA decays (0: no averaging)


@dataclass
class MethodContext:
    """What a method factory gets from the runner: the (frozen) teacher, the schedule, fresh networks for the
    generator and the fake score (copies of the teacher, or new MLPs beside an analytic teacher), a GAN head
    factory for a feature width, the batch size, and whether optimisers must be CUDA-graph capturable."""

    teacher: Denoiser
    sched: Schedule
    student_net: Callable[[], Denoiser]
    fake_net: Callable[[], Denoiser]
    batch_size: int = 64
    capturable: bool = False

    def gan_head(self, width: int) -> nn.Module:
        return nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))


def generator_sigmas(steps: int, sched: Schedule, first: float | None = None) -> list[float]:
    """A K-step generator's sigmas: `first` (default sigma_max) then the Karras ramp at k/K, k = 1..K-1 (DMD2's
    4-step 999/749/499/249 timesteps in sigma form; a flow teacher's shifted uniform t, see `edm.Schedule`)."""
    out = [first if first is not None else sched.sigma_max]
    out += [float(sched.sigma_at(k / steps)) for k in range(1, steps)]
    return out


def teacher_pairs(method, pairs: int, device, make: Callable) -> list[torch.Tensor]:
    """The warm start's teacher data (DMD2, SiD and CD beside an analytic teacher): `make(z, y)` -> a tuple of
    tensors per chunk of 1,000 fresh noises, with the labels (zeros when unconditional) appended, concatenated.
    Drawn from a fixed seed in a forked RNG, so a resumed run remakes the same data without moving the run's RNG."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(12345)
        parts = []
        for i in range(0, pairs, 1000):
            n = min(1000, pairs - i)
            z, y = method.noise(n, device), method.random_labels(n, device)
            labels = y if y is not None else torch.zeros(n, dtype=torch.long, device=device)
            parts.append((*make(z, y), labels))
    return [torch.cat(column) for column in zip(*parts)]


def regression_warm_start(run, params, loss: Callable[[], torch.Tensor], steps: int, lr: float, what: str) -> None:
    """`steps` steps of the regression `loss` with their own Adam at `lr`, then one log line."""
    t0 = time.perf_counter()
    opt = make_adam(params, lr)
    for _ in range(steps):
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    run.log(f"warm-up: {steps} regression steps on {what} in {time.perf_counter() - t0:.1f}s "
            f"(last loss {float(value.detach()):.4f})")


def make_adam(params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, capturable: bool = False):
    """AdamW, fused on CUDA (one kernel for all parameters), multi-tensor `foreach` elsewhere; `capturable`
    keeps its step counter on the device so the update can live inside a CUDA graph."""
    params = [p for p in params if p.requires_grad]
    cuda = bool(params) and params[0].is_cuda
    kw = {"fused": True} if cuda else {"foreach": True}
    if capturable and cuda:
        kw["capturable"] = True
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **kw)


class EMA(nn.Module):
    """An exponential moving average of a module's floating-point parameters, updated with one
    `torch._foreach_lerp_` (a single fused pass, graph-capturable)."""

    def __init__(self, module: nn.Module, decay: float):
        super().__init__()
        self.decay = float(decay)
        self.module = copy.deepcopy(module).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        dst = [p for p in self.module.parameters() if p.dtype.is_floating_point]
        src = [p for p in source.parameters() if p.dtype.is_floating_point]
        torch._foreach_lerp_(dst, src, 1.0 - self.decay)


def check_shapes(teacher: Denoiser, generator: nn.Module, sample_shape: tuple[int, ...]) -> None:
    """Teacher and generator must produce samples of one shape; say which and how they differ."""
    probe = torch.zeros(2, *sample_shape, device=next(iter(teacher.buffers()), torch.zeros(())).device)
    params = list(generator.parameters())
    if params:
        probe = probe.to(params[0].device)
    with torch.no_grad():
        try:
            out = generator(torch.randn_like(probe), None)
        except RuntimeError as e:
            raise ShapeMismatchError(f"the generator cannot take the teacher's sample shape {tuple(sample_shape)}: "
                                     f"{str(e).splitlines()[0]}") from e
    if tuple(out.shape[1:]) != tuple(sample_shape):
        raise ShapeMismatchError(f"the generator makes samples of shape {tuple(out.shape[1:])} but the teacher "
                                 f"denoises samples of shape {tuple(sample_shape)}; they must match")


@dataclass
class Plan:
    """How a run drives a method, set by the pillar once the factory has built it: the name, length and cadences,
    the fast step, where real batches come from (`real(n) -> (x, labels)`) and what evaluates the generator (an
    `evaluation.Evaluation`). A method built by hand (tests, benchmarks) keeps the defaults: eager, no data."""

    name: str = "diffusion"
    steps: int = 1
    log_every: int = 50
    eval_every: int = 0
    save_every: int = 0
    sample_every: int = 0  # sample pictures between evaluations (0: only at evaluations)
    fast: str = "eager"
    compile_mode: str | None = None
    channels_last: bool = False
    batch_size: int = 64
    real: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None
    evaluation: Any = None
    guards: Any = None  # a `guards.Guards`: readings logged every log_every steps, thresholds checked there


# the frozen teacher is loaded from its own file, never checkpointed
FROZEN_PREFIXES = ("teacher.", "real_score.")


class DistillMethod(nn.Module, Method):
    """A few-step distillation method (see the module docstring). Subclasses implement `train_step` and
    `optimizers`, and set `real_batches` (real batches one step consumes) and `needs_real`; `sampler()` is the
    few-step generator evaluated and saved (its EMA when there is one)."""

    real_batches: int = 1
    needs_real: bool = False

    def __init__(self, teacher: Denoiser, generator: Generator, sched: Schedule, ema_decay: float | None):
        super().__init__()
        self.teacher = teacher.requires_grad_(False).eval()
        self.generator = generator
        self.sched = sched
        self.ema = EMA(generator, ema_decay) if ema_decay else None
        self.num_classes = teacher.num_classes
        self.sample_shape = tuple(teacher.sample_shape)
        self.plan = Plan()
        self.reports: list[dict] = []  # one per evaluation, checkpointed with the networks
        self._fast: Callable | None = None
        self._clock = {"start": 0.0, "steps": 0, "eval_s": 0.0}

    # ------------------------------------------------------------ what fit reads from the plan

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def total_steps(self) -> int:
        return self.plan.steps

    @property
    def log_every(self) -> int:
        return self.plan.log_every

    @property
    def eval_every(self) -> int:
        return self.plan.eval_every

    @property
    def save_every(self) -> int:
        return self.plan.save_every

    # ------------------------------------------------------------ the method's own parts

    @abc.abstractmethod
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Each method (score distillation, consistency, regression) names its optimisers."""

    @abc.abstractmethod
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One training iteration of the method; returns its logged scalars (what `fast_step` compiles or
        captures)."""

    def sampler(self) -> Generator:
        return self.ema.module if self.ema is not None else self.generator

    def random_labels(self, n: int, device) -> torch.Tensor | None:
        return torch.randint(0, self.num_classes, (n,), device=device) if self.num_classes else None

    def noise(self, n: int, device) -> torch.Tensor:
        return torch.randn(n, *self.sample_shape, device=device)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        if self.ema is not None:
            self.ema.module.eval()
        return self

    # ------------------------------------------------------------ the Method contract

    def batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """`real_batches` real batches per step, stacked (drawn from the global RNG, which a checkpoint restores),
        or nothing for a data-free step."""
        while True:
            if not (self.needs_real and self.plan.real is not None):
                yield {}
                continue
            xs, ys = zip(*(self.plan.real(self.plan.batch_size) for _ in range(self.real_batches)))
            out = {"real": torch.stack(xs), "labels": torch.stack(ys)}
            if self.plan.channels_last and out["real"].ndim == 5:
                out["real"] = torch.stack([x.contiguous(memory_format=torch.channels_last) for x in out["real"]])
            yield out

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`train_step` through the plan's fast step, built at the first call: after a resume has loaded the
        optimisers, whose state tensors a CUDA graph captures."""
        if self._fast is None:
            self.train()
            self._clock = {"start": time.perf_counter(), "steps": 0, "eval_s": 0.0}
            self._fast = make_step(self, self.plan.fast, batch, self.plan.compile_mode)
        self._clock["steps"] += 1
        logs = self._fast(batch)
        # a CUDA graph writes every replay's logs into the same tensors: the loop keeps them, so copy them
        return {k: v.clone() for k, v in logs.items()} if "cuda_graph" in self.plan.fast else logs

    def networks(self) -> dict[str, torch.Tensor]:
        """The trainable networks' tensors (generator, EMA, fake score, GAN head, targets) without the frozen
        teacher; a fake score built on top of it (`ResidualDenoiser`) shares its tensors, which are left out too."""
        frozen = {t.data_ptr() for t in self.teacher.state_dict().values()}
        return {k: v for k, v in nn.Module.state_dict(self).items()
                if not k.startswith(FROZEN_PREFIXES) and v.data_ptr() not in frozen}

    def state_dict(self) -> dict:  # the Method contract's (nn.Module's own is `networks()`)
        return {"networks": self.networks(), "reports": self.reports,
                "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()},
                "guards": self.plan.guards.state_dict() if self.plan.guards is not None else None}

    def load_state_dict(self, state: dict) -> None:
        saved, own = state["networks"], self.networks()
        missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"the checkpoint was made by a different method or network: {len(missing)} "
                                  f"missing tensors (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                                  f"(e.g. {unexpected[:3]})")
        try:
            nn.Module.load_state_dict(self, saved, strict=False)
        except RuntimeError as e:
            raise CheckpointError(f"the checkpoint does not fit this run's networks: {str(e).splitlines()[-1]}") from e
        optimizers = self.optimizers()
        if set(state["optimizers"]) != set(optimizers):
            raise CheckpointError(f"the checkpoint has optimisers {sorted(state['optimizers'])}, this method has "
                                  f"{sorted(optimizers)}")
        for k, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        self.reports = list(state["reports"])
        if self.plan.guards is not None:
            self.plan.guards.load_state_dict(state.get("guards"))

    # ------------------------------------------------------------ guards (`guards.py`)

    def read_samples(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The guards' readings of a batch the step generated (tensors; none without guards)."""
        return self.plan.guards.read(x) if self.plan.guards is not None else {}

    def on_log(self, run, step: int, row: dict) -> dict:
        """At each log: the sample readings of G (not its EMA, as in a step) on a fixed-noise batch when the step
        made none, then the guards' checks on the logged numbers."""
        guards = self.plan.guards
        if guards is None:
            return {}
        extra = {}
        if "sample_std_ratio" not in row:
            extra = guards.read_sampler(self.generator.eval(), self.sample_shape, self.num_classes)
            self.train()
        guards.check(run, step, {**row, **extra})
        return extra

    def is_eval_step(self, step: int) -> bool:
        """Evaluations, and the sample pictures between them."""
        return super().is_eval_step(step) or bool(self.plan.sample_every and step % self.plan.sample_every == 0)

    @torch.no_grad()
    def evaluate(self, run, step: int) -> dict:
        ev = self.plan.evaluation
        if ev is None:
            return {}
        t0 = ev.clock()
        if Method.is_eval_step(self, step):
            rep = ev.report(self.sampler().eval(), step, run)
            self.reports.append(rep)
            if self.plan.guards is not None:
                self.plan.guards.check(run, step, rep)
            run.log(f"step {step}: " + "  ".join(f"{k}={v:.4g}" for k, v in rep.items() if isinstance(v, float)))
        else:
            ev.picture(self.sampler().eval(), step, run)
            rep = {}
        self.train()  # the sampler may be the generator itself: back to training mode
        self._clock["eval_s"] += ev.clock() - t0
        return rep

    def save_generator(self, path, meta: dict[str, str]) -> None:
        """The few-step generator's network and its sigmas (rebuilt without pickled code)."""
        gen = self.sampler()
        save_weights(gen.net, path, {"generator_sigmas": json.dumps(gen.sigmas.tolist()), **meta})

    def artefacts(self, run) -> dict:
        """`generator.safetensors` (the sampler: its EMA when there is one) and the run's summary: the teacher's
        and the evaluations' reports, the last one as `final`, and this session's training iterations per
        second (evaluation time left out)."""
        self.save_generator(run.run_dir / "generator.safetensors", {"method": self.name})
        ev = self.plan.evaluation
        steps = self._clock["steps"]
        wall = (ev.clock() if ev is not None else time.perf_counter()) - self._clock["start"] if steps else 0.0
        train_s = wall - self._clock["eval_s"]
        return {"method": self.name, "device": str(run.device),
                "teacher": ev.teacher_report() if ev is not None else None, "evals": self.reports,
                "final": self.reports[-1] if self.reports else None,
                "guards": self.plan.guards.summary() if self.plan.guards is not None else None,
                "it_s": steps / train_s if steps and train_s > 0 else None, "wall_s_this_session": wall}


def _fit_denoiser(net: Denoiser, x: torch.Tensor, labels, sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's weighted denoising loss of `net` on clean samples `x` at noise levels `sigma`."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    pred = net(x + s * torch.randn_like(x), sigma, labels)
    return (loss_weight(s, sigma_data) * (pred - x) ** 2).mean()


class ScoreDistillation(DistillMethod):
    """G, T, F and two time scales (DMD2; SiD with `fake_steps=1`). See the module docstring."""

    def __init__(self, teacher: Denoiser, generator: Generator, fake: Denoiser, sched: Schedule, *,
                 generator_loss: str = "dmd", loss_options: dict | None = None, fake_steps: int = 5,
                 guidance_scale: float = 1.0, lr_generator: float = 2e-6, lr_fake: float = 2e-6,
                 betas: tuple[float, float] = (0.0, 0.999), weight_decay: float = 0.0,
                 fake_sigma: str = "grid", gan_head: nn.Module | None = None, gan_generator_weight: float = 3e-3,
                 gan_fake_weight: float = 1e-2, ema_decay: float | None = None, batch_size: int = 64,
                 capturable: bool = False, bf16: bool = False, fake_sigma_range: tuple[float, float] = (0.0, 1.0),
                 warmup_steps: int = 0, warmup_pairs: int = 20000, warmup_teacher_steps: int = 32,
                 warmup_lr: float = 1e-3, regression_weight: float = 0.0, regression_loss: str = "mse"):
        super().__init__(teacher, generator, sched, ema_decay)
        if fake_sigma not in ("grid", "lognormal"):
            raise ConfigError(f"fake_sigma must be 'grid' (DMD2) or 'lognormal' (EDM/SiD), got '{fake_sigma}'")
        self.loss_fn: Callable = GENERATOR_LOSSES.get(generator_loss)
        self.loss_name, self.loss_options = generator_loss, dict(loss_options or {})
        self.fake = fake
        self.gan_head = gan_head
        self.fake_steps, self.fake_sigma, self.batch_size = fake_steps, fake_sigma, batch_size
        self.fake_sigma_range = tuple(fake_sigma_range)  # share of the Karras grid the fake score trains on
        self.warmup = (warmup_steps, warmup_pairs, warmup_teacher_steps)
        if regression_loss not in ("mse", "huber"):
            raise ConfigError(f"regression_loss must be 'mse' or 'huber' (pseudo-Huber), got '{regression_loss}'")
        self.warmup_lr, self.regression_weight, self.regression_loss = warmup_lr, regression_weight, regression_loss
        self.register_buffer("pair_z", torch.empty(0), persistent=False)
        self.register_buffer("pair_x", torch.empty(0), persistent=False)
        self.register_buffer("pair_y", torch.empty(0, dtype=torch.long), persistent=False)
        self.bf16 = bf16  # autocast the networks' forwards to bfloat16 (losses and updates stay float32)
        self.real_score = GuidedDenoiser(self.teacher, guidance_scale) if guidance_scale != 1.0 else self.teacher
        self.gan_weights = (gan_generator_weight, gan_fake_weight)
        self.needs_real = gan_head is not None
        self.real_batches = fake_steps
        fake_params = list(fake.parameters()) + (list(gan_head.parameters()) if gan_head is not None else [])
        self._fake_params = [p for p in fake_params if p.requires_grad]
        self.opt_fake = make_adam(fake_params, lr_fake, betas, weight_decay, capturable)
        self.opt_gen = make_adam(generator.parameters(), lr_generator, betas, weight_decay, capturable)

    def optimizers(self):
        return {"opt_generator": self.opt_gen, "opt_fake": self.opt_fake}

    def prepare(self, run, resuming: bool) -> None:
        """Optional regression warm start (DMD's regression loss, used up front): before distribution matching, fit
        G's first step to `warmup_pairs` noise -> teacher-ODE-sample pairs for `warmup_steps` steps (own Adam,
        `warmup_lr`). It gives a generator with no weights to copy from the teacher (beside an analytic teacher) the
        teacher's coarse map, as copying the teacher's weights does for DMD2 on images. With `regression_weight`
        > 0 the same pairs also feed DMD (v1)'s regression term during training. `regression_loss`: mean squared
        error, or pseudo-Huber (`huber`, the stand-in for DMD's LPIPS that CD and paired regression use too: its
        minimiser does not average two modes where G's map must jump between them, so fewer samples land between
        the modes). The pairs are remade on resume
        (deterministic in the seed); the warm-up training is not (the checkpoint holds its result)."""
        steps, pairs, teacher_steps = self.warmup
        if not (steps or self.regression_weight):
            return
        s = self.sched
        self.pair_z, self.pair_x, self.pair_y = teacher_pairs(self, pairs, self.generator.sigmas.device, lambda z, y: (
            z, heun_sample(self.real_score, z, teacher_steps, y, sched=s)))
        if resuming or not steps:
            return
        regression_warm_start(run, self.generator.parameters(), self._regression, steps, self.warmup_lr,
                              f"{pairs} teacher ODE pairs")
        if self.ema is not None:
            self.ema.module.load_state_dict(self.generator.state_dict())

    def _regression(self) -> torch.Tensor:
        idx = torch.randint(0, self.pair_z.shape[0], (self.batch_size,), device=self.pair_z.device)
        s1 = self.generator.sigmas[0]
        pred = self.generator.net(self.pair_z[idx] * s1, s1, self.pair_y[idx] if self.num_classes else None)
        if self.regression_loss == "huber":
            return pseudo_huber(pred, self.pair_x[idx]).mean()
        return ((pred - self.pair_x[idx]) ** 2).mean()

    # ---------------------------------------------------------------- the two losses

    def _sample_sigma(self, n: int, device, kind: str) -> torch.Tensor:
        s = self.sched
        if kind == "lognormal":
            return s.sample_training(n, device)
        lo, hi = self.fake_sigma_range
        return s.sample_grid(n, lo, hi, device=device)

    def fake_loss(self, real: torch.Tensor | None, real_labels: torch.Tensor | None):
        """F learns to denoise G's current samples (and, with a GAN head, to tell noisy real from noisy fake)."""
        n = self.batch_size
        device = self.generator.sigmas.device
        labels = self.random_labels(n, device)
        with torch.no_grad():
            x, _ = self.generator.simulate(self.noise(n, device), labels)
        sigma = self._sample_sigma(n, device, self.fake_sigma)
        loss = _fit_denoiser(self.fake, x, labels, sigma, self.sched.sigma_data)
        logs = {"fake_denoise": loss.detach()}
        if self.gan_head is not None:
            d_loss = self._gan_fake_loss(x, labels, real, real_labels)
            logs["gan_d"] = d_loss.detach()
            loss = loss + self.gan_weights[1] * d_loss
        return loss, logs

    def _gan_logits(self, x: torch.Tensor, labels, sigma) -> torch.Tensor:
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        _, feats = self.fake(x + s * torch.randn_like(x), sigma, labels, return_features=True)
        return self.gan_head(feats).reshape(-1)

    def _gan_fake_loss(self, x, labels, real, real_labels):
        sigma = self._sample_sigma(x.shape[0], x.device, "grid")
        logit_fake = self._gan_logits(x, labels, sigma)
        logit_real = self._gan_logits(real, real_labels if self.num_classes else None, sigma[: real.shape[0]])
        return F.softplus(logit_fake).mean() + F.softplus(-logit_real).mean()

    def generator_loss(self):
        n = self.batch_size
        device = self.generator.sigmas.device
        labels = self.random_labels(n, device)
        x, _ = self.generator.simulate(self.noise(n, device), labels)
        loss, logs = self.loss_fn(x, self.real_score, self.fake, labels, self.sched, **self.loss_options)
        logs = {**logs, **self.read_samples(x)}
        if self.regression_weight:
            reg = self._regression()
            logs = {**logs, "regression": reg.detach()}
            loss = loss + self.regression_weight * reg
        if self.gan_head is not None:
            sigma = self._sample_sigma(n, device, "grid")
            g_gan = F.softplus(-self._gan_logits(x, labels, sigma)).mean()
            logs = {**logs, "gan_g": g_gan.detach()}
            loss = loss + self.gan_weights[0] * g_gan
        return loss, logs

    # ---------------------------------------------------------------- one iteration

    def _autocast(self):
        return torch.autocast(self.generator.sigmas.device.type, torch.bfloat16, enabled=self.bf16)

    def _set_fake_trainable(self, flag: bool) -> None:
        for p in self._fake_params:
            p.requires_grad_(flag)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        real, real_labels = batch.get("real"), batch.get("labels")
        logs: dict[str, torch.Tensor] = {}
        for i in range(self.fake_steps):
            with self._autocast():
                loss_f, lf = self.fake_loss(real[i] if real is not None else None,
                                            real_labels[i] if real_labels is not None else None)
            self.opt_fake.zero_grad(set_to_none=True)
            loss_f.backward()
            self.opt_fake.step()
        logs.update(lf)
        self._set_fake_trainable(False)  # F is read, not trained, in G's step (SiD backpropagates through it)
        with self._autocast():
            loss_g, lg = self.generator_loss()
        self.opt_gen.zero_grad(set_to_none=True)
        loss_g.backward()
        self._set_fake_trainable(True)
        g_norm = grad_norm(self.generator.parameters())
        self.opt_gen.step()
        if self.ema is not None:
            self.ema.update(self.generator)
        logs.update(lg)
        logs["generator"] = loss_g.detach()
        logs["generator_grad_norm"] = g_norm
        return logs
