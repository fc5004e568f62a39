"""The settings of one image-condensation run (`kdkit condense cifar10 ...`), as a `kdkit.config` schema.

The settings every image method shares are fields here, each with its range beside its type; a method's own
settings (`iterations`, `lr_img`, `experts`, `members`, ...) are the typed keyword-only options of its factory
and sit under `options` (on the command line they are written flat: `experts=10`). The paper's values per
method and IPC are recipes (`recipes/condense-cifar10-*.yaml`), so `config.yaml` shows what ran.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ..config import NonNegInt, PositiveFloat, PositiveInt, RunName, check_resume
from .augment import DEFAULT_STRATEGY, Strategy
from .catalog import KINDS, method_factory, resolve_options
from .networks import check_member


@dataclass
class ImageCondenseConfig:
    """`kdkit condense cifar10 [--method M] [--ipc K] [--eval P] [recipe=NAME] [key=value ...]`."""

    description: str = ""
    recipe: str = ""  # the recipe these settings started from (set by `kdkit condense`)
    dataset: Literal[KINDS["image"].datasets] = "cifar10"  # type: ignore[valid-type]
    method: str = KINDS["image"].default_method
    ipc: PositiveInt = 10  # synthetic images per class
    seed: NonNegInt = 0
    width: PositiveInt = 128  # ConvNet width (128 in the papers; smaller for CPU smoke runs)
    dsa_strategy: Strategy = DEFAULT_STRATEGY
    zca: bool = False  # ZCA-whiten the images (MTT/DATM's choice per IPC, in their recipes)
    train_subset: PositiveInt | None = None  # class-balanced subset of the training set (CPU-sized runs)
    test_subset: PositiveInt | None = None
    # evaluation: `convnet` (MTT/DM/DATM's ConvNet-3 protocol) or `resnet18` (the relabel protocol)
    eval: Literal["convnet", "resnet18"] = "convnet"
    eval_epochs: NonNegInt = 1000  # 0: no evaluation
    eval_nets: PositiveInt = 5
    eval_lr: PositiveFloat | None = None  # null: the set's learned lr when it has one, else 0.01
    baseline: bool = True  # also evaluate ipc random real images per class, and DD-Ranking's HLR / IOR / DDRS
    # epochs of the full-data network DD-Ranking's HLR needs (trained once per data and setting, then cached);
    # null: min(200, eval_epochs)
    full_epochs: PositiveInt | None = None
    eval_student: str = "resnet18"  # the relabel protocol's network (a `networks.member_model` name)
    eval_temperature: PositiveFloat = 20.0  # crop-label protocol: KL temperature
    eval_lr_adamw: PositiveFloat = 1e-3  # crop-label protocol: AdamW learning rate
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options (its factory's arguments)
    # run folder
    checkpoint_every: PositiveInt = 100  # iterations between checkpoints
    keep_checkpoints: PositiveInt = 2
    output_dir: str = "runs"
    name: RunName | None = None  # run folder condense-<dataset>-<method>-ipc<k>[-<name>]
    resume: bool | str | None = "auto"  # auto/true: continue the run folder's checkpoint; false/null: start over; PATH
    progress: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: PositiveInt | None = None  # torch intra-op threads (null: torch's default, or KDKIT_THREADS)

    PILLAR: typing.ClassVar[str] = "condense"
    # settings a resumed run may change (evaluation and housekeeping); a method adds its own (`resume_may_change`)
    RESUME_MAY_CHANGE: typing.ClassVar[tuple[str, ...]] = (
        "description", "recipe", "resume", "output_dir", "name", "progress", "device", "threads", "checkpoint_every",
        "keep_checkpoints", "eval", "eval_epochs", "eval_nets", "eval_lr", "baseline", "full_epochs", "eval_student",
        "eval_temperature", "eval_lr_adamw", "test_subset")

    def validate(self, at: str) -> None:
        if isinstance(self.resume, str):
            check_resume(self.resume, f"{at}resume")
        check_member(self.eval_student, f"{at}eval_student")
        factory = method_factory("image", self.dataset, self.method)
        self.options = resolve_options(factory, self.method, self.options, tuple(f.name for f in fields(self)))

    def run_dir(self) -> Path:
        tag = f"condense-{self.dataset}-{self.method}-ipc{self.ipc}" + (f"-{self.name}" if self.name else "")
        return Path(self.output_dir) / tag

    def run_options(self) -> dict:
        """The `kdkit.run.Run` arguments this config decides."""
        return {"seed": self.seed, "device": self.device, "progress": self.progress}

    def setting(self, key: str):
        """A setting by its flat name (`ipc`, `experts`), wherever it lives; None when the method has none."""
        return getattr(self, key) if key in {f.name for f in fields(self)} else self.options.get(key)
