"""kdkit's one checkpoint format, and its weights files. No pickle is ever written or loaded.

A training checkpoint is a folder `checkpoints/step-N/` holding any nested state (model and optimiser state
dicts, RNG states, counters, histories) split in two:

    state.safetensors   every tensor of the state (and numpy array), under its path in the state
    state.json          everything else, with each tensor replaced by {"__tensor__": path}
    manifest.json       {"format": "kdkit-checkpoint", "version": 1, "files": {name: sha256}}

It is written under a temporary name beside its place and renamed into it (`atomic_path`), so a crash leaves
the previous checkpoint whole; `clean_stale` removes what such a crash left behind. Loading verifies every
checksum first, so a damaged file is named instead of being read. Final weights are single safetensors files
with string metadata (`save_model` / `load_model`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT, VERSION = "kdkit-checkpoint", 1
TMP_MARK, OLD_MARK = ".tmp-", ".old-"


# ---------------------------------------------------------------- atomic files and folders


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success rename it onto `path` (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}")) / path.name
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            old = path.with_name(f".{path.name}{OLD_MARK}{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def clean_stale(folder: Path) -> list[str]:
    """Remove the temporary files and folders an interrupted atomic write left in `folder` (and in its
    `checkpoints/`); returns their names."""
    removed = []
    for d in (Path(folder), Path(folder) / "checkpoints"):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(".") and (TMP_MARK in p.name or OLD_MARK in p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- weights files


def _dedup(state: dict) -> dict:
    """safetensors refuses tensors sharing memory; give each its own copy."""
    seen, out = set(), {}
    for k, v in state.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        out[k] = v.clone() if ptr is not None and ptr in seen else v
        seen.add(ptr)
    return out


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """A safetensors file, written atomically (tensors moved to CPU, made contiguous, shared memory split)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(Path(path)) as tmp:
        save_file(_dedup(state), str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def save_model(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Weights (parameters and buffers) as one safetensors file, written atomically."""
    save_tensors(path, model.state_dict(), metadata)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, or a CheckpointError saying what is wrong with it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({str(e).splitlines()[0]})") from e


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata only (cheap: no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({str(e).splitlines()[0]})") from e


def load_model(model: nn.Module, path: Path, expect: dict[str, str] | None = None) -> dict[str, str]:
    """Load weights into `model`, refusing a file made for another architecture with a clear message."""
    state, meta = read_safetensors(path)
    for key, want in (expect or {}).items():
        if key in meta and meta[key] != str(want):
            raise CheckpointError(f"checkpoint {path} holds {key}={meta[key]}, but the recipe asks for {want}")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        lines = str(e).splitlines()
        raise CheckpointError(f"checkpoint {path} does not fit {type(model).__name__}"
                              + (f" (made for {meta['model']} {meta.get('options', '')})" if "model" in meta else "")
                              + f": {lines[1].strip() if len(lines) > 1 else e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__}"
            + (f" (made for {meta['model']})" if "model" in meta else "")
            + f": {len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})")
    return meta


# ---------------------------------------------------------------- nested state <-> (tensors, JSON)


def _encode(obj, path: str, tensors: dict):
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": path}
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        return {"__pairs__": [[_encode(k, f"{path}/k{i}", tensors), _encode(v, f"{path}/{i}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"checkpoint state at '{path or '/'}' holds a {type(obj).__name__}, which kdkit does not store "
                    "(tensors, arrays, numbers, strings, lists, tuples and dicts only)")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy()
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__pairs__" in obj:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__pairs__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(k):
    return tuple(_hashable(v) for v in k) if isinstance(k, list) else k


def save_checkpoint(folder: Path, state: dict) -> Path:
    """Write nested `state` as one checkpoint folder (atomically, with its manifest)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, "", tensors)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        save_file(_dedup({k: v.detach().cpu().contiguous() for k, v in tensors.items()}),
                  str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(encoded))
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "version": VERSION,
                                                "files": {f: sha256(tmp / f) for f in files}}, indent=1))
    return folder


def verify(folder: Path) -> None:
    """The folder is a kdkit checkpoint and every file in its manifest has its recorded checksum."""
    folder = Path(folder)
    man = folder / MANIFEST
    if not man.is_file():
        raise CheckpointError(f"{folder} is not a kdkit checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(man.read_text())
        sums = manifest["files"]
        ok = manifest.get("format") == FORMAT and isinstance(sums, dict)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise CheckpointError(f"checkpoint manifest {man} is corrupt or from another tool or kdkit version")
    for name, digest in sums.items():
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {folder} is missing {name}")
        if sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is corrupt (checksum mismatch); "
                                  "resume from an earlier checkpoint or start again")


def load_checkpoint(folder: Path) -> dict:
    """The nested state of a checkpoint folder (verified first)."""
    folder = Path(folder)
    verify(folder)
    tensors, _ = read_safetensors(folder / "state.safetensors")
    try:
        return _decode(json.loads((folder / "state.json").read_text()), tensors)
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {folder}/state.json does not match its tensors ({e})") from e


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """A run's complete checkpoint folders (`checkpoints/step-N/` with a manifest), oldest first."""
    found = []
    for p in (Path(run_dir) / "checkpoints").glob("step-*"):
        step = p.name.removeprefix("step-")
        if step.isdigit() and (p / MANIFEST).is_file():
            found.append((int(step), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run (by step), or None."""
    folders = checkpoint_folders(run_dir)
    return folders[-1] if folders else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in checkpoint_folders(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def module_state(modules: dict[str, nn.Module]) -> dict:
    """{name: state_dict} of several modules (what a checkpoint stores of them)."""
    return {name: m.state_dict() for name, m in modules.items()}


def load_module_state(modules: dict[str, nn.Module], state: dict, where: str) -> None:
    """Load `state[name]` into each module, naming the checkpoint when it does not fit."""
    for name, module in modules.items():
        if name not in state:
            raise CheckpointError(f"checkpoint {where} has no '{name}' (it was made by another method or run)")
        try:
            module.load_state_dict(state[name])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {where}: '{name}' does not fit this run's model "
                                  f"({str(e).splitlines()[0]})") from e
