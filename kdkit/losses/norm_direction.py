"""ND loss: pull the student embedding's direction onto the teacher's class centre of the sample's label while
rewarding a large norm. Follows the official code (github.com/WangYZ1608/Knowledge-Distillation-via-ND,
``CIFAR/utils.py::DirectNormLoss``, ``CIFAR/Models/embtrans_cifar.py::EmbTrans``,
``CIFAR/emb_fea_distribution.py``); it is used on top of a logit loss (KD++ = KD + ND, DKD++ = DKD + ND).
"""
from pathlib import Path
from typing import Annotated

import torch
from torch import Tensor, nn

from ..config import ExistingPath, NonNegInt, Range
from ..errors import ConfigError, ShapeMismatchError
from ..models.outputs import Outputs
from ..models.taps import FeatureTaps, Tap
from ..registry import LOSSES
from .base import DistillLoss, check_options

__all__ = ["nd_loss", "NDProjector", "teacher_class_centres", "save_class_centres", "load_class_centres", "NDLoss"]

# Guards the divisions by a norm; the official code has none (a zero centre or embedding would give NaN there).
_EPS = 1e-12


def _shape(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def nd_loss(student_emb: Tensor, teacher_emb: Tensor, centres: Tensor, labels: Tensor) -> Tensor:
    """Wang et al., NeurIPS 2023, "Improving Knowledge Distillation via Regularizing Feature Norm and Direction":
    mean_i [1 - <s_i, c_{y_i} / ||c_{y_i}||> / max(||s_i||, ||t_i||)].

    ``student_emb`` / ``teacher_emb`` [B, D] penultimate embeddings (the student's projected to D), ``centres``
    [C, D] the teacher's class means, ``labels`` [B]. The projection of s_i on the unit centre direction,
    divided by the larger of the two norms: the loss falls as s_i turns towards the centre and as its norm grows
    past the teacher's. Teacher and centres carry no gradient.
    """
    if student_emb.dim() != 2 or student_emb.shape != teacher_emb.shape:
        raise ShapeMismatchError(
            f"nd_loss: student embedding {_shape(student_emb.shape)} and teacher embedding "
            f"{_shape(teacher_emb.shape)} must both be [B, D] with the same shape (project the student first)"
        )
    if centres.dim() != 2 or centres.shape[1] != student_emb.shape[1]:
        raise ShapeMismatchError(
            f"nd_loss: centres must be [C, D] with D = {student_emb.shape[1]} (the embedding width), "
            f"got {_shape(centres.shape)}"
        )
    labels = torch.as_tensor(labels, device=student_emb.device)
    if labels.shape != student_emb.shape[:1] or labels.is_floating_point():
        raise ShapeMismatchError(
            f"nd_loss: labels must be [B] = [{student_emb.shape[0]}] class indices, got {_shape(labels.shape)} "
            f"of {labels.dtype}"
        )
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= centres.shape[0]):
        raise ValueError(f"nd_loss: labels must lie in [0, {centres.shape[0]}) (one centre per class), "
                         f"got {labels.tolist()[:8]}")
    return _nd_value(student_emb, teacher_emb, centres, labels)


def _nd_value(student_emb: Tensor, teacher_emb: Tensor, centres: Tensor, labels: Tensor) -> Tensor:
    dtype = torch.promote_types(torch.promote_types(student_emb.dtype, teacher_emb.dtype), torch.float32)
    s, t = student_emb.to(dtype), teacher_emb.detach().to(dtype)
    c = centres.detach().to(device=s.device, dtype=dtype)[labels]
    e_c = c / c.norm(dim=1, keepdim=True).clamp_min(_EPS)
    max_norm = torch.maximum(s.norm(dim=1), t.norm(dim=1)).clamp_min(_EPS)
    return (1 - (s * e_c).sum(1) / max_norm).mean()


class NDProjector(nn.Sequential):
    """Wang et al., NeurIPS 2023, "Improving Knowledge Distillation via Regularizing Feature Norm and Direction":
    the student-embedding projector used when the widths differ, BatchNorm1d + Dropout(0.5) + Linear with a
    zero bias (the official ``EmbTrans``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.BatchNorm1d(in_dim), nn.Dropout(0.5), nn.Linear(in_dim, out_dim))
        nn.init.zeros_(self[2].bias)


# ---------------------------------------------------------------- class centres of the teacher


def _embedder(teacher, tap: str, device):
    """(embed(images) -> [B, D], cleanup()) for a kdkit Teacher/Student, any nn.Module, or a plain callable."""
    from ..models.teacher import Student  # Teacher is a Student

    model = teacher.model if isinstance(teacher, Student) else teacher
    if isinstance(model, nn.Module):
        taps = FeatureTaps(model, [tap])
        name = Tap.parse(tap).name
        was = model.training
        model.eval()
        if device is None:
            device = next((p.device for p in model.parameters()), None)

        def embed(x):
            taps.pop()
            model(x.to(device) if device is not None else x)
            return taps.pop()[name]

        def cleanup():
            taps.remove()
            model.train(was)

        return embed, cleanup
    if callable(teacher):
        def embed(x):
            out = teacher(x.to(device) if device is not None else x)
            return out.feature(tap, "teacher") if isinstance(out, Outputs) else out

        return embed, lambda: None
    raise TypeError(f"teacher_class_centres: teacher must be an nn.Module, a kdkit Teacher or a callable, "
                    f"got {type(teacher).__name__}")


def _batches(images, labels, batch_size: int):
    if isinstance(images, Tensor):
        if labels is None or not isinstance(labels, Tensor) or labels.shape != images.shape[:1]:
            raise ValueError(
                f"teacher_class_centres: with an image tensor of {images.shape[0]} images, pass labels as a "
                f"[{images.shape[0]}] tensor (got {type(labels).__name__})")
        for i in range(0, images.shape[0], batch_size):
            yield images[i:i + batch_size], labels[i:i + batch_size]
        return
    if labels is not None:
        raise ValueError("teacher_class_centres: pass labels only with an image tensor; a loader's batches "
                         "carry their own labels")
    for batch in images:
        if hasattr(batch, "images") and hasattr(batch, "labels"):
            yield batch.images, batch.labels
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            yield batch[0], batch[1]
        else:
            raise TypeError(f"teacher_class_centres: a loader batch must be (images, labels, ...) or have "
                            f".images and .labels, got {type(batch).__name__}")


@torch.no_grad()
def teacher_class_centres(teacher, images, labels: Tensor | None = None, *, num_classes: int | None = None,
                          tap: str = "in:fc", batch_size: int = 256, device=None) -> Tensor:
    """Wang et al., NeurIPS 2023, "Improving Knowledge Distillation via Regularizing Feature Norm and Direction":
    the teacher's class centres, the exact per-class mean of its embeddings, as a float32 [C, D] tensor.

    ``teacher``: a kdkit ``Teacher``/``Student`` or any ``nn.Module`` (its ``tap`` is hooked; it runs in eval
    mode, its mode restored after) or a callable returning [B, D] embeddings (or ``Outputs`` holding ``tap``).
    ``images``: an image tensor [N, ...] with ``labels`` [N], or an iterable of ``(images, labels, ...)`` batches
    (e.g. kdkit's ``TensorLoader``), images as the teacher sees them (normalised). The official code averages
    over one pass of the augmented training set. Sums are taken in float64. Every class in
    ``range(num_classes)`` (default: largest label + 1) must occur.
    """
    if batch_size < 1:
        raise ValueError(f"teacher_class_centres: batch_size must be >= 1, got {batch_size}")
    embed, cleanup = _embedder(teacher, tap, device)
    sums = counts = None
    try:
        for x, y in _batches(images, labels, batch_size):
            e = embed(x)
            if not isinstance(e, Tensor) or e.dim() != 2 or e.shape[0] != len(y):
                got = _shape(e.shape) if isinstance(e, Tensor) else type(e).__name__
                raise ShapeMismatchError(
                    f"teacher_class_centres: the teacher's '{tap}' must be a [B, D] embedding per batch of "
                    f"{len(y)} images, got {got}")
            y = torch.as_tensor(y, device=e.device).reshape(-1).long()
            if y.numel() and int(y.min()) < 0:
                raise ValueError(f"teacher_class_centres: labels must be >= 0, got {int(y.min())}")
            need = max(int(y.max()) + 1 if y.numel() else 0, num_classes or 0)
            if sums is None:
                sums = torch.zeros(need, e.shape[1], dtype=torch.float64, device=e.device)
                counts = torch.zeros(need, dtype=torch.float64, device=e.device)
            elif need > sums.shape[0]:  # a larger label than seen so far: grow
                sums = torch.cat([sums, sums.new_zeros(need - sums.shape[0], sums.shape[1])])
                counts = torch.cat([counts, counts.new_zeros(need - counts.shape[0])])
            sums.index_add_(0, y, e.to(torch.float64))
            counts += torch.bincount(y, minlength=sums.shape[0]).to(counts)
    finally:
        cleanup()
    if sums is None:
        raise ValueError("teacher_class_centres: no images were given")
    if num_classes is not None and sums.shape[0] > num_classes:
        raise ValueError(f"teacher_class_centres: labels reach {sums.shape[0] - 1}, outside num_classes={num_classes}")
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"teacher_class_centres: no images of class(es) {empty[:20]}; every class needs at least one")
    return (sums / counts[:, None]).float()


def save_class_centres(path: str | Path, centres: Tensor) -> Path:
    """Write [C, D] centres to a safetensors file (key ``centres``) for ``NDLoss(centres=path)``."""
    from safetensors.torch import save_file

    if centres.dim() != 2:
        raise ShapeMismatchError(f"save_class_centres: centres must be [C, D], got {_shape(centres.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"centres": centres.detach().float().cpu().contiguous()}, str(path))
    return path


def load_class_centres(path: str | Path) -> Tensor:
    """Read [C, D] centres from a safetensors file: the tensor ``centres``, or its only tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"nd: centres file {path} does not exist; write it with save_class_centres("
                          "path, teacher_class_centres(teacher, train_loader)) or leave centres empty to "
                          "accumulate them online")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"nd: centres file {path} is not a readable safetensors file ({e})") from e
    if "centres" in tensors:
        centres = tensors["centres"]
    elif len(tensors) == 1:
        centres = next(iter(tensors.values()))
    else:
        raise ConfigError(f"nd: centres file {path} holds {sorted(tensors)}; expected one [C, D] tensor named "
                          "'centres'")
    if centres.dim() != 2 or not centres.is_floating_point():
        raise ConfigError(f"nd: centres in {path} must be a float [C, D] tensor, got {_shape(centres.shape)} "
                          f"of {centres.dtype}")
    return centres.float()


# ---------------------------------------------------------------- the loss module


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class NDLoss(DistillLoss):
    """Wang et al., NeurIPS 2023, "Improving Knowledge Distillation via Regularizing Feature Norm and Direction"
    (ND loss: student embedding direction onto the teacher's class centre, large norm).

    Centres: ``centres=PATH`` (an existing file, checked with the recipe) loads a safetensors file (`save_class_centres` of `teacher_class_centres`, as the
    official code precomputes them). Left unset (null or empty), the loss accumulates the exact per-class mean of the frozen
    teacher's embeddings online, from the batches it sees in training mode during the first ``online_epochs``
    epochs (the epoch the trainer reports via ``set_epoch``), then keeps them fixed; before each loss the
    current batch is added, so every label has a centre. Sums and counts are buffers (checkpointed, summed
    over processes under DDP). After one epoch the centres equal `teacher_class_centres` over the images that
    epoch fed, i.e. the official one-pass precomputation over the augmented training set (kdkit's loader drops
    the last incomplete batch, so up to batch_size - 1 random images are missing). Early batches use partial
    means. ``projector``: when the student's width differs from the teacher's, its embedding goes through
    `NDProjector` (the official code; trained with the student); False requires equal widths.
    """

    needs_labels = True

    def __init__(self, *, student_layer: str = "in:fc", teacher_layer: str = "in:fc",
                 centres: ExistingPath | None = None, online_epochs: Annotated[float, Range(gt=0, finite=False)] = 1.0,
                 num_classes: NonNegInt = 0, projector: bool = True):
        # online_epochs: epochs over which the teacher's class centres are averaged (.inf: never frozen);
        # num_classes 0: the teacher's logit count
        super().__init__()
        check_options(self, locals())
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.student_taps, self.teacher_taps = (student_layer,), (teacher_layer,)
        self.centres_path = str(centres or "")
        self.online_epochs = float(online_epochs)
        self.num_classes = int(num_classes)
        self.use_projector = bool(projector)
        self.projector: nn.Module | None = None
        self._built: tuple | None = None
        if self.centres_path:
            loaded = load_class_centres(self.centres_path)
            if self.num_classes and loaded.shape[0] != self.num_classes:
                raise ConfigError(f"nd: centres file {self.centres_path} has {loaded.shape[0]} classes, but "
                                  f"num_classes={self.num_classes}")
            self.register_buffer("centres", loaded)
        else:  # sized by setup
            self.register_buffer("class_sum", None)
            self.register_buffer("class_count", None)

    @property
    def online(self) -> bool:
        return not self.centres_path

    def _feats(self, student: Outputs, teacher: Outputs | None) -> tuple[Tensor, Tensor]:
        if teacher is None:
            raise ValueError("nd needs the teacher's outputs, but none were passed")
        s, t = student.feature(self.student_layer, "student"), teacher.feature(self.teacher_layer, "teacher")
        if s.dim() != 2 or t.dim() != 2 or s.shape[0] != t.shape[0]:
            raise ShapeMismatchError(
                f"nd: student layer '{self.student_layer}' gives {_shape(s.shape)} and teacher layer "
                f"'{self.teacher_layer}' gives {_shape(t.shape)}; ND needs penultimate embeddings [B, D] of the "
                "same batch (tap e.g. 'in:fc')")
        return s, t

    def setup(self, student: Outputs, teacher: Outputs | None) -> None:
        s, t = self._feats(student, teacher)
        s_dim, t_dim = int(s.shape[1]), int(t.shape[1])
        n_cls = self.num_classes or (int(teacher.logits.shape[-1]) if teacher.logits is not None else 0)
        if not self.online:
            c, d = self.centres.shape
            if d != t_dim:
                raise ShapeMismatchError(f"nd: centres file {self.centres_path} has width {d}, but teacher layer "
                                         f"'{self.teacher_layer}' gives width {t_dim}")
            if n_cls and c != n_cls:
                raise ShapeMismatchError(f"nd: centres file {self.centres_path} has {c} classes, the teacher "
                                         f"predicts {n_cls}")
        elif not n_cls:
            raise ConfigError("nd: cannot tell the number of classes for the online centres: set num_classes "
                              "(the teacher's outputs have no logits)")
        key = (s_dim, t_dim, n_cls)
        if self._built == key:
            return  # built for these sizes already (setup again on resume): keep the trained state
        if s_dim != t_dim:
            if not self.use_projector:
                raise ShapeMismatchError(
                    f"nd with projector=False needs equal widths, but student layer '{self.student_layer}' gives "
                    f"{s_dim} and teacher layer '{self.teacher_layer}' gives {t_dim}; set projector=True")
            self.projector = NDProjector(s_dim, t_dim).to(s.device)
        else:
            self.projector = nn.Identity()  # the official code projects only when the widths differ
        if self.online:
            self.register_buffer("class_sum", torch.zeros(n_cls, t_dim, dtype=torch.float64, device=t.device))
            self.register_buffer("class_count", torch.zeros(n_cls, dtype=torch.long, device=t.device))
        self._built = key

    @torch.no_grad()
    def _accumulate(self, t: Tensor, labels: Tensor) -> None:
        t = t.to(device=self.class_sum.device, dtype=self.class_sum.dtype)
        if _distributed():
            import torch.distributed as dist

            sums = torch.zeros_like(self.class_sum).index_add_(0, labels, t)
            counts = torch.bincount(labels, minlength=self.class_count.shape[0])
            dist.all_reduce(sums)
            dist.all_reduce(counts)
            self.class_sum += sums
            self.class_count += counts
        else:
            self.class_sum.index_add_(0, labels, t)
            self.class_count += torch.bincount(labels, minlength=self.class_count.shape[0])

    def current_centres(self) -> Tensor:
        """The [C, D] centres the loss uses now (online: sums / counts; a class not seen yet is a zero row)."""
        if not self.online:
            return self.centres
        if self.class_sum is None:
            raise RuntimeError("NDLoss.setup(student_outputs, teacher_outputs) must be called first")
        return (self.class_sum / self.class_count.clamp_min(1)[:, None]).float()

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        if self.projector is None:
            raise RuntimeError(
                "NDLoss.setup(student_outputs, teacher_outputs) must be called before the loss is used: it sizes "
                "the projector and the class-centre state")
        if labels is None:
            raise ValueError("nd needs labels (each sample's class picks its teacher class centre)")
        s, t = self._feats(student, teacher)
        labels = torch.as_tensor(labels).reshape(-1).long()
        if labels.shape[0] != s.shape[0]:
            raise ShapeMismatchError(f"nd: {labels.shape[0]} labels for a batch of {s.shape[0]}")
        centres = self.centres if not self.online else self.class_sum
        labels = labels.to(centres.device)
        n_cls = centres.shape[0]
        in_range = (labels >= 0) & (labels < n_cls)
        accumulate = self.online and self.training and self.epoch < self.online_epochs
        unseen = None
        if self.online and not accumulate:  # frozen centres: every label needs one (same sync as the range check)
            unseen = (self.class_count[labels.clamp(0, n_cls - 1)] == 0) & in_range
            bad, missing = torch.stack([(~in_range).sum(), unseen.sum()]).tolist()
        else:
            bad, missing = int((~in_range).sum()), 0
        if bad:
            raise ValueError(f"nd: labels must lie in [0, {n_cls}) (one teacher centre per class), "
                             f"got {labels.tolist()[:8]}")
        if missing:
            raise RuntimeError(
                f"nd: no teacher embeddings of class(es) {sorted(set(labels[unseen].tolist()))[:8]} have been "
                "accumulated (the online centres grow only in training mode during the first online_epochs "
                "epochs); train first or pass centres=")
        if accumulate:  # this batch first, so each of its labels has a centre
            self._accumulate(t.detach(), labels)
        if isinstance(self.projector, NDProjector):
            s = self.projector(s.to(self.projector[2].weight.dtype))
        return _nd_value(s, t, self.current_centres(), labels.to(s.device))

    def extra_repr(self) -> str:
        src = f"centres={self.centres_path!r}" if not self.online else f"online_epochs={self.online_epochs}"
        return (f"student_layer={self.student_layer!r}, teacher_layer={self.teacher_layer!r}, {src}, "
                f"num_classes={self.num_classes}, projector={self.use_projector}")


if "nd" not in LOSSES:  # tolerate a re-import (importlib.reload)
    LOSSES.register("nd", NDLoss)
