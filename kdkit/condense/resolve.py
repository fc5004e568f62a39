"""From a `kdkit condense` command line to a validated config: which recipe it means, and its overrides.

The recipe: `recipe=NAME` when given; else `condense-<dataset>-<method>-<P>` with `preset=P` (e.g. CV-DD's
`preset=cpu`); else the `condense-<dataset>-<method>-ipc<K>` recipe whose K is nearest the asked IPC on a log
scale (the papers publish IPC 1, 10 and 50, so `--ipc 5` runs IPC 10's settings at IPC 5); else
`condense-<dataset>-<method>`; else none (the schema's and the method's defaults).

The overrides, in order: the dataset, the method, the `key=value` settings, then `--ipc`/`--eval`/`--gnn`/
`--seeds`. A key that is not a field of the schema is one of the method's options (`experts=10` is
`options.experts=10`), checked against the method's factory. Values are YAML (`tesla=no` is false).
"""
from __future__ import annotations

import math
import re
from dataclasses import fields

import yaml

from ..config import factory_options, list_recipes, load_recipe, parse_overrides
from ..errors import ConfigError
from .catalog import KINDS, dataset_kind, method_factory
from .graph_config import GraphCondenseConfig
from .image_config import ImageCondenseConfig

SCHEMAS = {"image": ImageCondenseConfig, "graph": GraphCondenseConfig}


def _last(settings: list[str], key: str) -> str | None:
    found = None
    for item in settings:
        k, _, v = item.partition("=")
        if k.strip() == key:
            found = v.strip()
    return found


def default_method(dataset: str, settings: list[str] | None = None) -> str | None:
    """The method a bare `kdkit condense DATASET` runs: the recipe's when `recipe=` is given (None: read from it),
    else the dataset kind's default (DM for images, Mirage for graphs)."""
    if _last(list(settings or []), "recipe") is not None:
        return None
    return KINDS[dataset_kind(dataset)].default_method


def choose_recipe(dataset: str, method: str, ipc: int | None, preset: str | None) -> str | None:
    """The recipe a command line without `recipe=` means (see the module docstring)."""
    stem = f"condense-{dataset}-{method}"
    names = [n for n in list_recipes() if n == stem or n.startswith(stem + "-")]
    by_ipc = {int(m.group(1)): n for n in names if (m := re.fullmatch(rf"{re.escape(stem)}-ipc(\d+)", n))}
    if preset is not None:
        presets = sorted(n.removeprefix(stem + "-") for n in names if n != stem and n not in by_ipc.values())
        if f"{stem}-{preset}" not in names:
            raise ConfigError(f"unknown preset '{preset}' for {method} on {dataset}; choices: "
                              f"{', '.join(presets) or 'none (this method has no presets)'}")
        return f"{stem}-{preset}"
    if by_ipc:
        want = ipc if ipc is not None else ImageCondenseConfig.ipc
        return by_ipc[min(by_ipc, key=lambda k: (abs(math.log(k) - math.log(want)), k))]
    return stem if stem in names else None


def _as_int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None  # not an integer: the schema refuses it with the standard message


def as_setting(key: str, value) -> str:
    """`key=value` with the value written as YAML, so it parses back to itself (lists, paths, booleans)."""
    if isinstance(value, (list, tuple)) and key in ("gnns", "baselines"):
        value = ",".join(map(str, value))
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def route(settings: list[str], schema) -> list[str]:
    """Flat method options under `options.` (`experts=10` -> `options.experts=10`); schema fields stay."""
    names = {f.name for f in fields(schema)}
    out = []
    for item in settings:
        key = item.partition("=")[0].strip()
        out.append(item if key.split(".")[0] in names else f"options.{item.strip()}")
    return out


def setting_names(kind: str, dataset: str, method: str) -> set[str]:
    """Every flat key `kdkit condense` takes for `method`: the schema's fields, the method's options, the
    recipe selectors."""
    factory = method_factory(kind, dataset, method)
    return {f.name for f in fields(SCHEMAS[kind])} | set(factory_options(factory)) | {"recipe", "preset"}


def load_condense_config(dataset: str, method: str | None = None, settings: list[str] | None = None, **options):
    """The validated config of `kdkit condense DATASET [--method M] [settings] [--ipc K ...]`, before any work.
    `options` are settings given as Python values (`ipc=10`, `gnns="gcn,gin"`), applied last."""
    kind = dataset_kind(dataset)
    dataset = str(dataset).strip().lower()
    settings = list(settings or [])
    parse_overrides(settings)  # a malformed setting fails first (`=5`, `a..b=1`, `epochs`)
    recipe, preset = _last(settings, "recipe"), _last(settings, "preset")
    rest = [s for s in settings if s.partition("=")[0].strip() not in ("recipe", "preset")]
    extra = [as_setting(k, v) for k, v in options.items() if v is not None]  # --ipc, --eval, --gnn, --seeds
    method = _last(rest, "method") or method
    if recipe is not None and preset is not None:
        raise ConfigError(f"recipe={recipe} and preset={preset}: give one of them (a preset is a recipe)")
    if recipe is None and method is None:
        method = KINDS[kind].default_method
    if recipe is None:
        ipc = _as_int(str(options["ipc"])) if options.get("ipc") is not None else _as_int(_last(rest, "ipc"))
        recipe = choose_recipe(dataset, method, ipc, preset)
    schema = SCHEMAS[kind]
    overrides = [f"dataset={dataset}", *([f"method={method}"] if method else []), *rest, *extra]
    overrides += [f"recipe={recipe}"] if recipe else []
    try:
        return load_recipe(recipe, route(overrides, schema), schema=schema)
    except ConfigError:
        other = next((k for k in SCHEMAS if k != kind and _loads(recipe, SCHEMAS[k])), None)
        if other is None:
            raise
        raise ConfigError(f"recipe={recipe} is for {other} datasets ({', '.join(KINDS[other].datasets)}), not for "
                          f"the {kind} dataset '{dataset}'") from None


def _loads(recipe: str | None, schema) -> bool:
    try:
        return recipe is not None and load_recipe(recipe, [], schema=schema) is not None
    except ConfigError:
        return False
