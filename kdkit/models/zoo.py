"""One entry point for every model kdkit can build by name: the CIFAR zoo and ``timm:<name>``.

`check_model` refuses an unknown name or bad options without building anything (a recipe's check, before any
work); `build_model` runs the same option check and builds. A zoo factory's options are its typed keyword
arguments (`kdkit.config.factory_options`: ``width: PositiveInt``, ``norm: Literal[...]``), except
``num_classes``, which the dataset decides; a factory may carry a ``check_options(options, at)`` attribute for
rules across options.
"""
from __future__ import annotations

import difflib
import inspect
import typing

from torch import nn

from ..config import bad_value, build_options, coerce
from ..errors import ConfigError, KdkitError
from ..registry import MODELS
from . import cifar  # noqa: F401  (registers the zoo in MODELS)

TIMM_PREFIX = "timm:"
SUPPLIED = ("num_classes",)  # set by the run (the dataset's class count), never a model option


def build_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build zoo model `name` (see `model_names()`) or a timm model named ``timm:<timm name>``.

    Options are passed to the factory (e.g. ``build_model("convnet3", width=64, norm="batchnorm")``,
    ``build_model("timm:resnet18", pretrained=True)``). Unknown names raise the registry's KeyError,
    which lists the choices; unknown options and out-of-range values raise `ConfigError` naming the accepted ones.
    """
    if name.startswith(TIMM_PREFIX):
        from .timm_adapter import build_timm

        return build_timm(name[len(TIMM_PREFIX):], num_classes=num_classes, **kwargs)
    factory = MODELS.get(name)
    options = _zoo_options(name, factory, kwargs, "")
    return factory(num_classes=num_classes, **options)


def check_model(name: str, options: dict, key: str) -> None:
    """Refuse, in one `ConfigError` line, a model name kdkit cannot build or options its factory would refuse.

    `key` is the recipe section (``student``, ``teacher``, ``teachers.1``): errors name ``{key}.model`` or
    ``{key}.options.<option>``. Zoo names are checked against the registry and their options against the
    factory's typed signature (unknown names, types, ranges, cross-option rules). ``timm:<name>`` must be a name
    timm knows (looked up, not built); of its options only ``pretrained`` (true or false) is kdkit's, the rest go
    to ``timm.create_model`` unchecked.
    """
    if not isinstance(name, str) or not name:
        raise bad_value(f"{key}.model", name, "a model name (`kdkit recipes --models`) or timm:<name>")
    if not isinstance(options, dict):
        raise bad_value(f"{key}.options", options, "a mapping of model options, e.g. {width: 64}")
    if name.startswith(TIMM_PREFIX):
        _check_timm(name[len(TIMM_PREFIX):], options, key)
        return
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS.names(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise bad_value(f"{key}.model", name, f"one of {', '.join(MODELS.names())}, or timm:<name>{hint}")
    _zoo_options(name, MODELS.get(name), options, f"{key}.options.")


def _zoo_options(name: str, factory, options: dict, prefix: str) -> dict:
    """`options` checked against the zoo factory's typed options (values coerced)."""
    for supplied in SUPPLIED:
        if supplied in options:
            raise ConfigError(f"{prefix}{supplied} is not a model option: the dataset sets it")
    checked = build_options(_options_of(factory), options, prefix, f"model '{name}'")
    check = getattr(factory, "check_options", None)
    if check is not None:
        check(checked, prefix)
    return checked


def _options_of(factory):
    """A stand-in with the factory's typed signature minus what the run supplies, for `build_options`."""
    sig = inspect.signature(factory)
    hints = typing.get_type_hints(factory, include_extras=True)

    def options(**_):
        """(signature only)"""

    keep = [p for n, p in sig.parameters.items() if n not in SUPPLIED]
    options.__signature__ = sig.replace(parameters=keep)
    options.__annotations__ = {n: hints[n] for n in (p.name for p in keep) if n in hints}
    return options


def _check_timm(arch: str, options: dict, key: str) -> None:
    from .timm_adapter import timm_name_error

    for supplied in SUPPLIED:
        if supplied in options:
            raise ConfigError(f"{key}.options.{supplied} is not a model option: the dataset sets it")
    if "pretrained" in options:
        coerce(options["pretrained"], bool, f"{key}.options.pretrained")
    try:
        problem = timm_name_error(arch)
    except KdkitError as e:
        raise ConfigError(f"{key}.model={TIMM_PREFIX}{arch}: {e}") from None
    if problem:
        raise ConfigError(f"{key}.model={TIMM_PREFIX}{arch}: {problem}")


def model_names() -> list[str]:
    """Registered model names (timm models are also available as ``timm:<name>``)."""
    return MODELS.names()


def stage_paths(model: nn.Module) -> list[str]:
    """The module paths of a model's main stages, in order: ``model.stages`` for zoo models, the
    ``feature_info`` modules for timm models whose ``stages`` name is taken by a submodule."""
    stages = getattr(model, "stages", None)
    if isinstance(stages, (list, tuple)) and all(isinstance(s, str) for s in stages):
        return list(stages)
    from .timm_adapter import timm_stage_paths

    return timm_stage_paths(model)
