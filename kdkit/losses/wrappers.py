"""Loss wrappers: per-sample weighting of a logit loss (``weighted``) and dual-head KD (``dual_head``).

A wrapper builds its inner loss from the registry by name. In a recipe the wrapper's own options and the inner
loss's options sit side by side; whatever the wrapper does not declare goes to the inner loss::

    losses:
      kd: {type: weighted, inner: kd, scheme: teacher_confidence, T: 4}

Recipe validation (`kdkit.config.validate_losses`) reads typed options: ``options_for(inner)`` gives a wrapper's
own options plus those of the loss registered as ``inner``, each with its declared type and range, and that is
what an entry naming ``inner`` is checked against (``inner: jsd, beta: 2`` is refused before any work, as for a
plain ``jsd``). The wrapper's signature itself lists its own options and those of its default inner loss, so an
entry without ``inner`` is checked against exactly the loss it will build. From Python,
``WeightedLoss.wrap(loss)`` / ``DualHeadLoss.wrap(loss)`` wrap an already built loss, and ``weight_fn`` gives
per-sample weights from any callable.
"""
import inspect
import typing
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NonNegFloat, PositiveFloat, factory_options
from ..errors import ConfigError, ShapeMismatchError, UnknownNameError
from ..models.outputs import Outputs
from ..registry import LOSSES
from .base import DistillLoss, check_options
from .logits import BinaryKLNormLoss, KDLoss, _check_T, _logits

__all__ = ["teacher_sample_weights", "weighted_mean", "WeightedLoss", "DualHeadLoss", "AuxHead"]


# ---------------------------------------------------------------- inner losses and their options


def _own_options(cls) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY}


def _own_hints(cls) -> dict[str, typing.Any]:
    """The declared (typed, ranged) annotations of the wrapper's own options."""
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    return {n: hints[n] for n in _own_options(cls)}


def _advertise_default_inner(cls, default_inner: type) -> None:
    """Give `cls` the signature ``(*, <own options>, <options of default_inner>)`` with their declared types.

    Only what recipe validation and ``inspect`` see changes; the constructor still takes ``**inner_options``.
    An entry naming another inner loss is checked with ``options_for(inner)`` instead.
    """
    params = dict(_own_options(cls))
    hints = _own_hints(cls) | typing.get_type_hints(default_inner.__init__, include_extras=True)
    for name, p in inspect.signature(default_inner).parameters.items():
        params.setdefault(name, p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    cls.__signature__ = inspect.Signature([p.replace(annotation=hints[n]) for n, p in params.items()])
    cls.__init__.__annotations__ = {n: hints[n] for n in params}


def _build_inner(wrapper: str, inner: str, options: dict, check=None) -> DistillLoss:
    """The registered loss `inner` built with `options`; unknown names and options are `ConfigError`s.

    ``check(factory, name)``, if given, vets the loss's class before its options are looked at.
    """
    if inner == wrapper:
        raise ConfigError(f"{wrapper}: inner={inner!r} would wrap itself; name the loss to wrap, e.g. inner='kd'")
    try:
        factory = LOSSES.get(inner)
    except UnknownNameError as e:
        raise ConfigError(f"{wrapper}: inner: {e}") from None
    if check is not None:
        check(factory, inner)
    allowed = factory_options(factory)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{wrapper} with inner={inner!r}: {', '.join(map(repr, unknown))} "
            f"{'is not an option' if len(unknown) == 1 else 'are not options'} of loss {inner!r}; "
            f"its options: {', '.join(allowed) or 'none'}"
        )
    return factory(**options)


def _options_for(cls, inner: str) -> dict[str, typing.Any]:
    own = _own_hints(cls)
    try:
        factory = LOSSES.get(inner)
    except UnknownNameError as e:
        raise ConfigError(f"inner: {e}") from None
    return own | {n: t for n, (t, _) in factory_options(factory).items() if n not in own}


def _per_sample_losses() -> list[str]:
    return [n for n in LOSSES.names() if n != "weighted" and callable(getattr(LOSSES.get(n), "per_sample", None))]


def _require_per_sample(loss, name: str) -> None:
    """`loss` (a class or an instance) must give per-sample values."""
    if not callable(getattr(loss, "per_sample", None)):
        raise ConfigError(
            f"weighted: loss {name!r} has no per_sample(student, teacher, labels) (per-sample values), so it cannot "
            f"be weighted per sample; losses that have one: {', '.join(_per_sample_losses())}"
        )


# ---------------------------------------------------------------- per-sample weighting

Scheme = Literal["teacher_confidence", "teacher_correct", "entropy"]
SCHEMES: tuple[str, ...] = typing.get_args(Scheme)


def teacher_sample_weights(teacher_logits: Tensor, labels: Tensor | None = None, scheme: str = "teacher_confidence",
                           wrong_weight: float = 0.0, entropy_T: float = 4.0) -> Tensor:
    """Per-sample weights from the teacher, detached, shaped ``teacher_logits.shape[:-1]``.

    ``teacher_confidence``: the teacher's probability of the true class (softmax at T = 1).
    ``teacher_correct``: 1 where the teacher's top class is the label, else ``wrong_weight``.
    ``entropy``: the entropy (nats) of softmax(t / entropy_T), as ER-KD (Su et al. 2023, "Entropy-Reweighted
    Knowledge Distillation", cpsu00/ER-KD ``er_kd_loss``, t = 4): uncertain teacher outputs weigh more.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"weighted: scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    t = teacher_logits.detach()
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    lead, c = t.shape[:-1], t.shape[-1]
    if scheme == "entropy":
        _check_T(entropy_T)
        log_p = F.log_softmax(t / entropy_T, dim=-1)
        p = log_p.exp()
        return -(torch.where(p > 0, p * log_p, 0.0)).sum(-1)
    if labels is None:
        raise ValueError(f"weighted: scheme {scheme!r} needs the ground-truth labels, but none were passed")
    y = labels.reshape(-1).long().to(t.device)
    if y.numel() != lead.numel():
        raise ShapeMismatchError(f"weighted: labels of shape {tuple(labels.shape)} do not match teacher logits "
                                 f"{tuple(teacher_logits.shape)}; one class index per logit row is needed")
    flat = t.reshape(-1, c)
    if scheme == "teacher_confidence":
        w = F.softmax(flat, dim=-1).gather(1, y[:, None]).squeeze(1)
    else:
        right = flat.argmax(dim=-1) == y
        w = torch.where(right, 1.0, float(wrong_weight)).to(flat.dtype)
    return w.reshape(lead)


def weighted_mean(values: Tensor, weights: Tensor, normalize: bool = False) -> Tensor:
    """``mean_i w_i * l_i`` over per-sample `values`; `weights` are detached, shaped like `values` or ``[B]``.

    ``normalize=True`` divides the weights by their mean first (so they average 1; all-zero weights stay 0).
    """
    w = _fit_weights(values, weights, normalize)
    return (w * values).mean()


def _fit_weights(values: Tensor, weights: Tensor, normalize: bool) -> Tensor:
    w = weights.detach().to(device=values.device, dtype=values.dtype)
    if w.shape != values.shape:
        if w.dim() == 1 and values.dim() >= 1 and w.shape[0] == values.shape[0]:
            w = w.reshape(-1, *([1] * (values.dim() - 1)))
        else:
            raise ShapeMismatchError(
                f"weighted: sample weights of shape {tuple(weights.shape)} do not fit per-sample loss values of "
                f"shape {tuple(values.shape)}; give one weight per value or one per batch row"
            )
    if normalize:
        mean = w.mean()
        w = torch.where(mean > 0, w / torch.where(mean > 0, mean, 1.0), w)
    return w


class WeightedLoss(DistillLoss):
    """Su et al. 2023, "Entropy-Reweighted Knowledge Distillation" (ER-KD, ``scheme: entropy``), generalised: a logit loss weighted per sample, ``mean_i w_i * l_i``.

    The wrapped loss (``inner``, a registered name; its options beside this loss's, see the module docstring) must
    have ``per_sample(student, teacher, labels)`` (KD, reverse KL, JSD, DKD, NKD, label-free, BinaryKL(-Norm);
    DIST relates the batch and has none). Weights, always detached: ``scheme`` ``teacher_confidence`` (teacher
    probability of the true class), ``teacher_correct`` (1, or ``wrong_weight`` where the teacher is wrong) or
    ``entropy`` (teacher entropy at ``entropy_T``, ER-KD's weight; with ``inner: kd`` this is ER-KD exactly), or any
    ``weight_fn(student, teacher, labels) -> [B]`` given from Python (``WeightedLoss.wrap(loss, weight_fn=f)``),
    which replaces the scheme. ``normalize: true`` rescales the weights to mean 1 per batch.
    """

    def __init__(self, *, inner: str = "kd", scheme: Scheme = "teacher_confidence", wrong_weight: NonNegFloat = 0.0,
                 entropy_T: PositiveFloat = 4.0, normalize: bool = False, **inner_options):
        super().__init__()
        self._configure(_build_inner("weighted", inner, inner_options, _require_per_sample), inner, scheme,
                        wrong_weight, entropy_T, normalize, None)

    @classmethod
    def wrap(cls, loss: DistillLoss, *, scheme: Scheme = "teacher_confidence", wrong_weight: NonNegFloat = 0.0,
             entropy_T: PositiveFloat = 4.0, normalize: bool = False, weight_fn=None) -> "WeightedLoss":
        """Weight an already built loss (from Python); `weight_fn`, if given, overrides `scheme`."""
        obj = cls.__new__(cls)
        DistillLoss.__init__(obj)
        obj._configure(loss, type(loss).__name__, scheme, wrong_weight, entropy_T, normalize, weight_fn)
        return obj

    @classmethod
    def options_for(cls, inner: str) -> dict[str, typing.Any]:
        """This wrapper's options plus those of the loss registered as `inner` (name -> type)."""
        return _options_for(cls, inner)

    def _configure(self, loss, inner_name, scheme, wrong_weight, entropy_T, normalize, weight_fn) -> None:
        if not isinstance(loss, DistillLoss):
            raise ConfigError(f"weighted wraps a DistillLoss, got {type(loss).__name__}")
        _require_per_sample(loss, inner_name)
        if loss.needs_index:
            raise ConfigError(f"weighted: loss {inner_name!r} needs dataset indices (needs_index), which per_sample "
                              "does not pass; it cannot be wrapped")
        check_options(self, dict(scheme=scheme, wrong_weight=wrong_weight, entropy_T=entropy_T, normalize=normalize))
        if weight_fn is not None and not callable(weight_fn):
            raise ConfigError(f"weighted: weight_fn must be callable(student, teacher, labels) -> [B], "
                              f"got {weight_fn!r}")
        self.inner = loss
        self.scheme = scheme
        self.wrong_weight = float(wrong_weight)
        self.entropy_T = float(entropy_T)
        self.normalize = bool(normalize)
        self.weight_fn = weight_fn
        self.student_taps, self.teacher_taps = loss.student_taps, loss.teacher_taps
        # Per instance (the trainer reads them so): they follow the inner loss and where the weights come from.
        self.needs_labels = loss.needs_labels or (weight_fn is None and scheme != "entropy")
        self.needs_teacher = loss.needs_teacher or weight_fn is None

    def set_epoch(self, epoch: float) -> None:
        super().set_epoch(epoch)
        self.inner.set_epoch(epoch)

    def setup(self, student: Outputs, teacher: Outputs | None) -> None:
        self.inner.setup(student, teacher)

    def sample_weights(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        """This step's weights (detached, before `normalize`)."""
        if self.weight_fn is not None:
            w = self.weight_fn(student, teacher, labels)
            if not isinstance(w, Tensor):
                w = torch.as_tensor(w)
            return w.detach()
        return teacher_sample_weights(_logits(teacher, "teacher", "weighted"), labels, self.scheme,
                                      self.wrong_weight, self.entropy_T)

    def per_sample(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        """``w_i * l_i`` per sample (weights normalised if asked); its mean is `forward`'s value."""
        values = self.inner.per_sample(student, teacher, labels)
        return _fit_weights(values, self.sample_weights(student, teacher, labels), self.normalize) * values

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        return self.per_sample(student, teacher, labels).mean()

    def extra_repr(self) -> str:
        source = f"weight_fn={getattr(self.weight_fn, '__name__', self.weight_fn)!r}" if self.weight_fn else \
            f"scheme={self.scheme!r}"
        return f"{source}, wrong_weight={self.wrong_weight}, entropy_T={self.entropy_T}, normalize={self.normalize}"


# ---------------------------------------------------------------- dual head (Yang et al. 2024)

Head = Literal["linear", "nonlinear"]
HEADS: tuple[str, ...] = typing.get_args(Head)


class AuxHead(nn.Module):
    """Yang et al. 2024, "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary Head": the auxiliary classifier.

    ``linear``: one ``Linear(dim, classes)`` (the official default, ``--linear``); ``nonlinear``: the official
    ``NonLinearClassifier``, Linear(dim, 200) - Dropout(0.1) - BatchNorm1d - ReLU - Linear(200, classes).
    """

    def __init__(self, dim: int, num_classes: int, kind: str = "linear"):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(dim, num_classes)
        else:
            self.net = nn.Sequential(nn.Linear(dim, 200), nn.Dropout(p=0.1), nn.BatchNorm1d(200), nn.ReLU(),
                                     nn.Linear(200, num_classes))
        self.dim, self.num_classes, self.kind = dim, num_classes, kind

    def forward(self, x: Tensor) -> Tensor:
        w = next(self.parameters())
        return self.net(x.to(w.dtype))


def _pooled(f: Tensor, where: str) -> Tensor:
    """``[B, D]`` as is; ``[B, C, H, W]`` global-average-pooled to ``[B, C]``."""
    if f.dim() == 2:
        return f
    if f.dim() == 4:
        return f.mean(dim=(2, 3))
    raise ShapeMismatchError(f"{where} must be a [B, D] embedding or a [B, C, H, W] map, got {tuple(f.shape)}")


class DualHeadLoss(DistillLoss):
    """Yang et al. 2024, "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary Head" (DHKD): the KD loss on an auxiliary head.

    An auxiliary classifier (``head``: ``linear`` or ``nonlinear``, built in `setup`) reads the student's penultimate
    features (``feature_layer``, default ``in:fc``); the inner loss (default ``binary_kl_norm``, the paper's
    logit-level loss at T = 2; any logit loss works, e.g. ``inner: kd``) compares the *auxiliary* logits with the
    teacher's, while the student's own head is trained by the trainer's cross-entropy only (recipe ``ce_weight: 1``
    and no other logit loss), because the two objectives conflict on one linear classifier but not in the
    backbone. The auxiliary head's gradient flows into the backbone (the point of the method); ``detach: true``
    stops it (an ablation). The head is dropped at test time. The official code's optional gradient alignment
    (``--ga``, a PCGrad-style projection of the KD gradient against the CE gradient) acts in the optimizer and is
    not part of this loss. Official settings: CIFAR-100 weight 1 with CE 1; ImageNet weight 0.1.
    """

    def __init__(self, *, inner: str = "binary_kl_norm", feature_layer: str = "in:fc", head: Head = "linear",
                 detach: bool = False, **inner_options):
        super().__init__()
        self._configure(_build_inner("dual_head", inner, inner_options), inner, feature_layer, head, detach)

    @classmethod
    def wrap(cls, loss: DistillLoss, *, feature_layer: str = "in:fc", head: Head = "linear",
             detach: bool = False) -> "DualHeadLoss":
        """Put an already built logit loss on an auxiliary head (from Python)."""
        obj = cls.__new__(cls)
        DistillLoss.__init__(obj)
        obj._configure(loss, type(loss).__name__, feature_layer, head, detach)
        return obj

    @classmethod
    def options_for(cls, inner: str) -> dict[str, typing.Any]:
        """This wrapper's options plus those of the loss registered as `inner` (name -> type)."""
        return _options_for(cls, inner)

    def _configure(self, loss, inner_name, feature_layer, head, detach) -> None:
        if not isinstance(loss, DistillLoss):
            raise ConfigError(f"dual_head wraps a DistillLoss, got {type(loss).__name__}")
        check_options(self, dict(feature_layer=feature_layer, head=head, detach=detach))
        if not str(feature_layer).strip():
            raise ConfigError("dual_head: feature_layer must name the student's penultimate features, e.g. 'in:fc'")
        if loss.needs_index:
            raise ConfigError(f"dual_head: loss {inner_name!r} needs dataset indices (needs_index); "
                              "it cannot be wrapped")
        self.inner = loss
        self.feature_layer = feature_layer
        self.head_kind = head
        self.detach = bool(detach)
        self.head: AuxHead | None = None
        self.student_taps = (feature_layer, *[t for t in loss.student_taps if t != feature_layer])
        self.teacher_taps = loss.teacher_taps
        self.needs_labels, self.needs_teacher = loss.needs_labels, loss.needs_teacher

    def set_epoch(self, epoch: float) -> None:
        super().set_epoch(epoch)
        self.inner.set_epoch(epoch)

    def setup(self, student: Outputs, teacher: Outputs | None) -> None:
        f = _pooled(student.feature(self.feature_layer, "student"), f"dual_head: feature_layer '{self.feature_layer}'")
        s = _logits(student, "student", "dual_head")
        dim, classes = f.shape[-1], s.shape[-1]
        if self.head is None or (self.head.dim, self.head.num_classes) != (dim, classes):
            self.head = AuxHead(dim, classes, self.head_kind).to(f.device)
        # (else: set up again on resume -- keep the trained head)
        self.inner.setup(student, teacher)  # the auxiliary logits have the student logits' shape

    def aux_logits(self, student: Outputs) -> Tensor:
        """The auxiliary head's logits for this batch."""
        if self.head is None:
            raise RuntimeError("DualHeadLoss.setup(student_outputs, teacher_outputs) must be called before the loss "
                               "is used: it builds the auxiliary head from the feature size")
        f = _pooled(student.feature(self.feature_layer, "student"), f"dual_head: feature_layer '{self.feature_layer}'")
        if f.shape[-1] != self.head.dim:
            raise ShapeMismatchError(f"dual_head: feature_layer '{self.feature_layer}' gives {tuple(f.shape)}, but the "
                                     f"auxiliary head was built for {self.head.dim} features")
        return self.head(f.detach() if self.detach else f)

    def _aux_outputs(self, student: Outputs) -> Outputs:
        return Outputs(self.aux_logits(student), student.features)

    def per_sample(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        """The inner loss's per-sample values on the auxiliary head (when the inner loss has them)."""
        if not callable(getattr(self.inner, "per_sample", None)):
            raise ConfigError(f"dual_head: its inner loss {type(self.inner).__name__} has no per_sample")
        return self.inner.per_sample(self._aux_outputs(student), teacher, labels)

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        return self.inner(self._aux_outputs(student), teacher, labels)

    def extra_repr(self) -> str:
        return f"feature_layer={self.feature_layer!r}, head={self.head_kind!r}, detach={self.detach}"


_advertise_default_inner(WeightedLoss, KDLoss)
_advertise_default_inner(DualHeadLoss, BinaryKLNormLoss)

for _name, _cls in (("weighted", WeightedLoss), ("dual_head", DualHeadLoss)):
    if _name not in LOSSES:  # tolerate a re-import (importlib.reload)
        LOSSES.register(_name, _cls)
