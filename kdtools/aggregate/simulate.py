"""Synthetic crowds as in the dissertation (CIFAR10^S, Pendigits^S): noisy workers over true labels.

Each of ``n_workers`` workers labels every item, except that a label is missing with probability
``missing``; a given label is wrong with probability ``noise``. A wrong label is drawn from the
paper's bimodal class distribution: a mixture (equal weights) of normals centred at 3.0 (sd 1.0)
and 7.0 (sd 0.5) on the class axis, rounded to the nearest class and redrawn while it falls outside
the classes or equals the true label. For C classes other than 10 the class axis is rescaled so the
centres keep their relative place (x * (C - 1) / 9).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import KdError

CENTRES = (3.0, 7.0)
SDS = (1.0, 0.5)
WEIGHTS = (0.5, 0.5)


def bimodal_wrong_labels(truth: np.ndarray, n_classes: int, rng: np.random.Generator,
                         centres=CENTRES, sds=SDS, weights=WEIGHTS, max_rounds: int = 1000) -> np.ndarray:
    """One wrong label per entry of ``truth`` (class indices), from the bimodal distribution."""
    truth = np.asarray(truth)
    if n_classes < 2:
        raise KdError("a wrong label needs at least two classes")
    out = np.full(truth.shape, -1, dtype=np.int64)
    todo = np.arange(truth.size)
    scale = (n_classes - 1) / 9.0
    flat_truth = truth.reshape(-1)
    flat_out = out.reshape(-1)
    for _ in range(max_rounds):
        if todo.size == 0:
            break
        comp = (rng.random(todo.size) >= weights[0]).astype(int)
        x = rng.normal(np.asarray(centres)[comp], np.asarray(sds)[comp]) * scale
        z = np.rint(x).astype(np.int64)
        ok = (z >= 0) & (z < n_classes) & (z != flat_truth[todo])
        flat_out[todo[ok]] = z[ok]
        todo = todo[~ok]
    if todo.size:  # practically never: fall back to a uniform wrong class
        shift = rng.integers(1, n_classes, size=todo.size)
        flat_out[todo] = (flat_truth[todo] + shift) % n_classes
    return out


@dataclass
class Crowd:
    items: np.ndarray  # item index per label
    workers: np.ndarray  # worker index per label
    labels: np.ndarray  # class index per label


def simulate_crowd(truth: np.ndarray, n_classes: int, n_workers: int = 10, noise: float = 0.6,
                   missing: float = 0.1, seed: int = 0) -> Crowd:
    """Labels of ``n_workers`` workers on every item (item-major order)."""
    if not 0 <= noise <= 1 or not 0 <= missing < 1:
        raise KdError("noise must be in [0, 1] and missing in [0, 1)")
    if n_workers < 1:
        raise KdError("need at least one worker")
    truth = np.asarray(truth, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n = truth.size
    y = np.repeat(truth[:, None], n_workers, axis=1)
    present = rng.random((n, n_workers)) >= missing
    wrong = rng.random((n, n_workers)) < noise
    labels = y.copy()
    if wrong.any():
        labels[wrong] = bimodal_wrong_labels(y[wrong], n_classes, rng)
    ii, ww = np.nonzero(present)
    return Crowd(items=ii, workers=ww, labels=labels[ii, ww])


def load_mnist_labels(root: str, train: bool = True) -> np.ndarray:
    """MNIST's true labels from torchvision's raw files under ``root`` (no download)."""
    try:
        from torchvision.datasets import MNIST
    except ImportError as e:  # pragma: no cover
        raise KdError(f"torchvision is needed to read MNIST: {e}") from None
    try:
        ds = MNIST(root, train=train, download=False)
    except RuntimeError as e:
        raise KdError(f"no MNIST under {root}: {e}") from None
    return ds.targets.numpy().astype(np.int64)
