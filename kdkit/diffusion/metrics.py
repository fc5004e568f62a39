"""Sample-quality metrics: on 2-D data MMD, sliced Wasserstein-2, per-mode mass, mass off the modes and per-mode
coverage; on images the Frechet distance and k-NN precision/recall of feature vectors (which features: see
`features.py`).

Per-mode mass (share of samples whose *nearest* mean is each mode) cannot see a collapse onto the ring between the
modes: a uniform ring with the right angular weights has exact mode masses. Mass off the modes (share of samples
farther than k sigma from every mode; about 1.1% of true 2-D Gaussian data at k = 3) and per-mode coverage (share
of samples within k sigma of each mode, relative to the true data's) do.

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
    term_x = _kernel_sum(x, x, bandwidths, off_diagonal=True) / (n * (n - 1))
    term_y = _kernel_sum(y, y, bandwidths, off_diagonal=True) / (m * (m - 1))
    return float(term_x + term_y - 2 * _kernel_sum(x, y, bandwidths) / (n * m))


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, bandwidths, off_diagonal: bool = False,
                chunk: int = 512) -> torch.Tensor:
    """`sum_ij sum_h exp(-|a_i - b_j|^2 / (2 h^2))` (without the i = j terms when `off_diagonal`), a block of rows
    at a time (the full matrices of 4,000 x 4,000 doubles made evaluation several times slower)."""
    total = a.new_zeros(())
    for i in range(0, a.shape[0], chunk):
        d2 = torch.cdist(a[i:i + chunk], b).square_()
        for h in bandwidths:
            k = torch.exp(d2 * (-0.5 / (h * h)))
            total += k.sum()
            if off_diagonal:
                total -= k.diagonal(offset=i).sum()
    return total


def sliced_w2(x: torch.Tensor, y: torch.Tensor, projections: int = 512, seed: int = 0) -> float:
    """Sliced Wasserstein-2: the root of the mean, over `projections` random unit directions (fixed by `seed`),
    of the squared 1-D W2 between the projected sets (exact by sorting; unequal sizes via quantiles)."""
    x, y = _check(x, y)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    # [projections, N], each row sorted (a contiguous last-dim sort: ~5x faster than sorting dim 0 of [N, P])
    px, py = ((v @ theta).T.contiguous().sort(1).values for v in (x, y))
    if px.shape[1] != py.shape[1]:
        q = (torch.arange(max(px.shape[1], py.shape[1]), dtype=torch.float64) + 0.5) / max(px.shape[1], py.shape[1])
        px, py = _quantiles(px, q), _quantiles(py, q)
    return float(((px - py) ** 2).mean().sqrt())


def _quantiles(sorted_vals: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rows of `[P, N]` sorted values at quantiles `q`."""
    idx = (q * sorted_vals.shape[1]).floor().long().clamp_max(sorted_vals.shape[1] - 1)
    return sorted_vals[:, idx]


def mode_mass(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Percentage of samples whose nearest mixture mean is each mode, `[K]` summing to 100."""
    counts = torch.bincount(nearest_mode(x, means), minlength=means.shape[0]).double()
    return 100.0 * counts / counts.sum()


OFF_MODE_K = 3.0  # "off the modes": farther than this many of a mode's std from every mode's mean


def _within(x: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, k: float) -> torch.Tensor:
    """`[N, K]`: whether each sample lies within `k * stds[j]` of mean j."""
    d = torch.cdist(x.double(), means.double())
    return d <= k * stds.double().reshape(1, -1).expand_as(d)


def off_mode_mass(x: torch.Tensor, means: torch.Tensor, stds, k: float = OFF_MODE_K) -> float:
    """Percentage of samples farther than `k` std from every mode (`stds`: one per mode, or one for all). For
    isotropic 2-D Gaussian modes that do not overlap, the true data's is `100 exp(-k^2 / 2)` (1.11% at k = 3)."""
    stds = torch.as_tensor(stds, dtype=torch.float64).expand(means.shape[0])
    return float(100.0 * (~_within(x, means, stds, k).any(1)).double().mean())


def mode_coverage(x: torch.Tensor, true: torch.Tensor, means: torch.Tensor, stds,
                  k: float = OFF_MODE_K) -> torch.Tensor:
    """Per mode, the share of samples within `k` std of it divided by the true samples' share, `[K]`: 1 = the
    mode holds its full mass, 0 = dropped, 0.5 = half of its mass smeared away (or onto another mode). A report
    counts a mode as covered at 0.5 or more."""
    stds = torch.as_tensor(stds, dtype=torch.float64).expand(means.shape[0])
    got = _within(x, means, stds, k).double().mean(0)
    want = _within(true, means, stds, k).double().mean(0)
    return got / want.clamp_min(1e-12)


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


def mixture_report(samples: torch.Tensor, true: torch.Tensor, means: torch.Tensor, stds,
                   reference: torch.Tensor | None = None, reference_sw2: float | None = None,
                   k: float = OFF_MODE_K) -> dict:
    """The 2-D numbers kdkit reports for a sample set, headline first: sliced-W2 against true samples (and, with
    `reference_sw2` = the teacher's, its ratio to it), the mass off the modes (%, beyond `k` std of every mode)
    and the fewest modes' coverage; then MMD, per-mode mass and coverage, and the same against a reference set
    (the teacher's many-step samples) when given."""
    out = {"sw2": sliced_w2(samples, true)}
    if reference_sw2 is not None:
        out["sw2_x_teacher"] = out["sw2"] / reference_sw2 if reference_sw2 > 0 else float("inf")
    cover = mode_coverage(samples, true, means, stds, k)
    out |= {"off_mode_pct": off_mode_mass(samples, means, stds, k),
            "true_off_mode_pct": off_mode_mass(true, means, stds, k),
            "min_mode_coverage": float(cover.min()),
            "modes_covered": int((cover >= 0.5).sum()),
            "mmd": mmd(samples, true),
            "mode_coverage": [round(float(v), 3) for v in cover],
            "mode_mass": [round(float(v), 3) for v in mode_mass(samples, means)],
            "true_mode_mass": [round(float(v), 3) for v in mode_mass(true, means)]}
    out["mode_mass_max_err"] = max(abs(a - b) for a, b in zip(out["mode_mass"], out["true_mode_mass"]))
    if reference is not None:
        out["sw2_vs_teacher"] = sliced_w2(samples, reference)
        out["mmd_vs_teacher"] = mmd(samples, reference)
    return out


def mixture_headline(rep: dict, label: str = "student") -> str:
    """One line a person reads first: sliced-W2 (against the teacher's when known), mass off the modes, modes
    covered."""
    r = rep.get("sw2_x_teacher")
    ratio = f" ({r:.2f}x the teacher's {rep['sw2'] / r:.4f})" if r and r != float("inf") else ""
    return (f"{label}: sliced-W2 {rep['sw2']:.4f}{ratio}, off-mode mass {rep['off_mode_pct']:.1f}% (true data "
            f"{rep['true_off_mode_pct']:.1f}%), {rep['modes_covered']}/{len(rep['mode_coverage'])} modes covered "
            f"(fewest {100 * rep['min_mode_coverage']:.0f}%), mode-mass error {rep['mode_mass_max_err']:.1f} pts")


# ---------------------------------------------------------------- per-step readings (pure tensor work, any device)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (`[C]`), channel = dim 1: a 2-D point's coordinates, an image's colours."""
    dims = [0, *range(2, x.ndim)]
    x = x.float()
    return x.mean(dims), x.std(dims)


def sample_drift(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample batch against the data's per-channel `mean` and `std`: the largest per-channel std ratio (above 1:
    spread out / saturating) and the largest per-channel mean shift in data stds."""
    m, s = channel_stats(x)
    return (s / std).max(), ((m - mean).abs() / std).max()


def modes_reached(x: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, k: float = OFF_MODE_K) -> torch.Tensor:
    """Share of the modes with at least one sample within `k` std (a scalar tensor: 1 = every mode reached)."""
    return _within(x, means, stds, k).any(0).float().mean()


def normalised_entropy(counts: torch.Tensor) -> float:
    """Entropy of a histogram over its maximum, log(bins): 1 = uniform over the bins, 0 = one bin holds all."""
    p = counts.double() / counts.sum().clamp_min(1)
    h = -(p * p.clamp_min(1e-300).log()).sum()
    return float(h / torch.log(torch.tensor(float(max(counts.numel(), 2)), dtype=torch.float64)))
