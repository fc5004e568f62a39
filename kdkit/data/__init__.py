"""Offline-first dataset loaders (CIFAR-10, GSM8K, TU graphs) and a fast in-memory tensor batch loader.

Every loader reads `$KDKIT_DATA_DIR` first (see `paths.data_dir`), writes only under `$KDKIT_CACHE_DIR`
(`paths.cache_dir`), downloads the usual way only when not offline, and otherwise raises
`kdkit.errors.MissingDatasetError` saying where it looked and how to get the data.
"""
from __future__ import annotations

from ..registry import DATASETS
from .cifar import CLASSES as CIFAR10_CLASSES
from .cifar import ImageTensors, load_cifar10
from .chain_sum import load_chain_sum
from .mnist import load_mnist
from .gsm8k import extract_final_answer, load_gsm8k
from .loader import Batch, TensorLoader
from .paths import cache_dir, data_dir, is_offline
from .subsets import balanced_subset
from .transforms import random_crop, random_hflip, to_float_normalized
from .tu import TU_NAMES, load_tu


def load_dataset_by_name(name: str, split: str | None = None, **kwargs):
    """Build the dataset registered as `name` (see `DATASETS.names()`), for `split` when given.

    `load_dataset_by_name("cifar10", "test")`, `load_dataset_by_name("gsm8k", "train")`,
    `load_dataset_by_name("nci1")` (TU sets have no split).
    """
    factory = DATASETS.get(name.strip().lower())
    return factory(**kwargs) if split is None else factory(split, **kwargs)


__all__ = [
    "Batch",
    "CIFAR10_CLASSES",
    "DATASETS",
    "ImageTensors",
    "TU_NAMES",
    "TensorLoader",
    "balanced_subset",
    "cache_dir",
    "data_dir",
    "extract_final_answer",
    "is_offline",
    "load_chain_sum",
    "load_cifar10",
    "load_dataset_by_name",
    "load_gsm8k",
    "load_mnist",
    "load_tu",
    "random_crop",
    "random_hflip",
    "to_float_normalized",
]
