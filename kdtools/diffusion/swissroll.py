"""The 2-D Swiss roll (the tabular case of section 6.3.5) and the sliced Wasserstein distance.

Points are scikit-learn's 3-D Swiss roll projected on its (x, z) plane and divided by 10, so they lie
roughly in [-1, 1.5]^2. Splits come from disjoint seeds: "train" (seed 0) and "test" (seed 1, held out).
"""

from __future__ import annotations

import torch

from ..errors import KdUsageError

SPLIT_SEEDS = {"train": 0, "test": 1}


def swiss_roll(n: int, split: str = "train", noise: float = 0.5) -> torch.Tensor:
    """``n`` points (n, 2) float32."""
    from sklearn.datasets import make_swiss_roll

    if split not in SPLIT_SEEDS:
        raise KdUsageError(f"swissroll has splits {', '.join(SPLIT_SEEDS)}, not {split!r}")
    pts, _ = make_swiss_roll(n_samples=n, noise=noise, random_state=SPLIT_SEEDS[split])
    return torch.from_numpy(pts[:, [0, 2]] / 10.0).float()


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 500, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean over random unit directions of the squared
    1-D Wasserstein-2 distance between the projected point sets (exact in 1-D: compare quantiles).
    Sets of different sizes are compared at the quantiles of the larger one (linear interpolation)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise KdUsageError(f"sliced Wasserstein needs two point sets (N, D) of the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa = (a.double() @ dirs).sort(dim=0).values
    pb = (b.double() @ dirs).sort(dim=0).values
    m = max(pa.shape[0], pb.shape[0])
    pa, pb = _at_quantiles(pa, m), _at_quantiles(pb, m)
    return float(((pa - pb) ** 2).mean(dim=0).mean().sqrt())


def _at_quantiles(sorted_vals: torch.Tensor, m: int) -> torch.Tensor:
    """Sorted samples (n, P) evaluated at m evenly spaced quantile levels (mid-points), by interpolation."""
    n = sorted_vals.shape[0]
    if n == m:
        return sorted_vals
    pos = (torch.arange(m, dtype=torch.float64) + 0.5) / m * n - 0.5
    pos = pos.clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo).view(-1, 1)
    return sorted_vals[lo] * (1 - w) + sorted_vals[hi] * w
