"""`kdkit bench diffusion`: iterations/s of the full DMD2 step (5 fake-score updates, one generator update,
EMA) in eager PyTorch against the compiled step and, on CUDA, the CUDA-graph-captured step, all in one process
on the same networks and batch.

`model=mlp`: the 2-D MLP (teacher, generator and fake score all width x depth MLPs; a random teacher, since
speed does not depend on its weights). `model=unet`: the 32x32 class-conditional U-Net with classifier-free
guidance in the real score (cond/uncond batched), `channels_last` and bf16 autocast where asked.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import NonNegInt, PositiveFloat, PositiveInt, bad_value
from ..errors import ConfigError
from .results import bench_options, write_result


@dataclass
class DiffusionBench:
    """`kdkit bench diffusion [key=value ...]`."""

    model: Literal["mlp", "unet"] = "mlp"
    batch: PositiveInt | None = None  # default: mlp 1024 on CUDA / 256 on CPU, unet 64 / 4
    steps: PositiveInt = 20  # timed steps
    warmup: NonNegInt = 3  # untimed steps first (compilation, graph capture)
    modes: str | None = None  # comma list of fast-step modes (default: all that the device runs)
    fake_steps: PositiveInt = 5
    width: PositiveInt = 256  # mlp
    depth: PositiveInt = 4  # mlp
    channels: PositiveInt = 64  # unet
    guidance_scale: PositiveFloat = 2.0  # unet: classifier-free guidance folded into the real score
    gan: bool = True
    threads: PositiveInt | None = None
    seed: NonNegInt = 0
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    bf16: bool = False

    def validate(self, at: str) -> None:
        from ..diffusion.fast_step import MODES

        if self.modes is not None and not all(m in MODES for m in self.modes.split(",")):
            raise bad_value(f"{at}modes", self.modes, f"a comma list of {', '.join(MODES)}")


def _teacher(opts: DiffusionBench, device):
    from ..diffusion.teachers import make_denoiser

    if opts.model == "mlp":
        return make_denoiser("mlp", dim=2, width=opts.width, depth=opts.depth, sigma_data=1.0).to(device)
    return make_denoiser("unet", channels=opts.channels, num_classes=10, dropout=0.0).to(device)


def _method(opts: DiffusionBench, teacher, capturable: bool):
    from ..diffusion.engine import MethodContext, Schedule
    from ..method import build_method

    torch.manual_seed(opts.seed)

    def copy_teacher():
        return copy.deepcopy(teacher).requires_grad_(True).train()

    ctx = MethodContext(teacher.requires_grad_(False).eval(), Schedule(sigma_data=teacher.sigma_data), copy_teacher,
                        copy_teacher, opts.batch, capturable)
    guidance = opts.guidance_scale if opts.model == "unet" else 1.0
    return build_method("diffusion", "dmd2", ctx, {"fake_steps": opts.fake_steps, "guidance_scale": guidance,
                                                   "gan": opts.gan, "lr_generator": 1e-5, "lr_fake": 1e-5,
                                                   "bf16": opts.bf16})


def _batch(method, opts: DiffusionBench, device):
    if not method.needs_real:
        return {}
    shape = (method.real_batches, opts.batch, *method.sample_shape)
    out = {"real": torch.randn(shape, device=device)}
    out["labels"] = torch.randint(0, max(method.num_classes, 1), shape[:2], device=device)
    return out


def measure(opts: DiffusionBench, mode: str, device) -> dict:
    from ..diffusion.fast_step import make_step

    teacher = _teacher(opts, device)
    method = _method(opts, teacher, "cuda_graph" in mode).to(device)
    if opts.model == "unet" and device.type == "cuda":
        method.to(memory_format=torch.channels_last)
    batch = _batch(method, opts, device)
    t0 = time.perf_counter()
    step = make_step(method, mode, batch if "cuda_graph" in mode else None, opts.compile_mode)
    for _ in range(opts.warmup):
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(opts.steps):
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t1
    return {"mode": mode, "it_s": opts.steps / dt, "setup_and_warmup_s": warm_s}


def run_diffusion_bench(settings: list[str]):
    import dataclasses

    opts = bench_options(DiffusionBench, settings)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = opts.modes or ("eager,compile,cuda_graph,compile+cuda_graph" if device.type == "cuda"
                           else "eager,compile")
    if device.type != "cuda" and "cuda_graph" in modes:
        raise ConfigError(f"modes={modes}: cuda_graph needs a CUDA device; on CPU use eager,compile")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.batch is None:
        opts.batch = {"mlp": 1024 if device.type == "cuda" else 256, "unet": 64 if device.type == "cuda" else 4}[
            opts.model]
    rows = [measure(opts, m, device) for m in modes.split(",")]
    eager = next((r["it_s"] for r in rows if r["mode"] == "eager"), None)
    for r in rows:
        r["speedup_vs_eager"] = r["it_s"] / eager if eager else None
        print(f"{opts.model} {r['mode']:>20}: {r['it_s']:.2f} it/s"
              + (f" ({r['speedup_vs_eager']:.2f}x eager)" if eager else ""))
    record = {"benchmark": "dmd2-step", "model": opts.model, "settings": dataclasses.asdict(opts), "rows": rows,
              "goal": {"mlp": ">= 5x eager on a GPU", "unet": ">= 2x eager on a GPU"}[opts.model]}
    return write_result("diffusion", record)
