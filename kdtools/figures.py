"""Writing plots: the format from the file name, written atomically, with the kdtools version and the options
that made it in the file's own metadata (PNG text chunks, SVG and PDF document information).

One module so that every command that draws a plot accepts the same names: ``curve.png``, ``curve.svg``,
``curve.pdf`` (or any other format matplotlib writes; no suffix means PNG).
"""

from __future__ import annotations

import json
import os

from . import __version__
from .errors import KdUsageError
from .fileio import atomic_path


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


def figure_metadata(fmt: str, options: dict | None) -> dict | None:
    """What records the kdtools version and ``options`` in a ``fmt`` file; None where matplotlib's writer for
    that format takes no metadata we can use (JPEG, TIFF, raw)."""
    made_by = f"kdtools {__version__}"
    described = json.dumps(options or {}, default=str)
    # each writer has its own key names: PNG text chunks, SVG Dublin Core, the PDF / PostScript info dictionary
    if fmt == "png":
        return {"Software": made_by, "Description": described}
    if fmt in ("svg", "svgz"):
        return {"Creator": made_by, "Description": described}
    if fmt == "pdf":
        return {"Creator": made_by, "Subject": described}
    if fmt in ("ps", "eps"):
        return {"Creator": made_by}
    return None


def save_figure(fig, path: str | os.PathLike, options: dict | None = None, **savefig_args) -> None:
    """Write ``fig`` to ``path`` atomically, in the format of its suffix, with its metadata."""
    fmt = image_format(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, metadata=figure_metadata(fmt, options), **savefig_args)
