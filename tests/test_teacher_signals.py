"""Typed teacher signals: every kind through every LM loss gives the dense-logit loss wherever the two must agree
(values and gradients, float64), the kinds that cannot serve a setting refuse it by name, and a store-backed
step means exactly what a live-teacher step means (beta, skew, ignore_index included)."""
import pytest
import torch
import torch.nn.functional as F

from kdkit.divergence import DIVERGENCES, Divergence
from kdkit.errors import ConfigError, ShapeMismatchError, TokenizerMismatchError
from kdkit.kernels import fused_linear_kd
from kdkit.losses import build_loss
from kdkit.losses.token import signal_kd_loss, token_kd_loss
from kdkit.models.outputs import Outputs
from kdkit.signals import (CrossTokenizerChunks, DenseLogits, HiddenStates, Sampled, TopK, as_signal,
                           sparse_to_dense_logprobs)

B, L, V, H = 2, 5, 11, 4
SETTINGS = {"fkl": {}, "rkl": {}, "jsd": {"beta": 0.9}, "skl": {"skew": 0.3}, "srkl": {"skew": 0.2}, "tvd": {}}
LOSS_KINDS = [("token_kd", {}), ("taid", {"t_start": 0.7}), ("adakd", {"keep_ratio": 0.6})]


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    hidden = torch.randn(B, L, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 1] = labels[1, 3] = -100
    return s, hidden, weight, bias, labels


def _loss_and_grad(loss, s, teacher, labels):
    s = s.clone().requires_grad_()
    value = loss(Outputs(s), teacher, labels)
    (grad,) = torch.autograd.grad(value, s)
    return value.detach(), grad


def _full_topk(logits, T):
    """A top-k signal that keeps every id: the whole distribution, so it must equal the dense teacher."""
    logp = F.log_softmax(logits / T, dim=-1)
    lp, idx = logp.topk(V, dim=-1)
    return idx, lp


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("loss_name,extra", LOSS_KINDS)
def test_dense_kinds_equal_live_logits_in_every_lm_loss(divergence, loss_name, extra):
    """Outputs, DenseLogits, DenseLogits from stored log-probs at another T0, HiddenStates + head and a full top-k
    are one teacher: every LM loss gives the same value and gradient for each (float64)."""
    s, hidden, weight, bias, labels = _data()
    t_logits = hidden @ weight.T + bias
    T = 1.5
    idx, lp = _full_topk(t_logits, T)
    signals = {
        "dense": DenseLogits(logits=t_logits),
        "stored log-probs at T0=0.7": DenseLogits.from_logprobs(F.log_softmax(t_logits / 0.7, -1), 0.7),
        "hidden + head": HiddenStates(hidden=hidden, weight=weight, bias=bias),
        "top-k, k = V": TopK(temperature=T, indices=idx, logprobs=lp),
        "top-k, k = V, no tail": TopK(temperature=T, indices=idx, logprobs=lp, tail="none"),
    }
    loss = build_loss(loss_name, divergence=divergence, T=T, **SETTINGS[divergence], **extra).double().eval()
    want, want_grad = _loss_and_grad(loss, s, Outputs(t_logits), labels)
    assert want > 0
    for name, signal in signals.items():
        got, got_grad = _loss_and_grad(loss, s, signal, labels)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9, msg=name)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-9, msg=name)


def test_token_kd_settings_reach_every_kind():
    """beta, skew and ignore_index change the loss the same way for a sparse kind as for dense logits."""
    s, hidden, weight, bias, labels = _data(1)
    t_logits = hidden @ weight.T + bias
    idx, lp = _full_topk(t_logits, 1.0)
    top = TopK(indices=idx, logprobs=lp)
    seen = set()
    for div, opts in [("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.9}), ("skl", {"skew": 0.0}), ("skl", {"skew": 0.5}),
                      ("fkl", {"ignore_index": int(labels[0, 0])})]:
        loss = build_loss("token_kd", divergence=div, **opts).double()
        dense = loss(Outputs(s), Outputs(t_logits), labels)
        torch.testing.assert_close(loss(Outputs(s), top, labels), dense)
        ref = token_kd_loss(s, t_logits, labels, divergence=div, **opts)
        torch.testing.assert_close(dense, ref)
        seen.add(round(float(dense), 9))
    assert len(seen) == 5  # each setting moved the value


def test_sparse_forward_kl_kinds():
    """A sampled signal whose weights are exactly p, and a top-k with tail='support' keeping every id, both give
    forward KL itself; their estimators refuse other divergences and another temperature, naming them."""
    s, hidden, weight, bias, labels = _data(2)
    t_logits = hidden @ weight.T + bias
    T = 2.0
    idx, lp = _full_topk(t_logits, T)
    sampled = Sampled(temperature=T, indices=idx, logprobs=lp, counts=torch.ones_like(idx), samples=1,
                      ratios=lp.exp())
    support = TopK(temperature=T, indices=idx, logprobs=lp, tail="support")
    loss = build_loss("token_kd", divergence="fkl", T=T).double()
    want, want_grad = _loss_and_grad(loss, s, Outputs(t_logits), labels)
    for signal in (sampled, support):
        got, got_grad = _loss_and_grad(loss, s, signal, labels)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_grad, want_grad)
        with pytest.raises(ConfigError, match="forward KL only.*'jsd'"):
            build_loss("token_kd", divergence="jsd", T=T)(Outputs(s), signal, labels)
        with pytest.raises(ConfigError, match=r"temperature 2.0.*T=2.0 \(got T=1.0\)"):
            build_loss("token_kd", divergence="fkl", T=1.0)(Outputs(s), signal, labels)
    with pytest.raises(ConfigError, match="full distribution"):
        build_loss("taid", divergence="fkl", T=T)(Outputs(s), sampled, labels)


def test_signals_refuse_mismatches():
    s, hidden, weight, bias, labels = _data(3)
    loss = build_loss("token_kd")
    with pytest.raises(ShapeMismatchError, match="11 vocabulary entries and the teacher's 12"):
        loss(Outputs(s), DenseLogits(logits=torch.randn(B, L, V + 1)), labels)
    with pytest.raises(ShapeMismatchError, match="cover different positions"):
        loss(Outputs(s), DenseLogits(logits=torch.randn(B, L + 1, V)), labels)
    with pytest.raises(ConfigError, match="cross_tokenizer"):
        loss(Outputs(s), CrossTokenizerChunks(logits=s, input_ids=labels, chunk_ids=labels), labels)
    sig = DenseLogits(logits=s, tokenizer="abc")
    sig.check_tokenizer("abc")
    with pytest.raises(TokenizerMismatchError, match="abc"):
        sig.check_tokenizer("xyz")
    with pytest.raises(ConfigError, match="no logits"):
        as_signal(object())


def test_fused_kernel_takes_the_signals():
    """fused_linear_kd with a HiddenStates or a TopK signal equals the unfused loss against the same signal."""
    _, hidden, weight, bias, labels = _data(4)
    g = torch.Generator().manual_seed(5)
    h_s = torch.randn(B * L, H, generator=g, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    y = labels.flatten()
    t_logits = hidden.flatten(0, 1) @ weight.T + bias
    logp = F.log_softmax(t_logits, -1)
    lp, idx = logp.topk(4, dim=-1)
    for signal in (HiddenStates(hidden=hidden.flatten(0, 1), weight=weight, bias=bias),
                   TopK(indices=idx, logprobs=lp)):
        for div in (Divergence("jsd", 1.0, 0.9), Divergence("srkl", 1.0, skew=0.3)):
            fused = fused_linear_kd(h_s, w_s, labels=y, teacher=signal, div=div, chunk_size=3, backend="torch")
            plain = signal_kd_loss(h_s @ w_s.T, signal, y, div=div)
            torch.testing.assert_close(fused, plain)
            gf = torch.autograd.grad(fused, (h_s, w_s))
            gp = torch.autograd.grad(plain, (h_s, w_s))
            for a, b in zip(gf, gp):
                torch.testing.assert_close(a, b)
    dense = sparse_to_dense_logprobs(idx, lp, V)
    torch.testing.assert_close(TopK(indices=idx, logprobs=lp).teacher_logits(1.0, V), dense)


def test_store_batches_become_signals(tmp_path):
    """A dense, a top-k and a sampled store batch as typed signals: the store's loss is the signal loss, with every
    setting (jsd beta 0.9 was dropped by the old store path: 0.2138 against 0.0840 live)."""
    from kdkit.llm.signal_store import batch_signal, signal_kd_loss as store_loss

    s, hidden, weight, bias, labels = _data(6)
    t_logits = hidden @ weight.T + bias
    ids = torch.randint(0, V, (B, L + 1))
    logp = F.log_softmax(t_logits, -1)
    dense = {"kind": "dense", "temperature": 1.0, "vocab_size": V, "input_ids": ids, "labels": ids, "logprobs": logp}
    live = token_kd_loss(s, t_logits, ids[:, 1:], divergence="jsd", beta=0.9)
    torch.testing.assert_close(store_loss(s, dense, divergence="jsd", beta=0.9), live)
    assert isinstance(batch_signal(dense), DenseLogits)
    lp, idx = logp.topk(3, dim=-1)
    top = {**dense, "kind": "topk", "indices": idx, "logprobs": lp}
    sig = batch_signal(top, tail="none", tokenizer="fp")
    assert isinstance(sig, TopK) and sig.tail == "none" and sig.tokenizer == "fp"
    sampled = {**top, "kind": "sampled", "counts": torch.ones_like(idx), "samples": 3}
    assert isinstance(batch_signal(sampled), Sampled)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_uniform_tail_topk_forward_kl_in_closed_form_equals_the_densified_teacher(T):
    """The closed form never builds the [..., V] teacher; value and gradient must be those of densifying it."""
    from kdkit.divergence import Divergence
    from kdkit.losses.token import token_kd_loss, topk_uniform_fkl_per_token
    from kdkit.signals import TopK, sparse_to_dense_logprobs

    g = torch.Generator().manual_seed(0)
    vocab, k = 50, 6
    teacher = torch.randn(3, 4, vocab, generator=g, dtype=torch.float64) * 3
    teacher[0, 0, :k] += 40.0  # a row whose top-k holds all the mass: the tail term must vanish, not NaN
    logprobs, ids = (teacher / T).log_softmax(-1).topk(k, dim=-1)
    signal = TopK(indices=ids, logprobs=logprobs, temperature=T, tail="uniform")
    labels = torch.randint(0, vocab, (3, 4), generator=g)
    labels[1, 2] = -100
    student = torch.randn(3, 4, vocab, generator=g, dtype=torch.float64, requires_grad=True)

    closed = signal_kd_loss(student, signal, labels, div=Divergence("fkl", T=T))
    (g_closed,) = torch.autograd.grad(closed, student)
    dense_t = sparse_to_dense_logprobs(ids, logprobs, vocab, "uniform") * T
    dense = token_kd_loss(student, dense_t, labels, divergence="fkl", T=T)
    (g_dense,) = torch.autograd.grad(dense, student)
    torch.testing.assert_close(closed, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_closed, g_dense, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(topk_uniform_fkl_per_token(student, signal, T)).all()
    # by hand at one position: sum over all V of p_j (log p_j - log s_j)
    p = dense_t[2, 3].div(T).softmax(-1)
    s = student[2, 3].div(T).log_softmax(-1)
    by_hand = (p * (p.log() - s)).sum() * T * T
    torch.testing.assert_close(topk_uniform_fkl_per_token(student, signal, T)[2, 3], by_hand, rtol=1e-10, atol=0)
