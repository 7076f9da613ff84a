"""A picture of a query log: what was asked, sorted by what the oracle answered.

One row per class the oracle answered, its first queries in log order, the row labelled with the class and
its share of the answers. Looking at it answers questions a table cannot: did the generator collapse to one
pattern, do the queries look like anything, which classes does the attack never reach.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .errors import KdUsageError
from .figures import save_figure


def to_hwc(x: torch.Tensor) -> torch.Tensor:
    """One stored query (C, H, W), uint8 or float in [0, 1], as a float (H, W) or (H, W, 3) array for imshow."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    x = x.clamp(0, 1)
    return x[0] if x.shape[0] == 1 else x[:3].permute(1, 2, 0)


def plot_answer_grid(examples: dict[int, torch.Tensor], counts: Sequence[int], path, title: str = "",
                     class_names: Optional[Sequence[str]] = None, options: Optional[dict] = None) -> None:
    """Rows of query images by answered class, written atomically as an image in the format of ``path``'s
    suffix (kdtools.figures). ``examples``: class -> (k, C, H, W) tensor; ``counts``: answers per class."""
    import matplotlib

    matplotlib.use("Agg")  # no display; works on servers
    import matplotlib.pyplot as plt

    if not examples:
        raise KdUsageError("the log holds no answered query to draw")
    first = next(iter(examples.values()))
    if first.dim() != 4 or first.shape[1] not in (1, 3):
        shape = "x".join(map(str, first.shape[1:]))
        raise KdUsageError(f"--grid draws images (1 or 3 channels, C x H x W); this log's queries are {shape}")
    classes = sorted(examples)
    cols = max(v.shape[0] for v in examples.values())
    total = max(1, sum(counts))
    fig, axes = plt.subplots(len(classes), cols, figsize=(0.9 * cols + 1.6, 0.9 * len(classes) + 0.6), dpi=120,
                             squeeze=False)
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
        axes[r][0].set_ylabel(f"{name}\n{100 * counts[c] / total:.1f} %", rotation=0, ha="right", va="center",
                              fontsize="small")
    never = [class_names[c] if class_names and c < len(class_names) else str(c) for c in range(len(counts)) if not counts[c]]
    fig.suptitle((title or "queries by answered class") + "\n(left: class, its share of the answers"
                 + (f"; never answered: {', '.join(never)})" if never else ")"), fontsize="medium")
    fig.tight_layout()
    try:
        save_figure(fig, path, options)
    finally:
        plt.close(fig)
