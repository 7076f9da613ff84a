"""Error-rate curves: error after each chunk for each method (matplotlib, Agg backend, no display)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from ..errors import KdError
from ..figures import image_format, save_figure


def has_points(curves: Mapping[str, Sequence[tuple[int, float]]]) -> bool:
    """Whether any curve has a point to draw."""
    return any(len(points) for points in curves.values())


def plot_error_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | os.PathLike,
                      title: str = "Error rate after each chunk", options: dict | None = None) -> None:
    """``curves``: method name -> [(tasks aggregated so far, error rate in [0, 1]), ...].

    Writes a PNG (or any format matplotlib infers from the suffix) atomically; the kdtools version
    and ``options`` are recorded in the file's own metadata (every format kdtools.figures offers).
    Raises KdUsageError for an unsupported suffix (see :func:`image_format`) and KdError when no
    curve has a point (an empty plot is never written; check :func:`has_points` first).
    """
    image_format(path)  # an unusable name is a usage error before anything is drawn
    if not has_points(curves):
        raise KdError(f"{path}: no error-rate point to draw (no task with gold was aggregated)")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, points in curves.items():
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, [100 * y for y in ys], marker="o" if len(xs) < 40 else None, markersize=3, label=name)
    ax.set_xlabel("tasks aggregated")
    ax.set_ylabel("error rate (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        save_figure(fig, path, options)
    finally:
        plt.close(fig)
