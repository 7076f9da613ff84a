"""Open-loop query sources for kd-gen-queries: noise and public-dataset images.

Each source yields batches ``{"x": tensor}``; images in [0, 1] either as uint8 (8-bit images) or float32.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from .data import ImageSet
from .errors import KdUsageError


def noise_batches(shape: tuple, n: int, batch_size: int = 256, distribution: str = "uniform", seed: int = 0,
                  mean: float = 0.5, std: float = 0.25) -> Iterator[dict]:
    """Random images: uniform on [0, 1], or gaussian(mean, std) clipped to [0, 1]."""
    if distribution not in ("uniform", "gaussian"):
        raise KdUsageError(f"--dist {distribution!r}: expected uniform or gaussian")
    if batch_size < 1:
        raise KdUsageError(f"--batch-size must be at least 1, not {batch_size}")
    g = torch.Generator().manual_seed(seed)
    for i in range(0, n, batch_size):
        m = min(batch_size, n - i)
        if distribution == "uniform":
            x = torch.rand(m, *shape, generator=g)
        else:
            x = (torch.randn(m, *shape, generator=g) * std + mean).clamp_(0, 1)
        yield {"x": x}


def random_affine(x: torch.Tensor, g: torch.Generator, degrees: float = 15.0, translate: float = 0.1,
                  scale: tuple = (0.9, 1.1), hflip: bool = False) -> torch.Tensor:
    """A different random rotation/scale/shift (and optional mirror) for every image of a float batch."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(degrees)
    s = torch.empty(n).uniform_(scale[0], scale[1], generator=g)
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * translate * 2  # grid coordinates span [-1, 1]
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if hflip else torch.ones(n)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos * flip, -sin, t[:, 0]], 1), torch.stack([sin * flip, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def dataset_batches(data: ImageSet, n: int, batch_size: int = 256, shuffle: bool = True, augment: bool = False,
                    seed: int = 0, hflip: bool = False) -> Iterator[dict]:
    """``n`` images drawn from ``data`` (cycling through it when n exceeds its size), optionally augmented."""
    if len(data) == 0:
        raise KdUsageError(f"dataset {data.title} is empty")
    if batch_size < 1:  # a zero or negative step would never finish
        raise KdUsageError(f"--batch-size must be at least 1, not {batch_size}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g) if shuffle else torch.arange(len(data))
    produced = 0
    while produced < n:
        for i in range(0, len(order), batch_size):
            m = min(batch_size, n - produced, len(order) - i)
            if m <= 0:
                break
            x = data.x[order[i:i + m]]
            if augment:
                xf = x.float() / 255.0 if x.dtype == torch.uint8 else x
                xf = random_affine(xf, g, hflip=hflip).clamp_(0, 1)
                x = (xf * 255).round().to(torch.uint8) if data.x.dtype == torch.uint8 else xf
            produced += m
            yield {"x": x.contiguous()}
        if shuffle:
            order = torch.randperm(len(data), generator=g)
