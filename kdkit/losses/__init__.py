"""The loss zoo: loss functions of tensors, `DistillLoss` modules around them; each file registers its own names.

Every module of this package is imported (below), so a new loss is one file with its function, its module and
one `LOSSES.register(...)` line; the imports here only name the public API.
"""
import importlib
import inspect
import pkgutil

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
from .self_distill import BYOTHead, BYOTLoss, byot_loss
from .bdkd import BDKDLoss, bdkd_loss, entropy_balance
from .wrappers import AuxHead, DualHeadLoss, WeightedLoss, teacher_sample_weights, weighted_mean
from .logits import BinaryKLLoss, BinaryKLNormLoss, binary_kl_loss, binary_kl_norm_loss
from .ofa import ConvBranch, OFALoss, TokenBranch, ofa_loss
from .projection import VkDLoss, orthogonal_projector, pool_features, standardize_features, vkd_loss
from .norm_direction import NDLoss, NDProjector, load_class_centres, nd_loss, save_class_centres, teacher_class_centres
from .token import TokenKDLoss, token_kd_loss
from .token_adaptive import AdaKDLoss, TAIDLoss
from .cross_tokenizer import CrossTokenizerLoss, alm_loss

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
    "VkDLoss", "vkd_loss", "orthogonal_projector", "pool_features", "standardize_features",
    "NDLoss", "NDProjector", "nd_loss", "teacher_class_centres", "save_class_centres", "load_class_centres",
    "OFALoss", "ofa_loss", "ConvBranch", "TokenBranch",
    "BYOTLoss", "BYOTHead", "byot_loss", "BDKDLoss", "bdkd_loss", "entropy_balance", "WeightedLoss", "DualHeadLoss",
    "AuxHead", "teacher_sample_weights", "weighted_mean", "BinaryKLLoss", "BinaryKLNormLoss", "binary_kl_loss",
    "binary_kl_norm_loss", "TokenKDLoss", "token_kd_loss", "AdaKDLoss", "TAIDLoss", "CrossTokenizerLoss", "alm_loss",
]

for _module in pkgutil.iter_modules(__path__):  # a new loss file registers itself by being here
    importlib.import_module(f"{__name__}.{_module.name}")


def build_loss(name: str, **kwargs) -> DistillLoss:
    """Build the loss registered as `name` (KeyError listing the choices if unknown) with keyword options.

    A wrapper given ``inner=`` takes its own options plus those of that inner loss (`options_for`)."""
    factory = LOSSES.get(name)
    if "inner" in kwargs and hasattr(factory, "options_for"):
        params = factory.options_for(kwargs["inner"])
    else:
        params = inspect.signature(factory).parameters
    if not any(getattr(p, "kind", None) is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ConfigError(
                f"loss '{name}' has no option {', '.join(map(repr, unknown))}; "
                f"its options: {', '.join(params) or 'none'}"
            )
    return factory(**kwargs)
