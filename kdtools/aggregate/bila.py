"""BiLA-CM: online label aggregation by variational inference (dissertation chapter 2).

* ``q_alpha(y | l)``: an MLP over the item's worker-label vector ``l`` (length K, the class index
  given by worker k or -1 when k gave no label), hidden layers 64 and 32 with tanh, softmax output.
* ``p_beta(l | y = c) = prod_{k in S_i} psi_{ck, l_ik}`` with ``psi_ck = softmax(omega_ck)`` (eq. 2.8-2.9),
  one C x C confusion matrix per worker.
* ``p_beta(y)``: the class prior counted from the observed labels (eq. 2.10), fixed (not trained).
* Loss (eq. 2.11), per mini-batch of M items::

      f = -1/M sum_i [ zeta * sum_c q(c|l_i) log(p(c) / q(c|l_i)) + sum_c q(c|l_i) log p(l_i|c) ]

* Optimiser (Algorithm 2.1, lines 24-29): RMSProp on the gradient with a bias-corrected second
  moment, element-wise learning rates clipped to ``[eta_l(t), eta_u(t)]`` and divided by sqrt(t)::

      v_t   = gamma v_{t-1} + (1 - gamma) g_t^2
      mu_t  = mu sqrt(1 - gamma^t)
      eta_t = clip(mu_t / (sqrt(v_t) + eps), eta_l(t), eta_u(t)) / sqrt(t)
      theta = theta - eta_t * g_t

  with the dynamic bounds of AdaBound (the paper's choice, its ref. [102]):
  ``eta_l(t) = final_lr (1 - 1/(bound_gamma t + 1))``, ``eta_u(t) = final_lr (1 + 1/(bound_gamma t))``.
  ``eps`` (1e-8) only guards the division for parameters that never had a gradient.
  The step count ``t`` is one number for the whole stream (``step_count="global"``, the algorithm as
  written) or one ``t_i`` per element counted from the element's creation ("per-parameter",
  "sparse"; see STEP_COUNTS): parameters added when the model grows then start their optimiser
  state fresh, as every parameter does at the start of the algorithm.
* Initialisation (Algorithm 2.1, line 4): ``omega`` from majority voting on the initial set (the
  smoothed confusion counts of each worker against the majority label, ``omega = log psi``), then
  ``q`` is fitted to the posterior of that initial model (``omega`` frozen) before joint training.
* Inference (Algorithm 2.1, lines 30-31): the label maximising ``log p(l_i | y = c)`` under the
  learned confusion matrices; the reported probabilities are that likelihood normalised over classes.

The model grows when new workers or classes appear (see :meth:`BilaModel.grow`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from ..progress import ProgressCallback, ProgressEvent, no_progress

PARAM_ORDER = ("W1", "b1", "W2", "b2", "W3", "b3", "omega")

# How the optimiser's step count t (Algorithm 2.1 lines 1 and 29) is kept:
# * "global": one t for all parameters over the life of the state, as the algorithm is written;
# * "per-parameter": t_i for each element, counting every optimisation step since the element was
#   created (a new worker's confusion matrix and input column, a new class's entries start at t_i = 0,
#   exactly as every parameter does at the start of the paper's algorithm);
# * "sparse": like "per-parameter", but a worker's confusion matrix only counts (and only updates its
#   second moment) in steps whose mini-batch holds a label of that worker, the lazy/sparse-Adam
#   reading; while frozen (fitting q at initialisation) it does not count either.
# With a fixed set of workers all known from the start, "per-parameter" is "global" exactly; so is
# "sparse" when every worker labels every batch (and there is no frozen-omega phase).
STEP_COUNTS = ("global", "per-parameter", "sparse")


@dataclass
class BilaConfig:
    """Hyperparameters of BiLA-CM. Fixed once (docs/kd-aggregate.md); never tuned on gold labels."""

    hidden: tuple = (64, 32)
    zeta: float = 1.0  # weight of the KL(q || prior) term, eq. 2.11
    lr: float = 0.01  # mu in Algorithm 2.1
    gamma: float = 0.9  # decay of the second moment
    final_lr: float = 0.1  # clip bounds converge to this (AdaBound-style dynamic bounds)
    bound_gamma: float = 1e-3  # speed at which the bounds close
    eps: float = 1e-8
    batch_size: int = 128
    max_epochs: int = 100
    min_epochs: int = 3
    tol: float = 1e-3  # stop when the epoch loss changes by less than tol (relative)
    init_epochs: int = 20  # epochs fitting q to the majority-vote initial model
    init_smoothing: float = 1.0  # pseudo-count added to each confusion-count cell at initialisation
    decision: str = "likelihood"  # "posterior": argmax p(y) p(l|y) (eq. 2.1); "likelihood": argmax p(l|y)
    # which step count t the optimiser uses (STEP_COUNTS below): one t for the whole stream as
    # Algorithm 2.1 is written ("global"), or one t_i per parameter element, started when that element
    # was created ("per-parameter", "sparse"); all three agree while no parameter is added
    step_count: str = "global"
    seed: int = 0

    def __post_init__(self):
        if self.step_count not in STEP_COUNTS:
            raise ValueError(f"unknown step count {self.step_count!r} (expected one of {', '.join(STEP_COUNTS)})")
        # a NaN or a zero learning rate would poison a state for good: refuse them here too (the CLI says which flag)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, not {self.lr}")
        if not (math.isfinite(self.zeta) and self.zeta >= 0):
            raise ValueError(f"zeta must be a finite number >= 0, not {self.zeta}")
        if not 0 <= self.gamma < 1:
            raise ValueError(f"gamma must be in [0, 1), not {self.gamma}")
        for key in ("batch_size", "max_epochs"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, not {getattr(self, key)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BilaConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "hidden" in known:
            known["hidden"] = tuple(known["hidden"])
        return cls(**known)


# ---------------------------------------------------------------------------------------------
# the loss and the optimiser, as plain functions (checked against hand-computed values in tests)


def bila_loss(log_q: torch.Tensor, log_prior: torch.Tensor, loglik: torch.Tensor, zeta: float) -> torch.Tensor:
    """Eq. 2.11: ``log_q`` (M, C) log q(c|l_i); ``log_prior`` (C,); ``loglik`` (M, C) log p(l_i|c)."""
    q = log_q.exp()
    neg_kl = (q * (log_prior.unsqueeze(0) - log_q)).sum(dim=1)
    expected_ll = (q * loglik).sum(dim=1)
    return -(zeta * neg_kl + expected_ll).mean()


def clip_bounds(t: int, final_lr: float, bound_gamma: float) -> tuple[float, float]:
    """Dynamic clip bounds eta_l(t), eta_u(t) (AdaBound form, converging to ``final_lr``)."""
    lower = final_lr * (1.0 - 1.0 / (bound_gamma * t + 1.0))
    upper = final_lr * (1.0 + 1.0 / (bound_gamma * t))
    return lower, upper


def rmsclip_step(theta: torch.Tensor, grad: torch.Tensor, v: torch.Tensor, t, cfg: BilaConfig,
                 active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One update of Algorithm 2.1 lines 24-29, in place on ``theta`` and ``v``; returns eta_t.

    ``t`` is the step number: an int (one t for every element, the algorithm as written) or a tensor
    of per-element step numbers t_i (already counting this step), shaped like ``theta`` or
    broadcastable to it (e.g. one count per column of W1). ``active`` (bool, like ``theta``) limits
    the update to some elements: the others keep their ``v`` (no decay) and ``theta``; their
    returned rate is 0. Elements with t_i = 0 must be inactive.
    """
    with torch.no_grad():
        if not isinstance(t, torch.Tensor) and active is None:
            # one t for all elements (the fast path; the arithmetic of the global step count)
            v.mul_(cfg.gamma).addcmul_(grad, grad, value=1.0 - cfg.gamma)
            mu_t = cfg.lr * math.sqrt(1.0 - cfg.gamma ** t)
            lower, upper = clip_bounds(t, cfg.final_lr, cfg.bound_gamma)
            eta = v.sqrt().add_(cfg.eps).reciprocal_().mul_(mu_t).clamp_(lower, upper)
            theta.addcmul_(eta, grad, value=-1.0 / math.sqrt(t))
            return eta / math.sqrt(t)
        if not isinstance(t, torch.Tensor):
            t = torch.full_like(theta, float(t))
        t_el = t.to(theta.dtype).clamp_min(1.0)  # the clamp only guards inactive elements (t_i = 0)
        # the same formulas, element by element: mu_t = mu sqrt(1 - gamma^t), clip, / sqrt(t)
        mu_t = torch.pow(cfg.gamma, t_el).neg_().add_(1.0).sqrt_().mul_(cfg.lr)
        lower, upper = clip_bounds(t_el, cfg.final_lr, cfg.bound_gamma)
        if active is None:
            v.mul_(cfg.gamma).addcmul_(grad, grad, value=1.0 - cfg.gamma)
        else:
            v.copy_(torch.where(active, v.mul(cfg.gamma).addcmul_(grad, grad, value=1.0 - cfg.gamma), v))
        eta = torch.clamp(v.sqrt().add_(cfg.eps).reciprocal_().mul_(mu_t), lower, upper).div_(t_el.sqrt())
        if active is not None:
            eta = torch.where(active, eta, torch.zeros((), dtype=eta.dtype))
        theta.addcmul_(eta, grad, value=-1.0)
    return eta


# ---------------------------------------------------------------------------------------------


def _pad_zeros(old: torch.Tensor, shape) -> torch.Tensor:
    """A zero tensor of ``shape`` holding ``old`` in its leading corner (each axis can only grow)."""
    new = torch.zeros(tuple(shape), dtype=old.dtype)
    new[tuple(slice(0, n) for n in old.shape)] = old
    return new


def _xavier(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    bound = math.sqrt(6.0 / (rows + cols))
    return (torch.rand(rows, cols, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).float()


@dataclass
class TrainStats:
    epochs: int = 0
    steps: int = 0
    loss: float = float("nan")


@dataclass
class Triples:
    """The labels of a set of items as index triples, sorted by item (a CSR layout for batching)."""

    rows: torch.Tensor  # item index (0..n_items-1) per label, non-decreasing
    workers: torch.Tensor
    labels: torch.Tensor
    n_items: int

    @classmethod
    def build(cls, rows, workers, labels, n_items: int) -> "Triples":
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.int64)
        workers = torch.as_tensor(np.asarray(workers), dtype=torch.int64)
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        order = torch.argsort(rows, stable=True)
        return cls(rows[order], workers[order], labels[order], int(n_items))

    @classmethod
    def from_matrix(cls, L: torch.Tensor) -> "Triples":
        """From a dense (n_items, K) matrix of class indices with -1 for a missing label."""
        r, w = (L >= 0).nonzero(as_tuple=True)
        return cls(r, w, L[r, w], int(L.shape[0]))

    def to_matrix(self, n_workers: int) -> torch.Tensor:
        L = torch.full((self.n_items, n_workers), -1, dtype=torch.int64)
        L[self.rows, self.workers] = self.labels
        return L

    def offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.bincount(self.rows, minlength=self.n_items)
        starts = torch.cumsum(counts, 0) - counts
        return starts, counts

    def select(self, items: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor) -> "Triples":
        """The labels of ``items`` (renumbered 0..len(items)-1 in the given order)."""
        c = counts[items]
        total = int(c.sum())
        base = torch.repeat_interleave(starts[items] - (torch.cumsum(c, 0) - c), c)
        idx = base + torch.arange(total)
        new_rows = torch.repeat_interleave(torch.arange(len(items)), c)
        return Triples(new_rows, self.workers[idx], self.labels[idx], len(items))


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread: BiLA's steps are tiny, and threads only add overhead (and fight
    with other processes for cores). The previous setting is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class BilaModel:
    """BiLA-CM parameters (MLP ``q`` and worker confusion logits ``omega``), optimiser state and prior.

    All parameters live in one flat vector ``theta`` (``params`` holds views into it) so that one
    optimiser step is a handful of vector operations. Gradients are computed in closed form
    (:meth:`loss_and_grad`); tests check them against autograd on :meth:`loss`.

    The input vector of ``q`` is the paper's: ``x_k`` = the class index given by worker k, or -1.
    Since most entries are -1, the first layer is computed sparsely and exactly as
    ``W1 x = -W1 1 + sum over labelled k of (l_k + 1) W1[:, k]``.
    """

    def __init__(self, n_workers: int, n_classes: int, config: Optional[BilaConfig] = None):
        self.cfg = config or BilaConfig()
        K, C = int(n_workers), int(n_classes)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        h1, h2 = self.cfg.hidden
        params = {
            "W1": _xavier(h1, K, gen), "b1": torch.zeros(h1),
            "W2": _xavier(h2, h1, gen), "b2": torch.zeros(h2),
            "W3": _xavier(C, h2, gen), "b3": torch.zeros(C),
            "omega": torch.zeros(K, C, C),
        }
        self._set(params, {k: torch.zeros_like(p) for k, p in params.items()})
        self.t = 0  # optimiser steps taken so far (Algorithm 2.1's t is t + 1 at the next step)
        self.prior_counts = torch.zeros(C, dtype=torch.float64)
        self.initialised = False

    # -- parameters ---------------------------------------------------------------------------

    def _set(self, params: dict[str, torch.Tensor], v: dict[str, torch.Tensor],
             steps: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Lay out parameters, second moments and per-element step counts as flat vectors.

        ``steps`` (the t_i of the per-parameter step counts: optimiser steps each element has taken
        since it was created) defaults to zeros; with ``step_count="global"`` it stays unused.
        """
        self.K, self.C = int(params["omega"].shape[0]), int(params["omega"].shape[1])
        self.shapes = {k: tuple(params[k].shape) for k in PARAM_ORDER}
        self.theta = torch.cat([params[k].reshape(-1).float() for k in PARAM_ORDER])
        self.v = torch.cat([v[k].reshape(-1).float() for k in PARAM_ORDER])
        if steps is None:
            self.steps = torch.zeros_like(self.theta)
        else:
            self.steps = torch.cat([steps[k].reshape(-1).float() for k in PARAM_ORDER])
        self.params = self._views(self.theta)
        self.v_params = self._views(self.v)
        self.steps_params = self._views(self.steps)

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for k in PARAM_ORDER:
            n = math.prod(self.shapes[k])
            out[k] = flat[i:i + n].view(self.shapes[k])
            i += n
        return out

    def log_prior(self) -> torch.Tensor:
        total = self.prior_counts.sum()
        if total <= 0:
            p = torch.full((self.C,), 1.0 / self.C, dtype=torch.float64)
        else:
            p = (self.prior_counts / total).clamp_min(1e-6)
            p = p / p.sum()
        return p.log().float()

    def confusion(self) -> torch.Tensor:
        """Per-worker confusion matrices pi[k, c, z] = p(worker k says z | truth c), shape (K, C, C)."""
        return torch.softmax(self.params["omega"], dim=2)

    # -- growth -------------------------------------------------------------------------------

    def grow(self, n_workers: int, n_classes: int) -> None:
        """Add workers and/or classes, keeping everything learned.

        New workers start as the average worker (the mean confusion matrix of the known workers)
        with zero input weights, so ``q`` is unchanged for items they did not label. A new class gets
        a zero output unit; in every confusion matrix it gets a row shaped like the worker's own
        (its mean diagonal and off-diagonal log-probabilities) and a column as likely as the
        worker's average off-diagonal cell. The optimiser state of new entries starts fresh: second
        moment 0 and per-element step count 0 (used by ``step_count`` "per-parameter"/"sparse").
        """
        K2, C2 = int(n_workers), int(n_classes)
        if K2 < self.K or C2 < self.C:
            raise ValueError("a model can only grow")
        if K2 == self.K and C2 == self.C:
            return
        p = {k: t.clone() for k, t in self.params.items()}
        K, C = self.K, self.C
        omega = p["omega"]
        if C2 > C:
            if C >= 2:
                ls = torch.log_softmax(omega, dim=2)
                diag = torch.diagonal(ls, dim1=1, dim2=2)
                d_logit = diag.mean(1)  # mean diagonal log-probability of each worker
                off_logit = (ls.sum((1, 2)) - diag.sum(1)) / (C * (C - 1))
                omega = ls  # logits are only defined up to a shift per row: use log-probabilities
            else:
                d_logit = torch.full((K,), math.log(0.7))
                off_logit = torch.full((K,), math.log(0.3 / max(C2 - 1, 1)))
            new = off_logit.view(-1, 1, 1).expand(K, C2, C2).clone()
            new[:, :C, :C] = omega
            for c in range(C, C2):
                new[:, c, c] = d_logit
            omega = new
            W3 = torch.zeros(C2, p["W3"].shape[1]); W3[:C] = p["W3"]
            b3 = torch.full((C2,), float(p["b3"].mean()) if C else 0.0); b3[:C] = p["b3"]
            p["W3"], p["b3"] = W3, b3
            pc = torch.zeros(C2, dtype=torch.float64); pc[:C] = self.prior_counts
            self.prior_counts = pc
            C = C2
        if K2 > K:
            if K > 0:
                avg = torch.softmax(omega, dim=2).mean(0).clamp_min(1e-6).log()
            else:
                avg = torch.full((C, C), math.log(0.3 / max(C - 1, 1)))
                if C > 1:
                    avg.fill_diagonal_(math.log(0.7))
                else:
                    avg.fill_(0.0)
            new = avg.unsqueeze(0).expand(K2, C, C).clone()
            new[:K] = omega
            omega = new
            W1 = torch.zeros(p["W1"].shape[0], K2); W1[:, :K] = p["W1"]
            p["W1"] = W1
        p["omega"] = omega
        # optimiser state: old entries keep theirs; new entries (new rows/columns, always at the end
        # of each axis) start at zero, as every parameter does at the start of Algorithm 2.1
        self._set(p, {k: _pad_zeros(t, p[k].shape) for k, t in self.v_params.items()},
                  {k: _pad_zeros(t, p[k].shape) for k, t in self.steps_params.items()})

    # -- loss: autograd reference and closed-form gradient --------------------------------------

    def loss(self, batch: Triples, theta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Eq. 2.11 on ``batch``, differentiable by autograd (used by tests; training uses loss_and_grad)."""
        P = self._views(self.theta if theta is None else theta)
        L = batch.to_matrix(self.K).to(torch.float32)
        h = torch.tanh(L @ P["W1"].T + P["b1"])
        h = torch.tanh(h @ P["W2"].T + P["b2"])
        log_q = torch.log_softmax(h @ P["W3"].T + P["b3"], dim=1)
        log_psi = torch.log_softmax(P["omega"], dim=2)
        contrib = log_psi[batch.workers, :, batch.labels]
        loglik = torch.zeros(batch.n_items, self.C, dtype=contrib.dtype).index_add(0, batch.rows, contrib)
        return bila_loss(log_q, self.log_prior(), loglik, self.cfg.zeta)

    def _q_forward(self, P: dict, batch: Triples):
        W1 = P["W1"]
        z1 = (batch.labels + 1).to(torch.float32).unsqueeze(1)
        s1 = (P["b1"] - W1.sum(1)).expand(batch.n_items, -1).index_add(0, batch.rows, z1 * W1.T[batch.workers])
        a1 = torch.tanh(s1)
        a2 = torch.tanh(torch.addmm(P["b2"], a1, P["W2"].T))
        log_q = torch.log_softmax(torch.addmm(P["b3"], a2, P["W3"].T), dim=1)
        return z1, a1, a2, log_q

    def _loglik(self, omega: torch.Tensor, batch: Triples, log_psi: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log p(l_i | y = c) = sum over the workers who labelled i of log psi[k, c, l_ik] (eq. 2.9)."""
        log_psi = torch.log_softmax(omega, dim=2) if log_psi is None else log_psi
        contrib = log_psi[batch.workers, :, batch.labels]  # (n_labels, C)
        return torch.zeros(batch.n_items, omega.shape[1], dtype=contrib.dtype).index_add_(0, batch.rows, contrib)

    def loss_and_grad(self, batch: Triples, log_prior: torch.Tensor, grad: torch.Tensor,
                      fit_q_only: bool = False, omega: Optional[torch.Tensor] = None,
                      local_workers: Optional[torch.Tensor] = None,
                      grad_omega: Optional[torch.Tensor] = None) -> float:
        """Eq. 2.11 on ``batch`` and its gradient, in closed form.

        The gradient of the MLP parameters is written into ``grad`` (the flat layout of ``theta``;
        its omega part too unless ``grad_omega`` is given). ``omega`` / ``local_workers`` /
        ``grad_omega`` let training work on the confusion matrices of the chunk's workers only
        (``omega`` then holds those rows and ``local_workers`` indexes them).
        """
        P = self.params
        G = self._grad_views(grad)
        M, C = batch.n_items, self.C
        zeta = self.cfg.zeta
        if omega is None:
            omega, local_workers, grad_omega = P["omega"], batch.workers, G["omega"]
        z1, a1, a2, log_q = self._q_forward(P, batch)
        q = log_q.exp()
        log_psi = torch.log_softmax(omega, dim=2)
        contrib = log_psi[local_workers, :, batch.labels]
        ll = torch.zeros(M, C).index_add_(0, batch.rows, contrib)
        a = zeta * (log_q - log_prior) - ll  # per item: loss_i = sum_c q_c a_c
        qa = q * a
        loss = float(qa.sum()) / M
        # softmax layer: d loss / d s3_c = q_c (a_c - sum_c' q_c' a_c') / M   (the zeta term cancels)
        g3 = (qa - q * qa.sum(1, keepdim=True)).div_(M)
        torch.mm(g3.T, a2, out=G["W3"])
        torch.sum(g3, 0, out=G["b3"])
        g2 = (g3 @ P["W3"]).mul_(1 - a2 * a2)
        torch.mm(g2.T, a1, out=G["W2"])
        torch.sum(g2, 0, out=G["b2"])
        g1 = (g2 @ P["W2"]).mul_(1 - a1 * a1)
        torch.sum(g1, 0, out=G["b1"])
        gW1T = torch.zeros(self.K, g1.shape[1]).index_add_(0, batch.workers, z1 * g1[batch.rows])
        G["W1"].copy_(gW1T.T).sub_(G["b1"].unsqueeze(1))
        if fit_q_only:
            grad_omega.zero_()
        else:
            # d/d omega[k,c,:] of -(1/M) sum_i q_ic log psi[k,c,l_ik] = -(1/M) (A[k,c,:] - N[k,c] psi[k,c,:])
            k = omega.shape[0]
            A = torch.zeros(k * C, C).index_add_(0, local_workers * C + batch.labels, q[batch.rows])
            A = A.view(k, C, C).transpose(1, 2)  # [k, c(truth), z(label)]
            N = A.sum(2, keepdim=True)
            torch.sub(A, N * log_psi.exp(), out=grad_omega).mul_(-1.0 / M)
        return loss

    def _grad_views(self, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        cache = getattr(self, "_gcache", None)
        if cache is None or cache[0] is not grad:
            self._gcache = (grad, self._views(grad))
        return self._gcache[1]

    # -- initialisation, training, inference ----------------------------------------------------

    def init_from_majority(self, batch: Triples, mv_labels: torch.Tensor) -> None:
        """Set ``omega`` from the confusion counts of each worker against the majority vote (+ smoothing)."""
        truth = torch.as_tensor(mv_labels, dtype=torch.int64)[batch.rows]
        counts = torch.zeros(self.K * self.C * self.C, dtype=torch.float64)
        counts.index_add_(0, (batch.workers * self.C + truth) * self.C + batch.labels,
                          torch.ones(len(batch.rows), dtype=torch.float64))
        counts = counts.view(self.K, self.C, self.C) + self.cfg.init_smoothing
        psi = counts / counts.sum(dim=2, keepdim=True)
        self.params["omega"].copy_(psi.log())
        self.initialised = True

    def train_chunk(self, data: Triples, seed: int, fit_q_only: bool = False, max_epochs: Optional[int] = None,
                    progress: ProgressCallback = no_progress, task: str = "training") -> TrainStats:
        """Algorithm 2.1 lines 11-29 on one chunk: epochs of mini-batches until the loss settles.

        Only the confusion matrices of the chunk's workers have a gradient; the others are left out
        of the arithmetic and their second moments decayed by gamma^steps at the end, which is
        exactly what the full update would have done to them (g = 0: v <- gamma v, theta unchanged;
        with ``step_count="per-parameter"`` their step counts advance by the steps taken too). With
        ``step_count="sparse"`` an absent worker's state is simply left as it is.
        """
        cfg = self.cfg
        n = data.n_items
        stats = TrainStats()
        if n == 0:
            return stats
        gen = torch.Generator().manual_seed(int(seed))
        bs = max(1, cfg.batch_size)
        epochs = max_epochs if max_epochs is not None else cfg.max_epochs
        log_prior = self.log_prior()
        starts, counts = data.offsets()
        present, local = torch.unique(data.workers, return_inverse=True)
        data = Triples(data.rows, data.workers, data.labels, n)
        n_mlp = self.theta.numel() - self.params["omega"].numel()
        theta_mlp, v_mlp = self.theta[:n_mlp], self.v[:n_mlp]
        omega = self.params["omega"][present].clone()
        v_omega = self.v_params["omega"][present].clone()
        grad = torch.zeros_like(self.theta)
        grad_mlp = grad[:n_mlp]
        grad_omega = torch.zeros_like(omega)
        mode = cfg.step_count
        if mode != "global":
            steps_mlp = self.steps[:n_mlp]
            steps_omega = self.steps_params["omega"][present].clone()
            in_batch = torch.zeros(len(present), dtype=torch.bool)
            # W1 (first in the layout) is most of the MLP; all elements of one of its columns (one
            # worker's input weights) are created together and step together, so they share a count:
            # the step is computed with one count per column, broadcast over the rows (much cheaper)
            n_w1 = math.prod(self.shapes["W1"])
            w1 = (theta_mlp[:n_w1].view(self.shapes["W1"]), v_mlp[:n_w1].view(self.shapes["W1"]),
                  grad_mlp[:n_w1].view(self.shapes["W1"]), steps_mlp[:n_w1].view(self.shapes["W1"])[:1])
            rest = (theta_mlp[n_w1:], v_mlp[n_w1:], grad_mlp[n_w1:], steps_mlp[n_w1:])
        whole = (data, local) if n <= bs else None
        prev = None
        for epoch in range(epochs):
            total = 0.0
            if whole is not None:
                batches = [whole]
            else:
                perm = torch.randperm(n, generator=gen)
                batches = []
                for s in range(0, n, bs):
                    items = perm[s:s + bs]
                    b = data.select(items, starts, counts)
                    c = counts[items]
                    idx = torch.repeat_interleave(starts[items] - (torch.cumsum(c, 0) - c), c) + torch.arange(int(c.sum()))
                    batches.append((b, local[idx]))
            for batch, lw in batches:
                loss = self.loss_and_grad(batch, log_prior, grad, fit_q_only=fit_q_only, omega=omega,
                                          local_workers=lw, grad_omega=grad_omega)
                self.t += 1
                if mode == "global":
                    rmsclip_step(theta_mlp, grad_mlp, v_mlp, self.t, cfg)
                    if not fit_q_only:
                        rmsclip_step(omega, grad_omega, v_omega, self.t, cfg)
                    else:
                        v_omega.mul_(cfg.gamma)
                else:
                    # every MLP element takes part in every step (its gradient is dense)
                    steps_mlp += 1
                    rmsclip_step(w1[0], w1[2], w1[1], w1[3], cfg)
                    rmsclip_step(rest[0], rest[2], rest[1], rest[3], cfg)
                    if mode == "per-parameter":
                        steps_omega += 1
                        if not fit_q_only:
                            rmsclip_step(omega, grad_omega, v_omega, steps_omega, cfg)
                        else:
                            v_omega.mul_(cfg.gamma)
                    elif not fit_q_only:
                        # sparse: only the confusion matrices of workers labelling in this batch step
                        in_batch.zero_()
                        in_batch[lw] = True
                        active = in_batch.view(-1, 1, 1).expand_as(omega)
                        steps_omega += active
                        rmsclip_step(omega, grad_omega, v_omega, steps_omega, cfg, active=active)
                total += loss * batch.n_items
                stats.steps += 1
            epoch_loss = total / n
            stats.epochs = epoch + 1
            stats.loss = epoch_loss
            progress(ProgressEvent(task, epoch + 1, epochs, {"loss": epoch_loss}))
            if prev is not None and epoch + 1 >= cfg.min_epochs and abs(prev - epoch_loss) <= cfg.tol * max(abs(prev), 1e-12):
                break
            prev = epoch_loss
        if mode != "sparse":
            self.v_params["omega"].mul_(cfg.gamma ** stats.steps)
        if mode == "per-parameter":
            self.steps_params["omega"].add_(stats.steps)
        if mode != "global":
            self.steps_params["omega"][present] = steps_omega
        self.v_params["omega"][present] = v_omega
        self.params["omega"][present] = omega
        progress(ProgressEvent(task, stats.epochs, stats.epochs, {"loss": stats.loss}, done=True))
        return stats

    def is_finite(self) -> bool:
        """Whether every parameter and second moment is a finite number (training can overflow, e.g. with a huge zeta)."""
        return bool(torch.isfinite(self.theta).all()) and bool(torch.isfinite(self.v).all())

    def infer(self, data: Triples) -> tuple[np.ndarray, np.ndarray]:
        """Labels from the learned confusion matrices (Algorithm 2.1 lines 30-31) and their probabilities.

        ``decision="posterior"``: the generative model's posterior p(y|l) ∝ p(y) p(l|y) (eq. 2.1) with
        the counted prior (eq. 2.10). ``decision="likelihood"``: the chapter's literal rule, argmax of
        p(l|y), with probabilities = the likelihood normalised over classes (a uniform prior).
        """
        score = self._loglik(self.params["omega"], data).double()
        if self.cfg.decision == "posterior":
            score = score + self.log_prior().double().unsqueeze(0)
        elif self.cfg.decision != "likelihood":
            raise ValueError(f"unknown decision rule {self.cfg.decision!r}")
        proba = torch.softmax(score, dim=1)
        return score.argmax(dim=1).numpy(), proba.numpy()

    def q_proba(self, data: Triples) -> np.ndarray:
        return self._q_forward(self.params, data)[3].exp().double().numpy()

    # -- (de)serialisation: plain tensors, the file format lives in state.py -------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"bila.param.{k}": t.contiguous().clone() for k, t in self.params.items()}
        out.update({f"bila.v.{k}": t.contiguous().clone() for k, t in self.v_params.items()})
        out["bila.prior_counts"] = self.prior_counts.contiguous().clone()
        out["bila.t"] = torch.tensor([self.t], dtype=torch.int64)
        if self.cfg.step_count != "global":
            # per-element step counts t_i (whole numbers, kept as float32 for the arithmetic)
            out.update({f"bila.steps.{k}": t.round().to(torch.int64).contiguous() for k, t in self.steps_params.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: BilaConfig, initialised: bool = True) -> "BilaModel":
        omega = tensors["bila.param.omega"]
        if omega.dim() != 3 or omega.shape[1] != omega.shape[2]:
            raise ValueError("omega must have shape (K, C, C)")
        K, C = int(omega.shape[0]), int(omega.shape[1])
        h1, h2 = config.hidden
        expect = {"W1": (h1, K), "b1": (h1,), "W2": (h2, h1), "b2": (h2,), "W3": (C, h2), "b3": (C,),
                  "omega": (K, C, C)}
        prefixes = ("bila.param.", "bila.v.") + (("bila.steps.",) if config.step_count != "global" else ())
        for k, shape in expect.items():
            for prefix in prefixes:
                if prefix + k not in tensors:
                    raise ValueError(f"{prefix}{k} is missing (needed by step count {config.step_count!r})")
                t = tensors[prefix + k]
                if tuple(t.shape) != shape:
                    raise ValueError(f"{prefix}{k} has shape {tuple(t.shape)}, expected {shape}")
        for k in PARAM_ORDER:
            # a NaN or an infinity would be carried into every later chunk (and every label would be class 0)
            if not bool(torch.isfinite(tensors[f"bila.param.{k}"]).all()):
                raise ValueError(f"bila.param.{k} holds NaN or infinite values")
            v = tensors[f"bila.v.{k}"]
            if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
                raise ValueError(f"bila.v.{k} (second moments) holds negative, NaN or infinite values")
        prior = tensors["bila.prior_counts"]
        if not bool(torch.isfinite(prior).all()) or bool((prior < 0).any()):
            raise ValueError("prior counts hold negative, NaN or infinite values")
        if tensors["bila.t"].numel() != 1 or int(tensors["bila.t"].reshape(-1)[0]) < 0:
            raise ValueError("the step counter bila.t is not one whole number >= 0")
        steps = None
        if config.step_count != "global":
            steps = {k: tensors[f"bila.steps.{k}"] for k in PARAM_ORDER}
            if any(bool((t < 0).any()) for t in steps.values()):
                raise ValueError("negative step counts")
        m = cls.__new__(cls)
        m.cfg = config
        m._set({k: tensors[f"bila.param.{k}"] for k in PARAM_ORDER}, {k: tensors[f"bila.v.{k}"] for k in PARAM_ORDER},
               steps)
        m.prior_counts = tensors["bila.prior_counts"].clone().double()
        if tuple(m.prior_counts.shape) != (C,):
            raise ValueError("prior counts do not match the class count")
        m.t = int(tensors["bila.t"].reshape(-1)[0])
        m.initialised = initialised
        return m
