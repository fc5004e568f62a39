"""Feature and relation losses (AT, SP, RKD, CRD): hand-computed values, gradchecks, agreement with RepDistiller,
real zoo models through `Outputs`, and clear errors."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from kdkit.errors import ConfigError, ShapeMismatchError
from kdkit.losses.base import DistillLoss
from kdkit.losses.crd import CRDEmbed, CRDLoss, crd_loss, crd_scores, nce_loss, sample_negatives
from kdkit.losses.features import ATLoss, RKDLoss, SPLoss, at_loss, attention_map, rkd_loss, sp_loss
from kdkit.models import Student, Teacher, build_model
from kdkit.models.outputs import Outputs
from kdkit.registry import LOSSES

from mathref import close

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _close(a, b, rel=1e-5, abs_=1e-7):
    close(a, b, rel, abs_)


# Reference numbers below come from RepDistiller (github.com/HobbitLong/RepDistiller, commit
# b84f547c5db6a35318d4671d7d5c4de74c822403): distiller_zoo/AT.py `Attention`, distiller_zoo/SP.py `Similarity`,
# distiller_zoo/RKD.py `RKDLoss`, crd/criterion.py `CRDLoss` + crd/memory.py `ContrastMemory` (AliasMethod.cuda
# stubbed out to run on CPU), run in float32 on the seeded inputs rebuilt by the tests below.


def _all_close(got, want, rel=1e-5, abs_=1e-7):
    got = got.detach().flatten().tolist() if isinstance(got, torch.Tensor) else list(got)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        _close(g, w, rel, abs_)


# ---------------------------------------------------------------- AT


def test_at_by_hand():
    # Student B=1, C=2, H=1, W=2: channel 0 = [1, 2], channel 1 = [3, 0] -> mean_c f^2 = [(1+9)/2, (4+0)/2] = [5, 2].
    s = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    # Teacher C=1: [1, -1] -> |f|^2 = [1, 1].
    t = torch.tensor([[[[1.0, -1.0]]]])
    a_s = [5 / math.sqrt(29), 2 / math.sqrt(29)]
    a_t = [1 / math.sqrt(2), 1 / math.sqrt(2)]
    expected = ((a_s[0] - a_t[0]) ** 2 + (a_s[1] - a_t[1]) ** 2) / 2
    _close(at_loss(s, t), expected, rel=1e-6)
    _all_close(attention_map(s), a_s, rel=1e-6)
    # p = 1: mean_c |f| = [2, 1] and [1, 1].
    b_s = [2 / math.sqrt(5), 1 / math.sqrt(5)]
    _close(at_loss(s, t, p=1.0), ((b_s[0] - a_t[0]) ** 2 + (b_s[1] - a_t[1]) ** 2) / 2, rel=1e-6)


def _at_inputs():
    g = torch.Generator().manual_seed(1)
    fs = [torch.randn(3, 4, 5, 5, generator=g, requires_grad=True),
          torch.randn(3, 6, 2, 3, generator=g, requires_grad=True)]
    ft = [torch.randn(3, 7, 5, 5, generator=g), torch.randn(3, 2, 2, 3, generator=g)]
    return fs, ft


def test_at_matches_repdistiller():
    fs, ft = _at_inputs()
    values = [at_loss(a, b) for a, b in zip(fs, ft)]
    _close(values[0], 0.01769401878118515)
    _close(values[1], 0.11567023396492004)
    # The module sums the pairs (RepDistiller: sum(loss_group)).
    loss = ATLoss(student_layers="a,b", teacher_layers="c,d")
    total = loss(Outputs(None, {"a": fs[0], "b": fs[1]}), Outputs(None, {"c": ft[0], "d": ft[1]}))
    _close(total, 0.1333642601966858)
    total.backward()
    _all_close(fs[0].grad[0, 0, 0, :3], [-0.00019713398069143295, 0.0002769186394289136, 4.6131954150041565e-05])
    _close(fs[0].grad[2, 3, 4, 4], -3.205403845640831e-05)
    _all_close(fs[1].grad[1, 2, 1, :], [0.00485439645126462, -0.0016360065201297402, 0.0018964710179716349])


def test_at_gradcheck():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 3, 2, generator=g, dtype=torch.float64)
    assert gradcheck(lambda x: at_loss(x, t), (s,))
    assert gradcheck(lambda x: at_loss(x, t, p=3.0), (s,))


def test_at_errors():
    with pytest.raises(ShapeMismatchError, match=r"\(2, 3, 4, 4\).*\(2, 3, 8, 8\)"):
        at_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8))
    with pytest.raises(ShapeMismatchError, match=r"\[B, C, H, W\]"):
        at_loss(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ConfigError, match="pair up"):
        ATLoss(student_layers="layer1,layer2", teacher_layers="layer3")
    with pytest.raises(ConfigError, match="p=0.0 is not allowed: expected a number > 0"):
        ATLoss(p=0.0)
    loss = ATLoss(student_layers="layer1", teacher_layers="layer1")
    so, to = Outputs(None, {"layer1": torch.randn(2, 4, 8, 8)}), Outputs(None, {"layer1": torch.randn(2, 4, 4, 4)})
    with pytest.raises(ShapeMismatchError, match=r"student layer 'layer1'.*\(2, 4, 8, 8\).*\(2, 4, 4, 4\)"):
        loss.setup(so, to)
    with pytest.raises(ShapeMismatchError, match="layer1"):
        loss(so, to)


# ---------------------------------------------------------------- SP


def test_sp_by_hand():
    # Student rows [1, 0], [1, 1]: G_s = [[1, 1], [1, 2]]; row-normalised [1, 1]/sqrt2, [1, 2]/sqrt5.
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # Teacher rows [2], [1]: G_t = [[4, 2], [2, 1]]; both rows normalise to [2, 1]/sqrt5.
    t = torch.tensor([[2.0], [1.0]])
    gs = [[1 / math.sqrt(2), 1 / math.sqrt(2)], [1 / math.sqrt(5), 2 / math.sqrt(5)]]
    gt = [[2 / math.sqrt(5), 1 / math.sqrt(5)], [2 / math.sqrt(5), 1 / math.sqrt(5)]]
    expected = sum((gt[i][j] - gs[i][j]) ** 2 for i in range(2) for j in range(2)) / (2 * 2)
    _close(sp_loss(s, t), expected, rel=1e-6)


def test_sp_matches_repdistiller_and_gradcheck():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 3, 2, 2, generator=g, requires_grad=True)
    t = torch.randn(4, 5, 2, 2, generator=g)
    loss = SPLoss(student_layer="x", teacher_layer="y")(Outputs(None, {"x": s}), Outputs(None, {"y": t}))
    _close(loss, 0.06549303233623505)
    loss.backward()
    _all_close(s.grad[0, 0, 0, :], [-0.006429280154407024, -0.005492276977747679])
    _close(s.grad[3, 2, 1, 1], -0.009131484664976597)
    s64 = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    t64 = torch.randn(3, 5, dtype=torch.float64)
    assert gradcheck(lambda x: sp_loss(x, t64), (s64,))


def test_sp_errors():
    with pytest.raises(ShapeMismatchError, match=r"\(3, 4\).*\(2, 4\)"):
        sp_loss(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(KeyError, match="student has no tapped feature 'layer3'"):
        SPLoss()(Outputs(None, {}), Outputs(None, {"layer3": torch.randn(2, 3)}))
    with pytest.raises(ValueError, match="teacher"):
        SPLoss()(Outputs(None, {"layer3": torch.randn(2, 3)}), None)


# ---------------------------------------------------------------- RKD


def _smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def _rkd_by_hand(s, t, w_d=25.0, w_a=50.0):
    """The RKD definitions in plain Python on lists of points."""
    n = len(s)

    def dist(p, q):
        return math.sqrt(sum((a - b) ** 2 for a, b in zip(p, q)))

    def dmat(e):
        d = [[dist(e[i], e[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mean for v in row] for row in d]

    def unit(p, q):  # unit vector from p to q, 0 if equal
        v = [b - a for a, b in zip(p, q)]
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v] if norm > 0 else [0.0] * len(v)

    def angles(e):
        return [sum(a * b for a, b in zip(unit(e[i], e[j]), unit(e[i], e[k])))
                for i in range(n) for j in range(n) for k in range(n)]

    ds, dt = dmat(s), dmat(t)
    loss_d = sum(_smooth_l1(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / (n * n)
    a_s, a_t = angles(s), angles(t)
    loss_a = sum(_smooth_l1(x, y) for x, y in zip(a_s, a_t)) / len(a_s)
    return w_d * loss_d + w_a * loss_a, loss_d, loss_a


def test_rkd_by_hand():
    # Student: right isosceles triangle; teacher: three collinear points.
    s = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    t = [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]
    # Spelled out: student distances 1, 1, sqrt2 (mean (2 + sqrt2)/3); teacher 1, 2, 1 (mean 4/3).
    ms, mt = (2 + math.sqrt(2)) / 3, 4 / 3
    pairs = [(1 / ms, 1 / mt), (1 / ms, 2 / mt), (math.sqrt(2) / ms, 1 / mt)]  # (0,1), (0,2), (1,2)
    loss_d = 2 * sum(_smooth_l1(a, b) for a, b in pairs) / 9
    expected, d_generic, a_generic = _rkd_by_hand(s, t)
    assert d_generic == pytest.approx(loss_d, rel=1e-12)
    # Angle at vertex 0 between (1, 0) and (0, 1): cos 90 = 0 for the student, cos 0 = 1 for the teacher.
    assert a_generic > 0
    _close(rkd_loss(torch.tensor(s), torch.tensor(t)), expected, rel=1e-6)
    _close(rkd_loss(torch.tensor(s), torch.tensor(t), w_d=1.0, w_a=0.0), loss_d, rel=1e-6)
    # Two samples carry no relation: normalised distance 1 and angles 0/1 whatever the features.
    _close(rkd_loss(torch.randn(2, 5), torch.randn(2, 3)), 0.0, abs_=1e-7)
    # A scaled, shifted copy of the teacher has identical normalised distances and angles: loss 0.
    _close(rkd_loss(torch.tensor(t) * 3 + 1, torch.tensor(t)), 0.0, abs_=1e-6)


def test_rkd_matches_repdistiller():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 6, generator=g, requires_grad=True)
    t = torch.randn(5, 8, generator=g)
    loss = RKDLoss()(Outputs(None, {"in:fc": s}), Outputs(None, {"in:fc": t}))
    _close(loss, 2.5020198822021484)
    loss.backward()
    _all_close(s.grad[0, :3], [1.3221946954727173, -1.2665553092956543, 1.7464969158172607])
    _close(s.grad[4, 5], -0.08475695550441742)
    _close(rkd_loss(s.detach(), t), _rkd_by_hand(s.tolist(), t.tolist())[0], rel=1e-5)


def test_rkd_gradcheck_and_teacher_constant():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x: rkd_loss(x, t.detach()), (s,))
    rkd_loss(s, t).backward()
    assert t.grad is None  # the teacher relations are targets (no_grad in RepDistiller)


def test_rkd_errors():
    with pytest.raises(ShapeMismatchError, match="B >= 2"):
        rkd_loss(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ShapeMismatchError, match=r"\(3, 4\).*\(2, 4\)"):
        rkd_loss(torch.randn(3, 4), torch.randn(2, 4))


# ---------------------------------------------------------------- CRD


def test_nce_and_scores_by_hand():
    # One row, K = 1, N = 4: Pn = 1/4, m*Pn = 0.25; eps 1e-7 in the denominators (RepDistiller).
    x = torch.tensor([[0.5, 0.1]])
    expected = -(math.log(0.5 / (0.5 + 0.25 + 1e-7)) + math.log(0.25 / (0.1 + 0.25 + 1e-7)))
    _close(nce_loss(x, 4), expected, rel=1e-6)
    # Scores: anchor [1, 0] against memory rows [0.6, 0.8] and [0, 1] at T = 0.5 -> exp(1.2), exp(0).
    mem = torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
    got = crd_scores(torch.tensor([[1.0, 0.0]]), mem, torch.tensor([[0, 1]]), T=0.5)
    _all_close(got, [math.exp(1.2), 1.0], rel=1e-6)
    # Full two-sided loss on that memory (student memory = teacher memory = mem), Z = 2 both sides, N = 3:
    # student anchor [1, 0] -> [e^1.2, 1] / 2; teacher anchor [0, 1] -> [e^1.6, e^2] / 2.
    mpn = 1 / 3

    def nce(p_pos, p_neg):
        return -(math.log(p_pos / (p_pos + mpn + 1e-7)) + math.log(mpn / (p_neg + mpn + 1e-7)))

    expected = nce(math.exp(1.2) / 2, 0.5) + nce(math.exp(1.6) / 2, math.exp(2.0) / 2)
    got = crd_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), mem, mem, torch.tensor([[0, 1]]),
                   2.0, 2.0, 3, T=0.5)
    _close(got, expected, rel=1e-6)


def _crd_reference_setup():
    """Rebuild the seeded inputs the RepDistiller reference was run on (n_data 20, feat_dim 4, K 5, B 3)."""
    g = torch.Generator().manual_seed(4)
    loss = CRDLoss(num_samples=20, feat_dim=4, nce_k=5)
    loss.setup(Outputs(None, {"in:fc": torch.zeros(2, 6)}), Outputs(None, {"in:fc": torch.zeros(2, 7)}))
    with torch.no_grad():
        loss.embed_student.linear.weight.copy_(torch.randn(4, 6, generator=g) * 0.5)
        loss.embed_student.linear.bias.copy_(torch.randn(4, generator=g) * 0.1)
        loss.embed_teacher.linear.weight.copy_(torch.randn(4, 7, generator=g) * 0.5)
        loss.embed_teacher.linear.bias.copy_(torch.randn(4, generator=g) * 0.1)
        loss.memory_student.copy_(F.normalize(torch.randn(20, 4, generator=g), dim=1))  # memory_v1
        loss.memory_teacher.copy_(F.normalize(torch.randn(20, 4, generator=g), dim=1))  # memory_v2
    f_s = torch.randn(3, 6, generator=g, requires_grad=True)
    f_t = torch.randn(3, 7, generator=g, requires_grad=True)
    # Fixed positive + negatives (RepDistiller's contrast_idx, column 0 = idx = [3, 11, 17]).
    sample_index = torch.tensor([[3, 0, 5, 9, 12, 19], [11, 1, 2, 4, 6, 8], [17, 0, 7, 10, 13, 15]])
    return loss, f_s, f_t, sample_index


def test_crd_matches_repdistiller_two_steps():
    loss, f_s, f_t, idx = _crd_reference_setup()
    value = loss.loss_on(f_s, f_t, idx)
    _close(value, 15.725504875183105)
    # Z estimated on the first batch: mean(exp(scores / T)) * N (printed by RepDistiller as 61610.7 / 814529.2).
    _all_close(loss.z, [61610.72265625, 814529.25])
    value.backward()
    _all_close(f_s.grad[0], [-1.1466772556304932, 0.8559799194335938, 1.0177741050720215, -0.41121935844421387,
                             0.49046847224235535, -0.7134254574775696])
    _all_close(f_t.grad[2], [0.1800348162651062, -0.10365481674671173, -0.14325088262557983, -0.10172975063323975,
                             -0.4203953742980957, -0.21563924849033356, -0.2680443227291107])
    _all_close(loss.embed_student.linear.weight.grad[1, :3], [1.7686214447021484, -3.3412489891052246,
                                                               1.9944119453430176])
    # Momentum-0.5 memory update of the positives' rows, renormalised.
    _all_close(loss.memory_student[3], [0.4591500759124756, -0.7232787013053894, 0.23872245848178864,
                                        -0.45723164081573486])
    _all_close(loss.memory_teacher[17], [-0.5934579372406006, -0.5282747745513916, -0.03750055655837059,
                                         0.6060752868652344])
    assert int(loss.step) == 1
    # Second step: Z kept, scores against the updated memory.
    f_s.grad = None
    value2 = loss.loss_on(f_s, f_t, idx)
    _close(value2, 16.318832397460938)
    value2.backward()
    _all_close(f_s.grad[1], [-0.4442625939846039, 1.15354585647583, 0.23652063310146332, -0.1220955029129982,
                             -0.0081992968916893, -0.49648743867874146], rel=1e-5, abs_=1e-6)
    _all_close(loss.z, [61610.72265625, 814529.25])


def test_crd_gradcheck_through_embeddings():
    g = torch.Generator().manual_seed(6)
    mem_s = F.normalize(torch.randn(10, 3, generator=g, dtype=torch.float64), dim=1)
    mem_t = F.normalize(torch.randn(10, 3, generator=g, dtype=torch.float64), dim=1)
    idx = torch.tensor([[0, 4, 5, 9], [7, 1, 2, 3]])
    emb_s, emb_t = CRDEmbed(5, 3).double(), CRDEmbed(6, 3).double()
    f_s = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(a, b):
        return crd_loss(emb_s(a), emb_t(b), mem_s, mem_t, idx, 3.0, 5.0, 10, T=0.5)

    assert gradcheck(fn, (f_s, f_t))
    x = torch.rand(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda v: nce_loss(v + 0.1, 50), (x,))


def test_sample_negatives():
    index = torch.tensor([0, 5, 9, 5])
    a = sample_negatives(index, 10, 9, torch.Generator().manual_seed(7))
    assert a.shape == (4, 10) and a.dtype == torch.long
    assert a[:, 0].tolist() == [0, 5, 9, 5]
    for row in a.tolist():
        # K = N - 1: the negatives are exactly every other index, once each.
        assert sorted(row[1:]) == [i for i in range(10) if i != row[0]]
    b = sample_negatives(index, 1000, 50, torch.Generator().manual_seed(7))
    c = sample_negatives(index, 1000, 50, torch.Generator().manual_seed(7))
    d = sample_negatives(index, 1000, 50, torch.Generator().manual_seed(8))
    assert torch.equal(b, c) and not torch.equal(b, d)
    for row in b.tolist():
        assert row[0] not in row[1:] and len(set(row[1:])) == 50 and all(0 <= i < 1000 for i in row)
    with pytest.raises(ConfigError, match="num_samples > nce_k"):
        sample_negatives(index, 10, 10)


def test_crd_forward_state_and_checkpoint():
    torch.manual_seed(0)
    so, to = Outputs(None, {"in:fc": torch.randn(4, 6)}), Outputs(None, {"in:fc": torch.randn(4, 7)})
    loss = CRDLoss(num_samples=30, feat_dim=4, nce_k=8)
    assert loss.needs_index and loss.student_taps == ("in:fc",) and CRDLoss.student_taps == ()
    loss.setup(so, to)
    loss.set_dataset_labels(torch.arange(30) % 3)
    before = loss.memory_student.clone()
    index = torch.tensor([1, 2, 3, 29])
    value = loss(so, to, index=index)
    assert value.dim() == 0 and torch.isfinite(value) and value.dtype == torch.float32
    value.backward()
    assert all(p.grad is not None for p in loss.parameters())
    changed = (loss.memory_student != before).any(1).nonzero().flatten().tolist()
    assert changed == [1, 2, 3, 29]
    assert int(loss.step) == 1 and (loss.z > 0).all()
    # Buffers go into checkpoints and come back.
    state = loss.state_dict()
    assert {"memory_student", "memory_teacher", "z", "step", "dataset_labels"} <= set(state)
    assert state["dataset_labels"].tolist() == [i % 3 for i in range(30)]
    other = CRDLoss(num_samples=30, feat_dim=4, nce_k=8)  # no labels set: they come from the checkpoint
    other.setup(so, to)
    other.load_state_dict(state)
    # Same state, same step-seeded negatives: the same next value.
    _close(other(so, to, index=index), float(loss(so, to, index=index).detach()), rel=1e-6)
    heads = loss.embed_student
    loss.setup(so, to)
    assert loss.embed_student is heads  # setup again keeps trained heads


def test_crd_errors():
    so, to = Outputs(None, {"in:fc": torch.randn(2, 6)}), Outputs(None, {"in:fc": torch.randn(2, 7)})
    loss = CRDLoss(num_samples=30, feat_dim=4, nce_k=8)
    with pytest.raises(RuntimeError, match="setup"):
        loss(so, to, index=torch.tensor([0, 1]))
    loss.setup(so, to)
    with pytest.raises(ValueError, match="index="):
        loss(so, to)
    with pytest.raises(ConfigError, match="sample index 30 .*num_samples=30"):
        loss(so, to, index=torch.tensor([0, 30]))
    with pytest.raises(ShapeMismatchError, match="3 entries for a batch of 2"):
        loss(so, to, index=torch.tensor([0, 1, 2]))
    with pytest.raises(ConfigError, match="nce_k=16384 must be < num_samples=100"):
        CRDLoss(num_samples=100)
    with pytest.raises(ConfigError, match="nce_m"):
        CRDLoss(nce_m=1.0)
    with pytest.raises(ShapeMismatchError, match=r"sample_index must be \[B, 1 \+ K\]"):
        crd_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(5, 4), torch.randn(5, 4), torch.tensor([[0], [1]]),
                 1.0, 1.0, 5)


# ---------------------------------------------------------------- CRD negatives: mode="exact" (other classes)


def _cls_negative(labels):
    """RepDistiller dataset/cifar100.py CIFAR100InstanceSample: cls_positive / cls_negative, rebuilt on `labels`."""
    n_cls = max(labels) + 1
    cls_positive = [[i for i, y in enumerate(labels) if y == c] for c in range(n_cls)]
    return [[i for j in range(n_cls) if j != c for i in cls_positive[j]] for c in range(n_cls)]


def test_sample_negatives_exact_are_repdistillers_cls_negative():
    labels = [2, 0, 1, 0, 2, 2, 1, 0, 0, 1, 2, 0]  # class sizes 5, 3, 4
    neg_sets = _cls_negative(labels)
    index = torch.tensor([0, 1, 2, 3, 6, 11])
    lab = torch.tensor(labels)
    for k in (3, 7):  # k <= every class's number of negatives (7, 9, 8): distinct, all from other classes
        got = sample_negatives(index, 12, k, torch.Generator().manual_seed(k), labels=lab)
        assert got.shape == (6, 1 + k) and got[:, 0].tolist() == index.tolist()
        for row in got.tolist():
            assert len(set(row[1:])) == k and set(row[1:]) <= set(neg_sets[labels[row[0]]])
    # k = the class-0 anchors' number of negatives (7): every one of them, once.
    got = sample_negatives(torch.tensor([1, 3, 7]), 12, 7, torch.Generator().manual_seed(0), labels=lab)
    for row in got.tolist():
        assert sorted(row[1:]) == sorted(neg_sets[0]) == [0, 2, 4, 5, 6, 9, 10]
    # k above a class's negatives (class 0 has 7, k = 8): drawn with replacement, as np.random.choice(
    # cls_negative[target], k, replace=True) does (8 draws of 7: a repeat); the class-1 row (9 others) stays distinct.
    got = sample_negatives(torch.tensor([1, 2]), 12, 8, torch.Generator().manual_seed(1), labels=lab)
    assert set(got[0, 1:].tolist()) <= set(neg_sets[0]) and len(set(got[0, 1:].tolist())) < 8
    assert set(got[1, 1:].tolist()) <= set(neg_sets[1]) and len(set(got[1, 1:].tolist())) == 8
    # Same generator seed, same draw; another seed, another draw.
    a = sample_negatives(index, 12, 5, torch.Generator().manual_seed(3), labels=lab)
    assert torch.equal(a, sample_negatives(index, 12, 5, torch.Generator().manual_seed(3), labels=lab))
    assert not torch.equal(a, sample_negatives(index, 12, 5, torch.Generator().manual_seed(4), labels=lab))
    with pytest.raises(ConfigError, match="only class"):
        sample_negatives(index, 12, 3, labels=torch.zeros(12, dtype=torch.long))


def test_sample_negatives_exact_is_uniform_over_other_classes():
    # 4000 draws of k = 2 among the 6 other-class samples of anchor 0: each is picked with probability 2/6.
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    got = sample_negatives(torch.zeros(4000, dtype=torch.long), 10, 2, torch.Generator().manual_seed(0), labels=labels)
    counts = torch.bincount(got[:, 1:].flatten(), minlength=10).tolist()
    assert counts[:4] == [0, 0, 0, 0]
    # Binomial(4000, 1/3): mean 1333, sd ~30; 5 sd bounds.
    assert all(abs(c - 4000 / 3) < 150 for c in counts[4:]), counts


def _crd_exact_setup(n=40, classes=4, k=20, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    so = Outputs(None, {"in:fc": torch.randn(batch, 6, generator=g)})
    to = Outputs(None, {"in:fc": torch.randn(batch, 5, generator=g)})
    labels = torch.randperm(n, generator=g) % classes
    torch.manual_seed(seed)
    loss = CRDLoss(num_samples=n, feat_dim=4, nce_k=k)
    loss.setup(so, to)
    loss.set_dataset_labels(labels)
    index = torch.randperm(n, generator=g)[:batch]
    return loss, so, to, labels, index


def _record_sample_index(loss, monkeypatch):
    seen = []
    inner = loss.loss_on

    def spy(s, t, sample_index):
        seen.append(sample_index.clone())
        return inner(s, t, sample_index)

    monkeypatch.setattr(loss, "loss_on", spy)
    return seen


def test_crd_exact_negatives_never_share_the_anchor_class(monkeypatch):
    loss, so, to, labels, index = _crd_exact_setup()
    assert loss.mode == "exact"
    seen = _record_sample_index(loss, monkeypatch)
    for _ in range(3):
        value = loss(so, to, labels[index], index=index)
        value.backward()
        assert torch.isfinite(value)
    assert int(loss.step) == 3 and len(seen) == 3
    for idx in seen:
        assert idx.shape == (8, 21) and torch.equal(idx[:, 0], index)
        neg_cls = labels[idx[:, 1:]]
        assert (neg_cls != labels[index][:, None]).all()  # never the anchor's class
        assert all(len(set(row)) == 20 for row in idx[:, 1:].tolist())  # distinct (30 other-class samples >= 20)
    assert not torch.equal(seen[0], seen[1])  # a fresh draw each step (seeded by the step counter)
    # The same draw as sample_negatives with the step-seeded generator and the dataset labels.
    assert torch.equal(seen[1], sample_negatives(index, 40, 20, torch.Generator().manual_seed(1), labels=labels))
    # Uniform mode over the same state draws from every class.
    uni, so, to, labels, index = _crd_exact_setup()
    uni.mode = "uniform"
    seen = _record_sample_index(uni, monkeypatch)
    uni(so, to, index=index)
    assert (labels[seen[0][:, 1:]] == labels[index][:, None]).any()
    assert torch.equal(seen[0], sample_negatives(index, 40, 20, torch.Generator().manual_seed(0)))


def test_crd_exact_reproducible_and_resumable(monkeypatch):
    a, so, to, labels, index = _crd_exact_setup(seed=3)
    b, *_ = _crd_exact_setup(seed=3)
    values_a = [float(a(so, to, labels[index], index=index).detach()) for _ in range(2)]
    values_b = [float(b(so, to, labels[index], index=index).detach()) for _ in range(2)]
    assert values_a == values_b  # same seed and state: the same negatives, the same losses
    # A checkpoint carries memories, Z, step and the dataset labels; a fresh loss (no labels given) resumes
    # from it and draws the negatives the original draws next.
    state = {k: v.clone() for k, v in a.state_dict().items()}
    assert state["dataset_labels"].tolist() == labels.tolist() and int(state["step"]) == 2
    c = CRDLoss(num_samples=40, feat_dim=4, nce_k=20)
    c.setup(so, to)
    c.load_state_dict(state)
    seen_a, seen_c = _record_sample_index(a, monkeypatch), _record_sample_index(c, monkeypatch)
    _close(c(so, to, labels[index], index=index), float(a(so, to, labels[index], index=index).detach()), rel=1e-6)
    assert torch.equal(seen_a[0], seen_c[0])
    # A checkpoint written before mode="exact" existed (no dataset_labels) still loads; the labels given stay.
    old = {k: v for k, v in state.items() if k != "dataset_labels"}
    d = CRDLoss(num_samples=40, feat_dim=4, nce_k=20)
    d.setup(so, to)
    d.set_dataset_labels(labels)
    d.load_state_dict(old)
    assert torch.equal(d.dataset_labels, labels) and int(d.step) == 2


def test_crd_exact_errors():
    loss, so, to, labels, index = _crd_exact_setup()
    fresh = CRDLoss(num_samples=40, feat_dim=4, nce_k=20)
    fresh.setup(so, to)
    with pytest.raises(RuntimeError, match=r"set_dataset_labels.*mode='uniform'"):
        fresh(so, to, labels[index], index=index)
    with pytest.raises(ValueError, match="batch labels differ"):
        loss(so, to, (labels[index] + 1) % 4, index=index)
    with pytest.raises(ShapeMismatchError, match="num_samples=40"):
        loss.set_dataset_labels(torch.zeros(39, dtype=torch.long))
    with pytest.raises(ConfigError, match="integer"):
        loss.set_dataset_labels(torch.zeros(40))
    with pytest.raises(ConfigError, match=">= 0"):
        loss.set_dataset_labels(torch.full((40,), -1))
    with pytest.raises(ConfigError, match="mode='relax' is not allowed: expected one of 'exact', 'uniform'"):
        CRDLoss(num_samples=40, nce_k=20, mode="relax")
    # Uniform mode needs no labels at all.
    uni = CRDLoss(num_samples=40, feat_dim=4, nce_k=20, mode="uniform")
    uni.setup(so, to)
    assert torch.isfinite(uni(so, to, index=index))


def test_crd_recipe_uses_exact_mode():
    from kdkit.config import load_recipe

    opts = {k: v for k, v in load_recipe("crd-resnet32x4-resnet8x4").losses["crd"].items() if k != "weight"}
    assert LOSSES.build("crd", **opts).mode == "exact"


# ---------------------------------------------------------------- zoo models, registry, signatures


@pytest.fixture(scope="module")
def zoo_pair():
    torch.manual_seed(0)
    return build_model("resnet32x4"), build_model("resnet8x4"), torch.randn(4, 3, 32, 32)


@pytest.mark.parametrize("name, options", [
    ("at", {}), ("sp", {}), ("rkd", {}), ("crd", {"num_samples": 100, "nce_k": 16}),
])
def test_losses_on_zoo_models(zoo_pair, name, options):
    t_model, s_model, images = zoo_pair
    loss = LOSSES.get(name)(**options)
    teacher = Teacher(t_model, loss.teacher_taps)
    student = Student(s_model, loss.student_taps)
    so, to = student(images), teacher(images)
    loss.setup(so, to)
    extra = {"index": torch.tensor([3, 97, 0, 50])} if loss.needs_index else {}
    if name == "crd":
        loss.set_dataset_labels(torch.arange(100) % 10)
    value = loss(so, to, **extra)
    assert value.dim() == 0 and torch.isfinite(value) and value > 0
    s_model.zero_grad()
    value.backward()
    assert s_model.fc.weight.grad is None  # only features before the classifier are distilled
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s_model.layer1.parameters())
    if name == "crd":
        assert loss.embed_student.linear.in_features == 256 and loss.embed_teacher.linear.in_features == 256


def test_paper_defaults():
    at = ATLoss()
    assert at.student_layers == ("layer1", "layer2", "layer3") and at.p == 2.0
    assert SPLoss().student_taps == ("layer3",)
    r = RKDLoss()
    assert (r.w_d, r.w_a, r.student_taps) == (25.0, 50.0, ("in:fc",))
    c = CRDLoss()
    assert (c.num_samples, c.feat_dim, c.nce_k, c.nce_t, c.nce_m) == (50000, 128, 16384, 0.07, 0.5)
    assert c.mode == "exact"  # RepDistiller train_student.py --mode exact: negatives from other classes
    assert c.memory_student.shape == (50000, 128)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gives_float32(dtype):
    torch.manual_seed(0)
    s, t = torch.randn(4, 3, 4, 4), torch.randn(4, 5, 4, 4)
    for fn in (at_loss, sp_loss, rkd_loss):
        low = fn(s.to(dtype), t.to(dtype))
        assert low.dtype == torch.float32
        _close(low, float(fn(s.to(dtype).float(), t.to(dtype).float())), rel=1e-6)
