"""Test environment: offline, the shared data beside the repo, a private writable cache, 2 threads."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "KDKIT_DATA_DIR" not in os.environ and SHARED.is_dir():
    os.environ["KDKIT_DATA_DIR"] = str(SHARED)
os.environ.setdefault("KDKIT_CACHE_DIR", str(REPO / ".cache"))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cifar():
    """CIFAR-10 train and test splits as uint8 tensors (decoded once, then cached)."""
    from kdkit.data import load_cifar10

    return load_cifar10("train"), load_cifar10("test")
