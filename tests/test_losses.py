"""Loss zoo: hand-computed values, gradients, reference agreement (as fixed vectors), shapes, registry, dtypes."""
import inspect
import math
import re
import types
import typing

import pytest
import torch
from torch.autograd import gradcheck

from kdkit.errors import ConfigError, ShapeMismatchError
from kdkit.losses import (
    LOSSES,
    ConvRegressor,
    DistillLoss,
    DKDLoss,
    FitNetLoss,
    KDLoss,
    NDLoss,
    build_loss,
    dkd_loss,
    dkd_parts,
    fitnet_loss,
    kd_loss,
)
from kdkit.models.outputs import Outputs
from mathref import close as _close, kl as _kl, softmax as _softmax

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


# ---------------------------------------------------------------- KD (Hinton et al. 2015)


def test_kd_two_class_by_hand():
    # T = 1, one row: teacher logits [2, 0], student logits [0, 1].
    pt1 = math.exp(2) / (math.exp(2) + 1)
    pt = [pt1, 1 - pt1]
    ps0 = 1 / (1 + math.e)
    ps = [ps0, 1 - ps0]
    expected = pt[0] * math.log(pt[0] / ps[0]) + pt[1] * math.log(pt[1] / ps[1])
    got = kd_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0]]), T=1.0)
    _close(got, expected)


def test_kd_three_class_batch_by_hand():
    # T = 2, two rows; batchmean over rows, times T^2 = 4.
    s = [[1.0, -1.0, 0.5], [0.0, 2.0, -2.0]]
    t = [[3.0, 0.0, -1.0], [0.5, 0.5, 1.0]]
    T = 2.0
    rows = []
    for srow, trow in zip(s, t):
        es = [math.exp(v / T) for v in srow]
        et = [math.exp(v / T) for v in trow]
        ps = [v / sum(es) for v in es]
        pt = [v / sum(et) for v in et]
        rows.append(sum(pt[i] * (math.log(pt[i]) - math.log(ps[i])) for i in range(3)))
    expected = (rows[0] + rows[1]) / 2 * T * T
    _close(kd_loss(torch.tensor(s), torch.tensor(t), T=T), expected)


def test_kd_zero_for_equal_logits_and_positive_otherwise():
    x = torch.randn(8, 10)
    assert abs(float(kd_loss(x, x.clone()))) < 1e-6
    assert float(kd_loss(x, torch.randn(8, 10))) > 0


def test_kd_t_squared_scaling():
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    for T in (0.5, 2.0, 4.0, 8.0):
        # KL at temperature T equals KL at T=1 of the scaled logits; the loss multiplies it by T^2.
        _close(kd_loss(s, t, T=T), T**2 * float(kd_loss(s / T, t / T, T=1.0)), rel=1e-10)


def test_kd_sequence_logits_equal_flattened():
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    _close(kd_loss(s, t, T=2.0), float(kd_loss(s.reshape(15, 11), t.reshape(15, 11), T=2.0)), rel=1e-6)


def test_kd_masked_classes_are_ignored():
    # Classes both models put at -inf (a masked vocabulary) contribute nothing and give finite gradients.
    s, t = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    s_m = torch.cat([s, torch.full((4, 2), float("-inf"), dtype=torch.float64)], dim=1).requires_grad_()
    t_m = torch.cat([t, torch.full((4, 2), float("-inf"), dtype=torch.float64)], dim=1)
    loss = kd_loss(s_m, t_m, T=2.0)
    _close(loss, float(kd_loss(s, t, T=2.0)), rel=1e-12)
    loss.backward()
    assert torch.isfinite(s_m.grad).all()


def test_kd_shape_mismatch_and_bad_temperature():
    with pytest.raises(ShapeMismatchError, match=r"\(4, 10\).*\(4, 11\)"):
        kd_loss(torch.randn(4, 10), torch.randn(4, 11))
    with pytest.raises(ConfigError):
        KDLoss(T=0.0)


# ---------------------------------------------------------------- gradients


def test_gradcheck_kd():
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, b: kd_loss(a, b, T=3.0), (s, t))


@pytest.mark.parametrize("gt_boost", [0.0, 6.0])  # p_target below / above 1/2: both ways of computing log(1 - p)
def test_gradcheck_dkd(gt_boost):
    y = torch.tensor([0, 3, 5, 3])
    boost = gt_boost * torch.nn.functional.one_hot(y, 6).double()
    s = (torch.randn(4, 6, dtype=torch.float64) + boost).requires_grad_()
    t = (torch.randn(4, 6, dtype=torch.float64) + boost).requires_grad_()
    assert gradcheck(lambda a, b: dkd_loss(a, b, y, alpha=1.5, beta=2.0, T=2.0), (s, t))


def test_dkd_finite_for_extremely_confident_models():
    # Softmax probabilities underflow in float32 here (a sum-of-probabilities TCKD would take log 0).
    y = torch.tensor([0, 1, 2])
    s = (400.0 * torch.nn.functional.one_hot(y, 5).float()).requires_grad_()
    t = -400.0 * torch.nn.functional.one_hot(y, 5).float()
    loss = dkd_loss(s, t, y, T=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    tckd, _ = dkd_parts(s.detach().double(), t.double(), y, T=1.0)
    # teacher [p_gt, 1 - p_gt] ~= [0, 1], student ~= [1, 4 e^-400]: KL ~= -log(4 e^-400) = 400 - log 4
    _close(tckd, 400.0 - math.log(4.0), rel=1e-9)


def test_gradcheck_fitnet():
    s = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(fitnet_loss, (s, t))


@pytest.mark.parametrize("s_hw, t_hw", [(2, 2), (4, 2), (2, 4)])
def test_gradcheck_conv_regressor_path(s_hw, t_hw):
    torch.manual_seed(0)
    s = torch.randn(2, 2, s_hw, s_hw, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, t_hw, t_hw, dtype=torch.float64)
    reg = ConvRegressor(s.shape, t.shape).double()
    assert gradcheck(lambda x: fitnet_loss(reg(x), t), (s,))


def test_gradcheck_linear_regressor_path():
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 7, dtype=torch.float64)
    reg = ConvRegressor(s.shape, t.shape).double()
    assert gradcheck(lambda x: fitnet_loss(reg(x), t), (s,))


# ---------------------------------------------------------------- DKD (Zhao et al. 2022)


def test_dkd_reduces_to_its_parts_and_is_linear():
    s, t = torch.randn(6, 9, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    y = torch.randint(0, 9, (6,))
    tckd, nckd = dkd_parts(s, t, y, T=3.0)
    _close(dkd_loss(s, t, y, alpha=1.0, beta=0.0, T=3.0), float(tckd), rel=1e-12)
    _close(dkd_loss(s, t, y, alpha=0.0, beta=1.0, T=3.0), float(nckd), rel=1e-12)
    for a, b in [(1.0, 8.0), (2.5, 0.5), (0.0, 3.0)]:
        _close(dkd_loss(s, t, y, alpha=a, beta=b, T=3.0), a * float(tckd) + b * float(nckd), rel=1e-12)
    assert float(tckd) >= 0 and float(nckd) >= 0


def test_tckd_by_hand():
    # One row, 3 classes, target 0, T = 2: binary KL between [p_gt, 1 - p_gt] of teacher and student, times T^2.
    s, t, T = [0.5, 1.0, -1.0], [2.0, 0.0, 1.0], 2.0
    ps = _softmax([v / T for v in s])
    pt = _softmax([v / T for v in t])
    bs, bt = [ps[0], 1 - ps[0]], [pt[0], 1 - pt[0]]
    expected_tckd = _kl(bt, bs) * T * T
    # NCKD: KL over the renormalised non-target classes {1, 2}.
    ns = _softmax([v / T for v in s[1:]])
    nt = _softmax([v / T for v in t[1:]])
    expected_nckd = _kl(nt, ns) * T * T
    tckd, nckd = dkd_parts(torch.tensor([s]), torch.tensor([t]), torch.tensor([0]), T=T)
    _close(tckd, expected_tckd)
    _close(nckd, expected_nckd)


def test_dkd_sequence_logits_equal_flattened():
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    y = torch.randint(0, 7, (2, 3))
    _close(dkd_loss(s, t, y), float(dkd_loss(s.reshape(6, 7), t.reshape(6, 7), y.reshape(6))), rel=1e-6)


def test_dkd_target_shape_checked():
    with pytest.raises(ShapeMismatchError, match="target"):
        dkd_loss(torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2]))


def test_dkd_warmup_factor():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    full = float(dkd_loss(s, t, y, alpha=1.0, beta=8.0, T=4.0))
    loss = DKDLoss()  # warmup = 20 epochs
    assert loss.needs_labels
    so, to = Outputs(s), Outputs(t)
    for epoch, factor in [(0, 0.0), (10, 0.5), (20, 1.0), (30, 1.0), (0.5, 0.025)]:
        loss.set_epoch(epoch)
        _close(loss(so, to, y), factor * full, abs_=1e-7)
    no_warmup = DKDLoss(warmup=0)
    _close(no_warmup(so, to, y), full)  # epoch 0, but no warm-up
    with pytest.raises(ValueError, match="labels"):
        no_warmup(so, to, None)


# Reference agreement. The constants below were produced by running the official implementations on the
# inputs of `_ref_inputs` in float64 (see the kdkit loss-zoo report for how): mdistiller's
# `mdistiller/distillers/DKD.py::dkd_loss` (megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259)
# and RepDistiller's `distiller_zoo/KD.py::DistillKL` (HobbitLong/RepDistiller @
# b84f547c5db6a35318d4671d7d5c4de74c822403). None of their code is in this repository.


def _ref_inputs(B, C, s_scale, t_scale):
    i = torch.arange(B, dtype=torch.float64)[:, None]
    j = torch.arange(C, dtype=torch.float64)[None, :]
    s = s_scale * (torch.sin(1.7 * i + 2.9 * j + 0.3) + 0.5 * torch.cos(0.31 * i * j + 1.1))
    t = t_scale * (torch.sin(0.7 * i - 1.9 * j + 1.0) + 0.5 * torch.cos(0.23 * i * j + 0.2))
    y = (7 * torch.arange(B) + 1) % C
    return s, t, y


# name: (B, C, s_scale, t_scale, T, alpha, beta)
REF_CASES = {
    "A": (4, 10, 2.0, 3.0, 4.0, 1.0, 8.0),
    "B": (6, 100, 3.0, 8.0, 4.0, 1.0, 8.0),
    "C": (5, 3, 1.5, 2.5, 2.0, 2.0, 0.5),
}
# mdistiller dkd_loss: tckd (alpha=1, beta=0), nckd (alpha=0, beta=1), total (case alpha, beta), and
# d total / d student_logits at [0, 0], [0, y[0]], [B-1, C-1].
MDISTILLER_DKD = {
    "A": dict(y=[1, 8, 5, 2], tckd=0.15260890411133213, nckd=3.313897789621673, total=26.663791221084715,
              grads=[-0.4449868251808689, 0.04038396896273864, 0.18245959325429018]),
    "B": dict(y=[1, 8, 15, 22, 29, 36], tckd=0.1037741806251558, nckd=14.703600749546666,
              total=117.73258017699848, grads=[-0.06508712004304534, 0.004988140161917792, 0.045901856952497176]),
    "C": dict(y=[1, 2, 0, 1, 2], tckd=0.5227991073537218, nckd=1.0189130607850712, total=1.5550547450999792,
              grads=[-0.14596300090078945, 0.17168643697861707, 0.10759390553231703]),
}
# RepDistiller DistillKL(T)(student, teacher) and its gradient at the same three entries, for T = 4 and T = 1.
REPDISTILLER_KD = {
    ("A", 4.0): (3.325005678795163, [-0.057070184426474616, 0.04038396896273865, 0.021952195028505084]),
    ("A", 1.0): (1.6021696293296328, [-0.04326147409673567, 0.008431564338006955, 0.0033972226585092893]),
    ("B", 4.0): (14.798497650551477, [-0.008176684123984151, 0.004988140161917797, 0.005666360692683072]),
    ("B", 1.0): (4.230682521551857, [-0.0023062176820564623, 0.0002906169101318596, 0.0003160435822485503]),
    ("C", 4.0): (1.60804291433911, [-0.13939106239580165, 0.1009994632742469, 0.06644078560131948]),
    ("C", 1.0): (0.8118677147468215, [-0.0905991678257479, 0.05342515365034702, 0.025582679973057153]),
}


def _grad_entries(g, y, B, C):
    return [float(g[0, 0]), float(g[0, int(y[0])]), float(g[B - 1, C - 1])]


@pytest.mark.parametrize("case", sorted(REF_CASES))
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_dkd_matches_mdistiller(case, dtype, rel):
    B, C, ss, ts, T, a, b = REF_CASES[case]
    ref = MDISTILLER_DKD[case]
    s, t, y = _ref_inputs(B, C, ss, ts)
    assert y.tolist() == ref["y"]
    s, t = s.to(dtype).requires_grad_(), t.to(dtype)
    tckd, nckd = dkd_parts(s, t, y, T=T)
    _close(tckd, ref["tckd"], rel=rel)
    _close(nckd, ref["nckd"], rel=rel)
    total = dkd_loss(s, t, y, alpha=a, beta=b, T=T)
    _close(total, ref["total"], rel=rel)
    total.backward()
    for got, want in zip(_grad_entries(s.grad, y, B, C), ref["grads"]):
        _close(got, want, rel=rel, abs_=1e-9 if dtype == torch.float64 else 1e-7)


@pytest.mark.parametrize("case, T", sorted(REPDISTILLER_KD))
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_kd_matches_repdistiller(case, T, dtype, rel):
    B, C, ss, ts = REF_CASES[case][:4]
    value, grads = REPDISTILLER_KD[(case, T)]
    s, t, y = _ref_inputs(B, C, ss, ts)
    s, t = s.to(dtype).requires_grad_(), t.to(dtype)
    loss = KDLoss(T=T)(Outputs(s), Outputs(t))
    _close(loss, value, rel=rel)
    loss.backward()
    for got, want in zip(_grad_entries(s.grad, y, B, C), grads):
        _close(got, want, rel=rel, abs_=1e-9 if dtype == torch.float64 else 1e-7)


# ---------------------------------------------------------------- FitNet (Romero et al. 2015)


@pytest.mark.parametrize(
    "s_shape, t_shape, kind",
    [
        ((2, 8, 8, 8), (2, 16, 8, 8), torch.nn.Conv2d),  # equal size: 1x1 conv (RepDistiller ConvReg)
        ((2, 8, 16, 16), (2, 16, 8, 8), torch.nn.Conv2d),  # student 2x larger: 3x3 stride 2
        ((2, 8, 4, 4), (2, 16, 8, 8), torch.nn.ConvTranspose2d),  # student 2x smaller: 4x4 transposed, stride 2
        ((2, 16, 8, 6), (2, 4, 4, 3), torch.nn.Conv2d),  # non-square, 2x larger, fewer teacher channels
        ((2, 32), (2, 64), torch.nn.Linear),  # vectors
        ((2, 5, 32), (2, 5, 48), torch.nn.Linear),  # token features [B, L, D]
    ],
)
def test_conv_regressor_shapes(s_shape, t_shape, kind):
    reg = ConvRegressor(s_shape, t_shape)
    assert isinstance(reg.proj, kind)
    assert reg(torch.randn(s_shape)).shape == torch.Size(t_shape)
    if len(s_shape) == 4 and s_shape[2:] == t_shape[2:]:
        assert reg.proj.kernel_size == (1, 1)


@pytest.mark.parametrize(
    "s_shape, t_shape",
    [((2, 8, 32, 32), (2, 16, 8, 8)), ((2, 8, 8, 8), (2, 16, 32, 32)), ((2, 8, 8, 8), (2, 16, 6, 6)),
     ((2, 64), (2, 16, 8, 8)), ((2, 16, 8, 8), (2, 64))],
)
def test_conv_regressor_rejects_other_ratios(s_shape, t_shape):
    with pytest.raises(ShapeMismatchError) as e:
        ConvRegressor(s_shape, t_shape)
    assert str(s_shape) in str(e.value) and str(t_shape) in str(e.value)


def _feats(s_shape, t_shape, s_layer="layer2", t_layer="layer2"):
    torch.manual_seed(0)
    return Outputs(torch.randn(2, 10), {s_layer: torch.randn(s_shape)}), Outputs(
        torch.randn(2, 10), {t_layer: torch.randn(t_shape)}
    )


def test_fitnet_loss_module():
    loss = FitNetLoss(student_layer="layer1", teacher_layer="layer3")
    assert loss.student_taps == ("layer1",) and loss.teacher_taps == ("layer3",)
    assert FitNetLoss.student_taps == () and not loss.needs_labels  # instance attributes, class untouched
    so, to = _feats((2, 8, 16, 16), (2, 32, 8, 8), "layer1", "layer3")
    with pytest.raises(RuntimeError, match="setup"):
        loss(so, to)
    loss.setup(so, to)
    value = loss(so, to)
    assert value.dim() == 0 and value.dtype == torch.float32
    value.backward()
    assert all(p.grad is not None for p in loss.parameters())
    _close(value, float(fitnet_loss(loss.projector(so.features["layer1"]), to.features["layer3"]).detach()), rel=1e-6)
    proj = loss.projector
    loss.setup(so, to)  # idempotent: keeps the (trained) projector
    assert loss.projector is proj


def test_fitnet_without_projector():
    so, to = _feats((2, 8, 4, 4), (2, 8, 4, 4))
    loss = FitNetLoss(projector=False)
    loss.setup(so, to)
    assert len(list(loss.parameters())) == 0
    _close(loss(so, to), float(((so.features["layer2"] - to.features["layer2"]) ** 2).mean()), rel=1e-6)

    so, to = _feats((2, 8, 4, 4), (2, 16, 4, 4))
    with pytest.raises(ShapeMismatchError) as e:
        FitNetLoss(projector=False).setup(so, to)
    msg = str(e.value)
    assert "(2, 8, 4, 4)" in msg and "(2, 16, 4, 4)" in msg and "layer2" in msg


def test_fitnet_setup_names_layers_on_bad_ratio_and_missing_taps():
    so, to = _feats((2, 8, 32, 32), (2, 16, 8, 8))
    with pytest.raises(ShapeMismatchError) as e:
        FitNetLoss().setup(so, to)
    assert "(2, 8, 32, 32)" in str(e.value) and "(2, 16, 8, 8)" in str(e.value) and "layer2" in str(e.value)
    with pytest.raises(KeyError, match="student has no tapped feature 'layer9'"):
        FitNetLoss(student_layer="layer9").setup(so, to)


def test_fitnet_loss_shape_mismatch():
    with pytest.raises(ShapeMismatchError, match=r"\(2, 3\).*\(2, 4\)"):
        fitnet_loss(torch.randn(2, 3), torch.randn(2, 4))


# ---------------------------------------------------------------- registry and signatures


def test_registry_build_and_unknown():
    loss = build_loss("kd", T=2.0)
    assert isinstance(loss, KDLoss) and loss.T == 2.0
    assert isinstance(build_loss("dkd", beta=2.0), DKDLoss)
    assert isinstance(build_loss("fitnet"), FitNetLoss)
    with pytest.raises(KeyError) as e:
        build_loss("hinton")
    for name in ("kd", "dkd", "fitnet"):
        assert name in str(e.value)
    with pytest.raises(ConfigError, match="temperature"):
        build_loss("kd", temperature=2.0)


def _base_types(tp) -> set:
    """The plain types an option annotation allows: Annotated[float, Range(...)] -> float, Literal["a"] -> str,
    X | None -> X and NoneType."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _base_types(args[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*map(_base_types, args))
    if origin is typing.Literal:
        return {type(a) for a in args}
    return {tp}


@pytest.mark.parametrize("name", LOSSES.names())
def test_loss_signatures_are_simple_keyword_options(name):
    """Every registered loss: a cited docstring, and keyword options whose annotations declare a simple type with its
    range or choices, as the recipe validator reads them; every default is an allowed value."""
    from kdkit.config import coerce, describe_type, loss_params

    cls = LOSSES.get(name)
    assert issubclass(cls, DistillLoss)
    assert cls.__doc__ and re.search(r"\b(19|20)\d\d\b", cls.__doc__), f"{name}: docstring must cite its paper"
    params = inspect.signature(cls).parameters
    declared = loss_params(cls)
    assert list(declared) == list(params)
    for p in params.values():
        tp = declared[p.name]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, (name, p)
        assert _base_types(tp) <= {int, float, str, bool, type(None)}, (name, p, tp)
        assert p.default is not inspect.Parameter.empty and coerce(p.default, tp, p.name) == p.default, (name, p)
        assert describe_type(tp), (name, p)
    cls()  # defaults build


def test_each_option_range_is_refused_by_the_recipe_check_and_the_constructor():
    """One declaration serves both: `validate_losses` (a recipe, before any work) and the constructor (Python)."""
    from kdkit.config import validate_losses

    for name, option, value, allowed in [("kd", "T", 0, "a number > 0"), ("kd", "T", -4, "a number > 0"),
                                         ("dkd", "beta", -8, "a number >= 0"), ("dkd", "warmup", 1.5, "an integer"),
                                         ("jsd", "beta", 2, "a number >= 0 and <= 1"),
                                         ("token_kd", "divergence", "foo", "one of 'fkl', 'rkl', 'jsd'"),
                                         ("token_kd", "skew", 1, "a number >= 0 and < 1"),
                                         ("crd", "num_samples", 1, "an integer >= 2"),
                                         ("nd", "online_epochs", 0, "a number > 0"),
                                         ("taid", "t_end", 0, "a number > 0 and <= 1"),
                                         ("adakd", "score", "loss", "one of 'hellinger', 'divergence'"),
                                         ("weighted", "scheme", "x", "one of 'teacher_confidence'")]:
        shown = repr(value) if isinstance(value, str) else value
        with pytest.raises(ConfigError, match=re.escape(f"losses.{name}.{option}={shown} is not allowed: "
                                                        f"expected {allowed}")):
            validate_losses({name: {option: value}})
        with pytest.raises(ConfigError, match=re.escape(f"{option}={shown} is not allowed: expected {allowed}")):
            build_loss(name, **{option: value})
    entry = {"kd": {"T": 2, "weight": 1}}
    validate_losses(entry)
    assert entry["kd"]["T"] == 2.0 and isinstance(entry["kd"]["T"], float)
    assert NDLoss(online_epochs=math.inf).online_epochs == math.inf  # the one option where infinity means something


def test_paper_defaults():
    assert KDLoss().T == 4.0
    d = DKDLoss()
    assert (d.alpha, d.beta, d.T, d.warmup) == (1.0, 8.0, 4.0, 20)


# ---------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_float32(dtype):
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 20) * 3, torch.randn(8, 20) * 3, torch.randint(0, 20, (8,))
    sl, tl = s.to(dtype), t.to(dtype)
    for fn in (lambda a, b: kd_loss(a, b), lambda a, b: dkd_loss(a, b, y)):
        low = fn(sl, tl)
        assert low.dtype == torch.float32
        # Identical to the float32 computation on the rounded inputs, and close to the unrounded one.
        _close(low, float(fn(sl.float(), tl.float())), rel=1e-6)
        _close(low, float(fn(s, t)), rel=5e-2)
    fs, ft = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    low = fitnet_loss(fs.to(dtype), ft.to(dtype))
    assert low.dtype == torch.float32
    _close(low, float(fitnet_loss(fs, ft)), rel=2e-2)
