"""A picture of a query log: what was asked, sorted by what the oracle answered.

One row per class the oracle answered, queries spread evenly over that class's rows in log order (its first
and its last), the row labelled with the class and its share of the answers. Looking at it answers questions
a table cannot: do the queries look like anything, do the late ones differ from the first, did a generator
settle on one pattern per class, which classes does the attack never reach.
"""

from __future__ import annotations

import textwrap
from typing import Optional, Sequence

import torch

from .errors import KdError, KdUsageError
from .figures import save_figure


def to_hwc(x: torch.Tensor) -> torch.Tensor:
    """One stored query (C, H, W), uint8 or float in [0, 1], as a float (H, W) or (H, W, 3) array for imshow."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    x = x.clamp(0, 1)
    return x[0] if x.shape[0] == 1 else x[:3].permute(1, 2, 0)


def share_text(count: int, total: int) -> str:
    """A class's share of the answers for a label: "<0.1 %" rather than a misleading "0.0 %" for a class that
    was answered a few times, "0 %" only for one never answered."""
    if count <= 0:
        return "0 %"
    share = 100 * count / max(1, total)
    return "<0.1 %" if share < 0.05 else f"{share:.1f} %"


def heading_width(cols: int) -> int:
    """Characters of a heading line that fit over a grid of ``cols`` columns (about 11 per inch at the
    title's font size, the figure being 0.9 inch a column plus 1.6 for the labels)."""
    return max(24, int(11 * (0.9 * cols + 1.6)))


def plot_answer_grid(examples: dict[int, torch.Tensor], counts: Sequence[int], path, title: str = "",
                     class_names: Optional[Sequence[str]] = None, options: Optional[dict] = None) -> None:
    """Rows of query images by answered class, written atomically as an image in the format of ``path``'s
    suffix (kdtools.figures). ``examples``: class -> (k, C, H, W) tensor; ``counts``: answers per class."""
    import matplotlib

    matplotlib.use("Agg")  # no display; works on servers
    import matplotlib.pyplot as plt

    if not examples:  # the data's fault, not the command line's: every row refused, or none committed yet
        raise KdError("the log holds no answered query to draw (no rows yet, or every query refused)")
    first = next(iter(examples.values()))
    if first.dim() != 4 or first.shape[1] not in (1, 3):
        shape = "x".join(map(str, first.shape[1:]))
        raise KdUsageError(f"--grid draws images (1 or 3 channels, C x H x W); this log's queries are {shape}")
    classes = sorted(examples)
    cols = max(v.shape[0] for v in examples.values())
    total = max(1, sum(counts))
    never = [class_names[c] if class_names and c < len(class_names) else str(c) for c in range(len(counts)) if not counts[c]]
    # the heading is wrapped to the grid's width (one line would be cut off at a narrow grid's edge, e.g.
    # --per-class 2 under a long path) and the figure made tall enough for its lines
    width = heading_width(cols)
    caption = "(left: class, its share of the answers" + (f"; never answered: {', '.join(never)})" if never else ")")
    heading = textwrap.wrap(title or "queries by answered class", width) + textwrap.wrap(caption, width)
    fig, axes = plt.subplots(len(classes), cols, figsize=(0.9 * cols + 1.6, 0.9 * len(classes) + 0.22 * len(heading) + 0.3),
                             dpi=120, squeeze=False)
    for r, c in enumerate(classes):
        for k in range(cols):
            ax = axes[r][k]
            ax.set_xticks([])
            ax.set_yticks([])
            if k < examples[c].shape[0]:
                img = to_hwc(examples[c][k])
                ax.imshow(img.numpy(), cmap="gray" if img.dim() == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.axis("off")
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        axes[r][0].set_ylabel(f"{name}\n{share_text(counts[c], total)}", rotation=0, ha="right", va="center",
                              fontsize="small")
    fig.suptitle("\n".join(heading), fontsize="medium")
    fig.tight_layout()
    try:
        save_figure(fig, path, options, bbox_inches="tight")  # tight: nothing drawn outside the canvas is lost
    finally:
        plt.close(fig)
