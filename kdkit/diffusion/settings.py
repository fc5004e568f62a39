"""How `kdkit diffusion METHOD [recipe=NAME] [key=value ...]` reads its settings, for distillation and teacher
training alike: one typed schema of run settings (`run.RunConfig`, `train_teacher.TeacherConfig`) and the
method's own options, which are the typed keyword-only arguments of its registered factory.

- The recipe is `recipe=NAME`, or else `recipes/diffusion-METHOD-DATA.yaml` when there is one (the 2-D mixture
  presets: `kdkit diffusion dmd2` runs `diffusion-dmd2-mixture`), or else none (the schema's and the factory's
  defaults, which are the papers' image settings).
- A method option may be given bare (`fake_steps=10`) or as `options.fake_steps=10`; where a name is both a run
  setting and an option (`teacher_steps`, `seed` of rectflow), bare means the run setting.
- Everything is validated (types, ranges, the method's options, cross-field rules) before any work.
"""
from __future__ import annotations

import dataclasses
import difflib

from ..config import complete_options, list_recipes, load_recipe, parse_overrides, split_recipe
from ..errors import ConfigError
from ..method import method_options, methods

PILLAR = "diffusion"


def resolve(schema, method: str, settings: list[str]):
    """`settings` of `kdkit diffusion METHOD` as a validated `schema` instance."""
    recipe, items = split_recipe(settings)
    params = method_options(PILLAR, method)  # an unknown method is refused here, listing the choices
    fields = {f.name for f in dataclasses.fields(schema)}
    parsed = parse_overrides(items)
    overrides = []
    for item in items:
        top = item.partition("=")[0].strip().split(".")[0]
        if top == "method":
            raise ConfigError(f"method is chosen by the command: `kdkit diffusion METHOD` (here {method}), not "
                              "method=")
        if top not in fields:
            if top not in params:
                raise _unknown(top, method, fields, params)
            item = "options." + item.strip()
        overrides.append(item)
    if recipe is None:
        data = parsed.get("data", schema.__dataclass_fields__["data"].default)
        preset = f"diffusion-{method}-{data}"
        if isinstance(data, str) and preset in list_recipes():
            recipe = preset
    cfg = load_recipe(recipe, overrides if recipe else [*overrides, f"method={method}"], schema)
    if cfg.method != method:
        raise ConfigError(f"recipe '{recipe}' is for `kdkit diffusion {cfg.method}`, not `kdkit diffusion {method}`")
    return cfg


def _unknown(key: str, method: str, fields: set[str], params: dict) -> ConfigError:
    close = difflib.get_close_matches(key, sorted(fields | set(params)), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    run_keys = ", ".join(sorted(fields - {"method", "options", "description"}))
    return ConfigError(f"unknown setting '{key}' for `kdkit diffusion {method}`.{hint} Run settings: {run_keys}. "
                       f"{method} options: {', '.join(params) or '(none)'}")


def method_settings(method: str, options: dict, at: str) -> dict:
    """The method's options typed and range-checked, with the factory's defaults filled in: what `config.yaml`
    shows and what a resumed run must match."""
    return complete_options(methods(PILLAR).get(method), options, f"{at}options.", f"diffusion method '{method}'")
