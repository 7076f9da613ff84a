"""Synthetic crowds as in the dissertation (CIFAR10^S, Pendigits^S): noisy workers over true labels.

Each of ``n_workers`` workers labels every item, except that a label is missing with probability
``missing``; otherwise, with probability ``noise`` (the paper's "mislabelling probability") the label
is drawn from the paper's "bimodal noise distribution over classes" instead of being the truth.

The paper gives only the centres (3.0, 7.0) and spreads (1.0, 0.5) of that distribution. The default
draw (``draw="pmf"``) reads it literally as a distribution over the classes: class ``c`` has
probability proportional to the equal-weight mixture density of N(3, 1) and N(7, 0.5) at ``c``
(0.5 N(c; 3, 1) + 0.5 N(c; 7, 0.5), normalised over the C classes), and the draw may hit the true
class (a noisy worker can be right by chance). This reproduces the paper's majority-vote error: MV
with random tie-breaking errs on 25.1 % of MNIST's first 20 000 items at 10 workers, noise 0.6,
missing 0.1, against 24.74 % (CIFAR-10) and 25.27 % (Pendigits) in the paper's Table 2.2.

``draw="rounded"`` is the earlier reading: a continuous draw from the mixture, rounded to the nearest
class and redrawn while it falls outside the classes or equals the truth (always wrong). It makes the
crowd noisier than the paper's (MV error 31.4 % on the same items), because every noisy label is
wrong and most of them pile onto class 7 (the sd 0.5 component puts 68 % of its mass there).

For C classes other than 10 the class axis is rescaled so the centres keep their relative place
(class c sits at c * 9 / (C - 1) on the paper's 0..9 axis).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import KdError

CENTRES = (3.0, 7.0)
SDS = (1.0, 0.5)
WEIGHTS = (0.5, 0.5)
DRAWS = ("pmf", "rounded")


def bimodal_pmf(n_classes: int, centres=CENTRES, sds=SDS, weights=WEIGHTS) -> np.ndarray:
    """The noise distribution over classes: the mixture density at each class, normalised."""
    if n_classes < 2:
        raise KdError("a noise distribution needs at least two classes")
    x = np.arange(n_classes) * 9.0 / (n_classes - 1)  # class axis on the paper's 0..9 scale
    dens = sum(w * np.exp(-0.5 * ((x - m) / sd) ** 2) / sd for m, sd, w in zip(centres, sds, weights))
    return dens / dens.sum()


def bimodal_wrong_labels(truth: np.ndarray, n_classes: int, rng: np.random.Generator,
                         centres=CENTRES, sds=SDS, weights=WEIGHTS, max_rounds: int = 1000) -> np.ndarray:
    """``draw="rounded"``: one wrong label per entry of ``truth`` (class indices) from the rounded
    continuous mixture, redrawn while outside the classes or equal to the truth."""
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
                   missing: float = 0.1, seed: int = 0, draw: str = "pmf") -> Crowd:
    """Labels of ``n_workers`` workers on every item (item-major order); ``draw``: see the module."""
    if not 0 <= noise <= 1 or not 0 <= missing < 1:
        raise KdError("noise must be in [0, 1] and missing in [0, 1)")
    if n_workers < 1:
        raise KdError("need at least one worker")
    if draw not in DRAWS:
        raise KdError(f"unknown noise draw {draw!r} (expected one of {', '.join(DRAWS)})")
    truth = np.asarray(truth, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n = truth.size
    y = np.repeat(truth[:, None], n_workers, axis=1)
    present = rng.random((n, n_workers)) >= missing
    noisy = rng.random((n, n_workers)) < noise
    labels = y.copy()
    if noisy.any():
        if draw == "pmf":
            labels[noisy] = rng.choice(n_classes, size=int(noisy.sum()), p=bimodal_pmf(n_classes))
        else:
            labels[noisy] = bimodal_wrong_labels(y[noisy], n_classes, rng)
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
