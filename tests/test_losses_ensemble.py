"""Multi-teacher (MEAL V2 / routing), PS-KD and DML: hand-computed values, gradients, reference numbers, zoo models."""
import inspect
import math

import pytest
import torch
from torch.autograd import gradcheck

from kdkit.errors import ConfigError, ShapeMismatchError
from kdkit.losses import LOSSES, DistillLoss, build_loss
from kdkit.losses.ensemble import (
    DMLLoss,
    MultiTeacherKDLoss,
    PredictionCache,
    PSKDLoss,
    dml_loss,
    drop_teachers,
    mean_teacher_probs,
    multi_teacher_kd_loss,
    pskd_alpha,
    pskd_loss,
    route_weights,
)
from kdkit.models import Student, Teacher, build_model
from kdkit.models.outputs import Outputs

from mathref import close as _close, kl as _kl, softmax as _softmax

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _ref_inputs(K, B, C, scale=3.0):
    # Same formula as the scratch scripts that produced the reference numbers below.
    k = torch.arange(K, dtype=torch.float64)[:, None, None]
    i = torch.arange(B, dtype=torch.float64)[None, :, None]
    j = torch.arange(C, dtype=torch.float64)[None, None, :]
    t = scale * (torch.sin(0.7 * i - 1.9 * j + 1.3 * k + 1.0) + 0.5 * torch.cos(0.23 * i * j + 0.9 * k + 0.2))
    s = 2.0 * (torch.sin(1.7 * i[0] + 2.9 * j[0] + 0.3) + 0.5 * torch.cos(0.31 * i[0] * j[0] + 1.1))
    return s, t


# ---------------------------------------------------------------- multi-teacher


def test_mean_teacher_probs_and_kd_by_hand():
    # Two teachers, three classes, one row, T = 2, weights 0.25 / 0.75.
    t1, t2, s = [2.0, 0.0, -1.0], [0.0, 1.0, 3.0], [0.5, 0.5, 0.0]
    p1, p2 = _softmax(t1, 2.0), _softmax(t2, 2.0)
    q = [0.25 * a + 0.75 * b for a, b in zip(p1, p2)]
    expected = _kl(q, _softmax(s, 2.0)) * 4.0
    w = torch.tensor([0.25, 0.75])
    tl = [torch.tensor([t1]), torch.tensor([t2])]
    got_q = mean_teacher_probs(tl, T=2.0, weights=w)[0]
    for g, e in zip(got_q.tolist(), q):
        _close(g, e)
    _close(multi_teacher_kd_loss(torch.tensor([s]), tl, T=2.0, weights=w), expected)
    # uniform (MEAL V2's plain average), stacked [K, B, C] input, T = 1
    q = [(a + b) / 2 for a, b in zip(_softmax(t1), _softmax(t2))]
    _close(multi_teacher_kd_loss(torch.tensor([s]), torch.tensor([[t1], [t2]])), _kl(q, _softmax(s, 4.0)) * 16, rel=1)
    _close(multi_teacher_kd_loss(torch.tensor([s]), torch.tensor([[t1], [t2]]), T=1.0), _kl(q, _softmax(s)))


def test_per_sample_weights_and_zero_weight_drop_a_teacher_exactly():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5), torch.randn(2, 3, 5)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    rows = [multi_teacher_kd_loss(s[i:i + 1], t[:, i:i + 1], T=3.0, weights=w[i]) for i in range(3)]
    _close(multi_teacher_kd_loss(s, t, T=3.0, weights=w), sum(float(r) for r in rows) / 3, rel=1e-6)
    from kdkit.losses import kd_loss
    _close(rows[0], float(kd_loss(s[:1], t[0, :1], T=3.0)), rel=1e-6)
    t2 = t.clone()
    t2[1, 0] = 1e4  # teacher 1 has weight 0 on row 0: its logits must not matter (and stay finite)
    _close(multi_teacher_kd_loss(s[:1], t2[:, :1], T=3.0, weights=w[0]), float(rows[0]), rel=1e-6)


def test_gradcheck_multi_teacher():
    torch.manual_seed(0)
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 3, 4, dtype=torch.float64)
    v = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)  # per-sample gate logits
    g = torch.randn(3, dtype=torch.float64, requires_grad=True)  # learned global weights
    assert gradcheck(lambda s, v: multi_teacher_kd_loss(s, t, T=2.0, weights=torch.softmax(v, -1)), (s, v))
    assert gradcheck(lambda s, g: multi_teacher_kd_loss(s, t, T=4.0, weights=torch.softmax(g, -1)), (s, g))
    assert gradcheck(lambda v: multi_teacher_kd_loss(s.detach(), t, 1.0, route_weights(v, top_k=2)), (v,))


# szq0214/MEAL-V2 @ 59e6bca29c77a7df9229e77d4463f2f795723810: extensions/teacher_wrapper.py
# ModelDistillationWrapper (combine=True: mean of the teachers' softmax) + extensions/kd_loss.py KLLoss
# (cross-entropy with those soft labels), run in float64 on _ref_inputs(K, B, C) in a scratch directory.
# Values: loss, d loss / d student at [0,0], [1,2], [B-1,C-1], soft labels at [0,0], [B-1,C-1].
MEAL_V2 = {
    (2, 4, 10): (2.9835045875865873, [-0.03701179976694271, 0.07286821357783885, 0.001934434914314719],
                 [0.2202978630941848, 0.008730698116003473]),
    (3, 5, 7): (2.728171863685611, [-0.008656206008014748, 0.05130882433352725, -0.04724022957896524],
                [0.2080476005704841, 0.2474999786554021]),
}


@pytest.mark.parametrize("shape", sorted(MEAL_V2))
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_multi_teacher_matches_meal_v2(shape, dtype, rel):
    K, B, C = shape
    ce, grads, soft = MEAL_V2[shape]
    s, t = _ref_inputs(K, B, C)
    s, t = s.to(dtype).requires_grad_(), t.to(dtype)
    q = mean_teacher_probs(list(t), T=1.0)
    _close(q[0, 0], soft[0], rel=rel)
    _close(q[B - 1, C - 1], soft[1], rel=rel)
    loss = MultiTeacherKDLoss(num_teachers=K, T=1.0)(Outputs(s), [Outputs(x) for x in t])
    # KL = CE - H(targets): the same gradients as MEAL V2's CE.
    entropy = float(-(q * q.log()).sum(-1).mean())
    _close(float(loss.detach()) + entropy, ce, rel=rel)
    loss.backward()
    for got, want in zip([s.grad[0, 0], s.grad[1, 2], s.grad[B - 1, C - 1]], grads):
        _close(got, want, rel=rel, abs_=1e-9 if dtype == torch.float64 else 1e-7)


def test_drop_teachers_deterministic_and_keeps_one():
    masks = [drop_teachers(4, 0.5, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(masks[0], masks[1])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([drop_teachers(3, 0.9, g) for _ in range(300)])
    assert (draws.sum(1) >= 1).all()
    assert 0.05 < draws.float().mean() < 0.6  # mostly dropped, never all
    assert torch.equal(drop_teachers(3, 0.0), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ConfigError, match="drop"):
        drop_teachers(3, 1.0)


def test_module_drop_uses_generator_and_ignores_dropped_teacher():
    torch.manual_seed(0)
    s, t = torch.randn(4, 6), torch.randn(3, 4, 6)
    loss = MultiTeacherKDLoss(num_teachers=3, drop_p=0.5)
    loss.generator = torch.Generator().manual_seed(3)
    keep = drop_teachers(3, 0.5, torch.Generator().manual_seed(3))
    value = loss(Outputs(s), [Outputs(x) for x in t])
    w = keep.double() / keep.sum()
    assert torch.allclose(loss.last_weights.double(), w)
    _close(value, float(multi_teacher_kd_loss(s, t[keep], T=4.0)), rel=1e-6)
    loss.eval()  # no dropping at evaluation
    _close(loss(Outputs(s), [Outputs(x) for x in t]), float(multi_teacher_kd_loss(s, t, T=4.0)), rel=1e-6)


def test_fixed_and_learned_weighting():
    torch.manual_seed(0)
    s, t = torch.randn(4, 6), torch.randn(2, 4, 6)
    fixed = MultiTeacherKDLoss(weighting="fixed", weights="3,1")
    _close(fixed(Outputs(s), [Outputs(x) for x in t]),
           float(multi_teacher_kd_loss(s, t, weights=torch.tensor([0.75, 0.25]))), rel=1e-6)
    learned = MultiTeacherKDLoss(weighting="learned")
    assert [n for n, _ in learned.named_parameters()] == ["logit_weights"]
    value = learned(Outputs(s), [Outputs(x) for x in t])
    _close(value, float(multi_teacher_kd_loss(s, t)), rel=1e-6)  # zeros -> uniform at start
    value.backward()
    g = learned.logit_weights.grad
    assert g is not None and g.abs().sum() > 0 and abs(float(g.sum())) < 1e-6  # softmax: gradients sum to 0


def test_routing_with_zoo_models():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    teachers = [Teacher(build_model("resnet32x4").eval()), Teacher(build_model("resnet8x4").eval())]
    loss = MultiTeacherKDLoss(weighting="routing", top_k=1, balance=0.1)
    assert loss.student_taps == ("in:fc",) and MultiTeacherKDLoss.student_taps == ()
    student = Student(build_model("resnet8x4"), taps=loss.student_taps)
    so, tos = student(x), [t(x) for t in teachers]
    assert so.features["in:fc"].shape == (2, 256)
    with pytest.raises(RuntimeError, match="setup"):
        loss(so, tos)
    loss.setup(so, tos)
    gate = loss.gate
    loss.setup(so, tos)
    assert loss.gate is gate  # idempotent
    value = loss(so, tos)
    w = loss.last_weights
    assert w.shape == (2, 2) and torch.equal((w > 0).sum(1), torch.tensor([1, 1]))  # top-1: one teacher per row
    rows = [multi_teacher_kd_loss(so.logits[i:i + 1], [t.logits[i:i + 1] for t in tos], T=4.0, weights=w[i])
            for i in range(2)]
    mean_w = w.mean(0)
    balance = 0.1 * (float(-(mean_w.clamp_min(1e-12).log()).mean()) - math.log(2))
    _close(value, float(sum(rows).detach()) / 2 + balance, rel=1e-5)
    value.backward()
    assert all(p.grad is not None for p in loss.gate.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # all-teacher routing: a soft mixture, rows sum to 1
    soft = MultiTeacherKDLoss(weighting="routing")
    soft.setup(so, tos)
    soft(so, tos)
    assert torch.allclose(soft.last_weights.sum(1), torch.ones(2)) and (soft.last_weights > 0).all()


def test_multi_teacher_errors():
    s = Outputs(torch.randn(2, 5))
    with pytest.raises(ShapeMismatchError, match="num_teachers=2 but got 3"):
        MultiTeacherKDLoss()(s, [Outputs(torch.randn(2, 5))] * 3)
    with pytest.raises(ValueError, match="list of 2 teacher Outputs"):
        MultiTeacherKDLoss()(s, Outputs(torch.randn(2, 5)))
    with pytest.raises(ShapeMismatchError, match=r"\(2, 5\).*\(2, 4\)"):
        MultiTeacherKDLoss()(s, [Outputs(torch.randn(2, 5)), Outputs(torch.randn(2, 4))])
    with pytest.raises(ShapeMismatchError, match=r"\(2, 5\)"):
        multi_teacher_kd_loss(torch.randn(2, 5), torch.randn(2, 3, 5))
    with pytest.raises(ShapeMismatchError, match="weights of shape"):
        multi_teacher_kd_loss(torch.randn(2, 5), torch.randn(2, 2, 5), weights=torch.ones(3) / 3)
    for kwargs, msg in [(dict(weighting="vote"), "weighting"), (dict(weighting="fixed"), "needs weights"),
                        (dict(weights="1,1"), "only used"), (dict(weighting="fixed", weights="1"), "1 values"),
                        (dict(weighting="fixed", weights="a,b"), "comma"), (dict(drop_p=1.0), "drop_p"),
                        (dict(top_k=1), "routing"), (dict(T=0.0), r"T=0.0 is not allowed: expected a number > 0"), (dict(num_teachers=0), ">= 1")]:
        with pytest.raises(ConfigError, match=msg):
            MultiTeacherKDLoss(**kwargs)
    with pytest.raises(KeyError, match="in:fc"):
        MultiTeacherKDLoss(weighting="routing").setup(s, [s, s])


# ---------------------------------------------------------------- PS-KD


def test_pskd_by_hand_and_alpha_schedule():
    s, y, prev, a = [1.0, 0.0, -1.0], 2, [0.2, 0.5, 0.3], 0.4
    target = [a * p + (1 - a) * (1.0 if c == y else 0.0) for c, p in enumerate(prev)]
    log_p = [math.log(p) for p in _softmax(s)]
    expected = -sum(ti * lp for ti, lp in zip(target, log_p))
    _close(pskd_loss(torch.tensor([s]), torch.tensor([y]), torch.tensor([prev]), a), expected)
    # official: alpha_T * (epoch + 1) / end_epoch during 0-based epoch e
    assert pskd_alpha(0.0, 0.8, 240) == pytest.approx(0.8 / 240)
    assert pskd_alpha(9.99, 0.8, 240) == pytest.approx(0.8 * 10 / 240)
    assert pskd_alpha(239.5, 0.8, 240) == pytest.approx(0.8) and pskd_alpha(500, 0.8, 240) == pytest.approx(0.8)


def test_gradcheck_pskd():
    torch.manual_seed(0)
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    prev = torch.softmax(torch.randn(4, 5, dtype=torch.float64), -1)
    y = torch.tensor([0, 4, 2, 2])
    assert gradcheck(lambda s: pskd_loss(s, y, prev, 0.3), (s,))


def test_prediction_cache_reads_only_earlier_epochs():
    c = PredictionCache(4, 2)
    probs, has = c.read(torch.tensor([0, 1]), 0)
    assert not has.any()
    c.write(torch.tensor([0, 1]), torch.tensor([[0.9, 0.1], [0.8, 0.2]]), 0)
    assert not c.read(torch.tensor([0]), 0)[1].any()  # written this epoch only: still nothing earlier
    c.write(torch.tensor([0]), torch.tensor([[0.7, 0.3]]), 0)  # a second visit in epoch 0 overwrites
    probs, has = c.read(torch.tensor([0, 1, 2]), 1)
    assert has.tolist() == [True, True, False]
    assert torch.allclose(probs[:2], torch.tensor([[0.7, 0.3], [0.8, 0.2]]))
    c.write(torch.tensor([0]), torch.tensor([[0.1, 0.9]]), 1)
    probs, has = c.read(torch.tensor([0, 1]), 1)  # sample 0 rewritten in epoch 1: reads its epoch-0 value
    assert has.all() and torch.allclose(probs, torch.tensor([[0.7, 0.3], [0.8, 0.2]]))
    probs, _ = c.read(torch.tensor([0, 1]), 3)  # sample 1 unvisited in epochs 1, 2: keeps its older value
    assert torch.allclose(probs, torch.tensor([[0.1, 0.9], [0.8, 0.2]]))
    with pytest.raises(ShapeMismatchError, match=r"\[0, 4\).*max 4"):
        c.read(torch.tensor([4]), 1)


# lgcnsai/PS-KD-Pytorch @ 9aa0828d099f2faed16bbac258e4153902a55021: main.py's train() loop (alpha_t, the
# all_predictions matrix, one-hot at epoch 0) with loss/pskd_loss.py Custom_CrossEntropy_PSKD, replayed in float64
# in a scratch directory on the fixed logits below (N=6, C=4, batch 3, 3 epochs, end_epoch=3, alpha_T=0.8).
# Per step: loss, d loss / d logits at [0, 0] and [2, 3].
PSKD_REF = [
    (2.2887222463458192, 0.03173685317126211, -0.315817331991859),
    (2.267067373823129, -0.3144078185646144, 0.033557961145496515),
    (1.3710539693516002, 0.016821172545780173, -0.024097404842995017),
    (2.4401227111903143, 0.18421627440592728, 0.13020174586903493),
    (1.4487136145786987, -0.06499915688064976, 0.04694852206453527),
    (1.4263354342337002, 0.14027115720285163, -0.05665451158220953),
]
PSKD_ORDERS = [[0, 1, 2, 3, 4, 5], [4, 2, 0, 5, 1, 3], [3, 5, 1, 0, 2, 4]]


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_pskd_matches_official_training_loop(dtype, rel):
    N, C, B, E = 6, 4, 3, 3
    labels = torch.tensor([(5 * n + 1) % C for n in range(N)])
    loss = PSKDLoss(num_samples=N, num_classes=C, alpha_T=0.8, epochs=E)
    step = 0
    for epoch in range(E):
        for b in range(N // B):
            loss.set_epoch(epoch + b / (N // B))
            idx = torch.tensor(PSKD_ORDERS[epoch][b * B:(b + 1) * B])
            i, j = idx.double()[:, None], torch.arange(C, dtype=torch.float64)[None, :]
            logits = 2.5 * torch.sin(1.3 * i + 0.7 * j + 0.9 * epoch + 0.4) + 0.3 * epoch * torch.cos(i - j)
            logits = logits.to(dtype).requires_grad_()
            value = loss(Outputs(logits), None, labels[idx], index=idx)
            value.backward()
            want, g00, g23 = PSKD_REF[step]
            # the cache is float32, so float64 agreement is at float32 precision of the stored predictions
            _close(value, want, rel=rel)
            _close(logits.grad[0, 0], g00, rel=rel, abs_=1e-7)
            _close(logits.grad[2, 3], g23, rel=rel, abs_=1e-7)
            step += 1
    assert set(loss.state_dict()) >= {"cache.latest", "cache.previous", "cache.written"}


def test_pskd_module_contract_and_errors():
    assert PSKDLoss.needs_index and PSKDLoss.needs_labels and not PSKDLoss.needs_teacher
    loss = PSKDLoss(num_samples=10, num_classes=3)
    s, y = Outputs(torch.randn(2, 3)), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="index"):
        loss(s, None, y)
    with pytest.raises(ValueError, match="labels"):
        loss(s, None, None, index=torch.tensor([0, 1]))
    with pytest.raises(ShapeMismatchError, match="num_classes=3"):
        loss(Outputs(torch.randn(2, 4)), None, y, index=torch.tensor([0, 1]))
    with pytest.raises(ShapeMismatchError, match="num_samples"):
        loss(s, None, y, index=torch.tensor([0, 10]))
    loss.eval()
    loss(s, None, y, index=torch.tensor([0, 1]))
    assert (loss.cache.written == -1).all()  # evaluation does not write the cache
    with pytest.raises(ConfigError, match="alpha_T"):
        PSKDLoss(alpha_T=1.5)


# ---------------------------------------------------------------- DML


def test_dml_by_hand():
    a, b = [1.0, 0.0], [0.0, 2.0]
    pa, pb = _softmax(a), _softmax(b)
    ta, tb = dml_loss(torch.tensor([a]), torch.tensor([b]))
    _close(ta, _kl(pb, pa))
    _close(tb, _kl(pa, pb))


def test_gradcheck_dml():
    torch.manual_seed(0)
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    # Each term is differentiated in its own peer only (the other peer's prediction is a constant target).
    assert gradcheck(lambda a: dml_loss(a, b.detach())[0], (a,))
    assert gradcheck(lambda b: dml_loss(a.detach(), b)[1], (b,))
    ta, tb = dml_loss(a, b)
    assert torch.autograd.grad(ta, b, allow_unused=True)[0] is None  # no gradient into the target peer
    assert torch.autograd.grad(tb, a, allow_unused=True)[0] is None


# YingZhangDUT/Deep-Mutual-Learning @ 34a20583debe4e0dab1d9856db69bed278c5c011 train_models.py kl_loss_compute
# (TensorFlow; transliterated op for op into torch float64 in a scratch dir -- TF is not installed -- with each
# net's loss differentiated only in its own logits, as its var_list does). Peers a, b = _ref_inputs(2, B, C)[1].
# Values: KL term of a, of b, d/da at [0,0], [B-1,C-1], d/db at the same entries.
DML_REF = {
    (4, 10): (2.0319852079434444, 2.0019646635896353, [0.012499296436184776, -0.0029255633858568057],
              [-0.01249938414199553, 0.0029255720198846087]),
    (5, 7): (2.172932859620453, 2.104535017426179, [-0.01347217748003932, -0.010330635861388136],
             [0.013472100144819003, 0.010330643069732283]),
}


@pytest.mark.parametrize("shape", sorted(DML_REF))
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_dml_matches_official(shape, dtype, rel):
    B, C = shape
    la_want, lb_want, ga, gb = DML_REF[shape]
    _, t = _ref_inputs(2, B, C)
    a, b = t[0].to(dtype).requires_grad_(), t[1].to(dtype).requires_grad_()
    la, lb = dml_loss(a, b)
    _close(la, la_want, rel=rel)  # the reference adds 1e-8 inside its log: agreement to ~1e-7
    _close(lb, lb_want, rel=rel)
    DMLLoss(peer_ce=False)(Outputs(a), Outputs(b)).backward()  # one backward: each peer its own gradient
    for got, want in zip([a.grad[0, 0], a.grad[B - 1, C - 1]], ga):
        _close(got, want, rel=rel, abs_=1e-7)
    for got, want in zip([b.grad[0, 0], b.grad[B - 1, C - 1]], gb):
        _close(got, want, rel=rel, abs_=1e-7)


def test_dml_module_with_zoo_peers():
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    student, peer = Student(build_model("resnet8x4")), Student(build_model("resnet8x4"))
    so, po = student(x), peer(x)
    loss = DMLLoss()
    value = loss(so, po, y)
    ta, tb = dml_loss(so.logits, po.logits)
    ce = torch.nn.functional.cross_entropy(po.logits, y)
    _close(value, float((ta + tb + ce).detach()), rel=1e-6)
    value.backward()
    assert all(p.grad is not None for p in peer.parameters() if p.requires_grad)
    frozen = Teacher(build_model("resnet8x4"))
    with pytest.raises(ValueError, match="trainable"):
        loss(student(x), frozen(x), y)
    with pytest.raises(ValueError, match="labels"):
        loss(so, po)
    with pytest.raises(ShapeMismatchError, match=r"\(2, 10\).*\(2, 5\)"):
        dml_loss(torch.randn(2, 10), torch.randn(2, 5))


# ---------------------------------------------------------------- registry


def test_paper_defaults():
    m = MultiTeacherKDLoss()
    assert (m.num_teachers, m.weighting, m.T, m.drop_p) == (2, "mean", 4.0, 0.0)
    p = PSKDLoss()
    assert (p.alpha_T, p.epochs, tuple(p.cache.latest.shape)) == (0.8, 240, (50000, 10))
