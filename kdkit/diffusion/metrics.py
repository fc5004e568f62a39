"""Sample-quality metrics: on 2-D data MMD, sliced Wasserstein-2 and per-mode mass; on images the Frechet
distance and k-NN precision/recall of feature vectors (which features: see `features.py`).

All of them compare two sets of samples; none needs a model, so each is checked against a closed form in the
tests."""
from __future__ import annotations

import torch

from ..errors import ShapeMismatchError
from .mixture import nearest_mode

MMD_BANDWIDTHS = (0.1, 0.3, 1.0)  # RBF length scales in data units (the ring mixtures have radius ~2)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double()


def _check(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _flat(x), _flat(y)
    if x.shape[1] != y.shape[1]:
        raise ShapeMismatchError(f"cannot compare samples of dimension {x.shape[1]} with samples of dimension "
                                 f"{y.shape[1]}")
    return x, y


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths=MMD_BANDWIDTHS, max_samples: int = 4000) -> float:
    """Unbiased MMD^2 with the kernel `sum_h exp(-|a-b|^2 / (2 h^2))` over the given bandwidths `h` (each set cut to
    its first `max_samples` points to bound the O(n^2) cost)."""
    x, y = _check(x[:max_samples], y[:max_samples])
    n, m = x.shape[0], y.shape[0]

    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(term_x + term_y - 2 * kxy.mean())


def sliced_w2(x: torch.Tensor, y: torch.Tensor, projections: int = 512, seed: int = 0) -> float:
    """Sliced Wasserstein-2: the root of the mean, over `projections` random unit directions (fixed by `seed`),
    of the squared 1-D W2 between the projected sets (exact by sorting; unequal sizes via quantiles)."""
    x, y = _check(x, y)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(0).values, (y @ theta).sort(0).values
    if px.shape[0] != py.shape[0]:
        q = (torch.arange(max(px.shape[0], py.shape[0]), dtype=torch.float64) + 0.5) / max(px.shape[0], py.shape[0])
        px, py = _quantiles(px, q), _quantiles(py, q)
    return float(((px - py) ** 2).mean().sqrt())


def _quantiles(sorted_vals: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    idx = (q * sorted_vals.shape[0]).floor().long().clamp_max(sorted_vals.shape[0] - 1)
    return sorted_vals[idx]


def mode_mass(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Percentage of samples whose nearest mixture mean is each mode, `[K]` summing to 100."""
    counts = torch.bincount(nearest_mode(x, means), minlength=means.shape[0]).double()
    return 100.0 * counts / counts.sum()


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = _flat(features)
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """`|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)`, the squared W2 between two Gaussians (FID's
    formula), with the matrix root from a symmetric eigendecomposition in float64."""
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape:
        raise ShapeMismatchError(f"Frechet distance of features of different sizes: {tuple(mu1.shape)} vs "
                                 f"{tuple(mu2.shape)}")
    vals, vecs = torch.linalg.eigh((cov1 + cov1.T) / 2)
    root1 = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    middle = root1 @ cov2 @ root1
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + cov1.trace() + cov2.trace() - 2 * tr_sqrt)


def frechet_distance_of(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance between the Gaussian fits of two feature sets."""
    _check(x, y)
    return frechet_distance(*gaussian_stats(x), *gaussian_stats(y))


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 2048) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls
    reaching each point's k-th nearest neighbour within its own set; precision = share of fake samples inside
    the real manifold, recall = share of real samples inside the fake manifold."""
    real, fake = _check(real, fake)
    return _coverage(real, fake, k, chunk), _coverage(fake, real, k, chunk)


def _kth_radius(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    out = []
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i:i + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself at distance 0
    return torch.cat(out)


def _coverage(manifold: torch.Tensor, queries: torch.Tensor, k: int, chunk: int) -> float:
    radii = _kth_radius(manifold, k, chunk)
    inside = []
    for i in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[i:i + chunk], manifold)
        inside.append((d <= radii[None]).any(1))
    return float(torch.cat(inside).double().mean())


def mixture_report(samples: torch.Tensor, true: torch.Tensor, means: torch.Tensor,
                   reference: torch.Tensor | None = None) -> dict:
    """The 2-D numbers kdkit reports for a sample set: against true samples, and against a reference set (the
    teacher's many-step samples) when given."""
    out = {"sw2": sliced_w2(samples, true), "mmd": mmd(samples, true),
           "mode_mass": [round(float(v), 3) for v in mode_mass(samples, means)],
           "true_mode_mass": [round(float(v), 3) for v in mode_mass(true, means)]}
    out["mode_mass_max_err"] = max(abs(a - b) for a, b in zip(out["mode_mass"], out["true_mode_mass"]))
    if reference is not None:
        out["sw2_vs_teacher"] = sliced_w2(samples, reference)
        out["mmd_vs_teacher"] = mmd(samples, reference)
    return out
