"""The training loop every diffusion method shares: random batches of x_0, a method-specific loss,
Adam with warm-up and cosine decay, gradient clipping, and an exponential moving average (EMA) of the
weights, which is what gets saved (standard for diffusion models).

Runs unchanged under torchrun: the caller initialises the process group and passes rank / world_size;
the network is wrapped in DistributedDataParallel (gradients averaged), each rank draws its own batches
from a rank-seeded generator, and only rank 0 reports progress.

Long runs keep a checkpoint (``checkpoint``: the network, its EMA, Adam's state, the step, the batch
generator), rewritten atomically every ``save_every_s`` seconds, always between two steps (a state taken
mid-step would repeat or skip part of one). A caller that defers Ctrl-C and SIGTERM to step boundaries passes
``stop_requested``: when it says so, the checkpoint is written and ``TrainingStopped`` raised, so a stop loses
no step. ``resume`` (that checkpoint, loaded) continues from its step: on one process exactly the
uninterrupted run; under torchrun the other ranks' batch generators are re-seeded from the step (only rank 0's
is saved), so it continues correctly but draws other batches than an uninterrupted run would.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import KdError, KdUsageError
from ..progress import ProgressCallback, ProgressEvent, no_progress
from .schedules import Chain, q_sample
from .teachers import denoise


@dataclass
class FitConfig:
    iters: int = 2000  # optimiser steps (per fold for progressive distillation)
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.999  # EMA decay of the saved weights; 0 saves the raw weights
    grad_clip: float = 1.0
    seed: int = 0
    hidden_weight: float = 0.1  # SFDDM: weight of the hidden-variable term
    data_weight: float = 0.0  # SFDDM: weight of the plain denoising loss on the true noise (eq. 6.15)

    def validate(self) -> None:
        # one message per flag, naming it and its value: a generic rule list leaves the user to find which
        problems = [f"--iters must be at least 1, not {self.iters}" if self.iters < 1 else "",
                    f"--batch-size must be at least 1, not {self.batch_size}" if self.batch_size < 1 else "",
                    f"--lr must be > 0, not {self.lr}" if not self.lr > 0 else "",
                    f"--ema must be in [0, 1), not {self.ema}" if not 0 <= self.ema < 1 else "",
                    f"--hidden-weight must be >= 0, not {self.hidden_weight}" if not self.hidden_weight >= 0 else "",
                    f"--data-weight must be >= 0, not {self.data_weight}" if not self.data_weight >= 0 else ""]
        problems = [p for p in problems if p]
        if problems:
            raise KdUsageError("; ".join(problems))

    def to_json(self) -> dict:
        return asdict(self)


def to_model_space(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> [-1, 1]; tabular floats stay as they are."""
    return x.float().div(127.5).sub(1.0) if x.dtype == torch.uint8 else x.float()


LossFn = Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]


class TrainingStopped(Exception):
    """``stop_requested`` said stop: the checkpoint (if any) holds every step done (``done`` of ``total``)."""

    def __init__(self, task: str, done: int, total: int):
        super().__init__(f"{task}: stopped after step {done} of {total}")
        self.task, self.done, self.total = task, done, total


def save_fit_checkpoint(path, state: dict) -> None:
    """Write a training checkpoint atomically (a kill mid-write leaves the previous one)."""
    from ..fileio import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_fit_checkpoint(path, cfg: FitConfig) -> dict:
    """A checkpoint ``fit`` wrote, checked against the configuration it is to continue with."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not ours: torch raises many types
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise KdError(f"{path}: not a readable training checkpoint ({why})") from None
    if not isinstance(state, dict) or state.get("kind") != "kdtools.diffusion.fit":
        raise KdError(f"{path}: not a kd-diffstep training checkpoint")
    theirs, ours = dict(state.get("fit") or {}), cfg.to_json()
    if isinstance(state.get("fold"), int) and isinstance(theirs.get("seed"), int):
        theirs["seed"] -= state["fold"]  # progressive distillation trains fold k with seed + k: compare the run's seed
    if theirs != ours:
        differ = ", ".join(f"{k} {theirs.get(k)!r} -> {ours[k]!r}" for k in ours if theirs.get(k) != ours[k])
        raise KdUsageError(f"{path} was made with other training options ({differ}): resume with the options it was "
                           "made with, or remove it to start over")
    return state


def fit(net: nn.Module, loss_fn: LossFn, data: torch.Tensor, cfg: FitConfig, device: torch.device,
        progress: ProgressCallback = no_progress, task: str = "training", rank: int = 0, world_size: int = 1,
        checkpoint=None, resume: dict | None = None, save_every_s: float = 60.0,
        record: dict | None = None, stop_requested: Callable[[], bool] | None = None,
        extra_state: dict | None = None) -> tuple[nn.Module, dict]:
    """Train ``net`` on ``loss_fn``; returns (the EMA network, stats {loss, seconds, iters}). With ``checkpoint``
    (a path; rank 0 writes it) the run keeps a checkpoint there, with ``record`` (the caller's options, for it
    to check on resume) and ``extra_state`` (what a caller running several fits needs to find its place again,
    e.g. progressive distillation's fold); ``resume`` continues one (module docstring)."""
    cfg.validate()
    if data.shape[0] == 0:
        raise KdError("no training data")
    net.to(device).train().requires_grad_(True)  # a copy of a frozen (EMA) teacher starts frozen
    model: nn.Module = net
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    ema = copy.deepcopy(net).eval().requires_grad_(False) if cfg.ema > 0 else None
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed * 7919 + rank + 1)  # each rank its own batches
    running, done, before = None, 0, 0.0  # done: optimiser steps finished (of cfg.iters)
    if resume is not None:
        net.load_state_dict(resume["net"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["opt"])
        done, running, before = int(resume["iter"]), resume["running"], float(resume["seconds"])
        if rank == 0:
            g.set_state(resume["rng"])
        else:  # only rank 0's generator is saved: the others go on with a fresh, step-seeded stream
            g.manual_seed((cfg.seed * 7919 + rank + 1) * 1000003 + done)
    t0 = time.perf_counter()
    keep = checkpoint is not None and rank == 0

    def save() -> None:
        save_fit_checkpoint(checkpoint, {
            "kind": "kdtools.diffusion.fit", "fit": cfg.to_json(), "iter": done, "net": net.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "opt": opt.state_dict(), "rng": g.get_state(),
            "running": running, "seconds": before + time.perf_counter() - t0, "world_size": world_size,
            "record": json.dumps(record or {}, sort_keys=True, default=str), **(extra_state or {})})

    saved_at = time.perf_counter()
    for it in range(done, cfg.iters):
        lr = cfg.lr * min(1.0, (it + 1) / max(1, cfg.warmup)) * (0.55 + 0.45 * math.cos(math.pi * it / cfg.iters))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(data.shape[0], (cfg.batch_size,), generator=g)
        x0 = to_model_space(data[idx]).to(device)
        loss = loss_fn(model, x0, g)
        if not torch.isfinite(loss):
            raise KdError(f"{task}: training diverged at step {it + 1} (loss {loss.item()}); lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not None:
            decay = min(cfg.ema, (1 + it) / (10 + it))  # short warm-up: early weights are not worth keeping
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(p, 1 - decay)
                for be, b in zip(ema.buffers(), net.buffers()):
                    be.copy_(b)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        done = it + 1
        if rank == 0 and (it % 50 == 0 or it == cfg.iters - 1):
            progress(ProgressEvent(task, done, cfg.iters, {"loss": running}))
        stop = stop_requested is not None and stop_requested()
        if stop_requested is not None and world_size > 1:
            # every rank must stop after the same step: one that left early would strand the others in the next
            # step's gradient all-reduce, and rank 0 (which saves) would fail instead of saving
            import torch.distributed as dist

            flag = torch.tensor([1.0 if stop else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if keep and (stop or time.perf_counter() - saved_at >= save_every_s):
            save()
            saved_at = time.perf_counter()
        if stop:
            raise TrainingStopped(task, done, cfg.iters)
    if rank == 0:
        progress(ProgressEvent(task, cfg.iters, cfg.iters, {"loss": running}, done=True))
    out = ema if ema is not None else net
    out.eval()
    return out, {"loss": running, "seconds": before + time.perf_counter() - t0, "iters": cfg.iters}


def rand_steps(n_steps: int, batch: int, g: torch.Generator) -> torch.Tensor:
    """Chain step indices k in 0..n-1 (the paper's t = k + 1), uniformly."""
    return torch.randint(n_steps, (batch,), generator=g)


def denoising_loss(chain: Chain) -> LossFn:
    """DDPM's simple loss (eq. 6.6 with gamma = 1) on a chain: teachers and from-scratch students."""
    alphas = chain.alphas_cumprod.float()
    timesteps = torch.tensor(chain.timesteps, dtype=torch.long)

    def loss_fn(net, x0, g):
        k = rand_steps(len(chain), x0.shape[0], g)
        eps = torch.randn(x0.shape, generator=g).to(x0.device)
        x_t = q_sample(x0, eps, alphas[k].to(x0.device))
        return F.mse_loss(denoise(net, x_t, timesteps[k].to(x0.device)), eps)

    return loss_fn
