"""TU graph-classification sets (MUTAG, PTC_MR, PROTEINS, NCI1, NCI109) as torch-geometric `TUDataset`s.

`TUDataset` writes `processed/` beside `raw/`, and the offline data folder may be read-only, so the raw
text files are copied from `$KDKIT_DATA_DIR/tu/NAME/raw` into `cache_dir()/tu/NAME/raw` and the dataset's
root is `cache_dir()/tu`. Online with no local copy, `TUDataset` downloads into that same root.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..registry import DATASETS
from .paths import cache_dir, data_dir, is_offline, missing_dataset_error

TU_NAMES = ("MUTAG", "PTC_MR", "PROTEINS", "NCI1", "NCI109")


def canonical_tu_name(name: str) -> str:
    """`nci1` -> `NCI1`; raises `ValueError` listing the known sets for any other name."""
    key = name.strip().upper()
    if key not in TU_NAMES:
        raise ValueError(f"unknown TU dataset '{name}'. Known: {', '.join(TU_NAMES)}")
    return key


def _required(name: str) -> list[str]:
    return [f"{name}_A.txt", f"{name}_graph_indicator.txt"]


def _sync_raw(src: Path, dst: Path) -> bool:
    """Copy the files of `src` into `dst` where missing or different (size or mtime); True if any changed."""
    changed = False
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        target = dst / f.name
        st = f.stat()
        if target.is_file():
            tt = target.stat()
            if tt.st_size == st.st_size and int(tt.st_mtime) == int(st.st_mtime):
                continue
        fd, tmp = tempfile.mkstemp(prefix=f".{f.name}.", suffix=".tmp", dir=dst)
        os.close(fd)
        try:
            shutil.copy2(f, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
        changed = True
    return changed


def load_tu(name: str, **kwargs):
    """The TU dataset `name` (case-insensitive) as a `torch_geometric.datasets.TUDataset`.

    Extra keyword arguments (`transform`, `pre_transform`, `use_node_attr`, ...) go to `TUDataset`.
    """
    name = canonical_tu_name(name)
    root = cache_dir() / "tu"
    src = data_dir() / "tu" / name / "raw"
    dst = root / name / "raw"
    if src.is_dir() and all((src / f).is_file() for f in _required(name)):
        if _sync_raw(src, dst):
            # New or changed raw files: drop what TUDataset built from the old ones.
            shutil.rmtree(root / name / "processed", ignore_errors=True)
    elif not all((dst / f).is_file() for f in _required(name)) and is_offline():
        raise missing_dataset_error(
            f"TU dataset {name}",
            [src / f for f in _required(name)] + [dst / f for f in _required(name)],
            f"tu/{name}/raw/{name}_A.txt, {name}_graph_indicator.txt, {name}_graph_labels.txt, ... "
            "(the TU text format, as torch-geometric's TUDataset(root='<dir>/tu', name=...) lays it out)",
            download="it from the TU Dortmund collection (https://chrsmrrs.github.io/datasets/)",
        )
    from torch_geometric.datasets import TUDataset

    return TUDataset(root=str(root), name=name, **kwargs)


def _factory(name: str):
    def build(split: str | None = None, **kwargs):
        if split not in (None, "all", "full"):
            raise ValueError(f"TU dataset {name} has no '{split}' split: it is one set (use split=None and folds)")
        return load_tu(name, **kwargs)

    build.__name__ = f"load_{name.lower()}"
    build.__doc__ = f"The TU dataset {name} (see `load_tu`)."
    return build


for _name in TU_NAMES:
    if _name.lower() not in DATASETS:
        DATASETS.register(_name.lower(), _factory(_name))
