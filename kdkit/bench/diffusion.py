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

import torch

from ..config import parse_overrides
from ..errors import ConfigError
from .results import write_result

DEFAULTS = {"model": "mlp", "batch": None, "steps": 20, "warmup": 3, "modes": None, "fake_steps": 5, "width": 256,
            "depth": 4, "channels": 64, "guidance_scale": 2.0, "gan": True, "threads": None, "seed": 0,
            "compile_mode": None, "bf16": False}


def _teacher(opts, device):
    from ..diffusion.teachers import make_denoiser

    if opts["model"] == "mlp":
        return make_denoiser("mlp", dim=2, width=opts["width"], depth=opts["depth"], sigma_data=1.0).to(device)
    if opts["model"] == "unet":
        return make_denoiser("unet", channels=opts["channels"], num_classes=10, dropout=0.0).to(device)
    raise ConfigError(f"bench diffusion model must be mlp or unet, got {opts['model']!r}")


def _method(opts, teacher, capturable: bool):
    from ..diffusion.dmd2 import build_dmd2
    from ..diffusion.engine import MethodContext, Schedule

    torch.manual_seed(opts["seed"])

    def copy_teacher():
        return copy.deepcopy(teacher).requires_grad_(True).train()

    ctx = MethodContext(teacher.requires_grad_(False).eval(), Schedule(sigma_data=teacher.sigma_data), copy_teacher,
                        copy_teacher, opts["batch"], capturable)
    guidance = opts["guidance_scale"] if opts["model"] == "unet" else 1.0
    return build_dmd2(ctx, fake_steps=opts["fake_steps"], guidance_scale=guidance, gan=bool(opts["gan"]),
                      lr_generator=1e-5, lr_fake=1e-5, bf16=bool(opts["bf16"]))


def _batch(method, opts, device):
    if not method.needs_real:
        return {}
    shape = (method.real_batches, opts["batch"], *method.sample_shape)
    out = {"real": torch.randn(shape, device=device)}
    out["labels"] = torch.randint(0, max(method.num_classes, 1), shape[:2], device=device)
    return out


def measure(opts, mode: str, device) -> dict:
    from ..diffusion.fast_step import make_step

    teacher = _teacher(opts, device)
    method = _method(opts, teacher, "cuda_graph" in mode).to(device)
    if opts["model"] == "unet" and device.type == "cuda":
        method.to(memory_format=torch.channels_last)
    batch = _batch(method, opts, device)
    t0 = time.perf_counter()
    step = make_step(method, mode, batch if "cuda_graph" in mode else None, opts["compile_mode"])
    for _ in range(opts["warmup"]):
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(opts["steps"]):
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t1
    return {"mode": mode, "it_s": opts["steps"] / dt, "setup_and_warmup_s": warm_s}


def run_diffusion_bench(settings: list[str]):
    opts = dict(DEFAULTS)
    for key, value in parse_overrides(settings).items():
        if key not in DEFAULTS:
            raise ConfigError(f"unknown bench setting '{key}'; allowed: {', '.join(DEFAULTS)}")
        opts[key] = value
    if opts["threads"]:
        torch.set_num_threads(int(opts["threads"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if opts["batch"] is None:
        opts["batch"] = {"mlp": 1024 if device.type == "cuda" else 256, "unet": 64 if device.type == "cuda" else 4}.get(
            opts["model"], 64)
    modes = opts["modes"] or ("eager,compile,cuda_graph,compile+cuda_graph" if device.type == "cuda"
                              else "eager,compile")
    rows = [measure(opts, m, device) for m in str(modes).split(",")]
    eager = next((r["it_s"] for r in rows if r["mode"] == "eager"), None)
    for r in rows:
        r["speedup_vs_eager"] = r["it_s"] / eager if eager else None
        print(f"{opts['model']} {r['mode']:>20}: {r['it_s']:.2f} it/s"
              + (f" ({r['speedup_vs_eager']:.2f}x eager)" if eager else ""))
    record = {"benchmark": "dmd2-step", "model": opts["model"], "settings": opts, "rows": rows,
              "goal": {"mlp": ">= 5x eager on a GPU", "unet": ">= 2x eager on a GPU"}[opts["model"]]}
    return write_result("diffusion", record)
