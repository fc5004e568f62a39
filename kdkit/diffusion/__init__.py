"""Few-step diffusion distillation: one engine (generator G, frozen teacher T, online fake score F) and the
methods on it, each registered with `kdkit.method.register_method("diffusion", NAME)`: DMD2 (`dmd2.py`), SiD
(`sid.py`), consistency distillation (`consistency.py`), the paired-regression baseline (`rectified_flow.py`),
and teacher training (`train_teacher.py`). EDM's sigma parametrisation throughout (`edm.py`).

`kdkit diffusion dmd2` runs the default: a 2-D Gaussian mixture with its exact (analytic) teacher, on CPU.

Every module of this package is imported here, so a new method (or generator loss) is one file with its
`@register_method` (or `@GENERATOR_LOSSES.register`) and nothing else to edit."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .edm import Denoiser, FlowMatchingAdapter
from .engine import GENERATOR_LOSSES, DistillMethod, MethodContext, Plan, Schedule, ScoreDistillation
from .metrics import frechet_distance, mmd, mode_mass, precision_recall, sliced_w2
from .mixture import GaussianMixture, MixtureDenoiser, ring_mixture
from .mlp import MLPDenoiser, ResidualDenoiser
from .samplers import Generator, GuidedDenoiser, euler_sample, heun_sample
from .unet import UNetDenoiser

__all__ = [
    "Denoiser", "DistillMethod", "FlowMatchingAdapter", "GENERATOR_LOSSES", "GaussianMixture", "Generator",
    "GuidedDenoiser", "MLPDenoiser", "MethodContext", "MixtureDenoiser", "Plan", "ResidualDenoiser", "Schedule",
    "ScoreDistillation", "UNetDenoiser", "euler_sample", "frechet_distance", "heun_sample", "mmd", "mode_mass",
    "precision_recall", "ring_mixture", "sliced_w2",
]
