"""Where kdkit looks for data, where it may write, and whether it may go online."""
from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "KDKIT_DATA_DIR"
CACHE_DIR_ENV = "KDKIT_CACHE_DIR"
_OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUTHY = {"1", "true", "yes", "on", "y", "t"}


def data_dir() -> Path:
    """The offline data folder: `$KDKIT_DATA_DIR`, else `~/.cache/kdkit/data`. It may be read-only."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kdkit" / "data"


def cache_dir() -> Path:
    """kdkit's own writable cache: `$KDKIT_CACHE_DIR`, else `~/.cache/kdkit`."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kdkit"


def is_offline() -> bool:
    """True when `HF_HUB_OFFLINE` or `HF_DATASETS_OFFLINE` is set to a truthy value (1, true, yes, on)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUTHY for k in _OFFLINE_ENVS)


def missing_dataset_error(
    what: str,
    searched: list[Path],
    expected_layout: str,
    download: str | None = None,
    why: str | None = None,
):
    """A `MissingDatasetError` naming every path searched, `KDKIT_DATA_DIR`, and how to get the data.

    `download` says what going online would fetch, e.g. "the Hub dataset 'uoft-cs/cifar10'"; `why` replaces the
    offline settings as the reason it was not fetched (e.g. the Hub could not be reached).
    """
    from ..errors import MissingDatasetError

    env = os.environ.get(DATA_DIR_ENV)
    env_note = f"{DATA_DIR_ENV}={env}" if env else f"{DATA_DIR_ENV} is unset, so the default {data_dir()} was used"
    looked = "\n".join(f"  - {p} ({'found' if p.exists() else 'missing'})" for p in searched)
    online = f" or go online (unset HF_HUB_OFFLINE and HF_DATASETS_OFFLINE) so kdkit can download {download or 'it'}"
    offline_vars = ", ".join(f"{k}={os.environ[k]}" for k in _OFFLINE_ENVS if k in os.environ) or "offline"
    return MissingDatasetError(
        f"{what} was not found and cannot be downloaded ({why or offline_vars}).\n"
        f"Searched ({env_note}):\n{looked}\n"
        f"To fix: set {DATA_DIR_ENV} to a folder that holds {expected_layout},{online}."
    )
