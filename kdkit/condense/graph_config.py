"""The settings of one graph-condensation run (`kdkit condense nci1 --method mirage ...`), as a `kdkit.config`
schema: the GNN training and evaluation every graph method shares are fields here, the method's own settings
(Mirage: `depth`, `min_support`, `top_trees`, ...) its factory's typed options under `options` (written flat on
the command line). Per-dataset values are recipes (`recipes/condense-<dataset>-mirage.yaml`)."""
from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from ..config import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Range, RunName, check_resume, show
from ..errors import ConfigError
from ..run import run_folder
from .catalog import KINDS, method_factory, resolve_options
from .graph_gnn import GNNS, check_gnn

BASELINES = ("random", "full")


def comma_list(value, key: str, allowed: tuple[str, ...], what: str, normalise=lambda v: v) -> list[str]:
    """A list or a comma list (`gcn,gin`) of names from `allowed`, each passed through `normalise`."""
    items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        try:
            name = normalise(item)
        except ConfigError:
            name = None
        if name not in allowed:
            raise ConfigError(f"{key}={show(value)} is not allowed: unknown {what} '{item}'; expected "
                              f"{', '.join(allowed)} (a list, or a comma list such as {','.join(allowed[:2])})")
        out.append(name)
    return out


@dataclass
class GraphCondenseConfig:
    """`kdkit condense DATASET --method mirage [--gnn G] [--seeds N] [recipe=NAME] [key=value ...]`."""

    description: str = ""
    recipe: str = ""  # the recipe these settings started from (set by `kdkit condense`)
    dataset: Literal[KINDS["graph"].datasets] = "mutag"  # type: ignore[valid-type]
    method: str = KINDS["graph"].default_method
    gnns: list[str] | str = field(default_factory=lambda: ["gcn"])  # gcn | gin | gat | sage, or a comma list
    seeds: PositiveInt = 5  # splits/seeds to run: first_seed, first_seed + 1, ...
    first_seed: NonNegInt = 0
    baselines: list[str] | str = field(default_factory=lambda: list(BASELINES))  # random, full (or a comma list)
    epochs: PositiveInt = 100
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegFloat = 5e-4
    batch_size: PositiveInt = 64
    hidden: PositiveInt = 128
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.5
    pool: Literal["sum", "mean"] = "sum"
    samples_per_epoch: PositiveInt = 512  # graphs drawn per epoch for both condensed trainings
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options (its factory's arguments)
    # run folder
    output_dir: str = "runs"
    name: RunName | None = None  # run folder name (default: condense-<dataset>-<method>-<time>)
    save_condensed: bool = True  # write each seed's condensed set
    verbose: bool = True
    resume: bool | str | None = "auto"  # auto/true: continue the run folder's checkpoint; false/null: start over
    keep_checkpoints: PositiveInt = 2
    threads: PositiveInt | None = None

    PILLAR: typing.ClassVar[str] = "condense"
    # settings a resumed run may change: more (or fewer) seeds extend the run; the rest is housekeeping
    RESUME_MAY_CHANGE: typing.ClassVar[tuple[str, ...]] = (
        "description", "recipe", "resume", "output_dir", "name", "verbose", "seeds", "save_condensed",
        "keep_checkpoints", "threads")

    def validate(self, at: str) -> None:
        if isinstance(self.resume, str):
            check_resume(self.resume, f"{at}resume")
        given, self.gnns = self.gnns, comma_list(self.gnns, f"{at}gnns", GNNS, "GNN", check_gnn)
        if not self.gnns:
            raise ConfigError(f"{at}gnns={show(given)} is not allowed: expected at least one of {', '.join(GNNS)}")
        self.baselines = comma_list(self.baselines, f"{at}baselines", BASELINES, "baseline")
        factory = method_factory("graph", self.dataset, self.method)
        self.options = resolve_options(factory, self.method, self.options, tuple(f.name for f in fields(self)))

    def run_dir(self) -> Path:
        return run_folder(self.output_dir, self.name, f"condense-{self.dataset}-{self.method}")

    def run_options(self) -> dict:
        """The `kdkit.run.Run` arguments this config decides (graph GNNs train on the CPU)."""
        return {"seed": self.first_seed, "device": "cpu", "progress": self.verbose, "console": self.verbose}

    def setting(self, key: str):
        """A setting by its flat name, wherever it lives; None when the method has none."""
        return getattr(self, key) if key in {f.name for f in fields(self)} else self.options.get(key)
