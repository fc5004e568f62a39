"""`kdkit condense DATASET --method M`: one dispatch from (kind of dataset, method) to the code that runs it.

Datasets are grouped by kind (graph sets today; image sets such as CIFAR-10 when image condensation
lands). Each kind registers its datasets and its methods with a runner `runner(dataset, method, gnns,
seeds, settings) -> metrics`; adding a kind or a method is one `register_kind` / `register_method`
call here, next to the existing ones, and nothing else in the CLI changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import ConfigError


@dataclass
class DatasetKind:
    """The datasets of one kind and the condensation methods that handle them."""

    datasets: tuple[str, ...]
    methods: dict[str, Callable] = field(default_factory=dict)


KINDS: dict[str, DatasetKind] = {}


def register_kind(kind: str, datasets: tuple[str, ...]) -> None:
    KINDS.setdefault(kind, DatasetKind(tuple(datasets)))


def register_method(kind: str, method: str, runner: Callable) -> None:
    KINDS[kind].methods[method] = runner


def dataset_kind(dataset: str) -> str:
    key = dataset.strip().lower()
    for kind, entry in KINDS.items():
        if key in entry.datasets:
            return kind
    known = "; ".join(f"{k}: {', '.join(e.datasets)}" for k, e in KINDS.items())
    raise ConfigError(f"unknown dataset '{dataset}' for condensation; choices ({known})")


def condense(dataset: str, method: str = "mirage", settings: list[str] | None = None, **options) -> dict:
    """Run condensation `method` on `dataset` with `key=value` settings; returns the run's metrics."""
    kind = dataset_kind(dataset)
    methods = KINDS[kind].methods
    if method not in methods:
        have = ", ".join(sorted(methods)) or "none yet"
        raise ConfigError(f"no condensation method '{method}' for {kind} dataset '{dataset}'; "
                          f"{kind} methods: {have}")
    return methods[method](dataset.strip().lower(), method, list(settings or []), **options)


def _run_graph(dataset: str, method: str, settings: list[str], **options) -> dict:
    from .graph_run import build_config, run_graph_condense

    return run_graph_condense(build_config(dataset, settings, method=method, **options))


register_kind("graph", ("mutag", "ptc_mr", "proteins", "nci1", "nci109"))
register_method("graph", "mirage", _run_graph)
register_kind("image", ("cifar10",))  # methods (trajectory matching, ...) register here when they land


def _run_image(dataset: str, method: str, settings: list[str], **options) -> dict:
    from .image_run import build_image_config, run_image_condense

    return run_image_condense(build_image_config(dataset, method, settings, **options))


for _m in ("dm", "mtt", "datm", "cvdd"):
    register_method("image", _m, _run_image)
