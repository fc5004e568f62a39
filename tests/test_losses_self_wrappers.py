"""BYOT self-distillation, BD-KD, per-sample values and the `weighted` wrapper, BinaryKL(-Norm) and `dual_head`.

Hand-computed values, float64 gradchecks, agreement with reference implementations (as literal constants), zoo
models through `Outputs`, recipes through the validator, and errors.
"""
import math
import typing

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from kdkit.config import load_recipe
from kdkit.errors import ConfigError, ShapeMismatchError
from kdkit.losses import LOSSES, build_loss
from kdkit.losses.bdkd import BDKDLoss, bdkd_loss, entropy_balance
from kdkit.losses.ensemble import dml_loss
from kdkit.losses.logits import (BinaryKLLoss, BinaryKLNormLoss, DKDLoss, JSDLoss, KDLoss, LabelFreeKDLoss, NKDLoss,
                                 RKLLoss, binary_kl_loss, binary_kl_norm_loss, kd_loss)
from kdkit.losses.self_distill import BYOTHead, BYOTLoss, byot_loss
from kdkit.losses.wrappers import DualHeadLoss, WeightedLoss, teacher_sample_weights, weighted_mean
from kdkit.models import Student, build_model
from kdkit.models.outputs import Outputs

from mathref import close as _close, kl as _kl, softmax as _softmax

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _ref_inputs(B, C, s_scale=2.0, t_scale=3.0, k=0):
    # The same formula as the scratch scripts that produced the reference numbers below.
    i = torch.arange(B, dtype=torch.float64)[:, None]
    j = torch.arange(C, dtype=torch.float64)[None, :]
    s = s_scale * (torch.sin(1.7 * i + 2.9 * j + 0.3 + k) + 0.5 * torch.cos(0.31 * i * j + 1.1))
    t = t_scale * (torch.sin(0.7 * i - 1.9 * j + 1.0 - k) + 0.5 * torch.cos(0.23 * i * j + 0.2))
    y = (7 * torch.arange(B) + 1) % C
    return s, t, y


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _entropy(p):
    return -sum(v * math.log(v) for v in p if v > 0)


# ---------------------------------------------------------------- per-sample values of the logit losses


PER_SAMPLE = [KDLoss(T=3.0), RKLLoss(T=2.0), JSDLoss(beta=0.3, T=2.0), JSDLoss(beta=0.0), JSDLoss(beta=1.0),
              DKDLoss(warmup=0), NKDLoss(), LabelFreeKDLoss(T=2.0), BinaryKLLoss(), BinaryKLNormLoss(),
              KDLoss(standardize=True)]


@pytest.mark.parametrize("loss", PER_SAMPLE, ids=lambda l: repr(l))
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7)])
def test_per_sample_mean_is_the_scalar_loss(loss, shape):
    torch.manual_seed(0)
    s, t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    y = torch.randint(0, shape[-1], shape[:-1])
    rows = loss.per_sample(Outputs(s), Outputs(t), y)
    assert rows.shape == shape[:-1]
    assert torch.equal(rows.mean(), loss(Outputs(s), Outputs(t), y))  # exactly, not just closely


def test_per_sample_kd_by_hand_and_dkd_warmup():
    s, t, T = [[1.0, -1.0, 0.5], [0.0, 2.0, -2.0]], [[3.0, 0.0, -1.0], [0.5, 0.5, 1.0]], 2.0
    rows = kd_loss(torch.tensor(s), torch.tensor(t), T=T, reduction="none")
    for got, srow, trow in zip(rows, s, t):
        _close(got, _kl(_softmax(trow, T), _softmax(srow, T)) * T * T)
    loss, y = DKDLoss(warmup=10), torch.tensor([0, 2])
    loss.set_epoch(5)
    full = DKDLoss(warmup=0).per_sample(Outputs(torch.tensor(s)), Outputs(torch.tensor(t)), y)
    _close(loss.per_sample(Outputs(torch.tensor(s)), Outputs(torch.tensor(t)), y)[1], 0.5 * float(full[1]))
    with pytest.raises(ConfigError, match="reduction"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), reduction="sum")
    assert not hasattr(LOSSES.get("dist"), "per_sample")  # batch-relational: no per-sample form


# ---------------------------------------------------------------- BinaryKL, BinaryKL-Norm (Yang et al. 2024)


def test_binary_kl_and_norm_by_hand():
    s, t, T = [0.5, -1.0, 3.0], [2.0, 0.0, -1.0], 2.0
    want = 0.0
    for a, b in zip(s, t):
        ps, pt = _sigmoid(a / T), _sigmoid(b / T)
        want += pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    _close(binary_kl_loss(torch.tensor([s]), torch.tensor([t]), T=T), want * T * T)
    # BinaryKL-Norm: KL(Bernoulli(1/2) || Bernoulli(sigmoid((s - t) / T))) per class
    want = sum(0.5 * math.log(0.5 / _sigmoid((a - b) / T)) + 0.5 * math.log(0.5 / (1 - _sigmoid((a - b) / T)))
               for a, b in zip(s, t))
    _close(binary_kl_norm_loss(torch.tensor([s]), torch.tensor([t]), T=T), want * T * T)
    x = torch.randn(4, 6)
    assert float(binary_kl_norm_loss(x, x.clone())) == 0.0
    # a common shift is invisible to softmax losses but not to BinaryKL-Norm
    assert float(kd_loss(x + 3, x)) < 1e-5 and float(binary_kl_norm_loss(x + 3, x)) > 1


# penghui-yang/DHKD @ 7976c69 distiller_zoo/BinaryKL.py, BinaryKLNorm.py, run in a scratch dir in float64 on
# _ref_inputs(B, C): value, d/ds at [0, 0] and [B-1, C-1].
DHKD_REF = {
    ("binary_kl", 4, 10, 2.0): (7.85549386158713, [-0.12640951141363313, 0.037504587384450734]),
    ("binary_kl_norm", 4, 10, 2.0): (8.308607024691375, [-0.15690339970676603, 0.040443944000447096]),
    ("binary_kl", 5, 7, 1.0): (3.898173791714897, [-0.04843459549701016, -0.004639162420337832]),
    ("binary_kl_norm", 5, 7, 1.0): (4.7831536928758105, [-0.09005152821349507, -0.009013253111750523]),
}


@pytest.mark.parametrize("key", sorted(DHKD_REF))
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_binary_kl_matches_dhkd(key, dtype, rel):
    name, B, C, T = key
    value, grads = DHKD_REF[key]
    s, t, _ = _ref_inputs(B, C)
    s = s.to(dtype).requires_grad_()
    loss = build_loss(name, T=T)(Outputs(s), Outputs(t.to(dtype)))
    _close(loss, value, rel=rel)
    loss.backward()
    for got, want in zip([s.grad[0, 0], s.grad[B - 1, C - 1]], grads):
        _close(got, want, rel=rel, abs_=1e-7)


@pytest.mark.parametrize("fn", [binary_kl_loss, binary_kl_norm_loss])
def test_gradcheck_binary_kl(fn):
    torch.manual_seed(0)
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, b: fn(a, b, T=1.5), (s, t))
    big = torch.tensor([[400.0, -400.0]], requires_grad=True)  # sigmoid saturates: still finite, log space
    value = fn(big, torch.tensor([[-400.0, 400.0]]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(big.grad).all()


# ---------------------------------------------------------------- weighted (per-sample weighting)

S = [[1.0, -1.0, 0.5], [0.0, 2.0, -2.0]]
T_ = [[3.0, 0.0, -1.0], [0.5, 0.5, 1.0]]
Y = [0, 2]


def _kd_rows(T):
    return [_kl(_softmax(t, T), _softmax(s, T)) * T * T for s, t in zip(S, T_)]


def test_weighted_schemes_by_hand():
    s, t, y, T = Outputs(torch.tensor(S)), Outputs(torch.tensor(T_)), torch.tensor(Y), 2.0
    rows = _kd_rows(T)
    conf = [_softmax(trow)[c] for trow, c in zip(T_, Y)]  # teacher probability of the label at T = 1
    _close(WeightedLoss(inner="kd", T=T)(s, t, y), sum(w * r for w, r in zip(conf, rows)) / 2)
    _close(WeightedLoss(inner="kd", T=T, normalize=True)(s, t, y), sum(w * r for w, r in zip(conf, rows)) / sum(conf))
    # teacher top classes: 0 (right) and 2 (right); flip the second label to make it wrong
    y2 = torch.tensor([0, 1])
    _close(WeightedLoss(inner="kd", T=T, scheme="teacher_correct", wrong_weight=0.25)(s, t, y2),
           (rows[0] + 0.25 * rows[1]) / 2)
    ent = [_entropy(_softmax(trow, 4.0)) for trow in T_]
    _close(WeightedLoss(inner="kd", T=T, scheme="entropy")(s, t, None), sum(w * r for w, r in zip(ent, rows)) / 2)
    got = teacher_sample_weights(torch.tensor(T_), y, "teacher_confidence")
    for g, w in zip(got, conf):
        _close(g, w)
    assert float(weighted_mean(torch.tensor([1.0, 3.0]), torch.zeros(2), normalize=True)) == 0.0  # no nan


# cpsu00/ER-KD @ 12b151a mdistiller/distillers/KD.py er_kd_loss(s, t, T) (entropy of softmax(t / 4), 1e-10 inside
# its log), run in a scratch dir in float64 on _ref_inputs(B, C): value, d/ds at [0, 0] and [B-1, C-1].
ERKD_REF = {
    (4, 10, 4.0): (7.117179360674383, [-0.12404403057419941, 0.04700291763308087]),
    (6, 5, 2.0): (3.4573777659573657, [-0.053970313562350276, 0.11710556883618745]),
}


@pytest.mark.parametrize("key", sorted(ERKD_REF))
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-8), (torch.float32, 1e-5)])
def test_weighted_entropy_kd_matches_er_kd(key, dtype, rel):
    B, C, T = key
    value, grads = ERKD_REF[key]
    s, t, y = _ref_inputs(B, C)
    s = s.to(dtype).requires_grad_()
    loss = build_loss("weighted", inner="kd", scheme="entropy", entropy_T=4.0, T=T)(Outputs(s), Outputs(t.to(dtype)), y)
    _close(loss, value, rel=rel)  # the reference's 1e-10 inside the log: agreement to ~1e-9
    loss.backward()
    for got, want in zip([s.grad[0, 0], s.grad[B - 1, C - 1]], grads):
        _close(got, want, rel=rel, abs_=1e-8)


def test_weighted_gradients_treat_weights_as_constants():
    torch.manual_seed(0)
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 5, (4,))
    loss = WeightedLoss(inner="nkd")
    assert gradcheck(lambda a: loss(Outputs(a), Outputs(t), y), (s,))
    # weight_fn from Python: its output is detached even if it depends on the student
    w_loss = WeightedLoss.wrap(KDLoss(T=2.0), weight_fn=lambda st, te, lab: st.logits.softmax(-1)[:, 0] * 4)
    assert not w_loss.needs_labels and w_loss.needs_teacher  # KD reads the teacher; no labels needed
    value = w_loss(Outputs(s), Outputs(t), y)
    (g,) = torch.autograd.grad(value, s)
    w = (s.detach().softmax(-1)[:, 0] * 4)
    (want,) = torch.autograd.grad((w * kd_loss(s, t, T=2.0, reduction="none")).mean(), s)
    assert torch.allclose(g, want, rtol=1e-12, atol=0)
    assert "weight_fn" in repr(w_loss)


def test_weighted_sequences_broadcast_batch_weights_and_follow_the_inner_loss():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    w_loss = WeightedLoss.wrap(RKLLoss(T=2.0), weight_fn=lambda *_: torch.tensor([1.0, 3.0]))
    rows = RKLLoss(T=2.0).per_sample(Outputs(s), Outputs(t))
    _close(w_loss(Outputs(s), Outputs(t)), float((rows[0].sum() + 3 * rows[1].sum()) / 6), rel=1e-6)
    assert w_loss.per_sample(Outputs(s), Outputs(t)).shape == (2, 3)
    bad = WeightedLoss.wrap(KDLoss(), weight_fn=lambda *_: torch.ones(5))
    with pytest.raises(ShapeMismatchError, match=r"\(5,\).*\(2, 3\)"):
        bad(Outputs(s), Outputs(t))
    dkd = WeightedLoss(inner="dkd", warmup=10)
    assert dkd.needs_labels and dkd.needs_teacher and dkd.inner.warmup == 10
    dkd.set_epoch(5.0)
    assert dkd.inner.epoch == 5.0  # the inner loss's schedule follows the trainer


def test_weighted_errors():
    with pytest.raises(ConfigError, match="'dist' has no per_sample.*kd"):
        WeightedLoss(inner="dist")
    with pytest.raises(ConfigError, match="'gamma' is not an option of loss 'kd'; its options: T, standardize"):
        WeightedLoss(inner="kd", gamma=3.0)
    with pytest.raises(ConfigError, match="unknown loss 'hinton'"):
        WeightedLoss(inner="hinton")
    with pytest.raises(ConfigError, match="scheme"):
        WeightedLoss(scheme="confidence")
    with pytest.raises(ConfigError, match="wrong_weight"):
        WeightedLoss(scheme="teacher_correct", wrong_weight=-1.0)
    with pytest.raises(ConfigError, match="no option 'temperature'"):
        build_loss("weighted", temperature=2.0)
    with pytest.raises(ConfigError, match="wrap itself"):
        WeightedLoss(inner="weighted")
    with pytest.raises(ValueError, match="labels"):
        WeightedLoss()(Outputs(torch.randn(2, 3)), Outputs(torch.randn(2, 3)), None)


def test_wrapper_options_reach_the_recipe_validator(tmp_path):
    from kdkit.config import NonNegFloat, PositiveFloat, Probability

    ckpt = tmp_path / "teacher.safetensors"
    ckpt.write_bytes(b"")  # the recipe check only needs the file to exist
    r = load_recipe("weighted-kd-resnet32x4-resnet8x4", [f"teacher.checkpoint={ckpt}", "losses.kd.T=2"])
    assert r.losses["kd"]["T"] == 2.0 and isinstance(r.losses["kd"]["T"], float)  # coerced by the inner type
    with pytest.raises(ConfigError, match="unknown option 'losses.kd.foo' for loss 'weighted'"):
        load_recipe("weighted-kd-resnet32x4-resnet8x4", ["losses.kd.foo=1"])
    with pytest.raises(ConfigError, match=r"losses.kd.T=0 is not allowed: expected a number > 0"):
        load_recipe("weighted-kd-resnet32x4-resnet8x4", ["losses.kd.T=0"])
    with pytest.raises(ConfigError, match=r"losses.kd.beta=2 is not allowed: expected a number >= 0 and <= 1"):
        load_recipe("weighted-kd-resnet32x4-resnet8x4", ["losses.kd.inner=jsd", "losses.kd.beta=2"])
    assert load_recipe("weighted-kd-resnet32x4-resnet8x4", ["losses.kd.inner=dkd", "losses.kd.beta=2"])
    with pytest.raises(ConfigError, match=r"losses.dhkd.head='mlp' is not allowed"):
        load_recipe("dualhead-kd-resnet32x4-resnet8x4", ["losses.dhkd.head=mlp"])
    assert WeightedLoss.options_for("kd") == {
        "inner": str, "scheme": typing.Literal["teacher_confidence", "teacher_correct", "entropy"],
        "wrong_weight": NonNegFloat, "entropy_T": PositiveFloat, "normalize": bool, "T": PositiveFloat,
        "standardize": bool}
    assert WeightedLoss.options_for("jsd")["beta"] == Probability
    assert set(DualHeadLoss.options_for("binary_kl_norm")) == {"inner", "feature_layer", "head", "detach", "T",
                                                               "standardize"}
    assert build_loss("weighted", inner="jsd", beta=0.25).inner.beta == 0.25  # from Python, options of that inner
    from kdkit.train.build import build_losses, check_mode

    check_mode(r, "distill")
    (weight, loss), = build_losses(r).values()
    assert weight == 0.9 and isinstance(loss, WeightedLoss) and loss.inner.T == 2.0
    check_mode(load_recipe("dualhead-kd-resnet32x4-resnet8x4", [f"teacher.checkpoint={ckpt}"]), "distill")
    check_mode(load_recipe("byot-resnet8x4"), "train")


# ---------------------------------------------------------------- dual head (Yang et al. 2024)


def _student(taps=()):
    torch.manual_seed(0)
    return Student(build_model("resnet8x4", num_classes=10), taps)


def test_dual_head_trains_the_aux_head_and_backbone_not_the_main_head():
    loss = DualHeadLoss()  # BinaryKL-Norm, T = 2, linear head on in:fc
    student = _student(loss.student_taps)
    x, y, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 7]), torch.randn(2, 10)
    with pytest.raises(RuntimeError, match="setup"):
        loss(student(x), Outputs(t), y)
    loss.setup(student(x), Outputs(t))
    assert isinstance(loss.head.net, torch.nn.Linear) and loss.head.net.in_features == 256
    out = student(x)
    value = loss(out, Outputs(t), y)
    _close(value, float(binary_kl_norm_loss(loss.head(out.features["in:fc"]), t, T=2.0).detach()), rel=1e-6)
    value.backward()
    model = student.model
    assert model.fc.weight.grad is None  # the student's own head: CE only
    assert model.conv1.weight.grad is not None and float(model.conv1.weight.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in loss.head.parameters())
    head = loss.head
    loss.setup(out, Outputs(t))
    assert loss.head is head  # setup again (resume) keeps the trained head

    detached = DualHeadLoss(detach=True, inner="kd", T=4.0, head="nonlinear")
    detached.setup(out, Outputs(t))
    student.zero_grad()
    detached(student(x), Outputs(t), y).backward()
    assert model.conv1.weight.grad is None and all(p.grad is not None for p in detached.head.parameters())
    assert isinstance(detached.head.net, torch.nn.Sequential)


def test_dual_head_inner_options_labels_and_errors():
    dkd = DualHeadLoss(inner="dkd", beta=2.0, warmup=0)
    assert dkd.needs_labels and dkd.inner.beta == 2.0 and dkd.student_taps == ("in:fc",)
    f = torch.randn(3, 8, 2, 2)  # a conv map is average-pooled
    s, t, y = Outputs(torch.randn(3, 5), {"in:fc": f}), Outputs(torch.randn(3, 5)), torch.tensor([0, 1, 4])
    dkd.setup(s, t)
    aux = dkd.aux_logits(s)
    _close(dkd(s, t, y), float(DKDLoss(beta=2.0, warmup=0)(Outputs(aux), t, y).detach()), rel=1e-6)
    assert torch.equal(dkd.per_sample(s, t, y).mean(), dkd(s, t, y))
    with pytest.raises(ConfigError, match="head='mlp' is not allowed: expected one of 'linear', 'nonlinear'"):
        DualHeadLoss(head="mlp")
    with pytest.raises(ConfigError, match="'tau' is not an option of loss 'kd'"):
        DualHeadLoss(inner="kd", tau=2.0)
    with pytest.raises(KeyError, match="in:fc"):
        DualHeadLoss().setup(Outputs(torch.randn(2, 5)), t)
    with pytest.raises(ShapeMismatchError, match=r"\(3, 8, 2\)"):
        DualHeadLoss().setup(Outputs(torch.randn(3, 5), {"in:fc": torch.randn(3, 8, 2)}), t)
    # weighting composes with the auxiliary head
    w = WeightedLoss.wrap(dkd, scheme="teacher_correct")
    assert torch.isfinite(w(s, t, y))


# ---------------------------------------------------------------- BYOT (Zhang et al., ICCV 2019)


def _byot_ref_inputs():
    B, C, D = 4, 10, 6
    out, _, y = _ref_inputs(B, C, 3.0, 2.0, k=0)
    m1, _, _ = _ref_inputs(B, C, 2.0, 1.0, k=1)
    m2, _, _ = _ref_inputs(B, C, 1.5, 1.0, k=2)
    i = torch.arange(B, dtype=torch.float64)[:, None]
    j = torch.arange(D, dtype=torch.float64)[None, :]
    final = torch.relu(3 * torch.sin(0.9 * i + 1.3 * j) + 0.5)
    f1 = torch.relu(4 * torch.cos(1.1 * i - 0.7 * j) + 0.2)
    f2 = 2 * torch.sin(0.4 * i * j + 0.3)  # negative entries: the reference's mask matters
    return out, y, [m1, m2], [f1, f2], final


# luanyunteng/pytorch-be-your-own-teacher @ 8f052ad train.py: (1 - alpha) * (CE(m1) + CE(m2)) + alpha * (kd(m1) +
# kd(m2)) * T^2 + beta * (feature_loss(f1) + feature_loss(f2)) with T = 3, alpha = 0.1, run in float64 in a scratch
# dir on _byot_ref_inputs(): value, d/dm1[0, 0], d/dm2[3, 9], d/df2[1, 2].
BYOT_REF = {
    1e-6: (9.716609512872264, [0.07429812257434268, 0.02819848065984074, 3.5648294402457414e-06]),
    0.5: (124.87125637138638, [0.07429812257434268, 0.02819848065984074, 1.7824147201228708]),
}


@pytest.mark.parametrize("lam", sorted(BYOT_REF))
def test_byot_loss_matches_reference(lam):
    value, grads = BYOT_REF[lam]
    out, y, ms, fs, final = _byot_ref_inputs()
    ms = [m.clone().requires_grad_() for m in ms]
    fs = [f.clone().requires_grad_() for f in fs]
    out = out.clone().requires_grad_()
    loss = byot_loss(ms, fs, out, final, y, T=3.0, alpha=0.1, lam=lam)
    _close(loss, value, rel=1e-10)
    loss.backward()
    for got, want in zip([ms[0].grad[0, 0], ms[1].grad[3, 9], fs[1].grad[1, 2]], grads):
        _close(got, want, rel=1e-9, abs_=1e-12)
    assert out.grad is None  # the deepest classifier is the (detached) teacher


def test_byot_loss_by_hand_and_gradcheck():
    z, zc, f, fc, T, a, lam = [1.0, -0.5], [2.0, 0.0], [0.5, -1.0], [1.5, -2.0], 2.0, 0.3, 0.1
    ce = -math.log(_softmax(z)[1])  # label 1
    q = _softmax(zc, T)
    soft = -sum(qi * math.log(pi) for qi, pi in zip(q, _softmax(z, T))) * T * T
    hint = (0.5 - 1.5) ** 2  # second channel: both <= 0, masked out as the reference does
    got = byot_loss([torch.tensor([z])], [torch.tensor([f])], torch.tensor([zc]), torch.tensor([fc]),
                    torch.tensor([1]), T=T, alpha=a, lam=lam)
    _close(got, (1 - a) * ce + a * soft + lam * hint)
    torch.manual_seed(0)
    m = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    g = (torch.rand(3, 5, dtype=torch.float64) + 0.1).requires_grad_()
    zc, fc = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 5, dtype=torch.float64) + 0.1
    assert gradcheck(lambda a, b: byot_loss([a], [b], zc, fc, torch.tensor([0, 3, 1]), lam=0.3), (m, g))


def test_byot_module_with_resnet8x4():
    loss = BYOTLoss()
    assert not loss.needs_teacher and loss.needs_labels
    assert loss.student_taps == ("layer1", "layer2", "layer3", "in:fc")
    student = _student(loss.student_taps)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    out = student(x)
    loss.setup(out, None)
    assert [h.shape_key for h in loss.heads] == [(64, 256, (4, 4), 10), (128, 256, (2, 2), 10)]
    value = loss(out, None, y)
    heads = [h(out.features[n]) for n, h in zip(loss.stages, loss.heads)]
    want = byot_loss([h[0] for h in heads], [h[1] for h in heads], out.logits, out.features["in:fc"], y)
    _close(value, float(want.detach()), rel=1e-6)
    value.backward()
    assert student.model.fc.weight.grad is None  # the deepest classifier is only a target here
    assert float(student.model.layer1[0].conv1.weight.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in loss.heads.parameters())
    kept = loss.heads
    loss.setup(out, None)
    assert loss.heads is kept
    assert isinstance(loss.heads[0], BYOTHead) and len(list(loss.heads[0].bottleneck)) == 9


def test_byot_errors():
    with pytest.raises(ConfigError, match="alpha"):
        BYOTLoss(alpha=1.5)
    with pytest.raises(ConfigError, match="lam"):
        BYOTLoss(lam=-1.0)
    with pytest.raises(ConfigError, match="last_stage 'layer3' is also in stages"):
        BYOTLoss(stages="layer2,layer3")
    with pytest.raises(ConfigError, match="> 0"):
        BYOTLoss(T=0.0)
    s = Outputs(torch.randn(2, 10), {"layer1": torch.randn(2, 4, 6, 6), "layer2": torch.randn(2, 8, 4, 4),
                                     "layer3": torch.randn(2, 16, 4, 4), "in:fc": torch.randn(2, 16)})
    with pytest.raises(ShapeMismatchError, match=r"stage 'layer1' gives \(2, 4, 6, 6\).*multiples"):
        BYOTLoss().setup(s, None)
    with pytest.raises(RuntimeError, match="setup"):
        BYOTLoss()(s, None, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        BYOTLoss()(s, None, None)


# ---------------------------------------------------------------- BD-KD (Amara et al. 2022)


def test_bdkd_by_hand():
    s, t = [1.0, 0.0, -0.5], [0.0, 2.0, 0.5]
    ps, pt = _softmax(s), _softmax(t)
    ws = _entropy(ps) / (_entropy(ps) + _entropy(pt))
    to_s, to_t = bdkd_loss(torch.tensor([s]), torch.tensor([t]))
    _close(to_s, (1 - ws) * _kl(pt, ps) + ws * _kl(ps, pt))
    wt = 1 - ws
    _close(to_t, (1 - wt) * _kl(ps, pt) + wt * _kl(pt, ps))
    _, dml_peer = bdkd_loss(torch.tensor([s]), torch.tensor([t]), peer_balance=False)
    _close(dml_peer, float(dml_loss(torch.tensor([s]), torch.tensor([t]))[1]))
    T = 3.0
    ps, pt = _softmax(s, T), _softmax(t, T)
    ws = _entropy(ps) / (_entropy(ps) + _entropy(pt))
    _close(bdkd_loss(torch.tensor([s]), torch.tensor([t]), T=T)[0], T * T * ((1 - ws) * _kl(pt, ps) + ws * _kl(ps, pt)))
    x = torch.randn(4, 6)
    assert all(abs(float(v)) < 1e-6 for v in bdkd_loss(x, x.clone()))


def test_bdkd_gradients_hold_the_weights_constant_and_each_side_gets_its_own():
    torch.manual_seed(0)
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = entropy_balance(F.log_softmax(a, -1), F.log_softmax(b, -1))  # per-sample weights, detached

    def kl(log_p, log_q):
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    def student_term(x):  # written out with w a constant
        ls, lt = F.log_softmax(x, -1), F.log_softmax(b.detach(), -1)
        return ((1 - w) * kl(lt, ls) + w * kl(ls, lt)).mean()

    def peer_term(x):
        ls, lt = F.log_softmax(a.detach(), -1), F.log_softmax(x, -1)
        return (w * kl(ls, lt) + (1 - w) * kl(lt, ls)).mean()

    assert gradcheck(student_term, (a,)) and gradcheck(peer_term, (b,))
    to_s, to_t = bdkd_loss(a, b)
    _close(to_s, float(student_term(a).detach()), rel=1e-12)
    _close(to_t, float(peer_term(b).detach()), rel=1e-12)
    assert torch.allclose(torch.autograd.grad(to_s, a, retain_graph=True)[0],
                          torch.autograd.grad(student_term(a), a)[0], rtol=1e-12, atol=0)
    assert torch.allclose(torch.autograd.grad(to_t, b, retain_graph=True)[0],
                          torch.autograd.grad(peer_term(b), b)[0], rtol=1e-12, atol=0)
    assert torch.autograd.grad(to_s, b, allow_unused=True, retain_graph=True)[0] is None  # no gradient into the target
    assert torch.autograd.grad(to_t, a, allow_unused=True)[0] is None


def test_bdkd_module_with_zoo_peers():
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    student, peer = Student(build_model("resnet8x4")), Student(build_model("resnet8x4"))
    so, po = student(x), peer(x)
    loss = BDKDLoss()
    value = loss(so, po, y)
    to_s, to_t = bdkd_loss(so.logits, po.logits)
    _close(value, float((to_s + to_t + F.cross_entropy(po.logits, y)).detach()), rel=1e-6)
    value.backward()
    assert all(p.grad is not None for p in peer.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="no gradient"):
        loss(student(x), Outputs(torch.randn(2, 10)), y)
    with pytest.raises(ValueError, match="labels"):
        loss(so, po)
    with pytest.raises(ShapeMismatchError, match=r"\(2, 10\).*\(2, 5\)"):
        bdkd_loss(torch.randn(2, 10), torch.randn(2, 5))
    assert not BDKDLoss(peer_ce=False)(Outputs(torch.randn(2, 4)), Outputs(torch.randn(2, 4))).requires_grad


# ---------------------------------------------------------------- registry and defaults


def test_registry_and_paper_defaults():
    for name, cls in [("byot", BYOTLoss), ("bdkd", BDKDLoss), ("weighted", WeightedLoss), ("dual_head", DualHeadLoss),
                      ("binary_kl", BinaryKLLoss), ("binary_kl_norm", BinaryKLNormLoss)]:
        assert LOSSES.get(name) is cls and isinstance(build_loss(name), cls)
    b = BYOTLoss()
    assert (b.stages, b.T, b.alpha, b.lam) == (("layer1", "layer2"), 3.0, 0.1, 1e-6)
    d = DualHeadLoss()
    assert (type(d.inner), d.inner.T, d.head_kind, d.detach, d.feature_layer) == (BinaryKLNormLoss, 2.0, "linear",
                                                                                    False, "in:fc")
    w = WeightedLoss()
    assert (type(w.inner), w.inner.T, w.scheme, w.normalize, w.entropy_T) == (KDLoss, 4.0, "teacher_confidence",
                                                                               False, 4.0)
    assert (BDKDLoss().T, BDKDLoss().peer_ce) == (1.0, True)
