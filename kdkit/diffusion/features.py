"""Image features for Frechet distance and precision/recall.

"FD (kdkit features)": the penultimate features of a classifier trained with kdkit on the same data (`kdkit
train`; its run folder or `model.safetensors`): CIFAR-10, or `mnist16` for the CPU image benchmark (recipe
`train-mnist16-features`). Gray samples are repeated to the classifier's three channels. It is *not* FID: the numbers are comparable with each other, never
with published Inception FIDs. The standard FID needs the user's TorchScript Inception-v3 file
(`inception-2015-12-05.pt`, the one StyleGAN/EDM's metrics use); kdkit never downloads it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .data import to_uint8
from .metrics import frechet_distance, gaussian_stats, precision_recall

FD_LABEL = "FD (kdkit features)"


def check_fd_classifier(path: str | Path, data: str, key: str = "fd_classifier") -> None:
    """Before any work: `path` is a kdkit classifier (its header names the model) trained on `data`'s images, so
    its features measure the distribution being generated (a CIFAR-10 classifier says little of MNIST digits)."""
    from .. import checkpoint as ckpt
    from ..train.build import model_file

    if data == "mixture":
        raise ConfigError(f"{key}={path}: an image metric, but data=mixture is 2-D (drop {key})")
    meta = ckpt.read_metadata(model_file(path))
    if "model" not in meta:
        raise CheckpointError(f"{model_file(path)} does not record its classifier architecture ({key}): pass a "
                              "`kdkit train` run folder or its model.safetensors")
    trained_on = meta.get("dataset", "cifar10")
    if trained_on != data:
        raise ConfigError(f"{key}={path} was trained on {trained_on}, but data={data}: pass a classifier trained "
                          f"on {data} (`kdkit train` with dataset {data}; for mnist16 recipe=train-mnist16-features)")


class ClassifierFeatures(nn.Module):
    """The input of a kdkit classifier's last linear layer, for images in [-1, 1]."""

    def __init__(self, path: str | Path):
        super().__init__()
        from ..data import load_dataset_by_name
        from ..models import build_model
        from .. import checkpoint as ckpt
        from ..train.build import model_file

        f = model_file(path)
        _, meta = ckpt.read_safetensors(f)
        if "model" not in meta:
            raise CheckpointError(f"{f} does not record its classifier architecture; pass a `kdkit train` run folder")
        self.model = build_model(meta["model"], num_classes=int(meta.get("num_classes", 10)),
                                 **json.loads(meta.get("options", "{}")))
        ckpt.load_model(self.model, f)
        self.model.requires_grad_(False).eval()
        last = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not last:
            raise ConfigError(f"classifier {meta['model']} has no linear layer to take features from")
        self._feats: list[torch.Tensor] = []
        last[-1].register_forward_hook(lambda mod, args, out: self._feats.append(args[0].flatten(1)))
        # the normalisation the classifier was trained with: its dataset's (recorded by `kdkit train`)
        ds = load_dataset_by_name(meta.get("dataset", "cifar10"), "test")
        self.register_buffer("mean", torch.tensor(ds.mean).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(ds.std).reshape(1, -1, 1, 1))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._feats.clear()
        x = x.float().clamp(-1, 1)
        if x.shape[1] == 1 and self.mean.shape[1] == 3:
            x = x.expand(-1, 3, -1, -1)
        self.model(((x + 1) / 2 - self.mean) / self.std)
        return self._feats[-1]


class InceptionFeatures(nn.Module):
    """2048-d pool features of the TorchScript Inception-v3 used for FID (`detector(uint8 NCHW,
    return_features=True)`), from a file the user supplies."""

    def __init__(self, path: str | Path):
        super().__init__()
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"inception={p}: no such file. The standard FID needs the TorchScript Inception-v3 "
                              "weights (inception-2015-12-05.pt, as used by StyleGAN2-ADA/EDM); download it where you "
                              "have internet and pass its path. Without it kdkit reports FD (kdkit features) only.")
        try:
            self.net = torch.jit.load(str(p), map_location="cpu").eval()
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"inception={p} is not a TorchScript module ({e}); pass inception-2015-12-05.pt") from e

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(to_uint8(x), return_features=True).float()


def features(extractor: nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([extractor(images[i:i + batch]).double().cpu() for i in range(0, images.shape[0], batch)])


_EXTRACTORS: dict = {}


def _extractor(kind: str, path: str, device) -> nn.Module:
    key = (kind, str(path), str(device))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = (ClassifierFeatures(path) if kind == "fd" else InceptionFeatures(path)).to(device)
    return _EXTRACTORS[key]


def image_report(x: torch.Tensor, cfg, device, ev: dict, reference: bool = True) -> dict:
    """FD (kdkit features) and precision/recall against real test images (and FD against the teacher's samples),
    and FID when an Inception file was given. Real-image features are computed once per run and kept in `ev`."""
    out: dict = {}
    for kind, path in (("fd", cfg.fd_classifier), ("fid", cfg.inception)):
        if not path:
            continue
        ext = _extractor(kind, path, device)
        if f"{kind}_real" not in ev:
            from .data import load_real_data

            real = load_real_data(cfg.data, device, split="test", limit=x.shape[0]).images.float() / 127.5 - 1
            ev[f"{kind}_real"] = features(ext, real)
        fx, fr = features(ext, x), ev[f"{kind}_real"]
        name = FD_LABEL if kind == "fd" else "FID"
        out[name] = frechet_distance(*gaussian_stats(fx), *gaussian_stats(fr))
        if kind == "fd":
            out["precision"], out["recall"] = precision_recall(fr, fx)
        if reference and "teacher" in ev:
            if f"{kind}_teacher" not in ev:
                ev[f"{kind}_teacher"] = features(ext, ev["teacher"])
            out[f"{name} vs teacher"] = frechet_distance(*gaussian_stats(fx), *gaussian_stats(ev[f"{kind}_teacher"]))
    if not out:
        out["note"] = "no image metric: set fd_classifier=RUN (a kdkit CIFAR-10 classifier) and/or inception=FILE"
    return out
