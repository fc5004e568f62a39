"""kdkit: knowledge and dataset distillation for classifiers, LLMs and diffusion models.

The Python API drops into your own training loop:

    teacher = Teacher(model, taps=["layer3"])      # frozen, eval, no-grad; features by module path
    loss = KDLoss(T=4)(student(x), teacher(x))
"""
from .config import Recipe, load_recipe
from .data import load_cifar10
from .errors import CheckpointError, ConfigError, KdkitError, MissingDatasetError, ShapeMismatchError
from .losses import DKDLoss, DistillLoss, FitNetLoss, KDLoss, build_loss, dkd_loss, fitnet_loss, kd_loss
from .models import CachedTeacher, Outputs, Student, Teacher, build_model, model_names
from .train.distiller import Distiller

__version__ = "0.1.0"

__all__ = [
    "CachedTeacher", "CheckpointError", "ConfigError", "DKDLoss", "DistillLoss", "Distiller", "FitNetLoss",
    "KDLoss", "KdkitError", "MissingDatasetError", "Outputs", "Recipe", "ShapeMismatchError", "Student",
    "Teacher", "build_loss", "build_model", "dkd_loss", "fitnet_loss", "kd_loss", "load_cifar10",
    "load_recipe", "model_names",
]
