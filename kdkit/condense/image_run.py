"""Image condensation from Python, as `kdkit condense cifar10 ...` runs it: build the config, run it.

    cfg = build_image_config("cifar10", "mtt", ["iterations=200", "tesla=true"], ipc=10)
    metrics = run_image_condense(cfg)                  # runs/condense-cifar10-mtt-ipc10/
    syn = load_synthetic(cfg.run_dir() / "synthetic.safetensors")

The run folder `runs/condense-<dataset>-<method>-ipc<k>[-<name>]/` holds `config.yaml` (every setting), the
artefacts of `image_artefacts.py` (`synthetic.safetensors`, `grid.png`, `curves.json/png`), `metrics.json` (the
evaluation: protocol, mean ± std over fresh networks, image and label bytes, and with `baseline=true` the same
protocol on `ipc` random real images per class and DD-Ranking's HLR / IOR / DDRS with the full-data accuracy
they need, `dd_ranking.py`), `metrics.jsonl`, `train.log` and `checkpoints/step-N/`
(every `checkpoint_every` iterations; a rerun with the same settings resumes). CV-DD adds
`crop_labels.safetensors` and `crop_labels_random_real.safetensors`.
"""
from __future__ import annotations

from .image_artefacts import load_synthetic, save_synthetic
from .image_config import ImageCondenseConfig
from .image_data import ImageSplit
from .resolve import load_condense_config
from .run import run_condense

__all__ = ["ImageCondenseConfig", "build_image_config", "load_synthetic", "run_image_condense", "save_synthetic"]


def build_image_config(dataset: str, method: str | None = None, settings: list[str] | None = None,
                       **options) -> ImageCondenseConfig:
    """The config `kdkit condense DATASET --method METHOD [settings] --ipc K ...` runs (`options`: ipc, eval, or any
    setting as a Python value)."""
    return load_condense_config(dataset, method, settings, **options)


def run_image_condense(cfg: ImageCondenseConfig, splits: tuple[ImageSplit, ImageSplit] | None = None) -> dict:
    """Condense, evaluate and write the run folder; returns the metrics (with `run_dir`)."""
    return run_condense(cfg, splits=splits)
