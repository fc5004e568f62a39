"""Models: the zoo (`build_model`, `check_model` for a recipe's check before any work), and the Teacher/Student wrappers that return `Outputs` with tapped features."""
from .outputs import Outputs
from .taps import FeatureTaps, Tap
from .teacher import CachedTeacher, Student, Teacher
from .zoo import build_model, check_model, model_names, stage_paths

__all__ = ["CachedTeacher", "FeatureTaps", "Outputs", "Student", "Tap", "Teacher", "build_model", "check_model",
           "model_names", "stage_paths"]
