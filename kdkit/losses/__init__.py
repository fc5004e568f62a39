"""The loss zoo: loss functions of tensors, `DistillLoss` modules around them; each file registers its own names."""
import inspect

from ..errors import ConfigError
from ..registry import LOSSES
from .base import DistillLoss
from .attention import MiniLMLoss, attention_kl_loss, split_heads, value_relation_loss
from .crd import CRDLoss, crd_loss, nce_loss
from .ensemble import DMLLoss, MultiTeacherKDLoss, PSKDLoss, dml_loss, mean_teacher_probs, multi_teacher_kd_loss, pskd_loss
from .features import (ATLoss, ConvRegressor, FitNetLoss, RKDLoss, SPLoss, at_loss, attention_map, fitnet_loss,
                       rkd_loss, sp_loss)
from .logits import (DISTLoss, DKDLoss, JSDLoss, KDLoss, LabelFreeKDLoss, NKDLoss, RKLLoss, dist_loss, dkd_loss,
                     dkd_parts, jsd_loss, kd_loss, label_free_kd_loss, nkd_loss, rkl_loss, standardize_logits)
from .review import ABF, ReviewKDLoss, hcl_loss

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
    "ATLoss", "SPLoss", "RKDLoss", "CRDLoss", "MiniLMLoss", "ReviewKDLoss", "ABF", "MultiTeacherKDLoss",
    "PSKDLoss", "DMLLoss", "at_loss", "attention_map", "sp_loss", "rkd_loss", "crd_loss", "nce_loss",
    "attention_kl_loss", "value_relation_loss", "split_heads", "hcl_loss", "dml_loss", "mean_teacher_probs",
    "multi_teacher_kd_loss", "pskd_loss", "DISTLoss", "JSDLoss", "LabelFreeKDLoss", "NKDLoss", "RKLLoss",
    "dist_loss", "jsd_loss", "label_free_kd_loss", "nkd_loss", "rkl_loss", "standardize_logits",
]


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
