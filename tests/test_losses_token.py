"""Token-level LM divergences (`kdkit.losses.token`) and the adaptive token losses (`kdkit.losses.token_adaptive`).

Hand-computed values on V = 3, agreement with TRL's GKD loss and Liger's JSD loss, float64 gradchecks, masking and
weights, sparse teacher signals, the registered `token_kd` / `taid` / `adakd` modules, TAID's update of t against
the official rule written out, and AdaKD's token selection, temperatures and ratio schedule against the official
rules written out.
"""
import ast
import functools
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck

from kdkit.config import validate_losses
from kdkit.errors import ConfigError, ShapeMismatchError
from kdkit.losses import LOSSES, build_loss
from kdkit.losses.token import (DIVERGENCES, TokenKDLoss, divergence_from_logprobs, divergence_per_token,
                                sparse_to_dense_logprobs, token_kd_loss)
from kdkit.losses.token_adaptive import AdaKDLoss, TAIDLoss, adakd_per_token, hardest_tokens
from kdkit.models.outputs import Outputs

from mathref import close, kl, softmax

P = [0.7, 0.2, 0.1]  # teacher
Q = [0.5, 0.3, 0.2]  # student


def _logits(p):
    return torch.tensor([math.log(x) for x in p], dtype=torch.float64)


def _mix(a, b, w):
    return [w * x + (1 - w) * y for x, y in zip(a, b)]


def _expected(divergence, p, q, beta=0.5, skew=0.1):
    """The divergences written out in Python floats."""
    if divergence == "fkl":
        return kl(p, q)
    if divergence == "rkl":
        return kl(q, p)
    if divergence == "jsd":
        if beta == 0:
            return kl(p, q)
        if beta == 1:
            return kl(q, p)
        m = _mix(p, q, beta)
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if divergence == "skl":
        return kl(p, _mix(p, q, skew))
    if divergence == "srkl":
        return kl(q, _mix(q, p, skew))
    if divergence == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    raise AssertionError(divergence)


def _random(b=2, length=7, v=11, seed=0, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, length, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(b, length, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[0, :2] = -100
    labels[-1, -1] = -100
    return s, t, labels


# ---------------------------------------------------------------- the divergences, by hand


@pytest.mark.parametrize("divergence,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0),
                                             ("jsd", 0.3), ("skl", 0.5), ("srkl", 0.5), ("tvd", 0.5)])
def test_divergences_match_hand_computed_values(divergence, beta):
    got = divergence_per_token(_logits(Q), _logits(P), divergence, beta=beta, skew=0.1)
    close(got, _expected(divergence, P, Q, beta=beta, skew=0.1), rel=1e-12)


def test_jsd_ends_are_the_two_kls_and_the_middle_is_symmetric():
    close(divergence_per_token(_logits(Q), _logits(P), "jsd", beta=0.0), kl(P, Q), rel=1e-12)
    close(divergence_per_token(_logits(Q), _logits(P), "jsd", beta=1.0), kl(Q, P), rel=1e-12)
    m = [(x + y) / 2 for x, y in zip(P, Q)]
    close(divergence_per_token(_logits(Q), _logits(P), "jsd", beta=0.5), 0.5 * kl(P, m) + 0.5 * kl(Q, m), rel=1e-12)
    assert float(divergence_per_token(_logits(P), _logits(Q), "jsd", beta=0.5)) == pytest.approx(
        float(divergence_per_token(_logits(Q), _logits(P), "jsd", beta=0.5)), rel=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_temperature_softens_both_sides_and_scales_by_T_squared(divergence):
    zs, zt = [1.0, -0.5, 2.0], [3.0, 0.0, -1.0]
    T = 2.0
    want = T * T * _expected(divergence, softmax(zt, T), softmax(zs, T), beta=0.5, skew=0.1)
    got = divergence_per_token(torch.tensor(zs, dtype=torch.float64), torch.tensor(zt, dtype=torch.float64),
                               divergence, T=T)
    close(got, want, rel=1e-12)


def test_low_precision_computes_in_float32_and_float64_stays_float64():
    s, t, _ = _random(dtype=torch.bfloat16)
    assert divergence_per_token(s, t).dtype == torch.float32
    s, t, _ = _random(dtype=torch.float64)
    assert divergence_per_token(s, t).dtype == torch.float64


def test_bad_divergence_arguments_fail_with_the_choices():
    s, t, _ = _random()
    with pytest.raises(ConfigError, match="fkl, rkl, jsd"):
        divergence_per_token(s, t, "kl")
    with pytest.raises(ConfigError, match="beta"):
        divergence_per_token(s, t, "jsd", beta=1.5)
    with pytest.raises(ConfigError, match="skew"):
        divergence_per_token(s, t, "skl", skew=1.0)
    with pytest.raises(ConfigError, match="T=0.0 is not allowed"):
        divergence_per_token(s, t, T=0.0)
    with pytest.raises(ShapeMismatchError):
        divergence_per_token(s, t[..., :-1])


# ---------------------------------------------------------------- agreement with TRL and Liger


@functools.cache
def _trl_generalized_jsd_loss():
    """TRL's ``GKDTrainer.generalized_jsd_loss``, the installed source itself, compiled alone: importing its module
    pulls in transformers' Trainer (8 s); the function needs only torch and F."""
    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl is not installed")
    path = Path(spec.origin).parent / "experimental" / "gkd" / "gkd_trainer.py"
    tree = ast.parse(path.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GKDTrainer"]
    (fn,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "generalized_jsd_loss"]
    fn.decorator_list = []
    scope = {"torch": torch, "F": torch.nn.functional}
    exec(compile(ast.Module([fn], type_ignores=[]), str(path), "exec"), scope)
    return scope["generalized_jsd_loss"]


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_jsd_matches_trl_gkd_loss(beta, T):
    """TRL's ``generalized_jsd_loss(reduction="batchmean", labels)`` is sum over tokens and vocabulary / #unmasked
    tokens, without T^2; kdkit's token mean includes T^2, so kdkit = T^2 * TRL (equal at T = 1)."""
    s, t, labels = _random(seed=1)
    ref = _trl_generalized_jsd_loss()(s, t, labels=labels, beta=beta, temperature=T)
    got = token_kd_loss(s, t, labels, divergence="jsd", beta=beta, T=T)
    close(got, T * T * float(ref), rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_jsd_matches_liger_distillation_loss(beta):
    """Liger's ``distillation_loss_fn`` takes flat [N, V] logits already divided by T and returns the *sum* over
    unmasked tokens, without T^2: kdkit's mean * #unmasked = T^2 * Liger(student / T, teacher / T)."""
    jsd = pytest.importorskip("liger_kernel.chunked_loss.jsd_loss")
    s, t, labels = _random(seed=2)
    n = int((labels != -100).sum())
    for T in (1.0, 1.5):
        ref = jsd.LigerFusedLinearJSDFunction.distillation_loss_fn(
            s.flatten(0, 1) / T, t.flatten(0, 1) / T, beta=beta, target=labels.flatten(), ignore_index=-100)
        got = token_kd_loss(s, t, labels, divergence="jsd", beta=beta, T=T)
        close(got * n, T * T * float(ref), rel=1e-5)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergence_per_token_gradcheck(divergence):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    for beta in ((0.0, 0.3, 1.0) if divergence == "jsd" else (0.5,)):
        assert gradcheck(lambda a, b: divergence_per_token(a, b, divergence, T=1.7, beta=beta, skew=0.1), (s, t))


# ---------------------------------------------------------------- masking and weights


@pytest.mark.parametrize("divergence", ["fkl", "jsd", "tvd"])
def test_masked_tokens_neither_count_nor_get_gradient(divergence):
    s, t, labels = _random(seed=4, dtype=torch.float64)
    s.requires_grad_()
    loss = token_kd_loss(s, t, labels, divergence=divergence)
    (grad,) = torch.autograd.grad(loss, s)
    masked = labels == -100
    assert grad[masked].abs().max() == 0 and grad[~masked].abs().max() > 0
    s2, t2 = s.detach().clone(), t.clone()
    s2[masked] = 100.0 * torch.randn_like(s2[masked])
    t2[masked] = -50.0
    assert float(token_kd_loss(s2, t2, labels, divergence=divergence)) == pytest.approx(float(loss.detach()),
                                                                                        rel=1e-12)
    per = divergence_per_token(s.detach(), t, divergence)
    close(loss, float(per[~masked].mean()), rel=1e-12)


def test_weights_scale_each_token_and_the_mean_stays_over_counted_tokens():
    s, t, labels = _random(seed=5, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    w = torch.rand(labels.shape, generator=g, dtype=torch.float64) + 0.5
    per = divergence_per_token(s, t, "fkl")
    counted = labels != -100
    close(token_kd_loss(s, t, labels, weights=w), float((w * per)[counted].sum() / counted.sum()), rel=1e-12)
    close(token_kd_loss(s, t, labels, weights=3 * torch.ones_like(w)), 3 * float(token_kd_loss(s, t, labels)),
          rel=1e-12)
    none = token_kd_loss(s, t, labels, weights=w, reduction="none")
    assert none.shape == labels.shape and none[~counted].abs().max() == 0
    torch.testing.assert_close(none[counted], (w * per)[counted])
    with pytest.raises(ShapeMismatchError, match="weights"):
        token_kd_loss(s, t, labels, weights=w[:, :-1])
    with pytest.raises(ConfigError, match="reduction"):
        token_kd_loss(s, t, labels, reduction="sum")


def test_all_masked_batch_is_zero_without_nan():
    s, t, labels = _random(seed=6)
    s.requires_grad_()
    for divergence in DIVERGENCES:
        loss = token_kd_loss(s, t, torch.full_like(labels, -100), divergence=divergence)
        (grad,) = torch.autograd.grad(loss, s)
        assert float(loss.detach()) == 0.0 and torch.isfinite(grad).all() and grad.abs().max() == 0


# ---------------------------------------------------------------- sparse teacher signals


def test_sparse_uniform_fill_is_a_distribution_and_repeats_add_up():
    idx = torch.tensor([[1, 1, 3], [0, 2, 4]])
    probs = torch.tensor([[0.2, 0.1, 0.3], [0.5, 0.25, 0.05]])
    dense = sparse_to_dense_logprobs(idx, probs.log(), 6).exp()
    torch.testing.assert_close(dense.sum(-1), torch.ones(2))
    close(dense[0, 1], 0.3, rel=1e-6)  # 0.2 + 0.1 for the repeated id
    close(dense[0, 3], 0.3, rel=1e-6)
    for j in (0, 2, 4, 5):  # the missing 0.4 over the 4 ids not stored
        close(dense[0, j], 0.1, rel=1e-6)
    for j in (1, 3, 5):  # the missing 0.2 over 3 ids
        close(dense[1, j], 0.2 / 3, rel=1e-6)
    none = sparse_to_dense_logprobs(idx, probs.log(), 6, fill="none")
    assert torch.isinf(none[0, [0, 2, 4, 5]]).all() and torch.isfinite(none).sum() == 5
    with pytest.raises(ConfigError, match="fill"):
        sparse_to_dense_logprobs(idx, probs.log(), 6, fill="zero")
    with pytest.raises(ShapeMismatchError):
        sparse_to_dense_logprobs(idx, probs.log()[:, :2], 6)


def test_fkl_on_a_sparse_support_is_the_sum_over_the_stored_ids():
    idx = torch.tensor([[4, 0, 2]])
    p = [0.5, 0.2, 0.1]
    log_p = sparse_to_dense_logprobs(idx, torch.tensor([p]).log(), 5, fill="none")
    zs = [0.3, -1.0, 0.8, 0.0, 1.5]
    q = softmax(zs)
    log_q = torch.log_softmax(torch.tensor([zs]), -1)
    want = sum(pi * (math.log(pi) - math.log(q[i])) for i, pi in zip([4, 0, 2], p))
    close(divergence_from_logprobs(log_q, log_p, "fkl"), want, rel=1e-5)
    assert torch.isinf(divergence_from_logprobs(log_q, log_p, "rkl")).all()  # q has mass where p has none


# ---------------------------------------------------------------- the token_kd module


def test_token_kd_module_is_token_kd_loss_and_reads_token_weights():
    s, t, labels = _random(seed=7, dtype=torch.float64)
    loss = build_loss("token_kd", divergence="jsd", beta=0.5)
    assert isinstance(loss, TokenKDLoss) and loss.needs_labels
    close(loss(Outputs(s), Outputs(t), labels), float(token_kd_loss(s, t, labels, divergence="jsd")), rel=1e-12)
    w = torch.rand(labels.shape, dtype=torch.float64)
    got = loss(Outputs(s, {"token_weights": w}), Outputs(t), labels)
    close(got, float(token_kd_loss(s, t, labels, divergence="jsd", weights=w)), rel=1e-12)
    with pytest.raises(ShapeMismatchError, match="token_weights"):
        loss(Outputs(s, {"token_weights": w[:, :3]}), Outputs(t), labels)
    labels[:, 3] = 7  # ignore_index is an option
    close(build_loss("token_kd", ignore_index=7)(Outputs(s), Outputs(t), labels),
          float(token_kd_loss(s, t, labels, ignore_index=7)), rel=1e-12)


def test_token_kd_refuses_a_padded_vocabulary_naming_both_sizes():
    loss = build_loss("token_kd")
    s, t = torch.randn(1, 2, 49152), torch.randn(1, 2, 49152 + 128)
    with pytest.raises(ShapeMismatchError) as e:
        loss(Outputs(s), Outputs(t), None)
    msg = str(e.value)
    assert "49,152" in msg and "49,280" in msg and "kdkit check" in msg and "cross_tokenizer" in msg
    with pytest.raises(ShapeMismatchError, match="positions"):
        loss(Outputs(s), Outputs(torch.randn(1, 3, 49152)), None)
    with pytest.raises(ValueError, match="teacher logits"):
        loss(Outputs(s), Outputs(None), None)


def test_token_kd_options_are_validated_by_the_recipe_and_at_construction():
    entry = {"kd": {"type": "token_kd", "divergence": "jsd", "T": "2", "beta": 0.25}}
    validate_losses(entry)
    assert entry["kd"]["T"] == 2.0
    with pytest.raises(ConfigError, match="temperature"):
        validate_losses({"kd": {"type": "token_kd", "temperature": 2.0}})
    with pytest.raises(ConfigError, match="losses.kd.T"):
        validate_losses({"kd": {"type": "token_kd", "T": "hot"}})
    choices = "one of 'fkl', 'rkl', 'jsd', 'skl', 'srkl', 'tvd'"
    with pytest.raises(ConfigError, match=f"losses.kd.divergence='bogus' is not allowed: expected {choices}"):
        validate_losses({"kd": {"type": "token_kd", "divergence": "bogus"}})  # the recipe check, before any work
    with pytest.raises(ConfigError, match=r"losses.kd.beta=2 is not allowed: expected a number >= 0 and <= 1"):
        validate_losses({"kd": {"type": "token_kd", "divergence": "jsd", "beta": 2}})
    for name in ("token_kd", "taid", "adakd"):
        with pytest.raises(ConfigError, match=f"divergence='bogus' is not allowed: expected {choices}"):
            build_loss(name, divergence="bogus")
        with pytest.raises(ConfigError, match=f"losses.{name}.divergence='bogus' is not allowed"):
            validate_losses({name: {"divergence": "bogus"}})
        assert name in LOSSES


# ---------------------------------------------------------------- TAID


def test_taid_target_is_the_teacher_at_1_and_the_detached_student_at_0():
    s, t, labels = _random(seed=8, dtype=torch.float64)
    s.requires_grad_()
    loss = TAIDLoss().eval()
    loss.t.fill_(1.0)
    got = loss(Outputs(s), Outputs(t), labels)
    want = token_kd_loss(s, t, labels)
    close(got, float(want.detach()), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0])
    for divergence in DIVERGENCES:
        zero = TAIDLoss(divergence=divergence, t_start=0.0).eval()
        value = zero(Outputs(s), Outputs(t), labels)
        (grad,) = torch.autograd.grad(value, s)
        assert abs(float(value.detach())) < 1e-12 and grad.abs().max() < 1e-12


def test_taid_interpolates_the_logits_at_t():
    zs, zt = [1.0, -0.5, 2.0], [3.0, 0.0, -1.0]
    loss = TAIDLoss(t_start=0.3, T=2.0).eval()
    p = softmax([0.7 * a + 0.3 * b for a, b in zip(zs, zt)], 2.0)
    got = loss(Outputs(torch.tensor([[zs]], dtype=torch.float64)), Outputs(torch.tensor([[zt]], dtype=torch.float64)))
    close(got, 4.0 * kl(p, softmax(zs, 2.0)), rel=1e-6)  # t is a float32 buffer (as the official), 0.3 rounded


def _official_update(t, m, prev, loss, progress, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99):
    """SakanaAI/TAID ``TAID.update_t`` in Python floats (prev = inf: only remember the loss)."""
    if math.isinf(prev):
        return t, m, loss
    rel = (prev - loss) / (prev + 1e-15)
    m = beta * m + (1 - beta) * rel
    target = t_start + (t_end - t_start) * progress
    delta = alpha * (1 / (1 + math.exp(-m))) * (1 - t)
    return min(t_end, max(target, t + delta)), m, loss


def test_taid_update_is_the_official_rule():
    loss = TAIDLoss()
    t, m, prev = 0.4, 0.0, math.inf
    for step, (value, progress) in enumerate([(3.0, 0.0), (2.5, 0.0), (2.7, 0.0), (2.0, 0.0001), (1.9, 0.5)]):
        loss.set_progress(progress)
        loss.update_t(torch.tensor(value))
        t, m, prev = _official_update(t, m, prev, value, progress)
        close(loss.t, t, rel=1e-7)
        close(loss.m, m, rel=1e-5, abs_=1e-9)
        close(loss.prev_loss, prev, rel=1e-7)
        if step == 3:  # the adaptive step, not the linear bound (0.40006), set t
            assert t > 0.4 + 0.6 * progress + 1e-4
    assert float(loss.t) == pytest.approx(0.7, rel=1e-6)  # the linear bound at progress 0.5
    fixed = TAIDLoss(adaptive=False, t_start=0.2)
    fixed.update_t(torch.tensor(1.0))
    fixed.set_progress(0.25)
    fixed.update_t(torch.tensor(0.5))
    close(fixed.t, 0.2 + 0.8 * 0.25, rel=1e-6)


def test_taid_t_is_monotone_above_the_linear_schedule_and_ends_at_t_end():
    torch.manual_seed(0)
    _, t, labels = _random(seed=9)
    s = torch.zeros_like(t, requires_grad=True)
    loss = TAIDLoss(alpha=0.05, t_start=0.2, t_end=0.9).train()
    opt = torch.optim.SGD([s], lr=5.0)
    n, ts = 30, []
    for step in range(n + 1):
        loss.set_progress(step / n)
        value = loss(Outputs(s), Outputs(t), labels)
        opt.zero_grad()
        value.backward()
        opt.step()
        ts.append(float(loss.t))
        linear = 0.2 + 0.7 * step / n
        assert ts[-1] >= linear - 1e-6 or step == 0
        assert ts[-1] <= 0.9 + 1e-7
    assert all(b >= a for a, b in zip(ts, ts[1:]))
    assert ts[-1] == pytest.approx(0.9) and ts[n // 3] > 0.2 + 0.7 * (n // 3) / n  # the adaptive step led early on
    # rising losses still move t forward (sigmoid(m) > 0), never back
    up = TAIDLoss()
    for value in (1.0, 2.0, 4.0, 8.0):
        before = float(up.t)
        up.update_t(torch.tensor(value))
        assert float(up.t) >= before
    assert float(up.m) < 0


def test_taid_state_round_trips_and_eval_does_not_move_t():
    s, t, labels = _random(seed=10)
    loss = TAIDLoss().train()
    for step in range(3):
        loss.set_progress(step / 10)
        loss(Outputs(s * (1 - 0.1 * step)), Outputs(t), labels)
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    assert set(state) == {"t", "m", "prev_loss"} and float(state["t"]) > 0.4
    again = TAIDLoss()
    again.load_state_dict(state)
    for name in ("t", "m", "prev_loss"):
        assert torch.equal(getattr(again, name), getattr(loss, name))
    for x in (loss, again):
        x.set_progress(0.3)
        x(Outputs(s * 0.5), Outputs(t), labels)
    assert torch.equal(again.t, loss.t) and torch.equal(again.m, loss.m)
    loss.eval()
    before = loss.t.clone()
    loss(Outputs(s), Outputs(t), labels)
    assert torch.equal(loss.t, before)
    loss.set_epoch(3.0)  # without total_epochs, epochs leave progress alone
    assert loss.progress == 0.3
    by_epoch = TAIDLoss(total_epochs=4)
    by_epoch.set_epoch(3.0)
    assert by_epoch.progress == 0.75


def test_taid_bad_options():
    for kw in ({"t_start": 1.2}, {"t_start": 0.8, "t_end": 0.5}, {"alpha": 2.0}, {"momentum": 1.0},
               {"total_epochs": -1.0}, {"T": 0.0}):
        with pytest.raises(ConfigError):
            TAIDLoss(**kw)


# ---------------------------------------------------------------- AdaKD


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "skl"])
def test_adakd_without_selection_and_temperatures_is_token_kd(divergence):
    s, t, labels = _random(seed=11, dtype=torch.float64)
    s.requires_grad_()
    ada = AdaKDLoss(divergence=divergence, keep_ratio=1.0, adaptive_ratio=False, adaptive_T=False, T=1.5).train()
    got = ada(Outputs(s), Outputs(t), labels)
    want = token_kd_loss(s, t, labels, divergence=divergence, T=1.5)
    close(got, float(want.detach()), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0])


def _hellinger(zs, zt):
    p, q = softmax(zt), softmax(zs)
    return math.sqrt(sum((math.sqrt(a) - math.sqrt(b)) ** 2 for a, b in zip(p, q))) / math.sqrt(2)


def test_adakd_half_keeps_only_the_hardest_half_of_counted_tokens():
    g = torch.Generator().manual_seed(12)
    t = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    noise = torch.linspace(0.1, 3.0, 12, dtype=torch.float64)[torch.randperm(12, generator=g)].reshape(2, 6, 1)
    s = (t + noise * torch.randn(2, 6, 5, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.zeros(2, 6, dtype=torch.long)
    labels[0, 0] = labels[1, 2] = -100
    scores = {(b, i): _hellinger(s[b, i].tolist(), t[b, i].tolist()) for b in range(2) for i in range(6)
              if labels[b, i] != -100}
    hardest = sorted(scores, key=scores.get, reverse=True)[:5]  # floor(0.5 * 10 counted tokens)
    ada = AdaKDLoss(divergence="fkl", keep_ratio=0.5, adaptive_T=False)
    value = ada(Outputs(s), Outputs(t), labels)
    (grad,) = torch.autograd.grad(value, s)
    got = {(b, i) for b in range(2) for i in range(6) if grad[b, i].abs().max() > 0}
    assert got == set(hardest)
    per = divergence_per_token(s.detach(), t, "fkl")
    close(value, sum(float(per[k]) for k in hardest) / 5, rel=1e-12)
    keep = hardest_tokens(torch.tensor([[3.0, 1.0, 2.0, 5.0]]), torch.tensor([[True, True, True, False]]), 0.1)
    assert keep.tolist() == [[True, False, False, False]]  # at least one token, never a masked one


def test_adakd_inverse_difficulty_temperatures_are_the_official_formula():
    s, t, labels = _random(b=1, length=8, v=7, seed=13, dtype=torch.float64)
    labels[:] = 0
    mask = labels != -100
    d, keep, temps = adakd_per_token(s, t, mask, 0.75, "rkl", T=1.0, T_scale=0.5)
    scores = [_hellinger(s[0, i].tolist(), t[0, i].tolist()) for i in range(8)]
    kept = sorted(range(8), key=lambda i: scores[i], reverse=True)[:6]
    assert sorted(kept) == keep[0].nonzero().flatten().tolist()
    med = sorted(scores[i] for i in kept)[2]  # torch.median: the lower of the two middle values
    for i in range(8):
        want = math.exp(-0.5 * math.tanh(math.log(scores[i] / med))) if i in kept else 1.0
        close(temps[0, i], want, rel=1e-9)
        if i in kept:  # harder than the median: sharper; the divergence at T_i, times T_i^2
            assert (temps[0, i] < 1) == (scores[i] > med)
            close(d[0, i], float(divergence_per_token(s[0, i], t[0, i], "rkl", T=want)), rel=1e-9)
    ada = AdaKDLoss(keep_ratio=0.75, T_scale=0.5).eval()
    close(ada(Outputs(s), Outputs(t), labels), float(d[keep].mean()), rel=1e-12)


def _official_latf(values, progresses, warmup=0.05, decay=0.99, loss_eps=0.05, step=0.05, floor=0.1):
    """SassyRong/AdaKD ``distillation.py``'s LATF loop in Python floats: the ratio after each step."""
    ratio, ema, ref, out = 1.0, None, None, []
    for value, progress in zip(values, progresses):
        ema = value if ema is None else decay * ema + (1 - decay) * value
        if ref is not None:
            delta = ref - ema
            eps = ref * loss_eps
            if delta < -eps:
                ratio, ref = min(ratio * (1 + step), 1.0), ema
            elif delta > eps:
                ratio, ref = max(ratio * (1 - step), floor), ema
        elif progress >= warmup:
            ref = ema
        out.append(ratio)
    return out


def test_adakd_ratio_follows_the_official_latf_rule():
    # flat through the warm-up, falling 20% a step (focus), flat (hold), then rising 30% a step (widen)
    values = [5.0] * 6 + [5.0 * 0.8 ** k for k in range(1, 61)] + [5.0 * 0.8 ** 60] * 5
    values += [values[-1] * 1.3 ** k for k in range(1, 11)]
    progresses = [i / 100 for i in range(len(values))]
    ada = AdaKDLoss(ema_decay=0.5)
    want = _official_latf(values, progresses, decay=0.5)
    for value, progress, ratio in zip(values, progresses, want):
        ada.set_progress(progress)
        ada.update_ratio(torch.tensor(value))
        close(ada.ratio, ratio, rel=1e-12)
    assert min(want) == pytest.approx(0.1) and want[-1] > min(want)  # focused down to the floor, then widened
    state = ada.state_dict()
    assert set(state) == {"ratio", "ema", "ref"}
    again = AdaKDLoss(ema_decay=0.5)
    again.load_state_dict(state)
    assert torch.equal(again.ratio, ada.ratio) and torch.equal(again.ref, ada.ref)
    fixed = AdaKDLoss(adaptive_ratio=False, keep_ratio=0.5, warmup=0.0)
    for value in values:
        fixed.update_ratio(torch.tensor(value))
    assert float(fixed.ratio) == 0.5


def test_adakd_bad_options():
    for kw in ({"keep_ratio": 0.0}, {"min_keep_ratio": 1.5}, {"ratio_step": 1.0}, {"ema_decay": 1.0},
               {"score": "entropy"}, {"warmup": 2.0}, {"skew": 1.0}):
        with pytest.raises(ConfigError):
            AdaKDLoss(**kw)
