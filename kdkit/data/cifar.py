"""CIFAR-10 as in-memory uint8 tensors: read once through `datasets`, decoded once, cached as safetensors.

Sources, in order:
1. `$KDKIT_DATA_DIR/cifar10/{train,test}.parquet` (the Hub's schema: `img` = struct{bytes, path}, `label`).
2. A tensor cache built earlier from the Hub dataset (`cache_dir()/cifar10/{split}-uint8.safetensors`).
3. Online only: the Hub dataset `uoft-cs/cifar10`.
Offline with none of these raises `MissingDatasetError`.

The decoded cache lives in `cache_dir()/cifar10/` and is keyed by the parquet file's size and SHA-256, so a
changed source file is decoded again; the shared data folder itself is never written. A file that is not a
readable parquet table, or a row whose image does not decode or whose label is missing or out of range, raises
`DataFileError` naming the file (and the row) before anything is cached.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataFileError
from ..registry import DATASETS
from .paths import cache_dir, data_dir, is_offline, missing_dataset_error

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
HUB_ID = "uoft-cs/cifar10"
_CACHE_FORMAT = "kdkit-cifar10-uint8-v1"


@dataclass
class ImageTensors:
    """A whole image classification split in memory.

    `images` is uint8 `[N, C, H, W]` (contiguous, CPU), `labels` int64 `[N]`; `mean`/`std` are the per-channel
    normalisation constants in [0, 1] units (what `to_float_normalized` and `TensorLoader` take).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown CIFAR-10 split '{split}'. Splits: {', '.join(SPLITS)}")


def _file_key(path: Path) -> dict[str, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return {
        "format": _CACHE_FORMAT,
        "source": "parquet",
        "size": str(path.stat().st_size),
        "sha256": h.hexdigest(),
    }


def _read_cache(path: Path, key: dict[str, str], match: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached tensors when `path` exists and its metadata agrees with `key` on the fields in `match`."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if any(meta.get(k) != key.get(k) for k in match):
                return None
            images = f.get_tensor("images")
            labels = f.get_tensor("labels")
    except Exception as e:  # a truncated or foreign file: rebuild it
        log.warning("ignoring unreadable CIFAR-10 cache %s (%s)", path, e)
        return None
    if images.dtype != torch.uint8 or labels.dtype != torch.int64 or images.shape[0] != labels.shape[0]:
        return None
    return images.contiguous(), labels


def _write_cache(path: Path, key: dict[str, str], images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write atomically (temp file in the same folder, then `os.replace`); a read-only cache only warns."""
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({"images": images.contiguous(), "labels": labels.contiguous()}, tmp, metadata=key)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        log.warning("could not write the CIFAR-10 cache %s (%s); the next load will decode again", path, e)


_RAW: list | None = None  # (bytes, path) per row, shared with forked decode workers


def _decode_one(data: bytes | None, path: str | None) -> np.ndarray:
    from PIL import Image

    im = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


def _decode_row(i: int, source: str) -> np.ndarray:
    """Row `i` of `_RAW` decoded; an image PIL cannot read is a `DataFileError` naming the source and the row."""
    assert _RAW is not None
    data, path = _RAW[i]
    if data is None and not path:
        raise DataFileError(f"{source}: row {i} has no image (img.bytes and img.path are both empty)")
    from PIL import UnidentifiedImageError

    try:
        return _decode_one(data, path)
    except UnidentifiedImageError:
        raise DataFileError(f"{source}: row {i}: the image does not decode (not an image format PIL knows)") from None
    except Exception as e:  # a truncated or damaged image: OSError, SyntaxError, ValueError, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataFileError(f"{source}: row {i}: the image does not decode ({reason})") from None


def _decode_range(lo: int, hi: int, shape: tuple[int, ...], source: str) -> np.ndarray:
    out = np.empty((hi - lo, *shape), dtype=np.uint8)
    for i in range(lo, hi):
        a = _decode_row(i, source)
        if a.shape != shape:
            raise DataFileError(f"{source}: row {i} has image shape {a.shape}, expected {shape} (as row 0)")
        out[i - lo] = a
    return out


def _decode_workers() -> int:
    env = os.environ.get("KDKIT_DECODE_WORKERS")
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _decode_all(raw: list, paths: list, source: str) -> np.ndarray:
    """PIL-decode every row into one uint8 [N,H,W,3] array, in forked worker processes when that pays.

    Decoding a 32x32 JPEG is ~150 us of mostly Python-level work in PIL, so threads do not help; worker
    processes forked after the bytes are in memory read them copy-free and return their slice.
    """
    import multiprocessing as mp

    global _RAW
    n = len(raw)
    _RAW = list(zip(raw, paths))
    try:
        shape = _decode_row(0, source).shape
        workers = _decode_workers()
        if workers == 1 or n < 4096 or "fork" not in mp.get_all_start_methods():
            return _decode_range(0, n, shape, source)
        step = -(-n // (workers * 4))
        bounds = [(lo, min(n, lo + step)) for lo in range(0, n, step)]
        out = np.empty((n, *shape), dtype=np.uint8)
        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.starmap(_decode_range, [(lo, hi, shape, source) for lo, hi in bounds])
        for (lo, hi), part in zip(bounds, parts):
            out[lo:hi] = part
        return out
    finally:
        _RAW = None


def _labels(column, source: str) -> torch.Tensor:
    """The `label` column as int64 [N]; a missing label or one outside the 10 classes names its row."""
    import pyarrow.compute as pc

    if column.null_count:
        row = pc.index(pc.is_null(column), True).as_py()
        raise DataFileError(f"{source}: row {row} has no label")
    try:
        values = np.asarray(column.to_numpy(), dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataFileError(f"{source}: the label column is not integer class ids ({e})") from None
    bad = np.flatnonzero((values < 0) | (values >= len(CLASSES)))
    if bad.size:
        raise DataFileError(f"{source}: row {int(bad[0])} has label {int(values[bad[0]])}, expected a class id in "
                            f"0..{len(CLASSES) - 1}")
    return torch.from_numpy(values.copy())


def _decode_table(table, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode an Arrow table with columns `img` (struct{bytes, path}) and `label` into uint8 [N,3,H,W] and int64 [N].

    The encoded bytes are decoded with PIL, exactly as `datasets.Image` decodes a row, but without a PIL
    object per row kept alive. `source` names the data in errors (the parquet file, or the Hub dataset).
    """
    img = table.column("img").combine_chunks()
    if img.null_count:
        import pyarrow.compute as pc

        raise DataFileError(f"{source}: row {pc.index(pc.is_null(img), True).as_py()} has no image")
    raw = img.field("bytes").to_pylist()
    paths = img.field("path").to_pylist()
    labels = _labels(table.column("label"), source)
    if not raw:
        raise DataFileError(f"{source}: the CIFAR-10 source has no rows")
    out = _decode_all(raw, paths, source)
    if out.ndim != 4 or out.shape[-1] != 3:
        raise DataFileError(f"{source}: CIFAR-10 images decode to shape {out.shape[1:]}, expected (H, W, 3)")
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return images, labels


def _decode_dataset(ds, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a `datasets.Dataset` (the Hub copy) with columns `img` (Image) and `label`."""
    import datasets

    ds = ds.cast_column("img", datasets.Image(decode=False))
    return _decode_table(ds.with_format("arrow")[:], source)


def _decode_parquet(local: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the local parquet file straight with pyarrow: no datasets cache (which keys local files by
    mtime only, so a replaced file could be served stale) and no ~100 MB Arrow duplicate left behind."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(local, columns=["img", "label"])
    except (OSError, ValueError, KeyError, TypeError) as e:  # pyarrow's ArrowInvalid is a ValueError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataFileError(f"{local}: not a readable CIFAR-10 parquet file with columns img, label ({reason})") from None
    return _decode_table(table, str(local))


def _result(images: torch.Tensor, labels: torch.Tensor, split: str) -> ImageTensors:
    return ImageTensors(images=images, labels=labels, classes=list(CLASSES), mean=MEAN, std=STD, name=f"cifar10-{split}")


def load_cifar10(split: str = "train") -> ImageTensors:
    """CIFAR-10 `split` ("train": 50,000 or "test": 10,000) as uint8 `[N,3,32,32]` images and int64 labels."""
    _check_split(split)
    local = data_dir() / "cifar10" / f"{split}.parquet"
    cache = cache_dir() / "cifar10" / f"{split}-uint8.safetensors"

    if local.is_file():
        key = _file_key(local)
        hit = _read_cache(cache, key, ("format", "source", "size", "sha256"))
        if hit is not None:
            return _result(*hit, split)
        images, labels = _decode_parquet(local, split)
        _write_cache(cache, key, images, labels)
        return _result(images, labels, split)

    # No local file: a tensor cache built from the Hub earlier serves both online and offline.
    hub_key = {"format": _CACHE_FORMAT, "source": f"hub:{HUB_ID}"}
    hit = _read_cache(cache, hub_key, ("format", "source"))
    if hit is not None:
        return _result(*hit, split)
    def missing(why: str | None = None):
        folder = data_dir() / "cifar10"
        return missing_dataset_error(
            f"CIFAR-10 ({split} split)",
            [folder / f"{s}.parquet" for s in SPLITS],
            "cifar10/train.parquet and cifar10/test.parquet in the Hub's schema "
            "(columns `img` = struct{bytes, path} holding an encoded image, `label` = int64)",
            download=f"the Hub dataset '{HUB_ID}'", why=why,
        )

    if is_offline():
        raise missing()
    import datasets

    try:
        ds = datasets.load_dataset(HUB_ID, split=split)
    except (ConnectionError, OSError) as e:  # no network: the same message as offline, with the cause
        raise missing(f"the Hub could not be reached: {type(e).__name__}") from None
    names = getattr(ds.features.get("label"), "names", None)
    if names is not None and list(names) != CLASSES:
        raise ValueError(f"'{HUB_ID}' has classes {names}, expected {CLASSES}")
    images, labels = _decode_dataset(ds, f"the Hub dataset '{HUB_ID}' ({split} split)")
    _write_cache(cache, {**hub_key, "fingerprint": str(getattr(ds, "_fingerprint", ""))}, images, labels)
    return _result(images, labels, split)


if "cifar10" not in DATASETS:
    DATASETS.register("cifar10", load_cifar10)
