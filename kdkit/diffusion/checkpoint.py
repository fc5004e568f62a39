"""Atomic, checksummed checkpoints of a distillation run: the method's networks (safetensors, the frozen teacher
left out), every optimiser (`torch.load(weights_only=True)`), the CPU and CUDA RNG states and the loop state, so
a resumed run continues bit for bit. Built on `kdkit.checkpoint` (same manifest, same atomic rename)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from .. import checkpoint as ckpt

FROZEN_PREFIXES = ("teacher.", "real_score.")


def trainable_state(method: nn.Module) -> dict[str, torch.Tensor]:
    """The method's state without the frozen teacher (it is loaded from its own file; a fake score built on top
    of it, `ResidualDenoiser`, shares its tensors, which are left out too)."""
    teacher = getattr(method, "teacher", None)
    frozen = {t.data_ptr() for t in teacher.state_dict().values()} if teacher is not None else set()
    return {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()
            if not k.startswith(FROZEN_PREFIXES) and v.data_ptr() not in frozen}


def save_run_checkpoint(folder: Path, method: nn.Module, optimizers: dict, state: dict) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    with ckpt.atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        save_file(ckpt._dedup(trainable_state(method)), str(tmp / "method.safetensors"))
        torch.save({k: o.state_dict() for k, o in optimizers.items()}, tmp / "optimizers.pt")
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng |= {f"torch_cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / ckpt.MANIFEST).write_text(json.dumps({f: ckpt.sha256(tmp / f) for f in files}, indent=1))
    return folder


def load_run_checkpoint(folder: Path, method: nn.Module, optimizers: dict) -> dict:
    folder = Path(folder)
    ckpt.verify(folder)
    tensors, _ = ckpt.read_safetensors(folder / "method.safetensors")
    own = trainable_state(method)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {folder} was made by a different method or network: {len(missing)} missing "
                              f"tensors (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    try:
        method.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {folder} does not fit this run's networks: {str(e).splitlines()[-1]}") from e
    saved = torch.load(folder / "optimizers.pt", map_location="cpu", weights_only=True)
    if set(saved) != set(optimizers):
        raise CheckpointError(f"checkpoint {folder} has optimisers {sorted(saved)}, "
                              f"this method has {sorted(optimizers)}")
    for k, opt in optimizers.items():
        opt.load_state_dict(saved[k])
    rng, _ = ckpt.read_safetensors(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[f"torch_cuda{i}"] for i in range(torch.cuda.device_count()) if f"torch_cuda{i}" in rng]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return json.loads((folder / "state.json").read_text())
