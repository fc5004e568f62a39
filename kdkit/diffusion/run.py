"""`kdkit diffusion METHOD [key=value ...]`: build teacher, networks and method from a typed config, train with
the chosen fast step, evaluate, and leave one run folder behind:

    config.yaml         the resolved config (method options included)
    metrics.json        teacher and student metrics (per evaluation and final), loss terms, it/s, NFE
    samples/step-N.png  scatter plots (2-D) or image grids, every `sample_every` steps
    checkpoints/step-N/ atomic, checksummed; `resume=auto` (or a folder) continues exactly
    generator.safetensors  the final few-step generator (its EMA when the method keeps one)
    train.log
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from ..config import build, coerce, parse_overrides
from ..errors import ConfigError
from .. import checkpoint as ckpt
from . import consistency, dmd2, rectified_flow, sid  # noqa: F401  (registers the methods)
from .checkpoint import load_run_checkpoint, save_run_checkpoint
from .data import MixtureSpec, load_real_data
from .edm import Denoiser
from .engine import METHODS, MethodContext, Schedule, check_shapes
from .fast_step import MODES, make_step
from .mlp import ResidualDenoiser
from .samplers import SAMPLERS, nfe
from .teachers import load_diffusers_teacher, load_teacher, make_denoiser, save_denoiser


@dataclass
class RunConfig:
    method: str = "dmd2"
    data: Literal["mixture", "cifar10"] = "mixture"
    # "analytic" (the mixture's exact denoiser), a `kdkit diffusion train-teacher` run folder / safetensors file,
    # or diffusers:FOLDER (a UNet2DModel + DDPMScheduler)
    teacher: str = "analytic"
    mixture: MixtureSpec = field(default_factory=MixtureSpec)
    steps: int = 2000  # method steps (one generator update each)
    batch_size: int = 256
    seed: int = 0
    width: int = 128  # generator / fake-score MLPs beside an analytic teacher
    depth: int = 3
    eval_every: int = 1000
    eval_samples: int = 20000
    teacher_steps: int = 64  # the teacher's many-step sampler, for the reference metrics
    sampler: Literal["heun", "euler"] = "heun"
    sample_every: int = 500  # PNG of samples (0 = only at the end)
    save_every: int = 500  # checkpoints (0 = only at the end)
    keep_checkpoints: int = 2
    log_every: int = 50
    fast: Literal["eager", "compile", "cuda_graph", "compile+cuda_graph"] = "eager"
    compile_mode: str | None = None
    channels_last: bool = False
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None
    output_dir: str = "runs"
    name: str | None = None
    resume: str | None = None  # a run folder or checkpoint folder, or "auto" (latest in this run's folder)
    progress: bool = True
    fd_classifier: str | None = None  # a kdkit-trained CIFAR-10 classifier run: "FD (kdkit features)"
    inception: str | None = None  # TorchScript Inception-v3 (inception-2015-12-05.pt): standard FID
    train_limit: int | None = None  # use the first N training images (smoke tests)
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options (see `kdkit diffusion --help`)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# What the 2-D mixture needs instead of the paper's image settings: a learning rate that trains an MLP from
# scratch in minutes, and (low-dimensional data) no noise levels far below the modes' own width, where the
# per-sample normaliser |x - D_real| of DMD/SiD is ~0 and the fake score's error dominates.
PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("dmd2", "mixture"): {"lr_generator": 1e-3, "lr_fake": 1e-3, "sigma_lo": 0.3, "sigma_hi": 0.75, "fake_sigma_lo": 0.3,
                          "fake_sigma_hi": 0.75, "gan": False, "ema_decay": 0.99},
    ("sid", "mixture"): {"lr_generator": 1e-3, "lr_fake": 1e-3, "t_min": 0.25, "ema_decay": 0.99},
    ("cd", "mixture"): {"lr": 1e-3, "ema_decay": 0.99},
    ("rectflow", "mixture"): {"lr": 1e-3, "ema_decay": 0.99, "teacher_steps": 32},
}


def method_params(name: str) -> dict[str, Any]:
    """The typed keyword options of a method factory (what `options.*` / bare `key=value` may set)."""
    factory = METHODS.get(name)
    hints = typing.get_type_hints(factory)
    sig = inspect.signature(factory)
    return {n: (hints.get(n, Any), p.default) for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY}


def resolve_config(method: str, settings: list[str]) -> RunConfig:
    """`key=value` settings -> a validated RunConfig. Keys of the method's factory may be given bare
    (`fake_steps=10`) or as `options.fake_steps=10`; anything else unknown fails naming both sets of choices."""
    raw = parse_overrides(settings)
    params = method_params(method)  # also rejects an unknown method, listing the choices
    run_keys = {f.name for f in dataclasses.fields(RunConfig)}
    opts = dict(raw.pop("options", {}) or {})
    for key in list(raw):
        if key in params and key not in run_keys:
            opts[key] = raw.pop(key)
    for key in raw:
        if key not in run_keys:
            import difflib

            close = difflib.get_close_matches(key, list(run_keys) + list(params), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown setting '{key}' for `kdkit diffusion {method}`.{hint} Run settings: "
                              f"{', '.join(sorted(run_keys - {'method', 'options'}))}. {method} options: "
                              f"{', '.join(params)}")
    cfg = build(RunConfig, {**raw, "method": method}, "")
    merged = dict(PRESETS.get((method, cfg.data), {}))
    merged.update(opts)
    for key, value in merged.items():
        if key not in params:
            raise ConfigError(f"unknown option '{key}' for method {method}; its options: {', '.join(params)}")
        tp = params[key][0]
        merged[key] = coerce(value, tp, f"options.{key}") if tp is not Any else value
    cfg.options = {k: _plain(v) for k, v in {**{k: d for k, (_, d) in params.items()}, **merged}.items()}
    if cfg.data == "mixture" and cfg.teacher.startswith("diffusers:"):
        raise ConfigError("data=mixture is 2-D; a diffusers teacher makes images (use data=cifar10)")
    if cfg.data != "mixture" and cfg.teacher == "analytic":
        raise ConfigError(f"teacher=analytic exists only for data=mixture; for data={cfg.data} pass teacher=PATH (a "
                          "`kdkit diffusion train-teacher` run) or teacher=diffusers:FOLDER")
    return cfg


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


# ---------------------------------------------------------------- building


def pick_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=cpu (or auto)")
    return torch.device(cfg.device)


def build_teacher(cfg: RunConfig) -> Denoiser:
    if cfg.teacher == "analytic":
        return cfg.mixture.build().denoiser(cfg.mixture.conditional)
    if cfg.teacher.startswith("diffusers:"):
        return load_diffusers_teacher(cfg.teacher.partition(":")[2])
    return load_teacher(cfg.teacher)


def build_context(cfg: RunConfig, teacher: Denoiser, capturable: bool) -> MethodContext:
    """Generator and fake-score networks: copies of the teacher when it has weights, else (the analytic
    teacher) a fresh MLP generator and a fake score that is the teacher plus a zero-initialised residual."""
    sched = Schedule(sigma_data=teacher.sigma_data)
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

    return MethodContext(teacher, sched, student, fake, cfg.batch_size, capturable)


def build_method(cfg: RunConfig, teacher: Denoiser, device: torch.device):
    capturable = "cuda_graph" in cfg.fast
    ctx = build_context(cfg, teacher, capturable)
    method = METHODS.build(cfg.method, ctx, **cfg.options)
    check_shapes(method.teacher, method.generator, method.sample_shape)
    method.to(device)
    if cfg.channels_last and len(method.sample_shape) == 3:
        method.to(memory_format=torch.channels_last)
    return method


# ---------------------------------------------------------------- the run


class Runner:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.device = pick_device(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        name = cfg.name or f"diffusion-{cfg.method}-{cfg.data}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run_dir = Path(cfg.output_dir) / name
        torch.manual_seed(cfg.seed)
        self.teacher = build_teacher(cfg).to(self.device)
        if cfg.data == "mixture" and tuple(self.teacher.sample_shape) != (2,):
            raise ConfigError(f"data=mixture is 2-D but the teacher denoises samples of shape "
                              f"{tuple(self.teacher.sample_shape)}")
        self.method = build_method(cfg, self.teacher, self.device)
        self.data = load_real_data(cfg.data, self.device, cfg.mixture, limit=cfg.train_limit)
        if tuple(self.data.sample_shape) != tuple(self.method.sample_shape):
            raise ConfigError(f"data={cfg.data} has samples of shape {tuple(self.data.sample_shape)} but the teacher "
                              f"denoises {tuple(self.method.sample_shape)}")
        self.metrics: dict[str, Any] = {"method": cfg.method, "data": cfg.data, "device": str(self.device),
                                        "train": [], "evals": []}
        self.step = 0

    # -- helpers

    def log(self, text: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "train.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        if self.cfg.progress:
            print(text, flush=True)

    def batch(self) -> dict[str, torch.Tensor]:
        m = self.method
        if not m.needs_real:
            return {}
        xs, ys = zip(*(self.data.batch(self.cfg.batch_size) for _ in range(m.real_batches)))
        out = {"real": torch.stack(xs), "labels": torch.stack(ys)}
        if self.cfg.channels_last and out["real"].ndim == 5:
            out["real"] = torch.stack([x.contiguous(memory_format=torch.channels_last) for x in out["real"]])
        return out

    def _resume_folder(self) -> Path | None:
        r = self.cfg.resume
        if not r:
            return None
        p = self.run_dir if r == "auto" else Path(r)
        if (p / ckpt.MANIFEST).is_file():
            return p
        latest = ckpt.latest_checkpoint(p)
        if latest is None and r != "auto":
            from ..errors import CheckpointError

            raise CheckpointError(f"resume={r}: no checkpoint there (expected {p}/checkpoints/step-N/)")
        return latest

    # -- evaluation

    def _eval_setup(self):
        """Fixed evaluation noise, labels, true samples and the teacher's many-step reference (computed once)."""
        if hasattr(self, "_eval"):
            return self._eval
        cfg, n = self.cfg, self.cfg.eval_samples
        g = torch.Generator().manual_seed(10_000 + cfg.seed)
        z = torch.randn(n, *self.method.sample_shape, generator=g).to(self.device)
        k = self.method.num_classes
        labels = torch.randint(0, k, (n,), generator=g).to(self.device) if k else None
        ev = {"z": z, "labels": labels}
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(20_000 + cfg.seed)
            ev["teacher"] = torch.cat([SAMPLERS[cfg.sampler](self.teacher, z[i:i + 1000], cfg.teacher_steps,
                                                             None if labels is None else labels[i:i + 1000])
                                       for i in range(0, n, 1000)])
        teacher_s = time.perf_counter() - t0
        if cfg.data == "mixture":
            ev["true"] = self.data.mixture.sample(n, g).to(self.device)
            from .metrics import mixture_report

            rep = mixture_report(ev["teacher"].cpu(), ev["true"].cpu(), self.data.mixture.means)
        else:
            rep = self._image_report(ev["teacher"], ev, reference=False)
        rep |= {"nfe": nfe(cfg.sampler, cfg.teacher_steps), "sampler": cfg.sampler, "steps": cfg.teacher_steps,
                "sample_s": round(teacher_s, 3)}
        self.metrics["teacher"] = rep
        self._eval = ev
        return ev

    def _image_report(self, x: torch.Tensor, ev: dict, reference: bool = True) -> dict:
        from .features import image_report

        return image_report(x, self.cfg, self.device, ev, reference)

    @torch.no_grad()
    def evaluate(self) -> dict:
        ev = self._eval_setup()
        gen = self.method.sampler().eval()
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(30_000 + self.cfg.seed)
            x = torch.cat([gen(ev["z"][i:i + 1000], None if ev["labels"] is None else ev["labels"][i:i + 1000])
                           for i in range(0, ev["z"].shape[0], 1000)])
        sample_s = time.perf_counter() - t0
        if self.cfg.data == "mixture":
            from .metrics import mixture_report

            rep = mixture_report(x.cpu(), ev["true"].cpu(), self.data.mixture.means, ev["teacher"].cpu())
        else:
            rep = self._image_report(x, ev)
        rep |= {"step": self.step, "nfe": gen.steps, "sample_s": round(sample_s, 3)}
        self.metrics["evals"].append(rep)
        self._samples_png(x, ev)
        return rep

    def _samples_png(self, x: torch.Tensor, ev: dict) -> Path:
        from .pictures import image_grid_png, scatter_png

        path = self.run_dir / "samples" / f"step-{self.step}.png"
        if self.cfg.data == "mixture":
            scatter_png(path, {"true": ev["true"], f"teacher ({self.cfg.teacher_steps}-step {self.cfg.sampler})":
                               ev["teacher"], f"{self.cfg.method} ({self.method.sampler().steps}-step), "
                               f"step {self.step}": x})
        else:
            image_grid_png(path, x[:64])
        return path

    # -- training

    def save(self) -> Path:
        state = {"step": self.step, "metrics": self.metrics}
        folder = save_run_checkpoint(self.run_dir / "checkpoints" / f"step-{self.step}", self.method,
                                     self.method.optimizers(), state)
        ckpt.prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        return folder

    def fit(self) -> dict:
        cfg, m = self.cfg, self.method
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        folder = self._resume_folder()
        m.prepare(resuming=folder is not None)
        if folder is not None:
            state = load_run_checkpoint(folder, m, m.optimizers())
            self.step, self.metrics = int(state["step"]), state["metrics"]
            self.log(f"resumed from {folder} at step {self.step}")
        m.train()
        step_fn = make_step(m, cfg.fast, self.batch() if "cuda_graph" in cfg.fast else None, cfg.compile_mode)
        sums: dict[str, torch.Tensor] = {}
        count, t_log, t_start = 0, time.perf_counter(), time.perf_counter()
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.method}", disable=not cfg.progress,
                   leave=False, dynamic_ncols=True, mininterval=1.0)
        while self.step < cfg.steps:
            logs = step_fn(self.batch())
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            count += 1
            self.step += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                rec = {"step": self.step, **{k: float(v) / count for k, v in sums.items()},
                       "it_s": count / (now - t_log)}
                if not all(math.isfinite(v) for v in rec.values()):
                    raise FloatingPointError(f"non-finite loss at step {self.step}: {rec}")
                self.metrics["train"].append(rec)
                sums, count, t_log = {}, 0, now
            end = self.step == cfg.steps
            if end or (cfg.eval_every and self.step % cfg.eval_every == 0):
                rep = self.evaluate()
                self.log(f"step {self.step}: " + "  ".join(f"{k}={v:.4g}" for k, v in rep.items()
                                                          if isinstance(v, float)))
            elif cfg.sample_every and self.step % cfg.sample_every == 0:
                self._samples_png(self._sample_for_png(), self._eval_setup())
            if end or (cfg.save_every and self.step % cfg.save_every == 0):
                self.save()
        bar.close()
        self.metrics["wall_s_this_session"] = time.perf_counter() - t_start
        self.metrics["final"] = self.metrics["evals"][-1] if self.metrics["evals"] else None
        (self.run_dir / "metrics.json").write_text(json.dumps(self.metrics, indent=1))
        self.save_generator()
        return self.metrics

    @torch.no_grad()
    def _sample_for_png(self) -> torch.Tensor:
        ev = self._eval_setup()
        gen = self.method.sampler().eval()
        n = 2000 if self.cfg.data == "mixture" else 64
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return gen(ev["z"][:n], None if ev["labels"] is None else ev["labels"][:n])

    def save_generator(self) -> Path:
        gen = self.method.sampler()
        net = gen.net
        meta = {"generator_sigmas": json.dumps(gen.sigmas.tolist()), "method": self.cfg.method}
        if isinstance(net, consistency.ConsistencyFunction):
            meta["consistency_eps"] = str(net.eps)
            net = net.net
        path = self.run_dir / "generator.safetensors"
        if getattr(net, "kdkit_spec", None) is not None:
            save_denoiser(net, path, meta)
        else:
            ckpt.save_model(net, path, meta)
        return path


def run_method(method: str, settings: list[str]) -> dict:
    cfg = resolve_config(method, settings)
    runner = Runner(cfg)
    metrics = runner.fit()
    metrics["run_dir"] = str(runner.run_dir)
    return metrics
