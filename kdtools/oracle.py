"""Oracles: whatever answers queries. One interface for kd-query and every method that needs answers.

An oracle takes a float batch of images in [0, 1] (N, C, H, W) and returns its answer in one of the
*response modes*:

  label     hard labels only                        field label (N,) int64
  probs     class probabilities                     field probs (N, K) float32
  logits    raw scores                              field logits (N, K) float32
  topk:K    the K most likely classes and their     fields topk_index (N, K) int64, topk_value (N, K) float32
            probabilities

Budgets are not the oracle's business: the caller reserves queries in the log before calling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .errors import KdError, KdUsageError
from .weights import LoadedModel, load_model


def parse_mode(mode: str) -> tuple[str, int]:
    """'topk:5' -> ('topk', 5); 'probs' -> ('probs', 0)."""
    mode = mode.strip().lower()
    if mode in ("label", "probs", "logits"):
        return mode, 0
    if mode.startswith("topk:"):
        try:
            k = int(mode.split(":", 1)[1])
        except ValueError:
            k = 0
        if k <= 0:
            raise KdUsageError(f"--mode {mode}: K must be a positive integer, e.g. topk:3")
        return "topk", k
    raise KdUsageError(f"--mode {mode!r}: expected label, probs, logits or topk:K")


def response_fields(mode: str, num_classes: int) -> dict:
    """The stream/HDF5 fields an answer in ``mode`` consists of."""
    kind, k = parse_mode(mode)
    if kind == "label":
        return {"label": {"dtype": "int64", "shape": []}}
    if kind == "probs":
        return {"probs": {"dtype": "float32", "shape": [num_classes]}}
    if kind == "logits":
        return {"logits": {"dtype": "float32", "shape": [num_classes]}}
    if k > num_classes:
        raise KdUsageError(f"--mode topk:{k}: the oracle has only {num_classes} classes")
    return {"topk_index": {"dtype": "int64", "shape": [k]}, "topk_value": {"dtype": "float32", "shape": [k]}}


def format_logits(logits: torch.Tensor, mode: str) -> dict:
    """Turn logits into the answer a ``mode`` oracle gives."""
    kind, k = parse_mode(mode)
    logits = logits.detach().float().cpu()
    if kind == "label":
        return {"label": logits.argmax(1).long()}
    if kind == "logits":
        return {"logits": logits.contiguous()}
    probs = torch.softmax(logits, 1)
    if kind == "probs":
        return {"probs": probs.contiguous()}
    v, i = probs.topk(k, dim=1)
    return {"topk_index": i.long().contiguous(), "topk_value": v.contiguous()}


class Oracle:
    """Base class. ``identity`` names the oracle in logs (file hash, URL, command)."""

    identity: str = ""
    kind: str = ""
    input_shape: Optional[tuple] = None
    num_classes: Optional[int] = None

    def answer(self, x: torch.Tensor, mode: str) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class ModelOracle(Oracle):
    """A local model file (kdtools weights, TorchScript, torch.export) answering on ``device``."""

    kind = "model"

    def __init__(self, loaded: LoadedModel, device: torch.device = torch.device("cpu"), batch_size: int = 1024):
        self.model = loaded.module.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.identity = loaded.identity
        self.input_shape = loaded.input_shape
        self.num_classes = loaded.num_classes
        if self.num_classes is None and self.input_shape is not None:
            with torch.no_grad():  # a foreign model does not say its class count; one forward pass does
                self.num_classes = int(self.model(torch.zeros(1, *self.input_shape, device=device)).shape[1])

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.model(x[i:i + self.batch_size].to(self.device, non_blocking=True)).float().cpu()
                for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(outs) if outs else torch.empty(0, self.num_classes or 0)

    def answer(self, x: torch.Tensor, mode: str) -> dict:
        return format_logits(self.logits(x), mode)


def open_oracle(spec: str, device: torch.device, trust_pickle: bool = False, input_shape=None, num_classes=None) -> Oracle:
    """Open an oracle from its spec. Today: a local model file. (HTTP, exec: and replay: come with issue 4.)"""
    for prefix in ("http://", "https://", "exec:", "replay:"):
        if spec.startswith(prefix):
            raise KdUsageError(f"{prefix} oracles are not implemented yet (tracked in the black-box extraction issue #4); "
                               "use a local model file")
    loaded = load_model(spec, trust_pickle=trust_pickle, input_shape=input_shape, num_classes=num_classes)
    if loaded.input_shape is None:
        raise KdUsageError(f"{spec}: a {loaded.source} model does not record its input shape; pass --input-shape CxHxW")
    return ModelOracle(loaded, device)


@dataclass
class QueryStats:
    answered: int = 0  # rows answered in this run (replayed ones included)
    paid: int = 0  # oracle calls made in this run
    replayed: int = 0  # rows answered from the log without a call
    spent_total: int = 0  # the log's spent counter at the end
    budget: Optional[int] = None
    status: str = "complete"
    seconds: float = 0.0


class BudgetedOracle:
    """An oracle behind a hard budget, logging every call: what attacks (TandemGAN, DFME, IDEAL, AEDM) use.

    ``query(x, mode)`` takes float images in [0, 1]. Every row counts against the budget, gradient-
    estimation probes included. The count is reserved in the log (persisted) *before* the oracle is
    called, and the answers are appended to the log before they are returned, so a crash can waste
    queries but never overspend or lose a paid answer. When fewer rows remain than asked for, the
    rows that fit are answered and logged, then BudgetExhausted is raised (its ``partial`` attribute
    holds those answers).
    """

    def __init__(self, oracle: Oracle, mode: str, budget: Optional[int] = None, log=None, store_uint8: bool = False):
        self.oracle = oracle
        self.mode = mode
        self.budget = budget
        self.log = log  # a kdtools.h5store.SampleWriter or None
        self.store_uint8 = store_uint8
        self.spent = log.spent if log is not None else 0
        if budget is not None and self.spent > budget:
            raise KdError(f"the log already spent {self.spent} queries, more than the budget of {budget}")

    @property
    def remaining(self) -> Optional[int]:
        return None if self.budget is None else max(0, self.budget - self.spent)

    def query(self, x: torch.Tensor, mode: Optional[str] = None) -> dict:
        from .errors import BudgetExhausted

        mode = mode or self.mode
        n = x.shape[0]
        fit = n if self.remaining is None else min(n, self.remaining)
        answers: dict = {}
        if fit:
            xq = x[:fit].detach().float().cpu().clamp(0, 1)
            if self.log is not None:
                self.log.reserve(fit)
            self.spent += fit
            answers = self.oracle.answer(xq, mode)
            if self.log is not None:
                stored = (xq * 255).round().to(torch.uint8) if self.store_uint8 else xq
                self.log.append({"x": stored, **answers})
        if fit < n:
            err = BudgetExhausted(f"query budget of {self.budget} reached ({self.spent} spent); {n - fit} queries of the last batch unanswered")
            err.partial = answers
            raise err
        return answers
