"""`kdkit diffusion train-teacher`: train an EDM denoiser to be a teacher: the MLP on a 2-D mixture, or the
class-conditional U-Net on images (labels dropped with probability `label_dropout`, so classifier-free
guidance works). EDM's loss: log-normal sigma (P_mean -1.2, P_std 1.2), weight lambda(sigma), Adam, EMA
weights saved as the teacher (`model.safetensors`, with its architecture in the metadata).

`objective=flow` trains the same network as a flow-matching velocity model instead (`edm.FlowVelocity`), as
SD3 and Flux are trained: the rectified-flow loss `|v(x_t, t) - (n - x_0)|^2` with `x_t = (1 - t) x_0 + t n`,
t from SD3's logit-normal (mean 0, std 1) with the timestep shift `flow_shift` applied. Its file says
`diffusion_param: flow` and the shift, so `load_teacher` returns it in a `FlowMatchingAdapter` and every method
distils it, at its shifted times (`edm.Schedule`); the final 2-D evaluation samples it the same way.

It is a method like the distillation ones (`register_method("diffusion", "train-teacher")`, its options the
factory's typed arguments), trained by `kdkit.method.fit` in a `kdkit.run.Run`: same run folder, same
checkpoints, same resume rule.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import torch

from ..checkpoint import load_module_state
from ..config import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Range, RunName, build_options, check_resume
from ..errors import ConfigError
from ..method import Method, build_method, fit, register_method
from ..run import Run, run_folder
from .data import DataName, MixtureSpec, load_real_data
from .edm import FlowVelocity, loss_weight, sample_lognormal_sigma, shift_time
from .engine import EMA, Decay, make_adam
from .metrics import mixture_report
from .samplers import heun_sample
from .settings import PILLAR, method_settings, resolve
from .teachers import ARCHS, flow_model, make_denoiser, save_weights

NAME = "train-teacher"


@dataclass
class TeacherConfig:
    """`kdkit diffusion train-teacher`: the run's settings; the training options (arch, lr, EMA, ...) go in
    `options` (bare `lr=2e-3` works too)."""

    description: str = ""
    method: Literal["train-teacher"] = NAME
    data: DataName = "mixture"
    mixture: MixtureSpec = field(default_factory=MixtureSpec)
    steps: PositiveInt = 4000
    batch_size: PositiveInt = 256
    seed: NonNegInt = 0
    eval_samples: PositiveInt = 10000  # 2-D: samples of the final many-step evaluation
    eval_steps: PositiveInt = 64  # its Heun steps (a flow teacher: on its shifted times)
    save_every: NonNegInt = 1000  # checkpoints (0 = only at the end)
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 100
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: PositiveInt | None = None
    channels_last: bool = False
    train_limit: PositiveInt | None = None
    output_dir: str = "runs"
    name: RunName | None = None
    resume: str | None = None
    progress: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # the training options (`build_teacher_training`)

    PILLAR: ClassVar[str] = PILLAR
    # the learning rate is constant, so `steps` only says where to stop (a finished run can go on)
    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = (
        "description", "resume", "output_dir", "progress", "log_every", "keep_checkpoints", "save_every", "threads",
        "eval_samples", "eval_steps", "steps", "name")

    def validate(self, at: str) -> None:
        check_resume(self.resume, f"{at}resume")
        opts = method_settings(NAME, self.options, at)
        if opts["arch"] == "auto":
            opts["arch"] = "mlp" if self.data == "mixture" else "unet"
        if self.data == "mixture" and opts["arch"] != "mlp":
            raise ConfigError(f"{at}options.arch={opts['arch']}: data=mixture is 2-D, use arch=mlp")
        build_options(ARCHS[opts["arch"]], opts["arch_options"] or {}, f"{at}options.arch_options.",
                      f"denoiser '{opts['arch']}'")
        self.options = objective_defaults(opts, at)


def resolve_teacher_config(settings: list[str]) -> TeacherConfig:
    return resolve(TeacherConfig, NAME, settings)


# each objective's paper noise levels, ln sigma ~ N(p_mean, p_std^2): EDM's log-normal sigma, and SD3's logit-normal
# time (logit t = ln sigma before the shift)
NOISE_LEVELS = {"edm": (-1.2, 1.2), "flow": (0.0, 1.0)}


def objective_defaults(opts: dict, at: str = "") -> dict:
    """The options with the objective's own `p_mean`, `p_std` (and `flow_shift` 1 for flow) where left unset; a
    shift given for the EDM objective is refused."""
    flow = opts["objective"] == "flow"
    if not flow and opts["flow_shift"] is not None:
        raise ConfigError(f"{at}options.flow_shift={opts['flow_shift']} is for objective=flow (a flow-matching "
                          "teacher); EDM's noise levels are set by p_mean and p_std")
    mean, std = NOISE_LEVELS[opts["objective"]]
    return {**opts, "p_mean": mean if opts["p_mean"] is None else opts["p_mean"],
            "p_std": std if opts["p_std"] is None else opts["p_std"],
            "flow_shift": (1.0 if opts["flow_shift"] is None else opts["flow_shift"]) if flow else None}


@dataclass
class TeacherContext:
    """What the factory gets: the real data, the device, and the run's settings."""

    data: Any
    device: torch.device
    cfg: TeacherConfig


class TeacherTraining(Method):
    """EDM denoising (or, with `flow_shift` set, flow matching) on real data: one Adam step per batch, EMA of the
    weights (the teacher)."""

    def __init__(self, net, data, cfg: TeacherConfig, *, lr: float, label_dropout: float, p_mean: float,
                 p_std: float, ema_decay: float, grad_clip: float, bf16: bool, num_classes: int,
                 flow_shift: float | None = None):
        self.net, self.data, self.cfg = net, data, cfg
        self.flow_shift = flow_shift
        self.velocity = FlowVelocity(net) if flow_shift is not None else None
        self.ema = EMA(net, ema_decay)
        self.opt = make_adam(net.parameters(), lr)
        self.label_dropout, self.p_mean, self.p_std, self.grad_clip = label_dropout, p_mean, p_std, grad_clip
        self.num_classes, self.sigma_data = num_classes, net.sigma_data
        self.bf16 = bf16 and next(net.parameters()).is_cuda
        self.total_steps, self.log_every, self.save_every = cfg.steps, cfg.log_every, cfg.save_every
        self.name = NAME
        self.report: dict | None = None

    def batches(self, start: int):
        while True:
            yield self.data.batch(self.cfg.batch_size)

    def step(self, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        labels = None
        if self.num_classes:
            drop = torch.rand(y.shape[0], device=y.device) < self.label_dropout
            labels = torch.where(drop, torch.full_like(y, self.num_classes), y)
        loss = self._flow_loss(x, labels) if self.velocity is not None else self._edm_loss(x, labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
        self.opt.step()
        self.ema.update(self.net)
        return {"loss": loss.detach()}

    def _edm_loss(self, x, labels) -> torch.Tensor:
        sigma = sample_lognormal_sigma(x.shape[0], self.p_mean, self.p_std, device=x.device)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.bf16):
            pred = self.net(x + s * torch.randn_like(x), sigma, labels)
        return (loss_weight(s, self.sigma_data) * (pred.float() - x) ** 2).mean()

    def _flow_loss(self, x, labels) -> torch.Tensor:
        """Rectified flow: `x_t = (1 - t) x + t n`, target `v = n - x`, logit(t) ~ N(p_mean, p_std^2) then shifted."""
        t = shift_time(torch.sigmoid(torch.randn(x.shape[0], device=x.device) * self.p_std + self.p_mean),
                       self.flow_shift)
        tt = t.reshape(-1, *([1] * (x.ndim - 1)))
        noise = torch.randn_like(x)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.bf16):
            v = self.velocity((1 - tt) * x + tt * noise, t, labels)
        return ((v.float() - (noise - x)) ** 2).mean()

    def teacher(self):
        """The EMA weights as the teacher denoiser (a flow model inside its `FlowMatchingAdapter`)."""
        return flow_model(self.ema.module, self.flow_shift) if self.flow_shift is not None else self.ema.module

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "report": self.report}

    def load_state_dict(self, state: dict) -> None:
        load_module_state({"net": self.net, "ema": self.ema}, state, "the resumed checkpoint")
        self.opt.load_state_dict(state["optimizer"])
        self.report = state["report"]

    @torch.no_grad()
    def evaluate(self, run, step: int) -> dict:
        """2-D data: the EMA teacher's many-step Heun samples (a flow teacher: on its shifted times) against true
        samples (images: none)."""
        if self.cfg.data != "mixture":
            return {}
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed + 1)
        true = self.data.mixture.sample(cfg.eval_samples, g)
        z = torch.randn(cfg.eval_samples, 2, generator=g).to(next(self.net.parameters()).device)
        xs = heun_sample(self.teacher(), z, cfg.eval_steps).cpu()
        self.report = mixture_report(xs, true, self.data.mixture.means, self.data.mixture.stds)
        grid = f" on t shifted by {self.flow_shift:g}" if self.flow_shift is not None else ""
        run.log(f"teacher {cfg.eval_steps}-step Heun{grid}: sw2={self.report['sw2']:.4f} "
                f"off-mode={self.report['off_mode_pct']:.2f}% mmd={self.report['mmd']:.5f} "
                f"mode-mass max err={self.report['mode_mass_max_err']:.2f}")
        return self.report

    def artefacts(self, run) -> dict:
        save_weights(self.teacher(), run.run_dir / "model.safetensors",
                     {"data": self.cfg.data, "steps": str(self.total_steps)})
        return {"steps": self.total_steps, "eval": self.report}


Finite = Annotated[float, Range()]


@register_method(PILLAR, NAME)
def build_teacher_training(ctx: TeacherContext, *, arch: Literal["auto", "mlp", "unet"] = "auto",
                           arch_options: dict[str, Any] | None = None, conditional: bool = True,
                           label_dropout: Annotated[float, Range(ge=0, lt=1)] = 0.1, lr: PositiveFloat = 1e-3,
                           objective: Literal["edm", "flow"] = "edm", flow_shift: PositiveFloat | None = None,
                           p_mean: Finite | None = None, p_std: PositiveFloat | None = None, ema_decay: Decay = 0.999,
                           grad_clip: NonNegFloat = 1.0, bf16: bool = False) -> TeacherTraining:
    """EDM's teacher training: `arch` (auto: mlp for 2-D data, unet for images) with `arch_options` (e.g.
    {channels: 128, blocks: 2}), class-conditional with label dropout, Adam at `lr`, gradients clipped at
    `grad_clip` (0: none), bf16 autocast on CUDA. `objective=flow`: the network as a flow-matching velocity model
    (rectified flow), its times shifted by `flow_shift` (SD3's shift; default 1, none). The noise levels: ln sigma
    ~ N(p_mean, p_std^2), default EDM's -1.2, 1.2, or for flow SD3's logit-normal time, logit t ~ N(0, 1)."""
    o = objective_defaults({"objective": objective, "flow_shift": flow_shift, "p_mean": p_mean, "p_std": p_std})
    cfg, data = ctx.cfg, ctx.data
    num_classes = data.num_classes if conditional and cfg.data != "mixture" else 0
    if cfg.data == "mixture":
        opts = {"dim": 2, "width": 256, "depth": 4, "sigma_data": data.mixture.data_std, "num_classes": num_classes}
    else:
        opts = {"in_channels": data.sample_shape[0], "image_size": data.sample_shape[-1], "num_classes": num_classes,
                "sigma_data": 0.5}
    arch = arch if arch != "auto" else ("mlp" if cfg.data == "mixture" else "unet")
    net = make_denoiser(arch, **{**opts, **(arch_options or {})}).to(ctx.device)
    if cfg.channels_last and arch == "unet":
        net = net.to(memory_format=torch.channels_last)
    return TeacherTraining(net, data, cfg, lr=lr, label_dropout=label_dropout, p_mean=o["p_mean"], p_std=o["p_std"],
                           ema_decay=ema_decay, grad_clip=grad_clip, bf16=bf16, num_classes=num_classes,
                           flow_shift=o["flow_shift"])


def train(cfg: TeacherConfig) -> dict:
    """Train the teacher in its run folder and return the summary (also metrics.json)."""
    run = Run(cfg, run_folder(cfg.output_dir, cfg.name, f"diffusion-teacher-{cfg.data}"), resume=cfg.resume,
              seed=cfg.seed, device=cfg.device, threads=cfg.threads, progress=cfg.progress,
              keep_checkpoints=cfg.keep_checkpoints, may_change=TeacherConfig.RESUME_MAY_CHANGE, console=cfg.progress)
    t0 = time.perf_counter()
    run.start()  # the resume rule and the run folder first; then the network is drawn from the seed
    data = load_real_data(cfg.data, run.device, cfg.mixture, limit=cfg.train_limit)
    method = build_method(PILLAR, NAME, TeacherContext(data, run.device, cfg), cfg.options)
    summary = fit(run, method)
    summary["wall_s"] = time.perf_counter() - t0  # this process's: a resumed run counts from its resume
    run.write_json("metrics.json", summary)
    return {**summary, "run_dir": str(run.run_dir)}


def train_teacher(settings: list[str]) -> dict:
    return train(resolve_teacher_config(settings))
