"""Offline baselines on one window of labels: majority vote, Dawid-Skene EM and MACE (numpy).

Each function takes a window of labels as three integer arrays of equal length -- ``items``
(0..n_items-1, local to the window), ``workers`` (global worker index) and ``labels`` (class index)
-- and returns ``(label, proba, confusion)``: the aggregated class per item, an (n_items, C)
probability matrix and an (n_workers, C, C) confusion estimate (NaN rows for workers absent from
the window). Offline use is one window holding everything; the paper's sliding-window online mode
calls the same function on each chunk alone.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def vote_counts(items: np.ndarray, labels: np.ndarray, n_items: int, n_classes: int) -> np.ndarray:
    return np.bincount(items * n_classes + labels, minlength=n_items * n_classes).reshape(n_items, n_classes).astype(float)


def break_ties(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Argmax per row; among exactly tied maxima pick one uniformly at random."""
    best = scores.max(axis=1, keepdims=True)
    tied = np.isclose(scores, best, rtol=0, atol=1e-12)
    noise = rng.random(scores.shape)
    return np.where(tied, noise, -1.0).argmax(axis=1)


def majority_vote(items, workers, labels, n_items: int, n_workers: int, n_classes: int,
                  rng: Optional[np.random.Generator] = None):
    """Most frequent label; ties broken uniformly at random with ``rng`` (seeded by --seed).

    Probabilities are the vote fractions; the confusion estimate is each worker's label counts
    against the majority labels, normalised per row.
    """
    rng = rng or np.random.default_rng(0)
    votes = vote_counts(items, labels, n_items, n_classes)
    label = break_ties(votes, rng)
    proba = votes / np.maximum(votes.sum(1, keepdims=True), 1)
    conf = _confusion_counts(label[items][:, None] == np.arange(n_classes)[None, :], items, workers, labels,
                             n_workers, n_classes)
    return label, proba, _normalise_rows(conf)


def _confusion_counts(post_per_label: np.ndarray, items, workers, labels, n_workers: int, n_classes: int) -> np.ndarray:
    """sum over labels of P(truth = c) at [worker, c, label]: shape (K, C, C)."""
    C = n_classes
    out = np.zeros((n_workers, C, C))
    flat = workers * C + labels
    for c in range(C):
        out[:, c, :] = np.bincount(flat, weights=post_per_label[:, c].astype(float), minlength=n_workers * C).reshape(n_workers, C)
    return out


def _normalise_rows(counts: np.ndarray) -> np.ndarray:
    s = counts.sum(axis=2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s > 0, counts / np.where(s > 0, s, 1), np.nan)


def _loglik(log_conf: np.ndarray, items, workers, labels, n_items: int) -> np.ndarray:
    C = log_conf.shape[1]
    out = np.empty((n_items, C))
    for c in range(C):
        out[:, c] = np.bincount(items, weights=log_conf[workers, c, labels], minlength=n_items)
    return out


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def dawid_skene(items, workers, labels, n_items: int, n_workers: int, n_classes: int,
                rng: Optional[np.random.Generator] = None, max_iter: int = 100, tol: float = 1e-5,
                smoothing: float = 0.01):
    """Dawid & Skene (1979) EM: per-worker confusion matrices and a class prior.

    Starts from the majority-vote fractions (E-step 0), then alternates the M-step (prior and
    confusion counts + ``smoothing``) and the E-step until the posteriors move less than ``tol``.
    Ties of the final posterior are broken at random with ``rng``.
    """
    rng = rng or np.random.default_rng(0)
    C = n_classes
    post = vote_counts(items, labels, n_items, C)
    post /= np.maximum(post.sum(1, keepdims=True), 1)
    conf = None
    for _ in range(max_iter):
        prior = post.mean(axis=0) + 1e-12
        counts = _confusion_counts(post[items], items, workers, labels, n_workers, C) + smoothing
        conf = counts / counts.sum(axis=2, keepdims=True)
        ll = _loglik(np.log(conf), items, workers, labels, n_items) + np.log(prior / prior.sum())[None, :]
        new = _softmax_rows(ll)
        delta = np.abs(new - post).max() if len(post) else 0.0
        post = new
        if delta < tol:
            break
    present = np.zeros(n_workers, bool)
    present[workers] = True
    conf = np.where(present[:, None, None], conf, np.nan) if conf is not None else np.full((n_workers, C, C), np.nan)
    return break_ties(post, rng), post, conf


def mace(items, workers, labels, n_items: int, n_workers: int, n_classes: int,
         rng: Optional[np.random.Generator] = None, max_iter: int = 100, tol: float = 1e-5,
         smoothing: float = 0.5):
    """MACE (Hovy et al. 2013) by EM: each worker is competent with probability theta_k (then gives
    the true label) and otherwise "spams" a label from its own distribution xi_k; uniform class prior.

    Initialised from the majority-vote fractions; ``smoothing`` pseudo-counts on theta (both sides)
    and on xi. The confusion estimate is ``theta I + (1 - theta) 1 xi^T``.
    """
    rng = rng or np.random.default_rng(0)
    C = n_classes
    post = vote_counts(items, labels, n_items, C)
    post /= np.maximum(post.sum(1, keepdims=True), 1)
    theta = xi = None
    n_per_worker = np.bincount(workers, minlength=n_workers).astype(float)
    for _ in range(max_iter):
        if theta is None:
            # M-step from the initial posterior, counting a label as competent with P(truth = label)
            know = post[items, labels]
        else:
            p_true = post[items, labels]
            t_w = theta[workers]
            x_w = xi[workers, labels]
            know = p_true * t_w / (t_w + (1 - t_w) * x_w)
        spam = 1.0 - know
        theta = (np.bincount(workers, weights=know, minlength=n_workers) + smoothing) / (n_per_worker + 2 * smoothing)
        xi = np.bincount(workers * C + labels, weights=spam, minlength=n_workers * C).reshape(n_workers, C) + smoothing
        xi /= xi.sum(axis=1, keepdims=True)
        # E-step: P(truth = c) ∝ prod over labels of theta [a == c] + (1 - theta) xi(a)
        t_w = theta[workers]
        x_w = xi[workers, labels]
        base = np.log((1 - t_w) * x_w)
        hit = np.log(t_w + (1 - t_w) * x_w)
        ll = np.tile(np.bincount(items, weights=base, minlength=n_items)[:, None], (1, C))
        np.add.at(ll, (items, labels), hit - base)
        new = _softmax_rows(ll)
        delta = np.abs(new - post).max() if len(post) else 0.0
        post = new
        if delta < tol:
            break
    conf = theta[:, None, None] * np.eye(C)[None] + (1 - theta)[:, None, None] * xi[:, None, :]
    present = n_per_worker > 0
    conf = np.where(present[:, None, None], conf, np.nan)
    return break_ties(post, rng), post, conf


BASELINES = {"mv": majority_vote, "ds": dawid_skene, "mace": mace}
