"""What `kdkit condense` can run: the datasets of each kind (images, graphs) and the registered methods.

A method is a factory registered with `@register_method("condense", NAME)` in a module of `methods/` (every
module there is imported on first use, so a new method is one file). Its class says which kind of dataset it
condenses (`kind = "image"` or `"graph"`); its typed keyword-only arguments are its options.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..config import complete_options, factory_options
from ..errors import ConfigError
from ..method import methods


@dataclass(frozen=True)
class Kind:
    """The datasets of one kind and the method a bare `kdkit condense DATASET` runs on them."""

    datasets: tuple[str, ...]
    default_method: str


KINDS: dict[str, Kind] = {
    "image": Kind(("cifar10",), "dm"),  # needs no expert trajectories, so it runs anywhere
    "graph": Kind(("mutag", "ptc_mr", "proteins", "nci1", "nci109"), "mirage"),
}


def dataset_kind(dataset: str) -> str:
    key = str(dataset).strip().lower()
    for kind, entry in KINDS.items():
        if key in entry.datasets:
            return kind
    known = "; ".join(f"{k}: {', '.join(e.datasets)}" for k, e in KINDS.items())
    raise ConfigError(f"unknown dataset '{dataset}' for condensation; choices ({known})")


def load_methods() -> None:
    """Import every module of `kdkit/condense/methods/` (each registers its methods)."""
    from . import methods as _  # noqa: F401


def kind_methods(kind: str) -> list[str]:
    """The registered methods that condense datasets of `kind`."""
    load_methods()
    registry = methods("condense")
    return [n for n in registry.names() if getattr(registry.get(n), "kind", None) == kind]


def method_factory(kind: str, dataset: str, name: str):
    """The factory of method `name` for a `kind` dataset, or an error listing that kind's methods."""
    if name not in kind_methods(kind):
        have = ", ".join(kind_methods(kind)) or "none yet"
        raise ConfigError(f"no condensation method '{name}' for {kind} dataset '{dataset}'; {kind} methods: {have}")
    return methods("condense").get(name)


def resolve_options(factory, name: str, given: dict, fields: tuple[str, ...] = ()) -> dict:
    """Every option of the method: the given ones typed and range-checked, the rest at the factory's defaults, so
    the run's config.yaml lists them all. A name that is neither an option nor one of the schema's `fields` is
    refused, listing both."""
    params = factory_options(factory)
    given = given if given is not None else {}
    for key in given:
        if key not in params:
            close = difflib.get_close_matches(str(key), [*fields, *params], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown setting '{key}' for condense method '{name}'.{hint} Settings: "
                              f"{', '.join(f for f in fields if f != 'options')}; {name} options: "
                              f"{', '.join(params) or '(none)'}")
    return complete_options(factory, given, "", f"condense method '{name}'")
