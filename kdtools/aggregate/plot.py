"""Error-rate curves: error after each chunk for each method (matplotlib, Agg backend, no display)."""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from .. import __version__
from ..fileio import atomic_path


def plot_error_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | os.PathLike,
                      title: str = "Error rate after each chunk", options: dict | None = None) -> None:
    """``curves``: method name -> [(tasks aggregated so far, error rate in [0, 1]), ...].

    Writes a PNG (or any format matplotlib infers from the suffix) atomically; the kdtools version
    and ``options`` are recorded in the image metadata where the format supports it (PNG does).
    """
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
    suffix = os.path.splitext(str(path))[1].lower() or ".png"
    meta = None
    if suffix == ".png":
        meta = {"Software": f"kdtools {__version__}", "Description": json.dumps(options or {}, default=str)}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=suffix.lstrip("."), metadata=meta)
    plt.close(fig)
