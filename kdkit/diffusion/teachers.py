"""Teachers: the analytic mixture denoiser, denoisers trained by kdkit (`kdkit diffusion train-teacher`:
an MLP for 2-D data, the U-Net for 32x32 images; EDM denoisers or flow-matching velocity models), and a user's
diffusers model through `VPAdapter`.

A kdkit teacher file is `model.safetensors` with its architecture in the metadata (`diffusion_arch` and the
JSON `diffusion_options`), so `load_teacher(path)` rebuilds it without pickled code. A flow-matching teacher's
file also says `diffusion_param: flow` and its `flow_shift`: the network is then a velocity model
(`edm.FlowVelocity`), loaded inside a `FlowMatchingAdapter`, so every method distils it as any other denoiser.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..config import bad_value
from ..errors import CheckpointError, ConfigError
from .. import checkpoint as ckpt
from .edm import Denoiser, FlowMatchingAdapter, FlowVelocity, as_sigma
from .mlp import MLPDenoiser
from .unet import UNetDenoiser

ARCHS = {"mlp": MLPDenoiser, "unet": UNetDenoiser}


def build_denoiser(arch: str, **options) -> Denoiser:
    if arch not in ARCHS:
        raise ConfigError(f"unknown denoiser architecture '{arch}'; choices: {', '.join(ARCHS)}")
    try:
        return ARCHS[arch](**options)
    except TypeError as e:
        raise ConfigError(f"denoiser '{arch}' does not take these options {sorted(options)}: {e}") from None


def arch_of(net: Denoiser) -> tuple[str, dict]:
    """The (architecture, options) a kdkit denoiser was built from (kept on the instance by `build_denoiser`)."""
    spec = getattr(net, "kdkit_spec", None)
    if spec is None:
        raise ConfigError(f"{type(net).__name__} was not built by kdkit.diffusion.teachers.build_denoiser")
    return spec


def make_denoiser(arch: str, **options) -> Denoiser:
    net = build_denoiser(arch, **options)
    net.kdkit_spec = (arch, dict(options))
    return net


def save_denoiser(net: Denoiser, path: Path, extra: dict | None = None) -> None:
    arch, options = arch_of(net)
    meta = {"diffusion_arch": arch, "diffusion_options": json.dumps(options), **(extra or {})}
    ckpt.save_model(net, Path(path), meta)


def flow_model(net: Denoiser, flow_shift: float) -> FlowMatchingAdapter:
    """A kdkit network trained as a flow-matching velocity model (`train-teacher objective=flow`), as a denoiser."""
    return FlowMatchingAdapter(FlowVelocity(net), net.sample_shape, net.sigma_data, net.num_classes,
                               flow_shift=flow_shift)


def save_weights(net: nn.Module, path: Path, meta: dict[str, str]) -> None:
    """A network's weights with its architecture when kdkit built it (`save_denoiser`; a `flow_model` as its
    velocity network, with `diffusion_param: flow` and its shift), else the weights alone."""
    if isinstance(net, FlowMatchingAdapter) and isinstance(net.velocity, FlowVelocity):
        meta = {**meta, "diffusion_param": "flow", "flow_shift": repr(net.flow_shift)}
        net = net.velocity.net
    if getattr(net, "kdkit_spec", None) is not None:
        save_denoiser(net, path, meta)
    else:
        ckpt.save_model(net, Path(path), meta)


def teacher_file(path: str | Path) -> Path:
    p = Path(path)
    return p / "model.safetensors" if p.is_dir() else p


TEACHER_CHOICES = ("analytic (data=mixture), diffusers:FOLDER (a diffusers UNet2DModel folder), or a "
                   "`kdkit diffusion train-teacher` run folder or its model.safetensors")


def check_teacher(spec: str, key: str = "teacher") -> dict[str, str]:
    """Before any work: `analytic`, an existing `diffusers:FOLDER`, or a kdkit teacher file whose header says it
    is one (a cheap read of the safetensors metadata: a corrupt or foreign file is named here). Returns that
    metadata (empty for the other two)."""
    if spec == "analytic":
        return {}
    if spec.startswith("diffusers:"):
        if not Path(spec.partition(":")[2]).expanduser().is_dir():
            raise bad_value(key, spec, f"{TEACHER_CHOICES} (no folder is there)")
        return {}
    f = teacher_file(Path(spec).expanduser())
    if not Path(spec).expanduser().exists():
        raise bad_value(key, spec, f"{TEACHER_CHOICES} (nothing is there)")
    meta = ckpt.read_metadata(f)
    if "diffusion_arch" in meta:
        return meta
    raise CheckpointError(f"{f} is not a kdkit diffusion teacher (no diffusion_arch in its metadata); train one "
                              "with `kdkit diffusion train-teacher`, or pass diffusers:PATH for a diffusers model")


def load_teacher(path: str | Path) -> Denoiser:
    """A frozen kdkit-trained denoiser from a run folder or its `model.safetensors` (a flow-matching teacher
    inside its `FlowMatchingAdapter`, with its shift)."""
    f = teacher_file(path)
    _, meta = ckpt.read_safetensors(f)
    if "diffusion_arch" not in meta:
        raise CheckpointError(f"{f} is not a kdkit diffusion teacher (no diffusion_arch in its metadata); train one "
                              "with `kdkit diffusion train-teacher`, or pass diffusers:PATH for a diffusers model")
    net = make_denoiser(meta["diffusion_arch"], **json.loads(meta.get("diffusion_options", "{}")))
    ckpt.load_model(net, f)
    param = meta.get("diffusion_param", "edm")
    if param == "flow":
        net = flow_model(net, float(meta.get("flow_shift", "1.0")))
    elif param != "edm":
        raise CheckpointError(f"{f} says diffusion_param={param}; this kdkit reads edm or flow teachers")
    return net.requires_grad_(False).eval()


# ---------------------------------------------------------------- diffusers (variance-preserving) models


class VPAdapter(Denoiser):
    """A discrete-time variance-preserving model `model(x_vp, t, labels)` (DDPM eps- or v-prediction, e.g. a
    diffusers UNet2DModel) seen as an EDM denoiser. With `abar(t)` its cumulative alphas, `sigma(t) =
    sqrt((1 - abar)/abar)` and `x_vp = x / sqrt(1 + sigma^2)`; t is found by interpolating log sigma over the
    model's timesteps (outside its range sigma is clamped to it)."""

    def __init__(self, model: nn.Module, alphas_cumprod: torch.Tensor, sample_shape: tuple[int, ...],
                 prediction_type: str = "epsilon", sigma_data: float = 0.5, num_classes: int = 0,
                 call=None):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(f"prediction_type must be epsilon, v_prediction or sample, got '{prediction_type}'")
        self.model, self.prediction_type = model, prediction_type
        self.sample_shape, self.sigma_data, self.num_classes = tuple(sample_shape), sigma_data, num_classes
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.register_buffer("log_sigmas", (((1 - abar) / abar).sqrt().log()).float())
        self.call = call or (lambda m, x, t, y: m(x, t, y))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        ls = sigma.float().log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        idx = torch.searchsorted(self.log_sigmas, ls.contiguous()).clamp(1, self.log_sigmas.numel() - 1)
        lo, hi = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        return (idx - 1).float() + (ls - lo) / (hi - lo)

    def forward(self, x, sigma, labels=None, return_features=False):
        s = as_sigma(sigma, x)
        t = self.timestep(s.flatten())
        x_vp = x / (1 + s * s).sqrt()
        out = self.call(self.model, x_vp, t, labels).to(x.dtype)
        a = 1 / (1 + s * s).sqrt()  # sqrt(abar)
        b = s * a  # sqrt(1 - abar)
        if self.prediction_type == "epsilon":
            x0 = x - s * out
        elif self.prediction_type == "v_prediction":
            x0 = a * x_vp - b * out
        else:
            x0 = out
        return (x0, None) if return_features else x0


def load_diffusers_teacher(path: str | Path, sigma_data: float = 0.5) -> Denoiser:
    """A local diffusers `UNet2DModel` folder (with its scheduler config beside or in `scheduler/`) as a teacher.
    Class labels go to the model's `class_labels` when it has a class embedding."""
    try:
        from diffusers import DDPMScheduler, UNet2DModel
    except ImportError as e:
        raise ConfigError("a diffusers teacher needs the `diffusers` package: pip install 'kdkit[diffusion]'") from e
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"diffusers teacher folder {p} does not exist")
    unet_dir = p / "unet" if (p / "unet").is_dir() else p
    sched_dir = p / "scheduler" if (p / "scheduler").is_dir() else p
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True)
        sched = DDPMScheduler.from_pretrained(str(sched_dir), local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise CheckpointError(f"cannot load a diffusers UNet2DModel + DDPMScheduler from {p}: {e}") from e
    num_classes = int(getattr(unet.config, "num_class_embeds", None) or 0)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)

    def call(m, x, t, y):
        return m(x, t, class_labels=y if num_classes else None).sample

    return VPAdapter(unet, sched.alphas_cumprod, (unet.config.in_channels, *size), sched.config.prediction_type,
                     sigma_data, num_classes, call).requires_grad_(False).eval()
