"""Atomic, checksummed checkpoints: tensors in safetensors, optimizer state via torch.load(weights_only=True).

A checkpoint is a folder written under a temporary name and renamed into place, with a manifest of
SHA-256 sums, so a crash mid-write leaves the previous checkpoint intact and a damaged file is
reported by name instead of being loaded. No pickled code is ever executed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success rename it onto `path` (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-")) / path.name
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Weights (parameters and buffers) as one safetensors file, written atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        save_file(_dedup(state), str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def _dedup(state: dict) -> dict:
    """safetensors refuses tensors sharing memory; give each its own copy."""
    seen, out = set(), {}
    for k, v in state.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


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
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file ({e})") from e


def load_model(model: nn.Module, path: Path, expect: dict[str, str] | None = None) -> dict[str, str]:
    """Load weights into `model`, refusing a file made for another architecture with a clear message."""
    state, meta = read_safetensors(path)
    for key, want in (expect or {}).items():
        if key in meta and meta[key] != str(want):
            raise CheckpointError(f"checkpoint {path} holds {key}={meta[key]}, but the recipe asks for {want}")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"checkpoint {path} does not fit {type(model).__name__}"
                              + (f" (made for {meta['model']} {meta.get('options', '')})" if "model" in meta else "")
                              + f": {str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__}"
            + (f" (made for {meta['model']})" if "model" in meta else "")
            + f": {len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})")
    return meta


def save_checkpoint(folder: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None,
                    state: dict, scaler_state: dict | None = None) -> Path:
    """One training checkpoint folder: each module's weights, optimizer, JSON state, RNG, and a manifest."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        for name, module in modules.items():
            sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(_dedup(sd), str(tmp / f"{name}.safetensors"))
        extras = {"optimizer": optimizer.state_dict() if optimizer is not None else {},
                  "scaler": scaler_state or {}}
        torch.save(extras, tmp / "optimizer.pt")
        save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MANIFEST).write_text(json.dumps({f: sha256(tmp / f) for f in files}, indent=1))
    return folder


def verify(folder: Path) -> None:
    """Every file listed in the manifest exists and has its recorded checksum."""
    folder = Path(folder)
    man = folder / MANIFEST
    if not man.is_file():
        raise CheckpointError(f"{folder} is not a kdkit checkpoint (no {MANIFEST})")
    try:
        sums = json.loads(man.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint manifest {man} is corrupt ({e})") from e
    for name, digest in sums.items():
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {folder} is missing {name}")
        if sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is corrupt (checksum mismatch); "
                                  f"resume from an earlier checkpoint or start again")


def load_checkpoint(folder: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore modules, optimizer and RNG from `folder` (verified first); return its JSON state."""
    folder = Path(folder)
    verify(folder)
    for name, module in modules.items():
        state, _ = read_safetensors(folder / f"{name}.safetensors")
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {folder / name}.safetensors does not fit the model: {e}") from e
    extras = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    if optimizer is not None and extras.get("optimizer"):
        optimizer.load_state_dict(extras["optimizer"])
    rng, _ = read_safetensors(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    state = json.loads((folder / "state.json").read_text())
    state["scaler"] = extras.get("scaler") or {}
    return state


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run (by global step), or None."""
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
