"""PNG pictures of samples: grids, teacher/student pairs from the same noise, interpolations.

Images are written as image grids (torchvision's ``make_grid``); 2-D points as matplotlib scatter plots.
Every file is written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from ..fileio import atomic_path


def save_image_rows(rows: Sequence[torch.Tensor], path: str | Path, labels: Sequence[str] = ()) -> None:
    """Rows of [-1, 1] images (each (n, C, H, W)) stacked into one grid PNG, one row per tensor."""
    from torchvision.utils import make_grid, save_image

    ncol = max(r.shape[0] for r in rows)
    tiles = torch.cat([r for r in rows])
    grid = make_grid(((tiles.clamp(-1, 1) + 1) / 2).float(), nrow=ncol, padding=2, pad_value=1.0)
    with atomic_path(path) as tmp:
        save_image(grid, str(tmp), format="png")


def save_grid(x: torch.Tensor, path: str | Path, max_images: int = 64, title: str = "") -> None:
    """A grid of the first images, or a scatter plot of points."""
    if x.dim() == 2:
        save_scatter([x], [title or f"{x.shape[0]} samples"], path)
        return
    x = x[:max_images]
    ncol = int(math.ceil(math.sqrt(x.shape[0])))
    rows = [x[i:i + ncol] for i in range(0, x.shape[0], ncol)]
    if rows and rows[-1].shape[0] < ncol:  # pad the last row with white tiles
        pad = torch.ones((ncol - rows[-1].shape[0], *x.shape[1:]))
        rows[-1] = torch.cat([rows[-1], pad])
    save_image_rows(rows, path)


def save_scatter(point_sets: Sequence[torch.Tensor], titles: Sequence[str], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(point_sets), figsize=(4 * len(point_sets), 4), squeeze=False)
    for ax, pts, title in zip(axes[0], point_sets, titles):
        p = pts.detach().cpu().numpy()
        ax.scatter(p[:, 0], p[:, 1], s=1, alpha=0.4)
        ax.set_title(title)
        ax.set_aspect("equal")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(str(tmp), format="png", dpi=80)
    plt.close(fig)


def save_pairs(teacher_x: torch.Tensor, student_x: torch.Tensor, path: str | Path, names=("teacher", "student")) -> None:
    """Teacher samples in the top row, the student's from the same noises below."""
    if teacher_x.dim() == 2:
        save_scatter([teacher_x, student_x], list(names), path)
    else:
        save_image_rows([teacher_x, student_x], path)
