"""Error-rate curves: error after each chunk for each method (matplotlib, Agg backend, no display)."""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from .. import __version__
from ..errors import KdError, KdUsageError
from ..fileio import atomic_path


def image_format(path: str | os.PathLike) -> str:
    """The image format matplotlib writes ``path`` in: its suffix (lower case), ``png`` when it has none.

    Raises KdUsageError for a suffix matplotlib cannot write (``errors.txt``), so a command can check
    its plot path before any work rather than fail after it."""
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = os.path.splitext(str(path))[1].lower().lstrip(".") or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if suffix not in supported:
        raise KdUsageError(f"{path}: cannot draw a plot as {suffix!r} (use one of "
                           f"{', '.join('.' + f for f in sorted(supported))}; no suffix means PNG)")
    return suffix


def has_points(curves: Mapping[str, Sequence[tuple[int, float]]]) -> bool:
    """Whether any curve has a point to draw."""
    return any(len(points) for points in curves.values())


def plot_error_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | os.PathLike,
                      title: str = "Error rate after each chunk", options: dict | None = None) -> None:
    """``curves``: method name -> [(tasks aggregated so far, error rate in [0, 1]), ...].

    Writes a PNG (or any format matplotlib infers from the suffix) atomically; the kdtools version
    and ``options`` are recorded in the image metadata where the format supports it (PNG does).
    Raises KdUsageError for an unsupported suffix (see :func:`image_format`) and KdError when no
    curve has a point (an empty plot is never written; check :func:`has_points` first).
    """
    fmt = image_format(path)
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
    meta = None
    if fmt == "png":
        meta = {"Software": f"kdtools {__version__}", "Description": json.dumps(options or {}, default=str)}
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, metadata=meta)
    finally:
        plt.close(fig)
