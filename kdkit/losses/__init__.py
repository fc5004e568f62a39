"""The loss zoo: loss functions of tensors, `DistillLoss` modules around them, and their registry names."""
import inspect

from ..errors import ConfigError
from ..registry import LOSSES
from .base import DistillLoss
from .features import ConvRegressor, FitNetLoss, fitnet_loss
from .logits import DKDLoss, KDLoss, dkd_loss, dkd_parts, kd_loss

__all__ = [
    "DistillLoss",
    "LOSSES",
    "build_loss",
    "kd_loss",
    "dkd_loss",
    "dkd_parts",
    "fitnet_loss",
    "KDLoss",
    "DKDLoss",
    "FitNetLoss",
    "ConvRegressor",
]

for _name, _cls in (("kd", KDLoss), ("dkd", DKDLoss), ("fitnet", FitNetLoss)):
    if _name not in LOSSES:  # tolerate a re-import (importlib.reload)
        LOSSES.register(_name, _cls)


def build_loss(name: str, **kwargs) -> DistillLoss:
    """Build the loss registered as `name` (KeyError listing the choices if unknown) with keyword options."""
    factory = LOSSES.get(name)
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ConfigError(
                f"loss '{name}' has no option {', '.join(map(repr, unknown))}; "
                f"its options: {', '.join(params) or 'none'}"
            )
    return factory(**kwargs)
