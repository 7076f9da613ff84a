"""The online aggregator: vocabularies, the label store, the per-chunk update, any method.

``Aggregator.process(rows)`` takes one chunk of ``(task, worker, label)`` string rows and returns the
aggregated labels of the chunk's tasks. For BiLA-CM it grows and trains the model on the chunk
(the first chunk of a fresh aggregator is the initial set); for the baselines it runs them on the
chunk alone (the paper's sliding window) -- or on everything at once when the input is one chunk.

Everything the next chunk needs lives in this object, and :mod:`kdtools.aggregate.state` saves and
loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import KdError
from ..progress import ProgressCallback, ProgressEvent, no_progress
from .baselines import BASELINES
from .bila import BilaConfig, BilaModel, Triples, single_thread
from .crowdio import Row, dedupe

METHODS = ("bila", "mv", "ds", "mace")


class Vocab:
    """An append-only string <-> index map."""

    def __init__(self, items: Sequence[str] = ()):
        self.items: list[str] = list(items)
        self.index: dict[str, int] = {s: i for i, s in enumerate(self.items)}
        if len(self.index) != len(self.items):
            raise ValueError("repeated entries in a vocabulary")

    def __len__(self) -> int:
        return len(self.items)

    def add(self, s: str) -> int:
        i = self.index.get(s)
        if i is None:
            i = len(self.items)
            self.items.append(s)
            self.index[s] = i
        return i


@dataclass
class ChunkResult:
    tasks: list[str]  # the chunk's tasks, in order of first appearance
    labels: list[str]
    confidence: np.ndarray  # probability of the chosen label
    proba: np.ndarray  # (n_tasks, C), columns in ``classes`` order
    classes: list[str]
    n_labels: int  # labels in the chunk after removing repeats
    replaced: int  # repeated (task, worker) labels replaced (inside the chunk and across chunks)
    new_workers: int
    new_classes: list[str]
    info: dict = field(default_factory=dict)


class Aggregator:
    def __init__(self, method: str = "bila", classes: Optional[Sequence[str]] = None,
                 config: Optional[BilaConfig] = None, seed: int = 0):
        if method not in METHODS:
            raise KdError(f"unknown method {method!r} (expected one of {', '.join(METHODS)})")
        self.method = method
        self.seed = int(seed)
        self.config = config or BilaConfig(seed=seed)
        self.classes_fixed = classes is not None
        self.classes = Vocab(classes or ())
        self.tasks = Vocab()
        self.workers = Vocab()
        # the label store: for each task, {worker: class}; kept so a task seen again is merged
        self.store: dict[int, dict[int, int]] = {}
        self.emitted = np.zeros(0, dtype=np.int32)  # last label given for each task (-1: none yet)
        self.emitted_conf = np.zeros(0, dtype=np.float32)
        self.class_counts = np.zeros(len(self.classes), dtype=np.int64)  # labels in the store per class
        self.chunks = 0
        self.labels_seen = 0
        self.model: Optional[BilaModel] = None
        self.last_confusion: Optional[np.ndarray] = None  # baselines: the last window's estimate

    # ------------------------------------------------------------------------------------------

    def process(self, rows: Sequence[Row], progress: ProgressCallback = no_progress,
                chunk_name: Optional[str] = None) -> ChunkResult:
        if not rows:
            raise KdError(f"{chunk_name or 'chunk'}: empty chunk (no labels)")
        rows, replaced = dedupe(list(rows))
        # classes first (may raise before anything changes)
        if self.classes_fixed:
            for task, worker, label in rows:
                if label not in self.classes.index:
                    known = ", ".join(self.classes.items[:10]) + (" ..." if len(self.classes) > 10 else "")
                    raise KdError(f"{chunk_name or 'chunk'}: label {label!r} (task {task!r}, worker {worker!r}) is not one of "
                                  f"the fixed classes ({known}; fixed by --classes, now or when the state was made)")
        n_classes_before = len(self.classes)
        from .crowdio import natural_order
        fresh_labels = [l for l in natural_order(l for _, _, l in rows) if l not in self.classes.index]
        for l in fresh_labels:
            self.classes.add(l)
        if len(self.class_counts) < len(self.classes):
            self.class_counts = np.concatenate([self.class_counts, np.zeros(len(self.classes) - len(self.class_counts), np.int64)])
        new_classes = self.classes.items[n_classes_before:]
        n_workers_before = len(self.workers)
        chunk_tasks: dict[int, None] = {}
        for task, worker, label in rows:
            t = self.tasks.add(task)
            w = self.workers.add(worker)
            c = self.classes.index[label]
            chunk_tasks.setdefault(t, None)
            labels_of = self.store.setdefault(t, {})
            old = labels_of.get(w)
            if old is not None:
                replaced += 1
                self.class_counts[old] -= 1
            labels_of[w] = c
            self.class_counts[c] += 1
        self.labels_seen += len(rows)
        n_tasks = len(self.tasks)
        if len(self.emitted) < n_tasks:
            self.emitted = np.concatenate([self.emitted, np.full(n_tasks - len(self.emitted), -1, np.int32)])
            self.emitted_conf = np.concatenate([self.emitted_conf, np.zeros(n_tasks - len(self.emitted_conf), np.float32)])
        task_idx = list(chunk_tasks)
        items, workers, labels = [], [], []
        for i, t in enumerate(task_idx):
            for w, c in self.store[t].items():
                items.append(i); workers.append(w); labels.append(c)
        items = np.asarray(items, dtype=np.int64)
        workers = np.asarray(workers, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        K, C = len(self.workers), len(self.classes)
        chunk_no = self.chunks + 1
        rng = np.random.default_rng([self.seed, chunk_no])
        info: dict = {}
        if self.method == "bila":
            with single_thread():
                label, proba, info = self._bila(items, workers, labels, len(task_idx), K, C, chunk_no, rng, progress)
        else:
            fn = BASELINES[self.method]
            label, proba, conf = fn(items, workers, labels, len(task_idx), K, C, rng=rng)
            self.last_confusion = conf
        conf_of_label = proba[np.arange(len(label)), label]
        ti = np.asarray(task_idx, dtype=np.int64)
        self.emitted[ti] = label
        self.emitted_conf[ti] = conf_of_label
        self.chunks = chunk_no
        return ChunkResult(tasks=[self.tasks.items[t] for t in task_idx],
                           labels=[self.classes.items[c] for c in label], confidence=conf_of_label,
                           proba=proba, classes=list(self.classes.items), n_labels=len(rows), replaced=replaced,
                           new_workers=len(self.workers) - n_workers_before, new_classes=list(new_classes), info=info)

    def _bila(self, items, workers, labels, n_items, K, C, chunk_no, rng, progress):
        first = self.model is None
        if first:
            self.model = BilaModel(K, C, self.config)
        else:
            self.model.grow(K, C)
        m = self.model
        # eq. 2.10: the prior counts every label observed so far (a replaced label counts once)
        m.prior_counts = torch.as_tensor(self.class_counts, dtype=torch.float64).clone()
        L = Triples.build(items, workers, labels, n_items)
        info = {}
        if first or not m.initialised:
            from .baselines import majority_vote
            mv, _, _ = majority_vote(items, workers, labels, n_items, K, C, rng=rng)
            m.init_from_majority(L, torch.as_tensor(mv))
            s0 = m.train_chunk(L, seed=self.seed * 1_000_003 + chunk_no, fit_q_only=True,
                               max_epochs=self.config.init_epochs, progress=progress, task="initialising")
            info["init_epochs"] = s0.epochs
        stats = m.train_chunk(L, seed=self.seed * 1_000_003 + chunk_no + 7919, progress=progress,
                              task="training")
        if not m.is_finite():
            # caught before any label of this chunk is given or any state saved: a NaN model would label every
            # task class 0 with confidence nan, in this chunk and every later one
            raise KdError(f"BiLA-CM training diverged on chunk {chunk_no} (its parameters became NaN or infinite; "
                          f"zeta {self.config.zeta:g}, lr {self.config.lr:g}); nothing of this chunk was written: "
                          f"use a smaller --zeta or --lr")
        info.update({"epochs": stats.epochs, "steps": stats.steps, "loss": stats.loss})
        label, proba = m.infer(L)
        return label, proba, info

    # ------------------------------------------------------------------------------------------

    def confusion(self) -> np.ndarray:
        """(K, C, C) confusion matrices: BiLA's learned ones, or a baseline's from its last window."""
        K, C = len(self.workers), len(self.classes)
        if self.method == "bila":
            if self.model is None:
                return np.full((K, C, C), np.nan)
            return self.model.confusion().double().numpy()
        if self.last_confusion is None:
            return np.full((K, C, C), np.nan)
        return self.last_confusion

    def error_rate(self, gold: dict[str, str]) -> tuple[float, int]:
        """Error of the last label given to each task that has gold; returns (rate, tasks compared)."""
        wrong = n = 0
        for task, truth in gold.items():
            t = self.tasks.index.get(task)
            if t is None or t >= len(self.emitted) or self.emitted[t] < 0:
                continue
            n += 1
            wrong += self.classes.items[self.emitted[t]] != truth
        return (wrong / n if n else float("nan")), n

    def store_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t, w, c = [], [], []
        for task, labels_of in self.store.items():
            for worker, cls in labels_of.items():
                t.append(task); w.append(worker); c.append(cls)
        return (np.asarray(t, dtype=np.int32), np.asarray(w, dtype=np.int32), np.asarray(c, dtype=np.int32))

    def relabel_all(self) -> ChunkResult:
        """Labels for every task seen so far from the current BiLA model (no training)."""
        if self.method != "bila" or self.model is None:
            raise KdError("--relabel-all needs a trained BiLA-CM state (method bila)")
        tasks = sorted(self.store)
        items, workers, labels = [], [], []
        for i, t in enumerate(tasks):
            for w, c in self.store[t].items():
                items.append(i); workers.append(w); labels.append(c)
        label, proba = self.model.infer(Triples.build(items, workers, labels, len(tasks)))
        conf = proba[np.arange(len(label)), label]
        self.emitted[np.asarray(tasks)] = label
        self.emitted_conf[np.asarray(tasks)] = conf
        return ChunkResult(tasks=[self.tasks.items[t] for t in tasks], labels=[self.classes.items[c] for c in label],
                           confidence=conf, proba=proba, classes=list(self.classes.items), n_labels=len(items),
                           replaced=0, new_workers=0, new_classes=[])


def error_curves(chunks: Sequence[Sequence[Row]], gold: dict[str, str], methods: Sequence[str] = ("bila",),
                 config: Optional[BilaConfig] = None, seed: int = 0,
                 progress: ProgressCallback = no_progress) -> dict[str, list[tuple[int, float]]]:
    """Error rate after each chunk for each method: ``{method: [(tasks seen, error in [0, 1]), ...]}``.

    Each method gets a fresh :class:`Aggregator` fed the same chunks in order; the error after a
    chunk is that of the last label given to every gold task seen so far (the labels emitted chunk
    by chunk, as in the dissertation's Figure 2.5a). The input for
    :func:`kdtools.aggregate.plot.plot_error_curves`.
    """
    curves: dict[str, list[tuple[int, float]]] = {}
    for m in methods:
        agg = Aggregator(m, config=config or BilaConfig(seed=seed), seed=seed)
        points = []
        for i, chunk in enumerate(chunks):
            agg.process(chunk)
            err, n = agg.error_rate(gold)
            if n:
                points.append((len(agg.tasks), err))
            progress(ProgressEvent(f"error curve {m}", i + 1, len(chunks), {"error": err}))
        curves[m] = points
    progress(ProgressEvent("error curves", len(chunks), len(chunks), {}, done=True))
    return curves
