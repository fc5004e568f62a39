"""V_kD (orthogonal projection + standardised teacher, smooth L1) and ND (norm and direction towards the teacher's
class centres): hand-computed values, gradchecks, agreement with the official code as fixed vectors, the class
centres (precomputed, from a file, accumulated online), checkpointed state, and clear errors."""
import copy
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.autograd import gradcheck

from kdkit.errors import ConfigError, ShapeMismatchError
from kdkit.losses import (LOSSES, NDLoss, NDProjector, VkDLoss, build_loss, load_class_centres, nd_loss,
                          orthogonal_projector, pool_features, save_class_centres, standardize_features,
                          teacher_class_centres, vkd_loss)
from kdkit.models import Student, Teacher, build_model
from kdkit.models.outputs import Outputs

from mathref import close

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _all_close(got, want, rel=1e-5, abs_=1e-8):
    got = got.detach().flatten().tolist() if isinstance(got, torch.Tensor) else list(got)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        close(g, w, rel, abs_)


def _smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def _standardize(row, eps=1e-5):
    m = sum(row) / len(row)
    var = sum((v - m) ** 2 for v in row) / len(row)
    return [(v - m) / math.sqrt(var + eps) for v in row]


# ================================================================ V_kD (Miles et al. 2024)


def test_standardize_and_pool_by_hand():
    x = [[1.0, 2.0, 6.0], [-3.0, 0.0, 3.0]]
    _all_close(standardize_features(torch.tensor(x, dtype=torch.float64)), _standardize(x[0]) + _standardize(x[1]),
               rel=1e-12)
    # equals F.layer_norm without affine, as the official code
    y = torch.randn(4, 7, dtype=torch.float64)
    assert torch.allclose(standardize_features(y), torch.nn.functional.layer_norm(y, (7,)), atol=1e-12)
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])  # [1, N=2, D=2] -> token mean [2, 4]
    _all_close(pool_features(tokens), [2.0, 4.0])
    conv = torch.arange(8.0).reshape(1, 2, 2, 2)  # channel 0: 0..3 -> 1.5, channel 1: 4..7 -> 5.5
    _all_close(pool_features(conv), [1.5, 5.5])
    flat = torch.randn(3, 5)
    assert pool_features(flat) is flat


def test_vkd_loss_by_hand():
    s = [[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]]
    t = [[1.0, 2.0, 6.0], [4.0, 4.0, 1.0]]
    nt = [_standardize(r) for r in t]
    expected = sum(_smooth_l1(a, b) for rs, rt in zip(s, nt) for a, b in zip(rs, rt)) / 6
    close(vkd_loss(torch.tensor(s), torch.tensor(t)), expected, rel=1e-6)
    # normalize="none": plain smooth L1 of the raw features
    raw = sum(_smooth_l1(a, b) for rs, rt in zip(s, t) for a, b in zip(rs, rt)) / 6
    close(vkd_loss(torch.tensor(s), torch.tensor(t), normalize="none"), raw, rel=1e-6)
    # the loss is 0 exactly when the projected student equals the standardised teacher
    tt = torch.randn(4, 8)
    close(vkd_loss(standardize_features(tt), tt), 0.0, abs_=1e-7)


@pytest.mark.parametrize("d_s, d_t", [(6, 4), (4, 6), (5, 5)])
def test_orthogonal_projector_stays_on_the_stiefel_manifold(d_s, d_t):
    torch.manual_seed(0)
    proj = orthogonal_projector(d_s, d_t)
    opt = torch.optim.SGD(proj.parameters(), lr=0.5)
    for _ in range(3):  # still orthogonal after optimiser steps
        w = proj.weight
        gram = w @ w.T if d_t <= d_s else w.T @ w  # orthonormal rows / columns
        assert torch.allclose(gram, torch.eye(min(d_s, d_t)), atol=1e-5)
        loss = vkd_loss(proj(torch.randn(8, d_s)), torch.randn(8, d_t))
        opt.zero_grad()
        loss.backward()
        opt.step()
    if d_s <= d_t:  # an isometry: norms are kept
        x = torch.randn(5, d_s)
        assert torch.allclose(proj(x).norm(dim=1), x.norm(dim=1), atol=1e-5)


# Official V_kD (roymiles/vkd @ 4b48050fe: train.py `orthogonal(nn.Linear(d_s, d_t, bias=False))`, engine.py
# lines 88-99: student tokens mean(1) -> projector, teacher conv map pooled -> F.layer_norm, F.smooth_l1_loss,
# alpha = 1), run on the inputs of `_vkd_inputs` with the projector's weight assigned `_fixed_q(d_s, d_t)`.
# (d_s, d_t, dtype) -> (loss, d loss / d tokens[0, 0, :], d loss / d tokens[2, 4, -1])
OFFICIAL_VKD = {
    (6, 4, torch.float64): (0.9159006883885062, [-0.008924622397518444, 0.013175422711852075, 0.021783174254887013,
                                                 0.008491768760575084, 0.0004328536369433561, 0.005866232079647209],
                            -0.019593751574583096),
    (6, 4, torch.float32): (0.9159005284309387, [-0.008924620226025581, 0.013175422325730324, 0.02178317680954933,
                                                 0.008491767570376396, 0.0004328526556491852, 0.005866233259439468],
                            -0.019593754783272743),
    (4, 6, torch.float64): (0.47323992852412317, [0.009565423674408357, 0.008309896434451122, 0.003571404186644314,
                                                  0.0033468967178288183], 0.001601393708417155),
    (4, 6, torch.float32): (0.4732398986816406, [0.009565422311425209, 0.008309895172715187, 0.0035714036785066128,
                                                 0.0033468962647020817], 0.0016013924032449722),
    (5, 5, torch.float64): (0.7714902871319633, [0.002835101566207544, 0.02174320811985987, -0.004698166676651861,
                                                 0.002449799204130338, 0.0074842974864513055], -0.009764762968561026),
    (5, 5, torch.float32): (0.7714902758598328, [0.0028351026121526957, 0.021743208169937134, -0.004698168486356735,
                                                 0.0024497993290424347, 0.0074843005277216434], -0.00976476352661848),
}


def _dct(n):
    """Orthonormal DCT-II basis, rows = basis vectors."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def _fixed_q(d_s, d_t):
    m = _dct(max(d_s, d_t))
    return m[:d_t, :d_s] if d_t <= d_s else m[:d_s, :d_t].T.contiguous()


def _vkd_inputs(d_s, d_t, dtype):
    g = torch.Generator().manual_seed(11 + d_s * 10 + d_t)
    tokens = torch.randn(3, 5, d_s, generator=g, dtype=torch.float64) * 2 + 0.5  # student ViT tokens [B, N, D_s]
    conv = torch.randn(3, d_t, 2, 2, generator=g, dtype=torch.float64) * 3 - 1  # teacher conv map [B, C, H, W]
    return tokens.to(dtype), conv.to(dtype)


@pytest.mark.parametrize("key", sorted(OFFICIAL_VKD, key=str))
def test_vkd_matches_official(key):
    d_s, d_t, dtype = key
    value, grad_row, grad_last = OFFICIAL_VKD[key]
    tokens, conv = _vkd_inputs(d_s, d_t, dtype)
    tokens.requires_grad_()
    so, to = Outputs(None, {"blocks": tokens}), Outputs(None, {"stage4": conv})
    loss = VkDLoss(student_layer="blocks", teacher_layer="stage4")
    loss.setup(so, to)
    loss.to(dtype)
    loss.projector.weight = _fixed_q(d_s, d_t).to(dtype)  # assignment keeps the parametrisation
    assert torch.allclose(loss.projector.weight.double(), _fixed_q(d_s, d_t), atol=1e-6)
    value_got = loss(so, to)
    rel = 1e-10 if dtype == torch.float64 else 1e-5
    close(value_got, value, rel=rel)
    value_got.backward()
    _all_close(tokens.grad[0, 0], grad_row, rel=rel, abs_=1e-12 if dtype == torch.float64 else 1e-7)
    close(tokens.grad[2, 4, -1], grad_last, rel=rel, abs_=1e-12 if dtype == torch.float64 else 1e-7)


def test_vkd_gradcheck():
    torch.manual_seed(0)
    proj = orthogonal_projector(4, 3).double()
    s = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 3, dtype=torch.float64) * 2
    # smooth L1 has a kink at |diff| = 1 only in its second derivative: the first is continuous
    assert gradcheck(lambda x: vkd_loss(proj(x), t), (s,))
    # and through the parametrisation to its unconstrained parameter (what the optimiser trains)
    orth = proj.parametrizations.weight[0]
    w = torch.randn_like(proj.parametrizations.weight.original).mul_(0.3).requires_grad_()
    assert gradcheck(lambda p: vkd_loss(torch.nn.functional.linear(s.detach(), orth(p)), t), (w,))


def test_vkd_module_on_zoo_models_and_state(tmp_path):
    torch.manual_seed(0)
    student = Student(build_model("resnet8x4"))
    teacher = Teacher(build_model("resnet20"))
    loss = build_loss("vkd")
    student.add_taps(loss.student_taps)
    teacher.add_taps(loss.teacher_taps)
    x = torch.randn(2, 3, 32, 32)
    so, to = student(x), teacher(x)
    loss.setup(so, to)
    assert (loss.projector.in_features, loss.projector.out_features) == (256, 64)
    value = loss(so, to)
    assert value.dim() == 0 and value.dtype == torch.float32 and value > 0
    value.backward()
    assert loss.projector.parametrizations.weight.original.grad is not None
    assert student.model.conv1.weight.grad is not None
    proj = loss.projector
    loss.setup(so, to)  # idempotent: keeps the trained projector
    assert loss.projector is proj
    # the state survives a safetensors round trip (as in kdkit's checkpoints) into a freshly set-up loss
    f = str(tmp_path / "losses.safetensors")
    save_file({k: v.contiguous() for k, v in loss.state_dict().items()}, f)
    fresh = VkDLoss()
    fresh.setup(so, to)
    fresh.load_state_dict(load_file(f))
    feats = so.features["in:fc"].detach()
    assert torch.allclose(fresh.project(feats), loss.project(feats))


def test_vkd_errors():
    with pytest.raises(ConfigError, match="normalize"):
        VkDLoss(normalize="whiten")
    with pytest.raises(ConfigError, match="normalize"):
        vkd_loss(torch.randn(2, 3), torch.randn(2, 3), normalize="batch")
    with pytest.raises(ShapeMismatchError, match=r"\(2, 3\).*\(2, 4\)"):
        vkd_loss(torch.randn(2, 3), torch.randn(2, 4))
    loss = VkDLoss(student_layer="a", teacher_layer="b")
    so, to = Outputs(None, {"a": torch.randn(2, 5)}), Outputs(None, {"b": torch.randn(2, 7)})
    with pytest.raises(RuntimeError, match="setup"):
        loss(so, to)
    with pytest.raises(ValueError, match="teacher"):
        loss.setup(so, None)
    loss.setup(so, to)
    with pytest.raises(ShapeMismatchError, match="student layer 'a' has width 6"):
        loss(Outputs(None, {"a": torch.randn(2, 6)}), to)
    with pytest.raises(ShapeMismatchError, match=r"teacher layer 'b'.*\(2, 8\)"):
        loss(so, Outputs(None, {"b": torch.randn(2, 8)}))
    with pytest.raises(ShapeMismatchError, match=r"student layer 'a' gives \(2, 1, 1, 1, 5\)"):
        loss(Outputs(None, {"a": torch.randn(2, 1, 1, 1, 5)}), to)
    with pytest.raises(ShapeMismatchError, match="batch sizes 2 and 3"):
        loss(so, Outputs(None, {"b": torch.randn(3, 7)}))
    with pytest.raises(KeyError, match="student has no tapped feature 'a'"):
        loss(Outputs(None, {}), to)


# ================================================================ ND (Wang et al. 2023)


def _nd_by_hand(s, t, centres, labels):
    def norm(v):
        return math.sqrt(sum(x * x for x in v))

    total = 0.0
    for si, ti, y in zip(s, t, labels):
        c = centres[y]
        e = [x / norm(c) for x in c]
        total += 1 - sum(a * b for a, b in zip(si, e)) / max(norm(si), norm(ti))
    return total / len(s)


def test_nd_by_hand():
    centres = [[2.0, 0.0], [0.0, -3.0], [1.0, 1.0]]
    s = [[3.0, 4.0], [0.5, -0.5], [-1.0, 2.0]]
    t = [[1.0, 1.0], [0.0, 2.0], [3.0, 0.0]]
    y = [0, 1, 2]
    # row 0: e = [1, 0], s.e = 3, max(5, sqrt2) = 5 -> 1 - 0.6 = 0.4
    # row 1: e = [0, -1], s.e = 0.5, max(sqrt(0.5), 2) = 2 -> 0.75
    # row 2: e = [1, 1]/sqrt2, s.e = 1/sqrt2, max(sqrt5, 3) = 3 -> 1 - 1/(3 sqrt2)
    expected = (0.4 + 0.75 + 1 - 1 / (3 * math.sqrt(2))) / 3
    assert _nd_by_hand(s, t, centres, y) == pytest.approx(expected, rel=1e-12)
    close(nd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(centres), torch.tensor(y)), expected, rel=1e-6)
    # only the centre's direction counts; a student along it with a norm past the teacher's gives 0
    e = torch.tensor([[0.6, 0.8]])
    close(nd_loss(7 * e, 2 * e, torch.tensor([[3.0, 4.0]]) * 10, torch.tensor([0])), 0.0, abs_=1e-7)
    # half the teacher's norm along the centre: 1 - 1/2
    close(nd_loss(1 * e, 2 * e, torch.tensor([[3.0, 4.0]]), torch.tensor([0])), 0.5, rel=1e-6)


# Official DirectNormLoss (WangYZ1608/Knowledge-Distillation-via-ND @ fc6f3f9, CIFAR/utils.py; .cuda() dropped,
# nd_loss_factor = 1) on `_nd_inputs`, centres passed as its T_EMB dict; float64 with float64 centres.
# dtype -> (loss, d loss / d s[0], d loss / d s[1]); row 1's student norm exceeds the teacher's.
OFFICIAL_ND = {
    torch.float64: (0.7738815211336206,
                    [-0.010446786110958757, 0.005260776789528913, 0.013036068575401634, -0.025096540192941566,
                     -0.04920899254187155],
                    [0.0030628065896185232, -0.004614308134240827, 0.006795306823486483, 0.01894044297043819,
                     -0.00920054406102285]),
    torch.float32: (0.7738814949989319,
                    [-0.010446785017848015, 0.00526077626273036, 0.013036067597568035, -0.025096537545323372,
                     -0.04920898750424385],
                    [0.0030628065578639507, -0.004614308476448059, 0.0067953066900372505, 0.01894044317305088,
                     -0.009200544096529484]),
}


def _nd_inputs(dtype):
    g = torch.Generator().manual_seed(7)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64)
    s[1] *= 3.0
    t = torch.randn(6, 5, generator=g, dtype=torch.float64) * 1.5
    centres = torch.randn(4, 5, generator=g, dtype=torch.float64)
    return s.to(dtype), t.to(dtype), centres.to(dtype), torch.tensor([0, 3, 1, 1, 2, 3])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nd_matches_official(dtype, tmp_path):
    value, g0, g1 = OFFICIAL_ND[dtype]
    s, t, centres, y = _nd_inputs(dtype)
    s.requires_grad_()
    rel = 1e-10 if dtype == torch.float64 else 1e-5
    got = nd_loss(s, t, centres, y)
    close(got, value, rel=rel)
    got.backward()
    _all_close(s.grad[0], g0, rel=rel, abs_=1e-12)
    _all_close(s.grad[1], g1, rel=rel, abs_=1e-12)
    # the module with centres from a file gives the same
    s2 = s.detach().clone().requires_grad_()
    path = save_class_centres(tmp_path / "c.safetensors", centres)
    loss = NDLoss(student_layer="e", teacher_layer="e", centres=str(path))
    so, to = Outputs(None, {"e": s2}), Outputs(torch.zeros(6, 4), {"e": t})
    loss.setup(so, to)
    close(loss(so, to, y), value, rel=1e-5 if dtype == torch.float64 else rel)  # file centres are float32


def test_nd_gradcheck():
    s, t, centres, y = _nd_inputs(torch.float64)
    s.requires_grad_()
    assert gradcheck(lambda x: nd_loss(x, t, centres, y), (s,))


# ---------------------------------------------------------------- class centres


class _Tiny(nn.Module):
    """A small classifier with a BatchNorm (so eval mode matters) and an `fc` whose input is the embedding."""

    def __init__(self, d_in=6, d=3, n_cls=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, d), nn.BatchNorm1d(d), nn.Tanh())
        self.fc = nn.Linear(d, n_cls)

    def forward(self, x):
        return self.fc(self.body(x))


def _centre_data(n=23, d_in=6, n_cls=3):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, d_in, generator=g)
    y = torch.arange(n) % n_cls
    return x, y[torch.randperm(n, generator=g)]


def _means_by_hand(emb, y, n_cls):
    return [[sum(float(emb[i, j]) for i in range(len(y)) if y[i] == k) / int((y == k).sum())
             for j in range(emb.shape[1])] for k in range(n_cls)]


def test_teacher_class_centres_ways_of_calling():
    model = _Tiny()
    model.train()
    x, y = _centre_data()
    with torch.no_grad():
        model.eval()
        emb = model.body(x)
        model.train()
    want = _means_by_hand(emb, y, 3)
    flat = [v for row in want for v in row]
    got = teacher_class_centres(model, x, y, batch_size=5)
    assert got.shape == (3, 3) and got.dtype == torch.float32
    _all_close(got, flat, rel=1e-6, abs_=1e-7)
    assert model.training and all(not m._forward_hooks for m in model.modules())  # mode and hooks restored
    # a loader of (images, labels) batches, a kdkit Teacher, a callable returning embeddings
    loader = [(x[i:i + 4], y[i:i + 4]) for i in range(0, len(y), 4)]
    _all_close(teacher_class_centres(model, loader), flat, rel=1e-6, abs_=1e-7)
    _all_close(teacher_class_centres(Teacher(copy.deepcopy(model)), loader), flat, rel=1e-6, abs_=1e-7)
    model.eval()
    _all_close(teacher_class_centres(lambda b: model.body(b), x, y), flat, rel=1e-6, abs_=1e-7)
    # num_classes larger than the labels seen: a class without images is an error
    with pytest.raises(ValueError, match=r"class\(es\) \[3\]"):
        teacher_class_centres(model, x, y, num_classes=4)
    with pytest.raises(ValueError, match="labels"):
        teacher_class_centres(model, x)
    with pytest.raises(ValueError, match="labels only with an image tensor"):
        teacher_class_centres(model, loader, y)
    with pytest.raises(ShapeMismatchError, match="'body' must be a \\[B, D\\] embedding"):
        teacher_class_centres(lambda b: torch.zeros(len(b), 2, 2), x, y, tap="body")


def _nd_outputs(teacher, x, student_emb):
    return Outputs(None, {"in:fc": student_emb}), teacher(x)


def test_nd_online_centres_equal_precomputed_after_one_epoch():
    teacher = Teacher(_Tiny(), taps=["in:fc"])
    x, y = _centre_data()
    precomputed = teacher_class_centres(teacher, x, y)
    loss = NDLoss()
    g = torch.Generator().manual_seed(1)
    s_all = torch.randn(len(y), 3, generator=g)
    so, to = _nd_outputs(teacher, x[:2], s_all[:2])
    loss.setup(so, to)
    assert loss.class_sum.shape == (3, 3) and loss.class_sum.dtype == torch.float64
    assert loss.needs_labels and loss.online
    loss.train()
    order = torch.randperm(len(y), generator=g)
    batches = [order[i:i + 5] for i in range(0, len(y), 5)]
    for step, idx in enumerate(batches):
        loss.set_epoch(step / len(batches))
        so, to = _nd_outputs(teacher, x[idx], s_all[idx])
        value = loss(so, to, y[idx])
        if step == 0:
            # the first batch: its own class means are the centres
            first = torch.stack([to.features["in:fc"][y[idx] == k].mean(0) if (y[idx] == k).any()
                                 else torch.zeros(3) for k in range(3)])
            close(value, float(nd_loss(s_all[idx], to.features["in:fc"], first, y[idx])), rel=1e-6)
    assert loss.class_count.tolist() == [int((y == k).sum()) for k in range(3)]
    assert torch.allclose(loss.current_centres(), precomputed, atol=1e-6)
    # after online_epochs (1) the centres are frozen
    loss.set_epoch(1.0)
    so, to = _nd_outputs(teacher, x[:5] * 3, s_all[:5])
    loss(so, to, y[:5])
    assert torch.allclose(loss.current_centres(), precomputed, atol=1e-6)
    close(loss(so, to, y[:5]), float(nd_loss(s_all[:5], to.features["in:fc"], precomputed, y[:5])), rel=1e-5)


def test_nd_online_state_is_checkpointed(tmp_path):
    teacher = Teacher(_Tiny(), taps=["in:fc"])
    x, y = _centre_data()
    loss = NDLoss()
    so, to = _nd_outputs(teacher, x[:8], torch.randn(8, 3))
    loss.setup(so, to)
    loss.train()
    loss(so, to, y[:8])
    f = str(tmp_path / "losses.safetensors")
    save_file({k: v.contiguous() for k, v in loss.state_dict().items()}, f)
    fresh = NDLoss()
    fresh.setup(so, to)
    fresh.load_state_dict(load_file(f))
    assert torch.equal(fresh.class_sum, loss.class_sum) and torch.equal(fresh.class_count, loss.class_count)
    # eval mode never accumulates; an unseen class is a clear error
    fresh.eval()
    before = fresh.class_count.clone()
    fresh(so, to, y[:8])
    assert torch.equal(fresh.class_count, before)
    empty = NDLoss()
    empty.setup(so, to)
    empty.eval()
    with pytest.raises(RuntimeError, match=r"class\(es\) \[0, 1, 2\]"):
        empty(so, to, y[:8])


def test_nd_projector_when_widths_differ():
    torch.manual_seed(0)
    so = Outputs(None, {"in:fc": torch.randn(4, 6, requires_grad=True)})
    to = Outputs(torch.randn(4, 3), {"in:fc": torch.randn(4, 2)})
    loss = NDLoss()
    loss.setup(so, to)
    assert isinstance(loss.projector, NDProjector)
    bn, drop, lin = loss.projector
    assert isinstance(bn, nn.BatchNorm1d) and drop.p == 0.5 and (lin.in_features, lin.out_features) == (6, 2)
    assert torch.equal(lin.bias, torch.zeros(2)) and torch.equal(bn.weight, torch.ones(6))
    loss.eval()  # deterministic (no dropout, BN running stats) to compare with the function
    loss.class_sum.copy_(torch.randn(3, 2, dtype=torch.float64))
    loss.class_count.fill_(2)
    value = loss(so, to, torch.tensor([0, 1, 2, 1]))
    want = nd_loss(loss.projector(so.features["in:fc"]), to.features["in:fc"], loss.current_centres(),
                   torch.tensor([0, 1, 2, 1]))
    close(value, float(want.detach()), rel=1e-6)
    value.backward()
    assert lin.weight.grad is not None and so.features["in:fc"].grad is not None
    # equal widths: no projector (the official code projects only when they differ)
    same = NDLoss()
    same.setup(Outputs(None, {"in:fc": torch.randn(4, 2)}), to)
    assert isinstance(same.projector, nn.Identity)
    with pytest.raises(ShapeMismatchError, match=r"projector=False.*'in:fc' gives 6.*gives 2"):
        NDLoss(projector=False).setup(so, to)


def test_nd_on_zoo_models():
    torch.manual_seed(0)
    student, teacher = Student(build_model("resnet8x4")), Teacher(build_model("resnet32x4"))
    loss = build_loss("nd")
    student.add_taps(loss.student_taps)
    teacher.add_taps(loss.teacher_taps)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    so, to = student(x), teacher(x)
    loss.setup(so, to)
    assert isinstance(loss.projector, nn.Identity) and loss.class_sum.shape == (10, 256)  # 10 classes from logits
    loss.train()
    value = loss(so, to, y)
    assert value.dtype == torch.float32 and 0 < float(value.detach()) < 2
    value.backward()
    assert student.model.conv1.weight.grad is not None


def test_nd_errors(tmp_path):
    with pytest.raises(ConfigError, match="online_epochs"):
        NDLoss(online_epochs=0.0)
    with pytest.raises(ConfigError, match="num_classes"):
        NDLoss(num_classes=-1)
    with pytest.raises(ConfigError, match=r"centres='.* is not allowed: expected an existing file"):
        NDLoss(centres=str(tmp_path / "missing.safetensors"))  # as the recipe check refuses it, before any work
    with pytest.raises(ConfigError, match="does not exist"):
        load_class_centres(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a readable safetensors"):
        NDLoss(centres=str(bad))
    path = save_class_centres(tmp_path / "c.safetensors", torch.randn(3, 4))
    assert load_class_centres(path).shape == (3, 4)
    with pytest.raises(ConfigError, match="3 classes, but num_classes=5"):
        NDLoss(centres=str(path), num_classes=5)
    so, to = Outputs(None, {"in:fc": torch.randn(2, 4)}), Outputs(torch.randn(2, 3), {"in:fc": torch.randn(2, 5)})
    with pytest.raises(ShapeMismatchError, match="width 4.*gives width 5"):
        NDLoss(centres=str(path)).setup(so, to)
    with pytest.raises(ConfigError, match="set num_classes"):
        NDLoss().setup(so, Outputs(None, {"in:fc": torch.randn(2, 5)}))
    loss = NDLoss()
    with pytest.raises(RuntimeError, match="setup"):
        loss(so, to, torch.tensor([0, 1]))
    loss.setup(so, to)
    loss.train()
    with pytest.raises(ValueError, match="labels"):
        loss(so, to, None)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        loss(so, to, torch.tensor([0, 3]))
    assert int(loss.class_count.sum()) == 0  # a rejected batch is not accumulated
    with pytest.raises(ShapeMismatchError, match=r"'in:fc' gives \(2, 4, 1, 1\)"):
        loss(Outputs(None, {"in:fc": torch.randn(2, 4, 1, 1)}), to, torch.tensor([0, 1]))
    with pytest.raises(ShapeMismatchError, match="3 labels for a batch of 2"):
        loss(so, to, torch.tensor([0, 1, 2]))
    with pytest.raises(ShapeMismatchError, match=r"\(2, 4\).*\(2, 5\)"):
        nd_loss(torch.randn(2, 4), torch.randn(2, 5), torch.randn(3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        nd_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 5]))


def test_registered_with_paper_defaults():
    assert "vkd" in LOSSES.names() and "nd" in LOSSES.names()
    v = build_loss("vkd")
    assert (v.student_layer, v.teacher_layer, v.normalize) == ("in:fc", "in:fc", "standardize")
    n = build_loss("nd")
    assert (n.student_layer, n.teacher_layer, n.centres_path, n.online_epochs, n.use_projector) == (
        "in:fc", "in:fc", "", 1.0, True)
