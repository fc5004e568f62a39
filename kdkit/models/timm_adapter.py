"""Build timm models as kdkit students/teachers (``build_model("timm:<name>")``).

timm's ImageNet architectures are designed for 224px input. They still run on CIFAR's 32px images,
because their heads use global pooling, but with heavy downsampling: timm ``resnet18`` on 32x32 input
has a 16x16 map after its stride-2 stem, 8x8 after the max-pool and only 1x1 after ``layer4`` (stride
32). That works (and is common as a quick baseline), but accuracy is well below the CIFAR-specific
zoo models, and ImageNet-pretrained weights transfer poorly at this resolution unless the images are
upsampled. Tap timm models by their own module names (``layer4`` for ResNets, ``stages.2`` for
ConvNeXt, ``blocks.11`` for ViT; ``in:fc`` / ``in:head.fc`` for the embedding).

``pretrained=True`` loads weights from the Hugging Face Hub (``timm/<model>.<tag>``). With
``HF_HUB_OFFLINE=1`` (kdkit's default in the Makefile) this only works when the weights are already in
the local Hugging Face cache; otherwise a `KdkitError` says how to fetch them.
"""
from __future__ import annotations

import difflib
import os

from torch import nn

from ..errors import KdkitError

_TRUE = {"1", "ON", "YES", "TRUE"}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_STEM_NAMES = ("act", "stem", "bn", "conv", "norm", "patch_embed")


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        return True
    try:  # huggingface_hub reads the variable once, at import
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _import_timm():
    try:
        import timm
    except ImportError as e:
        raise KdkitError("timm models need the 'timm' extra: pip install 'kdkit[timm]'") from e
    return timm


def timm_name_error(name: str) -> str | None:
    """None when timm knows `name` (looked up in its registry, nothing built), else what is wrong with it.

    ``hf-hub:org/repo`` and ``local-dir:/path`` names are resolved by timm itself when building.
    """
    timm = _import_timm()
    if ":" in name or timm.is_model(name):
        return None
    arch = name.split(".", 1)[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=5)
    hint = f" Close: {', '.join(close)}." if close else ""
    return f"unknown timm model '{name}'.{hint} See timm.list_models() for all names"


def _check_name(name: str) -> None:
    problem = timm_name_error(name)
    if problem:
        raise KeyError(problem)


def _cached_weights(name: str, kwargs: dict) -> tuple[bool, str, str]:
    """Whether pretrained weights for `name` load without the network, what was looked for, and its HF repo."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if overlay.get("file") or overlay.get("state_dict") is not None or name.startswith("local-dir:"):
        return True, "a local file", ""
    from huggingface_hub import try_to_load_from_cache

    if name.startswith(("hf-hub:", "hf_hub:")):
        repo, files = name.split(":", 1)[1], ("open_clip_model.safetensors",) + _WEIGHT_FILES
    else:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            return False, f"pretrained weights for '{name}' (timm lists none)", ""
        if cfg.file:
            return True, cfg.file, ""
        if not cfg.hf_hub_id:
            from timm.models._hub import check_cached_file  # old-style url weights in the torch hub cache

            return bool(check_cached_file(cfg.url)), cfg.url, ""
        repo = cfg.hf_hub_id
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _WEIGHT_FILES
    repo = repo.split("@", 1)[0]
    for f in files:
        if isinstance(try_to_load_from_cache(repo, f), str):
            return True, repo, repo
    return False, f"Hugging Face repo '{repo}'", repo


def timm_stage_paths(model: nn.Module) -> list[str]:
    """Module paths of a timm model's feature stages (from its ``feature_info``), stem entries left out."""
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    paths = [i["module"] for i in info] if isinstance(info, (list, tuple)) else list(info.module_name())
    stages = [p for p in paths if not p.split(".")[-1].startswith(_STEM_NAMES)]
    return stages or paths


def build_timm(name: str, num_classes: int = 10, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(name, num_classes=..., pretrained=..., **kwargs)`` with kdkit's conventions.

    timm's ImageNet models are built for 224px input; on 32px CIFAR images they run (global pooling
    adapts) but downsample heavily (``resnet18``: 1x1 after ``layer4``). The model gets a ``stages``
    attribute (its ``feature_info`` module paths, e.g. ``layer1..layer4``) unless the name is already
    taken (ConvNeXt has a ``stages`` submodule): use `kdkit.models.zoo.stage_paths` to read it.

    Raises `KeyError` for an unknown architecture and `KdkitError` when ``pretrained=True`` cannot be
    honoured: offline (``HF_HUB_OFFLINE=1``) without the weights in the local HF cache, or a failed download.
    """
    timm = _import_timm()
    _check_name(name)
    if pretrained and _offline():
        ok, what, repo = _cached_weights(name, kwargs)
        if not ok:
            raise KdkitError(
                f"timm:{name} with pretrained=True needs {what}, which is not in the local cache, "
                f"and HF_HUB_OFFLINE=1 forbids downloading it. Fetch it once with network access "
                f"(HF_HUB_OFFLINE=0 kdkit ...{', or `hf download ' + repo + '`' if repo else ''}), "
                f"or use pretrained=False.")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        if not pretrained:
            raise
        if isinstance(e, RuntimeError) and "Unknown model" in str(e):
            raise KeyError(f"unknown timm model '{name}'") from e
        raise KdkitError(f"could not load pretrained weights for timm:{name} ({type(e).__name__}: {e}). "
                         f"Check the network / Hugging Face cache, or use pretrained=False.") from e
    if not hasattr(model, "stages"):
        model.stages = timm_stage_paths(model)
    return model
