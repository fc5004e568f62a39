"""`kdkit.divergence.Divergence`: hand-computed values, closed-form gradients against autograd in float64, the
range checks, and one T^2 convention shared by the classifier and LM losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.divergence import DIVERGENCES, Divergence
from kdkit.errors import ConfigError
from kdkit.losses.logits import jsd_loss, kd_loss, rkl_loss
from kdkit.losses.token import token_kd_loss


def test_values_by_hand():
    """V = 2, p = (0.8, 0.2), q = (0.5, 0.5): each divergence's textbook formula."""
    p, q = torch.tensor([[0.8, 0.2]], dtype=torch.float64), torch.tensor([[0.5, 0.5]], dtype=torch.float64)

    def kl(a, b):
        return float((a * (a / b).log()).sum())

    m = 0.3 * p + 0.7 * q
    want = {"fkl": kl(p, q), "rkl": kl(q, p), "jsd": 0.3 * kl(p, m) + 0.7 * kl(q, m),
            "skl": kl(p, 0.1 * p + 0.9 * q), "srkl": kl(q, 0.1 * q + 0.9 * p), "tvd": 0.3}
    for name in DIVERGENCES:
        got = float(Divergence(name, beta=0.3).rows(q.log(), p.log()))
        assert got == pytest.approx(want[name], rel=1e-12), name
    # the jsd end points are the KLs
    assert float(Divergence("jsd", beta=0.0).rows(q.log(), p.log())) == pytest.approx(kl(p, q), rel=1e-12)
    assert float(Divergence("jsd", beta=1.0).rows(q.log(), p.log())) == pytest.approx(kl(q, p), rel=1e-12)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("T,beta,skew", [(1.0, 0.5, 0.1), (2.5, 0.9, 0.4), (0.7, 0.0, 0.0), (1.3, 1.0, 0.9)])
def test_closed_form_gradient_is_autograd(name, T, beta, skew):
    g = torch.Generator().manual_seed(hash((name, T)) % 2**31)
    z = torch.randn(6, 9, generator=g, dtype=torch.float64) * 3
    t = torch.randn(6, 9, generator=g, dtype=torch.float64) * 3
    scale = torch.rand(6, generator=g, dtype=torch.float64)
    div = Divergence(name, T, beta, skew)
    zz = z.clone().requires_grad_()
    ref = (div.per_row(zz, t) * scale).sum()
    (ref_grad,) = torch.autograd.grad(ref, zz)
    d, grad = div.value_and_grad(z, F.log_softmax(t / T, -1), scale)
    assert float((d * scale).sum()) == pytest.approx(ref.detach().item(), rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("key,value,allowed", [("T", 0.0, "a finite number > 0"), ("T", math.nan, "a finite number > 0"),
                                               ("beta", 1.5, "a number in \\[0, 1\\]"),
                                               ("skew", 1.0, "a number in \\[0, 1\\)")])
def test_out_of_range_values_are_named(key, value, allowed):
    with pytest.raises(ConfigError, match=rf"{key}=.* is not allowed: expected {allowed}"):
        Divergence("jsd", **{key: value})
    with pytest.raises(ConfigError, match="unknown divergence 'kl2'; choose one of fkl, rkl, jsd"):
        Divergence("kl2")


def test_one_t_squared_convention_for_classifier_and_lm():
    """The classifier kd/rkl/jsd losses and token_kd are the same numbers at any T (the old classifier jsd had
    no T^2 and was 4x smaller at T = 2)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, 10, generator=g), torch.randn(5, 7, 10, generator=g)
    T = 2.0
    assert float(kd_loss(s, t, T)) == pytest.approx(float(token_kd_loss(s, t, divergence="fkl", T=T)), rel=1e-6)
    assert float(rkl_loss(s, t, T)) == pytest.approx(float(token_kd_loss(s, t, divergence="rkl", T=T)), rel=1e-6)
    got = float(jsd_loss(s, t, beta=0.3, T=T))
    assert got == pytest.approx(float(token_kd_loss(s, t, divergence="jsd", beta=0.3, T=T)), rel=1e-6)
    at_one = Divergence("jsd", 1.0, 0.3).rows(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)).mean()
    assert got == pytest.approx(4 * float(at_one), rel=1e-6)
