"""One entry point for every model kdkit can build by name: the CIFAR zoo and ``timm:<name>``."""
from __future__ import annotations

import inspect

from torch import nn

from ..errors import ConfigError
from ..registry import MODELS
from . import cifar  # noqa: F401  (registers the zoo in MODELS)

TIMM_PREFIX = "timm:"


def build_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build zoo model `name` (see `model_names()`) or a timm model named ``timm:<timm name>``.

    Options are passed to the factory (e.g. ``build_model("convnet3", width=64, norm="batchnorm")``,
    ``build_model("timm:resnet18", pretrained=True)``). Unknown names raise the registry's KeyError,
    which lists the choices; unknown options raise `ConfigError` naming the accepted ones.
    """
    if name.startswith(TIMM_PREFIX):
        from .timm_adapter import build_timm

        return build_timm(name[len(TIMM_PREFIX):], num_classes=num_classes, **kwargs)
    factory = MODELS.get(name)
    try:
        inspect.signature(factory).bind(num_classes=num_classes, **kwargs)
    except TypeError:
        params = [p for p in inspect.signature(factory).parameters if p != "num_classes"]
        raise ConfigError(f"model '{name}' does not take option(s) {sorted(kwargs)}; it accepts: "
                          f"{', '.join(params) or 'no options'}") from None
    return factory(num_classes=num_classes, **kwargs)


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
