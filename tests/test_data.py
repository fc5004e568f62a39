"""kdkit.data: offline dataset loaders, batched transforms, TensorLoader, subsets.

Reads the offline data in `$KDKIT_DATA_DIR` (default: `../shared/data` beside the repository) and writes
only to a temporary `KDKIT_CACHE_DIR`. The first CIFAR-10 load decodes 60,000 JPEGs once per session.
"""
from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kdkit.data as kd
from kdkit.data import (
    TensorLoader,
    balanced_subset,
    load_cifar10,
    load_gsm8k,
    load_tu,
    random_crop,
    random_hflip,
    to_float_normalized,
)
from kdkit.data.transforms import crop_at
from kdkit.errors import DataFileError, MissingDatasetError

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = Path(os.environ.get("KDKIT_DATA_DIR") or DEFAULT_DATA)
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _need(*rel: str):
    missing = [r for r in rel if not (DATA / r).exists()]
    if missing:
        pytest.skip(f"offline data not found: {', '.join(str(DATA / r) for r in missing)}")


@pytest.fixture(scope="module", autouse=True)
def data_env(tmp_path_factory):
    """Point kdkit at the shared data, a fresh writable cache, and offline mode for the whole module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KDKIT_DATA_DIR", str(DATA))
    mp.setenv("KDKIT_CACHE_DIR", str(tmp_path_factory.mktemp("kdkit-cache")))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    yield DATA
    mp.undo()


@pytest.fixture(scope="module")
def cifar_train(data_env):
    _need("cifar10/train.parquet")
    t = time.perf_counter()
    d = load_cifar10("train")
    d.decode_seconds = time.perf_counter() - t  # type: ignore[attr-defined]
    print(f"\nCIFAR-10 train first load (decode + cache write): {d.decode_seconds:.1f} s")
    return d


@pytest.fixture(scope="module")
def cifar_test(data_env):
    _need("cifar10/test.parquet")
    return load_cifar10("test")


# --------------------------------------------------------------------------------------------- paths


def test_paths_follow_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KDKIT_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "c"))
    assert kd.data_dir() == tmp_path / "d"
    assert kd.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("KDKIT_DATA_DIR")
    monkeypatch.delenv("KDKIT_CACHE_DIR")
    assert kd.data_dir() == Path.home() / ".cache" / "kdkit" / "data"
    assert kd.cache_dir() == Path.home() / ".cache" / "kdkit"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    assert not kd.is_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not kd.is_offline()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    assert kd.is_offline()


# --------------------------------------------------------------------------------------------- CIFAR-10


def test_cifar10_train(cifar_train):
    d = cifar_train
    assert d.images.shape == (50_000, 3, 32, 32)
    assert d.images.dtype == torch.uint8 and d.images.is_contiguous()
    assert d.labels.dtype == torch.int64 and d.labels.shape == (50_000,)
    assert torch.bincount(d.labels, minlength=10).tolist() == [5000] * 10
    assert d.classes == CIFAR_CLASSES
    assert d.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    assert d.std == pytest.approx((0.2470, 0.2435, 0.2616))
    assert len(d) == 50_000 and d.num_classes == 10
    assert d.images.float().std() > 40  # real pixels, not a blank tensor


def test_cifar10_test(cifar_test):
    assert cifar_test.images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(cifar_test.labels, minlength=10).tolist() == [1000] * 10
    assert cifar_test.classes == CIFAR_CLASSES


def test_cifar10_pixels_equal_pil_decode(cifar_train):
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(DATA / "cifar10" / "train.parquet")
    rows = [0, 1, 777, 12_345, 49_999]
    img = table.column("img")
    for i in rows:
        raw = img[i]["bytes"].as_py()
        ref = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
        got = cifar_train.images[i].permute(1, 2, 0).numpy()
        assert np.array_equal(got, ref), f"row {i}"
        assert int(cifar_train.labels[i]) == table.column("label")[i].as_py()


def test_cifar10_cached_reload_is_identical_and_fast(cifar_train):
    cache = kd.cache_dir() / "cifar10" / "train-uint8.safetensors"
    assert cache.is_file()
    assert not [p for p in cache.parent.iterdir() if p.name.endswith(".tmp")]
    t = time.perf_counter()
    again = load_cifar10("train")
    dt = time.perf_counter() - t
    print(f"\nCIFAR-10 train cached reload: {dt * 1000:.0f} ms (first load {cifar_train.decode_seconds:.1f} s)")
    assert dt < 1.0
    assert torch.equal(again.images, cifar_train.images)
    assert torch.equal(again.labels, cifar_train.labels)


def test_cifar10_changed_source_invalidates_cache(cifar_test, monkeypatch, tmp_path):
    import pyarrow.parquet as pq

    src = pq.read_table(DATA / "cifar10" / "test.parquet")
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    target = tmp_path / "data" / "cifar10" / "test.parquet"
    monkeypatch.setenv("KDKIT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))

    pq.write_table(src.slice(0, 40), target)
    first = load_cifar10("test")
    assert len(first) == 40
    assert torch.equal(load_cifar10("test").images, first.images)  # cached

    stat = target.stat()
    pq.write_table(src.slice(100, 30), target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: only the content changed
    second = load_cifar10("test")
    assert len(second) == 30
    assert torch.equal(second.images, cifar_test.images[100:130])
    assert torch.equal(second.labels, cifar_test.labels[100:130])
    assert torch.equal(first.images, cifar_test.images[:40])


def _cifar_copy(tmp_path, monkeypatch, rows: int = 6):
    """The first `rows` rows of the real test split, as a table to damage and write under a temp KDKIT_DATA_DIR
    (the shared data folder is read-only and never touched), with a temp cache."""
    import pyarrow.parquet as pq

    _need("cifar10/test.parquet")
    table = pq.read_table(DATA / "cifar10" / "test.parquet").slice(0, rows)
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    monkeypatch.setenv("KDKIT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    return table, tmp_path / "data" / "cifar10" / "test.parquet"


def _replace_row(table, column: str, row: int, value):
    import pyarrow as pa

    values = table.column(column).to_pylist()
    values[row] = value
    return table.set_column(table.schema.get_field_index(column), column, pa.array(values, table.schema.field(column).type))


def test_cifar10_corrupt_jpeg_names_the_file_and_the_row(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    table, target = _cifar_copy(tmp_path, monkeypatch)
    img = table.column("img").to_pylist()[3]
    bad = _replace_row(table, "img", 3, {"bytes": img["bytes"][:40] + b"\x00" * 20, "path": img["path"]})
    pq.write_table(bad, target)
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(target))}: row 3: the image does not decode") as e:
        load_cifar10("test")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache" / "cifar10" / "test-uint8.safetensors").exists()  # nothing cached
    pq.write_table(_replace_row(table, "label", 2, None), target)
    with pytest.raises(DataFileError, match=rf"{re.escape(str(target))}: row 2 has no label"):
        load_cifar10("test")
    pq.write_table(_replace_row(table, "label", 5, 10), target)
    with pytest.raises(DataFileError, match=r"row 5 has label 10, expected a class id in 0..9"):
        load_cifar10("test")
    pq.write_table(table, target)  # repaired: loads, equal to the real rows
    assert len(load_cifar10("test")) == 6


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_cifar10_file_that_is_not_parquet_names_the_file(tmp_path, monkeypatch, damage):
    import pyarrow.parquet as pq

    table, target = _cifar_copy(tmp_path, monkeypatch)
    pq.write_table(table, target)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "truncated" else np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(target))}: not a readable CIFAR-10 parquet") as e:
        load_cifar10("test")
    assert "\n" not in str(e.value)


def test_cifar10_unknown_split():
    with pytest.raises(ValueError, match="train, test"):
        load_cifar10("validation")


def test_missing_datasets_name_where_they_looked(monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("KDKIT_DATA_DIR", str(empty))
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    for load in (lambda: load_cifar10("test"), lambda: load_gsm8k("train"), lambda: load_tu("nci1")):
        with pytest.raises(MissingDatasetError) as err:
            load()
        msg = str(err.value)
        assert str(empty) in msg and "KDKIT_DATA_DIR" in msg and "offline" in msg.lower()
    with pytest.raises(MissingDatasetError, match=r"cifar10[/\\]test\.parquet"):
        load_cifar10("test")


def test_no_network_is_the_missing_dataset_error_not_a_traceback(monkeypatch, tmp_path):
    """Online settings but no network (this machine without KDKIT_DATA_DIR): the same named error, with the cause."""
    import datasets

    monkeypatch.setenv("KDKIT_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'uoft-cs/cifar10' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    for load in (lambda: load_cifar10("train"), lambda: load_gsm8k("test")):
        with pytest.raises(MissingDatasetError, match="the Hub could not be reached: ConnectionError") as err:
            load()
        assert "KDKIT_DATA_DIR" in str(err.value)


# --------------------------------------------------------------------------------------------- transforms


def test_random_crop_is_torchvision_random_crop_at_the_drawn_offsets():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    out, (top, left) = random_crop(x, padding=4, generator=g, return_offsets=True)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert int(top.min()) >= 0 and int(top.max()) <= 8 and int(left.max()) <= 8
    for i in range(x.shape[0]):
        ref = tvf.crop(tvf.pad(x[i], [4], fill=0), int(top[i]), int(left[i]), 32, 32)
        assert torch.equal(out[i], ref), i
    # float input takes the same path
    outf = crop_at(x.float(), top, left, 4)
    assert torch.equal(outf, out.float())


def test_random_crop_offsets_cover_all_81_positions_uniformly():
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(16_200, 1, 32, 32)
    _, (top, left) = random_crop(x, 4, g, return_offsets=True)
    counts = torch.bincount(top * 9 + left, minlength=81)
    assert counts.numel() == 81 and int(counts.min()) > 0
    assert int(counts.min()) > 100 and int(counts.max()) < 300  # expected 200 each


def test_random_crop_is_reproducible():
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    a = random_crop(x, 4, torch.Generator().manual_seed(5))
    b = random_crop(x, 4, torch.Generator().manual_seed(5))
    c = random_crop(x, 4, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_hflip_mirrors_exactly():
    x = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)
    out, flipped = random_hflip(x, 0.5, torch.Generator().manual_seed(0), return_mask=True)
    assert 60 < int(flipped.sum()) < 140
    assert torch.equal(out[flipped], x[flipped].flip(-1))
    assert torch.equal(out[~flipped], x[~flipped])
    assert torch.equal(out[flipped][:, :, :, 0], x[flipped][:, :, :, 31])
    assert torch.equal(random_hflip(x, 0.0), x)
    assert torch.equal(random_hflip(x.float(), 1.0), x.float().flip(-1))


def test_to_float_normalized():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    y = to_float_normalized(x, (0.0, 0.2, 0.5), (1.0, 0.1, 0.5))
    assert y.dtype == torch.float32 and y.shape == (2, 3, 2, 2)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(to_float_normalized(x.float() / 255, (0.0, 0.2, 0.5), (1.0, 0.1, 0.5)), y)


def test_normalised_train_set_has_zero_mean_unit_std(cifar_train):
    s = torch.zeros(3, dtype=torch.float64)
    ss = torch.zeros(3, dtype=torch.float64)
    for chunk in cifar_train.images.split(10_000):
        z = to_float_normalized(chunk, cifar_train.mean, cifar_train.std).double()
        s += z.sum((0, 2, 3))
        ss += z.square().sum((0, 2, 3))
    n = cifar_train.images.shape[0] * 32 * 32
    mean = s / n
    std = (ss / n - mean.square()).sqrt()
    assert mean.abs().max() < 0.02, mean
    assert (std - 1).abs().max() < 0.02, std


# --------------------------------------------------------------------------------------------- TensorLoader


def _toy(n=103, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 10
    return x, y


MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _loader(x, y, bs=10, **kw):
    return TensorLoader(x, y, bs, mean=MEAN, std=STD, **kw)


def test_eval_loader_is_plain_normalised_order():
    x, y = _toy()
    dl = _loader(x, y, shuffle=False, augment=False, drop_last=False)
    batches = list(dl)
    assert len(dl) == len(batches) == 11 and batches[-1].images.shape[0] == 3
    idx = torch.cat([b.index for b in batches])
    assert torch.equal(idx, torch.arange(103))
    assert torch.allclose(torch.cat([b.images for b in batches]), to_float_normalized(x, MEAN, STD))
    assert torch.equal(torch.cat([b.labels for b in batches]), y)
    assert batches[0].images.dtype == torch.float32


def test_shuffled_epoch_visits_every_index_once():
    x, y = _toy()
    dl = _loader(x, y, drop_last=False)
    idx = torch.cat([b.index for b in dl])
    assert torch.equal(idx.sort().values, torch.arange(103))
    assert not torch.equal(idx, torch.arange(103))
    for b in dl:
        assert torch.equal(b.labels, y[b.index])
    dl_drop = _loader(x, y, drop_last=True)
    assert len(dl_drop) == 10 and all(b.index.numel() == 10 for b in dl_drop)


def test_augmented_samples_are_crops_and_flips_of_their_source():
    x, y = _toy(40)
    dl = _loader(x, y, bs=8, seed=3)
    dl.set_epoch(2)
    offs = [(t, l) for t in range(9) for l in range(9)]
    tops = torch.tensor([t for t, _ in offs])
    lefts = torch.tensor([l for _, l in offs])
    n_changed = 0
    for b in dl:
        for img, i in zip(b.images, b.index):
            cands = crop_at(x[i].expand(81, -1, -1, -1), tops, lefts, 4)
            cands = to_float_normalized(torch.cat([cands, cands.flip(-1)]), MEAN, STD)
            assert (cands - img).abs().amax((1, 2, 3)).min() < 1e-5
            n_changed += int(not torch.allclose(img, to_float_normalized(x[i], MEAN, STD)))
    assert n_changed > 30


def test_two_ranks_partition_the_permutation():
    x, y = _toy(100)
    ranks = [_loader(x, y, rank=r, world_size=2, drop_last=False, seed=7) for r in range(2)]
    for dl in ranks:
        dl.set_epoch(4)
    got = [torch.cat([b.index for b in dl]) for dl in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 5
    assert set(got[0].tolist()).isdisjoint(got[1].tolist())
    assert torch.equal(torch.cat(got).sort().values, torch.arange(100))
    single = _loader(x, y, drop_last=False, seed=7)
    perm = single.epoch_indices(4)
    assert torch.equal(got[0], perm[0::2]) and torch.equal(got[1], perm[1::2])

    # an odd size is padded by wrapping, so both ranks get as many batches
    x, y = _toy(103)
    ranks = [_loader(x, y, rank=r, world_size=2, drop_last=False) for r in range(2)]
    got = [torch.cat([b.index for b in dl]) for dl in ranks]
    assert got[0].numel() == got[1].numel() == 52 and len(ranks[0]) == len(ranks[1])
    assert set(torch.cat(got).tolist()) == set(range(103))


def test_iter_from_reproduces_the_rest_of_the_epoch():
    x, y = _toy()
    kw = dict(bs=8, seed=11, rank=1, world_size=2)
    full_loader = _loader(x, y, **kw)
    full_loader.set_epoch(3)
    full = list(full_loader)
    resumed = _loader(x, y, **kw)  # a fresh process after a restart
    resumed.set_epoch(3)
    rest = list(resumed.iter_from(4))
    assert len(rest) == len(full) - 4 > 0
    for a, b in zip(full[4:], rest):
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.index, b.index)
    assert list(resumed.iter_from(len(resumed))) == []
    with pytest.raises(ValueError):
        resumed.iter_from(len(resumed) + 1)


def test_epochs_differ_and_repeat():
    x, y = _toy()
    dl = _loader(x, y)
    dl.set_epoch(0)
    e0 = [b.index for b in dl]
    e0_again = [b.index for b in dl]
    dl.set_epoch(1)
    e1 = [b.index for b in dl]
    assert all(torch.equal(a, b) for a, b in zip(e0, e0_again))
    assert not torch.equal(torch.cat(e0), torch.cat(e1))
    assert not torch.equal(dl.epoch_indices(0), _loader(x, y, seed=1).epoch_indices(0))


def test_indices_restrict_the_loader():
    x, y = _toy(100)
    sub = balanced_subset(y, 3, seed=0)
    dl = _loader(x, y, bs=4, indices=sub, drop_last=False)
    assert len(dl) == 8
    assert torch.equal(torch.cat([b.index for b in dl]).sort().values, sub)
    with pytest.raises(ValueError):
        _loader(x, y, indices=torch.tensor([0, 100]))


def test_cifar_loader_batches(cifar_test):
    dl = TensorLoader.from_data(cifar_test, 256, shuffle=False, augment=False, drop_last=False)
    assert len(dl) == 40
    b = next(iter(dl))
    assert b.images.shape == (256, 3, 32, 32) and b.images.dtype == torch.float32
    assert torch.equal(b.labels, cifar_test.labels[:256])
    train = TensorLoader.from_data(cifar_test, 128)
    t = time.perf_counter()
    n = sum(bt.images.shape[0] for bt in train)
    dt = time.perf_counter() - t
    print(f"\nTensorLoader CPU, augmented: {n / dt:,.0f} images/s")
    assert n == 78 * 128


@pytest.mark.gpu
def test_loader_on_gpu_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x, y = _toy()
    cpu = list(_loader(x, y, seed=2))
    gpu = list(_loader(x, y, seed=2, device="cuda"))
    assert gpu[0].images.is_cuda and gpu[0].labels.is_cuda
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a.images, b.images.cpu(), atol=1e-6)
        assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels.cpu())


# --------------------------------------------------------------------------------------------- subsets


def test_balanced_subset(cifar_train):
    labels = cifar_train.labels
    sub = balanced_subset(labels, 10, seed=0)
    assert sub.dtype == torch.int64 and sub.numel() == 100
    assert torch.equal(sub, sub.unique())
    assert torch.bincount(labels[sub], minlength=10).tolist() == [10] * 10
    assert torch.equal(sub, balanced_subset(labels, 10, seed=0))
    assert not torch.equal(sub, balanced_subset(labels, 10, seed=1))
    assert set(balanced_subset(labels, 4, seed=0).tolist()) <= set(sub.tolist())
    with pytest.raises(ValueError, match="5000"):
        balanced_subset(labels, 5001)


# --------------------------------------------------------------------------------------------- GSM8K


def test_gsm8k():
    _need("gsm8k/train.jsonl", "gsm8k/test.jsonl")
    train, test = load_gsm8k("train"), load_gsm8k("test")
    assert len(train) == 7473 and len(test) == 1319
    assert {"question", "answer", "final_answer"} <= set(train.column_names)
    with open(DATA / "gsm8k" / "train.jsonl") as f:
        first = json.loads(f.readline())
    assert first["answer"].strip().endswith("#### 72")
    assert train[0]["question"] == first["question"]
    assert train[0]["final_answer"] == "72"
    for ans in train["final_answer"]:
        float(ans)  # every final answer is a plain number
    assert kd.extract_final_answer("so 1,000 + 234\n#### 1,234 ") == "1234"
    with pytest.raises(ValueError, match="train, test"):
        load_gsm8k("dev")


# --------------------------------------------------------------------------------------------- TU


def _snapshot(folder: Path):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_tu_mutag_loads_from_a_copy():
    _need("tu/MUTAG/raw/MUTAG_A.txt")
    before = _snapshot(DATA / "tu")
    ds = load_tu("mutag")
    assert len(ds) == 188 and ds.num_classes == 2
    assert ds[0].edge_index.shape[0] == 2
    assert (kd.cache_dir() / "tu" / "MUTAG" / "processed").is_dir()
    assert not list((DATA / "tu").rglob("processed"))
    assert _snapshot(DATA / "tu") == before
    assert len(kd.load_dataset_by_name("MUTAG")) == 188  # the registry, cached processing
    with pytest.raises(ValueError, match="NCI109"):
        load_tu("ENZYMES")


def test_registry_names():
    for name in ("cifar10", "gsm8k", "mutag", "ptc_mr", "proteins", "nci1", "nci109"):
        assert name in kd.DATASETS
