"""The loss contract: a module that reads student/teacher `Outputs` (and labels) and declares what it needs."""
from __future__ import annotations

import abc

import torch
from torch import nn

from ..config import build_options, factory_options
from ..models.outputs import Outputs


def check_options(loss: "DistillLoss", given: dict) -> None:
    """Refuse constructor options outside the type and range their annotation declares, with the recipe
    validator's message (`kdkit.config.validate_losses` reads the same annotations), so a loss built from Python
    is checked exactly as one named in a recipe. `given` may be the constructor's `locals()`: names that are not
    declared options (self, **inner_options) are skipped."""
    cls = type(loss)
    declared = factory_options(cls)
    build_options(cls, {k: v for k, v in given.items() if k in declared}, f"{cls.__name__}: ", f"loss {cls.__name__}")


class DistillLoss(nn.Module, metaclass=abc.ABCMeta):
    """Base of every loss in the zoo.

    Options are keyword-only constructor arguments whose annotation declares their type and range
    (`kdkit.config`'s `PositiveFloat`, `Probability`, `Literal[...]`, ...); the constructor calls
    `check_options(self, locals())` and keeps only the cross-option rules as code.

    Subclasses set what they read so the trainer can tap it: `student_taps` / `teacher_taps`
    (module paths), `needs_labels`, `needs_index`. Parameters a loss owns (projectors) are trained with the
    student. `setup` is called once with example outputs before training, so lazily sized
    parameters (a projector from student to teacher channels) can be built and shapes checked.
    """

    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()
    needs_labels: bool = False
    needs_teacher: bool = True
    # True: forward also receives `index=` (the batch's dataset sample indices), for losses that keep
    # per-sample state (CRD's memory bank, PS-KD's prediction cache).
    needs_index: bool = False
    # True: `teacher` is a list of `Outputs`, one per teacher of the recipe's `teachers:` (multi-teacher losses).
    takes_teacher_list: bool = False

    epoch: float = 0.0

    def set_epoch(self, epoch: float) -> None:
        """The trainer reports progress (fractional epochs) before each step, for warm-ups and schedules."""
        self.epoch = float(epoch)

    def setup(self, student: Outputs, teacher: Outputs | None) -> None:
        """Build shape-dependent parameters; the default loss has none."""

    @abc.abstractmethod
    def forward(self, student: Outputs, teacher: Outputs | None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Return a scalar loss (already weighted by the loss's own scale such as T^2, not by the recipe weight)."""
