"""Plain-Python arithmetic that loss tests check kdkit against (written out, not torch's formulas)."""
import math

import pytest
import torch


def close(a, b, rel=1e-5, abs_=1e-8):
    """`a` (a number or a scalar tensor) equals `b` to the given tolerances."""
    a = float(a.detach()) if isinstance(a, torch.Tensor) else float(a)
    assert a == pytest.approx(b, rel=rel, abs=abs_), (a, b)


def softmax(xs, T=1.0):
    m = max(xs)
    e = [math.exp((x - m) / T) for x in xs]
    z = sum(e)
    return [v / z for v in e]


def kl(p, q):
    """KL(p || q) with 0 log 0 = 0."""
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)
