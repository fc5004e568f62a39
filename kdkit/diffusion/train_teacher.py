"""`kdkit diffusion train-teacher`: train an EDM denoiser to be a teacher: the MLP on a 2-D mixture, or the
class-conditional U-Net on CIFAR-10 (labels dropped with probability `label_dropout`, so classifier-free
guidance works). EDM's loss: log-normal sigma (P_mean -1.2, P_std 1.2), weight lambda(sigma), Adam, EMA
weights saved as the teacher. Checkpoints are atomic and resume exactly, like the distillation runs."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from ..config import build, parse_overrides
from ..errors import ConfigError
from .. import checkpoint as ckpt
from .checkpoint import load_run_checkpoint, save_run_checkpoint
from .data import MixtureSpec, load_real_data
from .edm import loss_weight, sample_lognormal_sigma
from .engine import EMA, make_adam
from .metrics import mixture_report
from .samplers import heun_sample
from .teachers import make_denoiser, save_denoiser


@dataclass
class TeacherConfig:
    data: Literal["mixture", "cifar10"] = "mixture"
    mixture: MixtureSpec = field(default_factory=MixtureSpec)
    arch: Literal["auto", "mlp", "unet"] = "auto"  # auto: mlp for mixture, unet for images
    arch_options: dict[str, Any] = field(default_factory=dict)  # e.g. {channels: 128, blocks: 2}
    conditional: bool = True  # class-conditional (images) with label dropout for CFG
    label_dropout: float = 0.1
    steps: int = 4000
    batch_size: int = 256
    lr: float = 1e-3
    p_mean: float = -1.2
    p_std: float = 1.2
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    eval_samples: int = 10000
    eval_steps: int = 64
    save_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 100
    device: str = "auto"
    threads: int | None = None
    bf16: bool = False  # autocast to bfloat16 on CUDA
    channels_last: bool = False
    train_limit: int | None = None
    output_dir: str = "runs"
    name: str | None = None
    resume: str | None = None
    progress: bool = True


class _TeacherTraining(torch.nn.Module):
    """The network and its EMA as one module, so the distillation checkpoint code saves and resumes it."""

    def __init__(self, net, ema_decay):
        super().__init__()
        self.net, self.ema = net, EMA(net, ema_decay)


def resolve_teacher_config(settings: list[str]) -> TeacherConfig:
    cfg = build(TeacherConfig, parse_overrides(settings), "")
    if cfg.arch == "auto":
        cfg.arch = "mlp" if cfg.data == "mixture" else "unet"
    if cfg.data == "mixture" and cfg.arch != "mlp":
        raise ConfigError("data=mixture is 2-D: use arch=mlp")
    if not 0 <= cfg.label_dropout < 1:
        raise ConfigError(f"label_dropout must be in [0, 1), got {cfg.label_dropout}")
    return cfg


def train_teacher(settings: list[str]) -> dict:
    cfg = resolve_teacher_config(settings)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = load_real_data(cfg.data, device, cfg.mixture, limit=cfg.train_limit)
    num_classes = data.num_classes if cfg.conditional and cfg.data != "mixture" else 0
    if cfg.data == "mixture":
        sigma_data = data.mixture.data_std
        opts = {"dim": 2, "width": 256, "depth": 4, "sigma_data": sigma_data, "num_classes": num_classes}
    else:
        sigma_data = 0.5
        opts = {"in_channels": data.sample_shape[0], "image_size": data.sample_shape[-1], "num_classes": num_classes,
                "sigma_data": sigma_data}
    opts.update(cfg.arch_options)
    net = make_denoiser(cfg.arch, **opts).to(device)
    if cfg.channels_last and cfg.arch == "unet":
        net = net.to(memory_format=torch.channels_last)
    state = _TeacherTraining(net, cfg.ema_decay).to(device)
    opt = make_adam(net.parameters(), cfg.lr)
    run_dir = Path(cfg.output_dir) / (cfg.name or f"diffusion-teacher-{cfg.data}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    step, history = 0, []
    if cfg.resume:
        p = run_dir if cfg.resume == "auto" else Path(cfg.resume)
        folder = p if (p / ckpt.MANIFEST).is_file() else ckpt.latest_checkpoint(p)
        if folder is not None:
            st = load_run_checkpoint(folder, state, {"opt": opt})
            step, history = st["step"], st["history"]
    use_bf16 = cfg.bf16 and device.type == "cuda"
    t_log, running, n_run = time.perf_counter(), torch.zeros((), device=device), 0
    while step < cfg.steps:
        x, y = data.batch(cfg.batch_size)
        labels = None
        if num_classes:
            drop = torch.rand(y.shape[0], device=device) < cfg.label_dropout
            labels = torch.where(drop, torch.full_like(y, num_classes), y)
        sigma = sample_lognormal_sigma(x.shape[0], cfg.p_mean, cfg.p_std, device=device)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16):
            pred = net(x + s * torch.randn_like(x), sigma, labels)
        loss = (loss_weight(s, sigma_data) * (pred.float() - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        state.ema.update(net)
        running += loss.detach()
        n_run += 1
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"step": step, "loss": float(running) / n_run, "it_s": n_run / (time.perf_counter() - t_log)}
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(f"teacher loss is not finite at step {step}")
            history.append(rec)
            if cfg.progress:
                print(f"teacher step {step}: loss={rec['loss']:.4f} it/s={rec['it_s']:.1f}", flush=True)
            running, n_run, t_log = torch.zeros((), device=device), 0, time.perf_counter()
        if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
            save_run_checkpoint(run_dir / "checkpoints" / f"step-{step}", state, {"opt": opt},
                                {"step": step, "history": history})
            ckpt.prune_checkpoints(run_dir, cfg.keep_checkpoints)
    teacher = state.ema.module
    save_denoiser(teacher, run_dir / "model.safetensors", {"data": cfg.data, "steps": str(step)})
    metrics = {"history": history, "steps": step}
    if cfg.data == "mixture":
        g = torch.Generator().manual_seed(cfg.seed + 1)
        true = data.mixture.sample(cfg.eval_samples, g)
        z = torch.randn(cfg.eval_samples, 2, generator=g).to(device)
        xs = heun_sample(teacher, z, cfg.eval_steps).cpu()
        metrics["eval"] = mixture_report(xs, true, data.mixture.means)
        if cfg.progress:
            print(f"teacher {cfg.eval_steps}-step Heun: sw2={metrics['eval']['sw2']:.4f} "
                  f"mmd={metrics['eval']['mmd']:.5f} mode-mass max err={metrics['eval']['mode_mass_max_err']:.2f}")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    metrics["run_dir"] = str(run_dir)
    return metrics
