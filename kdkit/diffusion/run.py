"""`kdkit diffusion METHOD [recipe=NAME] [key=value ...]`: check every setting, then build the teacher, the
method's networks and the data, and train with `kdkit.method.fit` in a `kdkit.run.Run`. The run folder:

    config.yaml            every resolved setting (the method's options included)
    metrics.jsonl          loss terms every `log_every` steps, the evaluations
    metrics.json           the summary: the teacher's and each evaluation's numbers, `final`, it/s, NFE, and
                           `guards` (the saturation/collapse readings and any warning: `guards.py`)
    train.log              what the console showed
    checkpoints/step-N/    the one checkpoint format; `resume=auto` continues exactly
    samples/step-N.png     scatter plots (2-D) or image grids, at evaluations and every `sample_every` steps
    generator.safetensors  the final few-step generator (its EMA when the method keeps one)

`kdkit diffusion train-teacher` is the same shape (`train_teacher.py`).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from ..config import ExistingPath, NonNegInt, PositiveInt, RunName, check_resume
from ..errors import ConfigError
from ..method import build_method, fit
from ..run import Run, run_folder
from .data import DataName, MixtureSpec, load_real_data
from .edm import Denoiser
from .engine import MethodContext, Plan, Schedule, check_shapes
from .evaluation import Evaluation
from .fast_step import FastMode
from .features import check_fd_classifier
from .guards import Guards, GuardSpec
from .metrics import mixture_headline
from .mlp import ResidualDenoiser
from .settings import PILLAR, method_settings, resolve
from .teachers import check_teacher, load_diffusers_teacher, load_teacher, make_denoiser


@dataclass
class RunConfig:
    """`kdkit diffusion METHOD`: the run's settings; the method's own go in `options`."""

    description: str = ""
    method: str = "dmd2"  # a registered diffusion method (the command's METHOD)
    data: DataName = "mixture"
    # "analytic" (the mixture's exact denoiser), a `kdkit diffusion train-teacher` run folder / safetensors file,
    # or diffusers:FOLDER (a UNet2DModel + DDPMScheduler)
    teacher: str = "analytic"
    mixture: MixtureSpec = field(default_factory=MixtureSpec)
    steps: PositiveInt = 2000  # method steps (one generator update each)
    batch_size: PositiveInt = 256
    seed: NonNegInt = 0
    width: PositiveInt = 128  # generator / fake-score MLPs beside an analytic teacher
    depth: PositiveInt = 3
    eval_every: NonNegInt = 1000  # 0: only after the last step
    eval_samples: PositiveInt = 20000
    teacher_steps: PositiveInt = 64  # the teacher's many-step sampler, for the reference metrics
    sampler: Literal["heun", "euler"] = "heun"
    sample_every: NonNegInt = 500  # PNG of samples (0 = only at evaluations)
    save_every: NonNegInt = 500  # checkpoints (0 = only at the end)
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 50
    fast: FastMode = "eager"
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    channels_last: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: PositiveInt | None = None
    output_dir: str = "runs"
    name: RunName | None = None
    resume: str | None = None  # a run folder or checkpoint folder, or "auto" (latest in this run's folder)
    progress: bool = True
    fd_classifier: ExistingPath | None = None  # a kdkit-trained classifier of the same data: "FD (kdkit features)"
    inception: ExistingPath | None = None  # TorchScript Inception-v3 (inception-2015-12-05.pt): standard FID
    train_limit: PositiveInt | None = None  # use the first N training images (smoke tests)
    guards: GuardSpec = field(default_factory=GuardSpec)  # thresholds of the saturation/collapse warnings (guards.py)
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options (`kdkit diffusion --help`)

    PILLAR: ClassVar[str] = PILLAR
    # what a resumed run may change: evaluation, pictures, logging, housekeeping, the fast step, and `steps`
    # (every method's learning rate is constant, so `steps` only says where to stop: a finished run can go on)
    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = (
        "description", "resume", "output_dir", "progress", "log_every", "keep_checkpoints", "save_every", "threads",
        "eval_every", "eval_samples", "teacher_steps", "sampler", "sample_every", "fd_classifier", "inception",
        "fast", "compile_mode", "steps", "name", "guards")

    def validate(self, at: str) -> None:
        check_resume(self.resume, f"{at}resume")
        if self.fd_classifier:
            check_fd_classifier(self.fd_classifier, self.data, f"{at}fd_classifier")
        meta = check_teacher(self.teacher, f"{at}teacher")
        if self.data == "mixture" and meta and (meta["diffusion_arch"] != "mlp" or
                                                json.loads(meta.get("diffusion_options", "{}")).get("dim", 2) != 2):
            raise ConfigError(f"{at}teacher={self.teacher} denoises {meta['diffusion_arch']} samples, but "
                              f"data=mixture is 2-D: pass a teacher trained with `kdkit diffusion train-teacher "
                              "data=mixture`, or data=cifar10")
        if self.data == "mixture" and self.teacher.startswith("diffusers:"):
            raise ConfigError(f"{at}data=mixture is 2-D; a diffusers teacher makes images (use data=cifar10)")
        if self.data != "mixture" and self.teacher == "analytic":
            raise ConfigError(f"{at}teacher=analytic exists only for data=mixture; for data={self.data} pass "
                              "teacher=PATH (a `kdkit diffusion train-teacher` run) or teacher=diffusers:FOLDER")
        self.options = method_settings(self.method, self.options, at)
        if self.options.get("pairs") is not None and self.options["pairs"] < self.batch_size:
            raise ConfigError(f"{at}options.pairs={self.options['pairs']} must be >= {at}batch_size="
                              f"{self.batch_size} (each step draws a batch of the stored teacher pairs)")


def resolve_config(method: str, settings: list[str]) -> RunConfig:
    """`kdkit diffusion METHOD` settings as a validated RunConfig (see `settings.py`)."""
    if method == "train-teacher":
        raise ConfigError("train-teacher has its own settings: use kdkit.diffusion.train_teacher")
    return resolve(RunConfig, method, settings)


# ---------------------------------------------------------------- building


def build_teacher(cfg: RunConfig) -> Denoiser:
    if cfg.teacher == "analytic":
        return cfg.mixture.build().denoiser(cfg.mixture.conditional)
    if cfg.teacher.startswith("diffusers:"):
        return load_diffusers_teacher(cfg.teacher.partition(":")[2])
    return load_teacher(cfg.teacher)


def build_context(cfg: RunConfig, teacher: Denoiser) -> MethodContext:
    """Generator and fake-score networks: copies of the teacher when it has weights, else (the analytic
    teacher) a fresh MLP generator and a fake score that is the teacher plus a zero-initialised residual."""
    sched = Schedule.of(teacher)  # a flow-matching teacher's own (shifted) schedule, else EDM's
    has_weights = any(True for _ in teacher.parameters())

    def copy_teacher():
        return copy.deepcopy(teacher).requires_grad_(True).train()

    if has_weights:
        student, fake = copy_teacher, copy_teacher
    else:
        def student():
            return make_denoiser("mlp", dim=teacher.sample_shape[0], width=cfg.width, depth=cfg.depth,
                                 sigma_data=teacher.sigma_data, num_classes=teacher.num_classes)

        def fake():
            return ResidualDenoiser(teacher, cfg.width, cfg.depth)

    return MethodContext(teacher, sched, student, fake, cfg.batch_size, capturable="cuda_graph" in cfg.fast)


def build(cfg: RunConfig, teacher: Denoiser, device: torch.device):
    """The method, on `device`, its generator checked against the teacher's sample shape."""
    method = build_method(PILLAR, cfg.method, build_context(cfg, teacher), cfg.options)
    check_shapes(method.teacher, method.generator, method.sample_shape)
    method.to(device)
    if cfg.channels_last and len(method.sample_shape) == 3:
        method.to(memory_format=torch.channels_last)
    return method


# ---------------------------------------------------------------- the run


def distill(cfg: RunConfig) -> dict:
    """Train `cfg.method` in its run folder and return the summary (also metrics.json); on the 2-D mixture the
    last line logged is the headline: sliced-W2 against the teacher's, mass off the modes, modes covered."""
    t0 = time.perf_counter()
    run = Run(cfg, run_folder(cfg.output_dir, cfg.name, f"diffusion-{cfg.method}-{cfg.data}"), resume=cfg.resume,
              seed=cfg.seed, device=cfg.device, threads=cfg.threads, progress=cfg.progress,
              keep_checkpoints=cfg.keep_checkpoints, may_change=RunConfig.RESUME_MAY_CHANGE, console=cfg.progress)
    run.start()  # the resume rule and the run folder first; then the networks are drawn from the seed
    teacher = build_teacher(cfg).to(run.device)
    if cfg.data == "mixture" and tuple(teacher.sample_shape) != (2,):
        raise ConfigError(f"data=mixture is 2-D but the teacher denoises samples of shape "
                          f"{tuple(teacher.sample_shape)}")
    method = build(cfg, teacher, run.device)
    data = load_real_data(cfg.data, run.device, cfg.mixture, limit=cfg.train_limit)
    if tuple(data.sample_shape) != tuple(method.sample_shape):
        raise ConfigError(f"data={cfg.data} has samples of shape {tuple(data.sample_shape)} but the teacher "
                          f"denoises {tuple(method.sample_shape)}")
    method.plan = Plan(name=cfg.method, steps=cfg.steps, log_every=cfg.log_every, eval_every=cfg.eval_every,
                       save_every=cfg.save_every, sample_every=cfg.sample_every, fast=cfg.fast,
                       compile_mode=cfg.compile_mode, channels_last=cfg.channels_last, batch_size=cfg.batch_size,
                       real=data.batch, evaluation=Evaluation(cfg, teacher, data, run.device),
                       guards=Guards(cfg.guards, data, run.device, cfg.batch_size, cfg.seed))
    summary = {"data": cfg.data, **fit(run, method)}
    summary["wall_s"] = time.perf_counter() - t0  # everything: networks, warm-up, training, evaluations
    run.write_json("metrics.json", summary)
    if cfg.data == "mixture" and summary.get("final"):
        final = summary["final"]
        run.log(mixture_headline(final, f"{cfg.method} ({final['nfe']}-step, step {final['step']})") +
                f"; {summary['wall_s']:.0f}s on {torch.get_num_threads()} thread(s)")
    return {**summary, "run_dir": str(run.run_dir)}


def run_method(method: str, settings: list[str]) -> dict:
    return distill(resolve_config(method, settings))


def run_diffusion(what: str, settings: list[str], dry_run: bool = False):
    """`kdkit diffusion WHAT ...`: a distillation method or `train-teacher`; with `dry_run`, only the resolved
    settings (every check done)."""
    from . import train_teacher

    cfg = train_teacher.resolve_teacher_config(settings) if what == "train-teacher" else resolve_config(what, settings)
    if dry_run:
        return cfg
    return train_teacher.train(cfg) if what == "train-teacher" else distill(cfg)
