"""BD-KD: online distillation (a jointly trained teacher) with forward and reverse KL balanced per sample.

Trainer interface: as ``dml`` (`kdkit.losses.ensemble.DMLLoss`): ``teacher`` is the jointly trained peer's
`Outputs` *with gradients* (a trainable model in train mode, its own optimizer, stepped after the one
``loss.backward()``). The returned value holds both networks' terms, each against the other's detached prediction,
so one backward gives each network exactly its own gradient, plus the peer's cross-entropy.

Provenance of the rule. The BD-KD paper's method section (its equations) could not be consulted when this was
written: only its abstracts (arXiv 2212.12965 v1 and v2) and a citing paper's summary were at hand. They say:
the student's online-distillation loss combines forward and reverse KL, weighted per sample, adaptively, from the
two networks' entropies; the student's confidence is balanced; v2 adjusts the teacher's loss as well. The exact
weights below are kdkit's reading of that, stated here so they can be checked against the paper.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import PositiveFloat
from ..errors import ShapeMismatchError
from ..models.outputs import Outputs
from ..registry import LOSSES
from .base import DistillLoss, check_options
from .logits import _check_T, _kl_rows, _logits

__all__ = ["entropy_balance", "bdkd_loss", "BDKDLoss"]


def _float_pair(a: Tensor, b: Tensor, what: str) -> tuple[Tensor, Tensor]:
    if a.shape != b.shape:
        raise ShapeMismatchError(f"{what}: student logits {tuple(a.shape)} and peer logits {tuple(b.shape)} differ; "
                                 "both must be [..., num_classes]")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    c = a.shape[-1]
    return a.to(dtype).reshape(-1, c), b.to(dtype).reshape(-1, c)


def _entropy(log_p: Tensor) -> Tensor:
    p = log_p.exp()
    return -(torch.where(p > 0, p * log_p, 0.0)).sum(dim=-1)


def entropy_balance(log_p_a: Tensor, log_p_b: Tensor) -> Tensor:
    """``H(p_a) / (H(p_a) + H(p_b))`` per row, detached (1/2 where both are one-hot): a's share of the uncertainty."""
    h_a, h_b = _entropy(log_p_a.detach()), _entropy(log_p_b.detach())
    total = h_a + h_b
    return torch.where(total > 0, h_a / torch.where(total > 0, total, 1.0), 0.5)


def bdkd_loss(student_logits: Tensor, peer_logits: Tensor, T: float = 1.0,
              peer_balance: bool = True) -> tuple[Tensor, Tensor]:
    """Amara et al. 2022, "BD-KD: Balancing the Divergences for Online Knowledge Distillation": ``(student term, peer term)``.

    With ``p = softmax(logits / T)`` and ``w_s = H(p_s) / (H(p_s) + H(p_t))`` per sample (detached), the student
    term is ``T^2 * mean[(1 - w_s) KL(p_t || p_s) + w_s KL(p_s || p_t)]``: a student less certain than its teacher
    leans on the mode-seeking reverse KL (sharpening it), an over-confident one on the mass-covering forward KL
    (softening it). With ``peer_balance`` the teacher's term mirrors it (``w_t = 1 - w_s``:
    ``(1 - w_t) KL(p_s || p_t) + w_t KL(p_t || p_s)``), else it is DML's ``KL(p_s || p_t)``. Each term's target is
    the other network's detached prediction. See the module docstring on where this rule comes from.
    """
    _check_T(T)
    s, t = _float_pair(student_logits, peer_logits, "bdkd_loss")
    log_s, log_t = F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)
    w_s = entropy_balance(log_s, log_t)
    ls, lt = log_s.detach(), log_t.detach()
    to_student = ((1 - w_s) * _kl_rows(lt, log_s) + w_s * _kl_rows(log_s, lt)).mean() * T**2
    if peer_balance:
        w_t = 1 - w_s
        to_peer = ((1 - w_t) * _kl_rows(ls, log_t) + w_t * _kl_rows(log_t, ls)).mean() * T**2
    else:
        to_peer = _kl_rows(ls, log_t).mean() * T**2
    return to_student, to_peer


class BDKDLoss(DistillLoss):
    """Amara et al. 2022, "BD-KD: Balancing the Divergences for Online Knowledge Distillation": both networks' balanced-divergence terms plus the teacher's CE.

    ``teacher`` is the jointly trained teacher's `Outputs` with gradients, as for ``dml`` (see the module
    docstring). Returns ``student term + teacher term + peer_ce * CE(teacher, labels)`` (`bdkd_loss`); the student's
    own CE is the trainer's ``ce_weight`` term. T = 1 as DML, the online-KD baseline; ``peer_balance: false`` gives
    the teacher plain DML mimicry. Recipe: ``ce_weight: 1``, bdkd weight 1.
    """

    needs_labels = True

    def __init__(self, *, T: PositiveFloat = 1.0, peer_ce: bool = True, peer_balance: bool = True):
        super().__init__()
        check_options(self, locals())
        self.T = float(T)
        self.peer_ce = bool(peer_ce)
        self.peer_balance = bool(peer_balance)

    def forward(self, student: Outputs, teacher: Outputs | None, labels: Tensor | None = None) -> Tensor:
        s = _logits(student, "student", "bdkd")
        p = _logits(teacher, "jointly trained teacher (peer)", "bdkd")
        to_student, to_peer = bdkd_loss(s, p, self.T, self.peer_balance)
        loss = to_student + to_peer
        if self.peer_ce:
            if labels is None:
                raise ValueError("bdkd with peer_ce=True needs the labels to train the teacher, but none were passed")
            if not p.requires_grad:
                raise ValueError("bdkd: the teacher's logits carry no gradient -- BD-KD trains the teacher jointly, "
                                 "so it must be a trainable model run outside inference_mode/no_grad (not a frozen "
                                 "Teacher)")
            loss = loss + F.cross_entropy(p.float().reshape(-1, p.shape[-1]), labels.reshape(-1).long().to(p.device))
        return loss

    def extra_repr(self) -> str:
        return f"T={self.T}, peer_ce={self.peer_ce}, peer_balance={self.peer_balance}"


if "bdkd" not in LOSSES:  # tolerate a re-import (importlib.reload)
    LOSSES.register("bdkd", BDKDLoss)
