"""Writing plots: the format from the file name, written atomically, with the kdtools version and the options
that made it in the file's own metadata (PNG text chunks, SVG and PDF document information, a JPEG comment,
TIFF description and software tags).

One module so that every command that draws a plot accepts the same names: ``curve.png``, ``curve.svg``,
``curve.pdf``, ``curve.jpg``, ``curve.tif`` (no suffix means PNG). Only formats whose files can carry that
record are offered: matplotlib's raw / rgba dumps cannot, PostScript keeps only a creator line, and PGF
needs a LaTeX installation.
"""

from __future__ import annotations

import json
import os

from . import __version__
from .errors import KdUsageError
from .fileio import atomic_path


# the suffixes a plot may have: each format can record the kdtools version and the options (figure_metadata)
PLOT_FORMATS = ("jpeg", "jpg", "pdf", "png", "svg", "svgz", "tif", "tiff")


def image_format(path: str | os.PathLike) -> str:
    """The image format matplotlib writes ``path`` in: its suffix (lower case), ``png`` when it has none.

    Raises KdUsageError for any other suffix (``errors.txt``, ``errors.eps``), so a command can check
    its plot path before any work rather than fail after it."""
    suffix = os.path.splitext(str(path))[1].lower().lstrip(".") or "png"
    if suffix not in PLOT_FORMATS:
        raise KdUsageError(f"{path}: cannot draw a plot as {suffix!r} (use one of "
                           f"{', '.join('.' + f for f in PLOT_FORMATS)}; no suffix means PNG)")
    return suffix


def figure_metadata(fmt: str, options: dict | None) -> dict:
    """The ``savefig`` arguments that record the kdtools version and ``options`` in a ``fmt`` file."""
    made_by = f"kdtools {__version__}"
    described = json.dumps(options or {}, default=str)
    # each writer has its own names: PNG text chunks, SVG Dublin Core, the PDF info dictionary, and for the
    # formats Pillow writes, a JPEG comment and the TIFF ImageDescription / Software tags
    if fmt == "png":
        return {"metadata": {"Software": made_by, "Description": described}}
    if fmt in ("svg", "svgz"):
        return {"metadata": {"Creator": made_by, "Description": described}}
    if fmt == "pdf":
        return {"metadata": {"Creator": made_by, "Subject": described}}
    if fmt in ("jpg", "jpeg"):
        return {"pil_kwargs": {"comment": f"{made_by} {described}"}}
    if fmt in ("tif", "tiff"):
        return {"pil_kwargs": {"software": made_by, "description": described}}
    raise KdUsageError(f"cannot record who made a {fmt!r} plot")  # image_format offers no other format


def save_figure(fig, path: str | os.PathLike, options: dict | None = None, **savefig_args) -> None:
    """Write ``fig`` to ``path`` atomically, in the format of its suffix, with its metadata."""
    fmt = image_format(path)
    with atomic_path(path) as tmp:
        if fmt == "svgz":
            # matplotlib would gzip under the temporary file's name, which the gzip header then records (and
            # `gunzip -N` restores): compress here, naming the plot the user asked for (without the z)
            import gzip
            import io

            svg = io.BytesIO()
            fig.savefig(svg, format="svg", **figure_metadata(fmt, options), **savefig_args)
            with open(tmp, "wb") as raw, gzip.GzipFile(filename=os.path.basename(str(path))[:-1], mode="wb",
                                                       fileobj=raw) as packed:
                packed.write(svg.getvalue())
        else:
            fig.savefig(tmp, format=fmt, **figure_metadata(fmt, options), **savefig_args)
