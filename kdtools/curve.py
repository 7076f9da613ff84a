"""kd-eval curve: substitute accuracy (and fidelity to the victim) against queries spent.

An attack run saves its substitute every so often as ``DIR/checkpoints/substitute-<queries>.safetensors``:
a kdtools weights file whose metadata key ``queries_spent`` says how many oracle calls had been paid
when it was saved (the number in the file name is the fallback). ``find_checkpoints`` accepts

  DIR          its checkpoints/ sub-directory if there is one, else the *.safetensors files in DIR
  LOG.h5       a query log: the checkpoints directory its run recorded (extra "checkpoints"), else
               the checkpoints/ directory beside the log
  FILE         one weights file

and ``evaluate_curve`` measures each on a labelled split, with the reference's predictions computed once.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import __version__
from .data import ImageSet
from .errors import KdError
from .evaluate import check_input
from .figures import save_figure
from .fileio import sniff
from .progress import ProgressCallback, ProgressEvent, no_progress
from .train import predict
from .weights import load_model, read_metadata

QUERIES_IN_NAME = re.compile(r"-(\d+)\.safetensors$")


@dataclass
class CurvePoint:
    queries: int
    accuracy: float
    fidelity: Optional[float]
    path: str


def title_lines(title: str, width: int = 60) -> str:
    """A plot title broken into lines that fit the figure (a long --title was cut at both edges)."""
    import textwrap

    return "\n".join(textwrap.wrap(title, width)) or title


def query_tick(value: float) -> str:
    """An axis label for a query count: 500, 20k, 1.5M (matplotlib's default wrote 0.2 ... 1.0 with "1e6" in a corner)."""
    value = float(value)
    if value == 0:
        return "0"  # not "-0"
    # six significant digits: ticks 0.5k apart near 200k (one checkpoint) must not round to the same label,
    # and 999 500 must not read "1e+03k"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.6g}{suffix}"
    return f"{value:.6g}"


def queries_of(path: Path) -> int:
    """The queries a checkpoint was saved at: metadata ``queries_spent``, else ``-<n>.safetensors``."""
    meta = read_metadata(path)
    if "queries_spent" in meta:
        try:
            return int(json.loads(meta["queries_spent"]))
        except (ValueError, TypeError):
            raise KdError(f"{path}: metadata queries_spent={meta['queries_spent']!r} is not a whole number") from None
    m = QUERIES_IN_NAME.search(path.name)
    if m:
        return int(m.group(1))
    raise KdError(f"{path}: a weights file without queries_spent in its metadata (and no -<queries> in its name)")


def _checkpoint_dir_of_log(log: Path) -> Path:
    from .h5store import read_header

    extra = read_header(log).extra
    recorded = extra.get("checkpoints") if isinstance(extra, dict) else None
    if recorded:
        d = Path(recorded)
        return d if d.is_absolute() else log.parent / d
    return log.parent / "checkpoints"


def find_checkpoints(inputs: Sequence[str]) -> list[tuple[int, Path]]:
    """(queries, path) of every checkpoint named by ``inputs``, sorted by queries."""
    found: list[tuple[int, Path]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            d = p / "checkpoints" if (p / "checkpoints").is_dir() else p
            files = sorted(d.glob("*.safetensors"))
            if not files:
                raise KdError(f"{p}: no checkpoints (*.safetensors) in {d}")
        elif p.is_file() and sniff(p) == "hdf5":
            d = _checkpoint_dir_of_log(p)
            files = sorted(d.glob("*.safetensors")) if d.is_dir() else []
            if not files:
                raise KdError(f"{p}: a query log, but no checkpoints in {d}: a curve needs the substitutes an attack "
                              "saved (kd-gen-queries -o DIR); for a kd-query log, train on it with kd-distill and "
                              "measure with kd-eval accuracy")
        elif p.is_file():
            files = [p]
        else:
            raise KdError(f"{p}: no such file or directory")
        found += [(queries_of(f), f) for f in files]
    # a weights file named beside the run directory that holds it is one checkpoint, not two points
    unique = {f.resolve(): (q, f) for q, f in reversed(found)}
    return sorted(unique.values(), key=lambda qp: (qp[0], str(qp[1])))


def evaluate_curve(checkpoints: Sequence[tuple[int, Path]], data: ImageSet, device: torch.device,
                   reference: Optional[torch.nn.Module] = None, reference_shape: Optional[tuple] = None,
                   progress: ProgressCallback = no_progress) -> tuple[list[CurvePoint], Optional[float]]:
    """Accuracy (and fidelity to ``reference``) of each checkpoint on ``data``; also the reference's accuracy."""
    if data.y is None:
        raise KdError(f"{data.name}: no labels to measure accuracy against")
    ref_pred, ref_acc = None, None
    if reference is not None:
        if reference_shape is not None:
            check_input(reference_shape, data, "the reference")
        ref_pred = predict(reference.to(device), data.x, device).argmax(1)
        ref_acc = (ref_pred == data.y).float().mean().item()
    points = []
    for i, (queries, path) in enumerate(checkpoints):
        m = load_model(path)
        check_input(m.input_shape, data, str(path))
        pred = predict(m.module.to(device), data.x, device).argmax(1)
        fid = (pred == ref_pred).float().mean().item() if ref_pred is not None else None
        points.append(CurvePoint(queries, (pred == data.y).float().mean().item(), fid, str(path)))
        progress(ProgressEvent("checkpoints", i + 1, len(checkpoints), {"queries": queries}))
    progress(ProgressEvent("checkpoints", len(checkpoints), len(checkpoints), done=True))
    return points, ref_acc


def curve_json(series: Sequence[tuple[str, list[CurvePoint]]], data_name: str, reference: Optional[str],
               reference_accuracy: Optional[float], options: dict) -> dict:
    """The curve as JSON: always ``series`` (one entry per run: its name, "" for a single unnamed one, and its
    points); with exactly one series its points are also ``points``, the shape a single curve had first."""
    doc = {"kdtools.version": __version__, "data": data_name, "reference": reference,
           "reference_accuracy": reference_accuracy,
           "series": [{"run": name, "points": [asdict(p) for p in points]} for name, points in series],
           "options": options}
    if len(series) == 1:
        doc["points"] = doc["series"][0]["points"]
    return doc


def run_label(item: str) -> str:
    """A short name for the run an input names: its directory (a log: the directory holding it)."""
    p = Path(item)
    if p.is_file() and sniff(p) == "hdf5":
        return p.parent.name or p.stem
    return p.name or str(p)


def is_run(item: str) -> bool:
    """A run directory or a query log (one series of a comparison), rather than a single weights file."""
    p = Path(item)
    return p.is_dir() or (p.is_file() and sniff(p) == "hdf5")


def plot_curve(points: list[CurvePoint], path, title: str = "", reference_accuracy: Optional[float] = None,
               options: Optional[dict] = None) -> None:
    """Accuracy (and fidelity) against queries as an image (format from the suffix), written atomically."""
    plot_curves([("", points)], path, title, reference_accuracy, options)


def plot_curves(series: Sequence[tuple[str, list[CurvePoint]]], path, title: str = "",
                reference_accuracy: Optional[float] = None, options: Optional[dict] = None) -> None:
    """One line per run (accuracy; fidelity dashed when measured) against queries, written atomically as an image
    in the format of ``path``'s suffix (PNG, SVG, PDF, ...; kdtools.figures)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; works on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    all_q = []
    for i, (name, points) in enumerate(series):
        q = [p.queries for p in points]
        all_q += q
        color = f"C{i % 10}"
        ax.plot(q, [100 * p.accuracy for p in points], marker="o", color=color,
                label=f"{name}: accuracy" if name else "substitute accuracy")
        if points and points[0].fidelity is not None:
            ax.plot(q, [100 * p.fidelity for p in points], marker="s", linestyle="--", color=color, alpha=0.6,
                    label=f"{name}: fidelity" if name else "fidelity to the victim")
    if reference_accuracy is not None:
        ax.axhline(100 * reference_accuracy, color="grey", linestyle=":", label="victim accuracy")
    if all_q and min(all_q) > 0 and max(all_q) / min(all_q) >= 100:
        ax.set_xscale("log")  # budgets span orders of magnitude
    if ax.get_xscale() == "linear":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no tick at half a query
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: query_tick(value)))
    ax.set_xlabel("queries spent")
    ax.set_ylabel("%")
    ax.set_title(title_lines(title or "accuracy vs queries"), fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    try:
        save_figure(fig, path, options)
    finally:
        plt.close(fig)
