"""Teacher and Student: any nn.Module behind one call that returns `Outputs` with tapped features."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, KdkitError
from .outputs import Outputs, logits_of
from .taps import FeatureTaps, Tap


class Student(nn.Module):
    """A trainable model whose forward returns `Outputs` (logits + features tapped by module path)."""

    def __init__(self, model: nn.Module, taps=()):
        super().__init__()
        self.model = model
        self._taps = FeatureTaps(model, taps)

    @property
    def taps(self) -> list[Tap]:
        return self._taps.taps

    def add_taps(self, taps):
        """Add taps after construction (losses declare what they need); already-tapped paths are kept once."""
        merged = {t.name: t for t in self._taps.taps}
        merged.update({t.name: t for t in map(Tap.parse, taps)})
        self._taps.remove()
        self._taps = FeatureTaps(self.model, list(merged.values()))

    def forward(self, *args, **kwargs) -> Outputs:
        self._taps.pop()
        raw = self.model(*args, **kwargs)
        return Outputs(logits_of(raw), self._taps.pop())


class Teacher(Student):
    """A frozen Student: eval mode, no gradients, inference mode, whatever the caller does."""

    def __init__(self, model: nn.Module, taps=()):
        super().__init__(model, taps)
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True):
        # A teacher stays in eval mode: batch-norm statistics and dropout must not move.
        return super().train(False)

    def forward(self, *args, **kwargs) -> Outputs:
        with torch.inference_mode():
            out = super().forward(*args, **kwargs)
        # Inference tensors cannot enter autograd graphs; clone makes them ordinary constants.
        return Outputs(None if out.logits is None else out.logits.clone(),
                       {k: v.clone() for k, v in out.features.items()})


class CachedTeacher(nn.Module):
    """A teacher served from stored logits, indexed by dataset sample index (no teacher forward)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits, persistent=False)

    @classmethod
    def load(cls, path: str | Path) -> "CachedTeacher":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"teacher cache {path} does not exist; build it with CachedTeacher.build")
        try:
            return cls(load_file(str(path))["logits"])
        except (SafetensorError, KeyError, OSError) as e:
            raise CheckpointError(f"teacher cache {path} is unreadable or corrupt ({e}); rebuild it") from e

    @staticmethod
    @torch.no_grad()
    def build(teacher: nn.Module, images: torch.Tensor, path: str | Path, batch_size: int = 512,
              transform=None, indices: torch.Tensor | None = None) -> "CachedTeacher":
        """Run `teacher` once over `images` (or only `images[indices]`) and store its logits with safetensors.

        Rows are dataset sample indices; rows not computed are NaN, and asking for them is an error.
        The logits are of the un-augmented images: a cached teacher trades augmentation-exact targets for
        no teacher forward at all.
        """
        from safetensors.torch import save_file

        from ..checkpoint import atomic_path

        rows = torch.arange(len(images)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        was = teacher.training
        teacher.eval()  # eval-mode logits; batch-norm statistics must not move
        parts = []
        for i in range(0, len(rows), batch_size):
            x = images[rows[i : i + batch_size]]
            x = transform(x) if transform is not None else x
            parts.append(logits_of(teacher(x)).float().cpu())
        teacher.train(was)
        part = torch.cat(parts)
        logits = torch.full((len(images), part.shape[1]), float("nan"))
        logits[rows] = part
        with atomic_path(Path(path)) as tmp:
            save_file({"logits": logits.contiguous()}, str(tmp))
        return CachedTeacher(logits)

    def forward(self, *args, index: torch.Tensor, **kwargs) -> Outputs:
        if index is None:
            raise ValueError("CachedTeacher needs the batch's sample indices (index=...)")
        logits = self.logits[index.to(self.logits.device)]
        missing = torch.isnan(logits).any(dim=1)
        if missing.any():
            raise KdkitError(f"the teacher cache has no logits for sample indices "
                           f"{index[missing.cpu()][:8].tolist()}; build it over the samples you train on")
        return Outputs(logits)
