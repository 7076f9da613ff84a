"""Training a classifier from labelled data or from an oracle's answers (kd-distill).

Targets come from whatever the data holds, and the loss follows them unless told otherwise:
  label               -> ce  (cross-entropy on hard labels)
  probs / logits      -> kl  (Hinton: T^2 * KL(teacher_T || student_T), temperature T)
  topk_index/value    -> kl  on the teacher distribution completed by spreading the unseen mass
                              evenly over the classes outside the top k
``l1`` (L1 between probability vectors) and ``ce`` on the argmax are available for soft targets too.

Runs unchanged under torchrun: the caller passes ``rank``/``world_size`` after initialising the process
group; each rank trains on its shard of every epoch's permutation and gradients are averaged by
DistributedDataParallel. Only rank 0 evaluates, reports progress and writes checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import to_float
from .errors import KdError, KdUsageError, counted
from .oracle import without_rejected
from .fileio import atomic_path
from .progress import ProgressCallback, ProgressEvent, no_progress
from .queries import random_affine

LOSSES = ("auto", "ce", "kl", "l1")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("cosine", "step", "constant")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_size: int = 30  # epochs between x0.1 decays for schedule "step"
    loss: str = "auto"
    temperature: float = 1.0
    augment: bool = False
    hflip: bool = False  # mirror images in augmentation (not for digits/letters)
    seed: int = 0
    eval_batch_size: int = 1024
    # Sample each epoch's rows with probability proportional to count(class)^-class_balance, with
    # replacement (class = the label, or the argmax of a soft answer): 0 = every row once (plain
    # shuffling), 1 = every class equally often, 0.5 = square-root balancing. For query logs whose
    # answers pile onto a few classes (kd-eval log shows the spread): an epoch keeps its length.
    class_balance: float = 0.0
    # mixup (Zhang et al., ICLR 2018): each batch is mixed with a shuffled copy of itself, images and
    # targets alike, with one weight lam ~ Beta(mixup, mixup) per batch; 0 = off. Targets mix as
    # distributions (one-hot for hard labels), so the loss sees lam*y_i + (1-lam)*y_j.
    mixup: float = 0.0

    def loss_for(self, soft: bool) -> str:
        """The loss actually used: "auto" is KL on soft answers, cross-entropy on hard labels."""
        return self.loss if self.loss != "auto" else ("kl" if soft else "ce")

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise KdUsageError(f"--loss {self.loss!r}: expected one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise KdUsageError(f"--optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise KdUsageError(f"--schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
        for flag, value, ok, want in (("--epochs", self.epochs, self.epochs >= 0, ">= 0"),
                                      ("--batch-size", self.batch_size, self.batch_size > 0, "> 0"),
                                      ("--lr", self.lr, self.lr > 0 and math.isfinite(self.lr), "> 0"),
                                      ("--temperature", self.temperature, self.temperature > 0 and math.isfinite(self.temperature), "> 0")):
            if not ok:
                raise KdUsageError(f"{flag} {value}: must be {want}")
        if not 0.0 <= self.class_balance <= 1.0:
            raise KdUsageError(f"--class-balance {self.class_balance}: expected a number from 0 (off) to 1 (every class equally often)")
        if not (self.mixup >= 0 and math.isfinite(self.mixup)):
            raise KdUsageError(f"--mixup {self.mixup}: expected the Beta distribution's alpha, > 0 (or 0 = off)")


@dataclass
class Targets:
    """What the student learns from: hard labels and/or a teacher distribution."""

    labels: torch.Tensor  # (N,) int64, always present (argmax of soft targets if needed)
    probs: Optional[torch.Tensor] = None  # (N, K) float32 teacher probabilities at temperature 1
    logits: Optional[torch.Tensor] = None  # (N, K) when the teacher gave logits

    @property
    def soft(self) -> bool:
        return self.probs is not None or self.logits is not None


def targets_from(batch: dict, num_classes: int, where: str = "the training data") -> Targets:
    """Build targets from the answer fields of a sample set (see kdtools.oracle); ``where`` names the source
    in errors. Non-finite answers are refused here: trained on, they only show up later as a NaN loss."""
    for name in ("logits", "probs", "topk_value"):
        if name in batch:
            bad = ~torch.isfinite(batch[name].float()).flatten(1).all(1)  # flatten: 0 rows too
            if bad.any():
                raise KdError(f"{where}: NaN or infinite {name} in {counted(int(bad.sum()), 'answer')} "
                              f"(first at row {int(bad.nonzero()[0])})")
    if "logits" in batch:
        logits = batch["logits"].float()
        return Targets(logits.argmax(1), torch.softmax(logits, 1), logits)
    if "probs" in batch:
        p = batch["probs"].float()
        return Targets(p.argmax(1), p)
    if "topk_index" in batch:
        idx, val = batch["topk_index"].long(), batch["topk_value"].float()
        k = idx.shape[1]
        rest = (1 - val.sum(1, keepdim=True)).clamp_min(0) / max(1, num_classes - k)
        p = rest.expand(-1, num_classes).clone()
        p.scatter_(1, idx, val)
        return Targets(idx[:, 0], p / p.sum(1, keepdim=True))
    if "label" in batch:
        y = batch["label"].long()
        if y.numel() and (y.min() < 0 or y.max() >= num_classes):
            raise KdError(f"{where}: labels outside 0..{num_classes - 1}")
        return Targets(y)
    raise KdError("the training data has no labels or answers (fields label, probs, logits or topk_*)")


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, probs: Optional[torch.Tensor],
                      teacher_logits: Optional[torch.Tensor], loss: str, temperature: float) -> torch.Tensor:
    """The training loss for one batch (see module docstring)."""
    if loss == "ce":
        return F.cross_entropy(student_logits, labels)
    if probs is None:
        raise KdUsageError(f"--loss {loss} needs soft targets (probs/logits), but the data has hard labels only")
    if loss == "l1":
        return (torch.softmax(student_logits, 1) - probs).abs().sum(1).mean()
    # kl: teacher distribution at temperature T. From logits directly; from probabilities p, p^(1/T)
    # renormalised equals softmax(log p / T), the same thing.
    t = temperature
    if teacher_logits is not None:
        teacher_log = torch.log_softmax(teacher_logits / t, 1)
    else:
        teacher_log = torch.log_softmax(torch.log(probs.clamp_min(1e-12)) / t, 1)
    student_log = torch.log_softmax(student_logits / t, 1)
    return F.kl_div(student_log, teacher_log, log_target=True, reduction="batchmean") * t * t


def mixup_loss(student_logits: torch.Tensor, labels: torch.Tensor, probs: Optional[torch.Tensor],
               partner: torch.Tensor, lam: float, loss: str, temperature: float,
               teacher_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The loss on a mixed batch (inputs already mixed as lam*x + (1-lam)*x[partner]).

    Hard labels with ``ce``: lam*CE(y) + (1-lam)*CE(y[partner]), which is cross-entropy against the mixed
    one-hot target. Soft targets: the teacher distributions mixed the same way (in probability space, where
    a mixture of two answers lives), then the usual loss. From teacher logits the mixture is formed in log
    space (log(lam p_i + (1-lam) p_j) by logsumexp), so no probability is clamped and lam = 1 is exactly the
    unmixed loss at any temperature."""
    if loss == "ce":
        return lam * F.cross_entropy(student_logits, labels) + (1 - lam) * F.cross_entropy(student_logits, labels[partner])
    if probs is None:
        raise KdUsageError(f"--loss {loss} needs soft targets (probs/logits), but the data has hard labels only")
    if teacher_logits is not None:
        log_p = torch.log_softmax(teacher_logits.float(), 1)
        weights = torch.tensor([lam, 1 - lam], dtype=log_p.dtype, device=log_p.device).log().view(2, 1, 1)
        mixed_log = torch.logsumexp(torch.stack([log_p, log_p[partner]]) + weights, 0)  # log of the mixed distribution
        return distillation_loss(student_logits, labels, mixed_log.exp(), mixed_log, loss, temperature)
    mixed = lam * probs + (1 - lam) * probs[partner]
    return distillation_loss(student_logits, labels, mixed, None, loss, temperature)


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    train_accuracy: float
    seconds: float
    lr: float
    eval_accuracy: Optional[float] = None


@dataclass
class TrainResult:
    history: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def last(self) -> Optional[EpochRecord]:
        return self.history[-1] if self.history else None


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Learning-rate multiplier for ``epoch`` (0-based), set at the start of each epoch."""
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / max(1, cfg.epochs)))
    if cfg.schedule == "step":
        return 0.1 ** (epoch // max(1, cfg.step_size))
    return 1.0


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``model`` for images ``x`` (uint8 or float), on the CPU."""
    model.eval()
    outs = [model(to_float(x[i:i + batch_size]).to(device)).float().cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int = 1024) -> float:
    if x.shape[0] == 0:
        return float("nan")
    return (predict(model, x, device, batch_size).argmax(1) == y).float().mean().item()


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, history: list, cfg: TrainConfig) -> None:
    """Training state to continue from (plain tensors and strings only, so it loads with weights_only=True)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "history": json.dumps([asdict(h) for h in history]), "config": json.dumps(asdict(cfg)),
             "torch_rng": torch.get_rng_state()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise KdError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def train(model: nn.Module, x: torch.Tensor, targets: Targets, cfg: TrainConfig, device: torch.device,
          eval_set: Optional[tuple] = None, progress: ProgressCallback = no_progress,
          checkpoint: Optional[Path] = None, resume: Optional[dict] = None, rank: int = 0, world_size: int = 1,
          on_epoch_end: Optional[Callable[[nn.Module, EpochRecord], None]] = None) -> TrainResult:
    """Train ``model`` (an ImageClassifier) on images ``x`` with ``targets``; see the module docstring.

    ``eval_set`` is (x_test, y_test) evaluated after every epoch. ``checkpoint`` is written after every
    epoch (rank 0), ``resume`` is a loaded checkpoint to continue from.
    """
    cfg.validate()
    loss_name = cfg.loss_for(targets.soft)
    if loss_name in ("kl", "l1") and not targets.soft:
        raise KdUsageError(f"--loss {loss_name} needs soft targets (probs/logits/topk answers); these data have hard labels only")
    if x.shape[0] != targets.labels.shape[0]:
        raise KdError(f"{x.shape[0]} images but {targets.labels.shape[0]} targets")
    if x.shape[0] == 0:
        raise KdError("no training data")
    from .data import check_finite_rows

    check_finite_rows(x, "the training images")
    torch.manual_seed(cfg.seed)
    model.to(device)
    net: nn.Module = model
    if world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(model.parameters(), cfg)
    start_epoch, history = 0, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        recorded = json.loads(resume.get("config") or "{}").get("optimizer")
        if recorded and recorded != cfg.optimizer:
            raise KdUsageError(f"the checkpoint was trained with --optimizer {recorded}: resume with the same optimiser, "
                               f"or start from its weights with --init and a fresh {cfg.optimizer} optimiser")
        try:
            optimizer.load_state_dict(resume["optimizer"])
        except (KeyError, ValueError) as e:
            raise KdError(f"the checkpoint's optimiser state does not fit this optimiser ({type(e).__name__}: {e}); "
                          "resume with the options it was trained with, or start from its weights with --init") from None
        start_epoch = int(resume["epoch"])
        history = [EpochRecord(**h) for h in json.loads(resume["history"])]
        torch.set_rng_state(resume["torch_rng"])
    labels, probs, logits = targets.labels, targets.probs, targets.logits
    t_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        lr = cfg.lr * lr_factor(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the same order on every rank (seeded by epoch), each rank taking its own stride
        perm = epoch_order(labels, cfg, epoch)[rank::world_size]
        # augmentation draws from its own per-epoch, per-rank generator so a resumed run repeats it exactly
        g = torch.Generator().manual_seed((cfg.seed * 100003 + epoch) * 64 + rank + 1)
        steps = math.ceil(perm.numel() / cfg.batch_size)
        if cfg.mixup:
            # one Beta draw per step, from the same per-epoch seed (torch has no seeded Beta sampler)
            lams = np.random.default_rng(((cfg.seed * 100003 + epoch) * 64 + rank + 1) % 2 ** 63).beta(cfg.mixup, cfg.mixup, size=steps)
        net.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for step in range(steps):
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            xb = to_float(x[idx])
            if cfg.augment:
                xb = random_affine(xb, g, hflip=cfg.hflip).clamp_(0, 1)
            xb = xb.to(device, non_blocking=True)
            yb = labels[idx].to(device)
            pb = probs[idx].to(device) if probs is not None else None
            lb = logits[idx].to(device) if logits is not None else None
            if cfg.mixup:
                lam = float(lams[step])
                partner = torch.randperm(idx.numel(), generator=g).to(device)
                xb = lam * xb + (1 - lam) * xb[partner]
                out = net(xb)
                loss = mixup_loss(out, yb, pb, partner, lam, loss_name, cfg.temperature, lb)
                # train accuracy against the label with the larger share of each mixed image
                if lam < 0.5:
                    yb = yb[partner]
            else:
                out = net(xb)
                loss = distillation_loss(out, yb, pb, lb, loss_name, cfg.temperature)
            if not torch.isfinite(loss):
                raise KdError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * idx.numel()
            correct += (out.argmax(1) == yb).sum().item()
            seen += idx.numel()
            if rank == 0 and (step % 10 == 0 or step == steps - 1):
                progress(ProgressEvent(f"epoch {epoch + 1}/{cfg.epochs}", step + 1, steps, {"loss": loss_sum / seen}))
        record = EpochRecord(epoch + 1, loss_sum / max(1, seen), correct / max(1, seen), time.perf_counter() - t0, lr)
        if rank == 0:
            if eval_set is not None:
                record.eval_accuracy = accuracy(model, eval_set[0], eval_set[1], device, cfg.eval_batch_size)
            history.append(record)
            info = {"loss": record.loss, "train acc": record.train_accuracy}
            if record.eval_accuracy is not None:
                info["test acc"] = record.eval_accuracy
            progress(ProgressEvent(f"epoch {epoch + 1}/{cfg.epochs}", steps, steps, info, done=True))
            # weights first, then the checkpoint: --resume rebuilds the model from the weights file and
            # takes its state from the checkpoint, so a kill between the two writes must leave the weights
            # file there (at worst one epoch ahead of the checkpoint, which wins)
            if on_epoch_end is not None:
                on_epoch_end(model, record)
            if checkpoint is not None:
                save_checkpoint(checkpoint, model, optimizer, epoch + 1, history, cfg)
    return TrainResult(history, time.perf_counter() - t_start)


def epoch_order(labels: torch.Tensor, cfg: TrainConfig, epoch: int) -> torch.Tensor:
    """The row indices of one epoch: a permutation, or a class-balanced draw with replacement (cfg.class_balance)."""
    n = labels.shape[0]
    g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    if cfg.class_balance == 0:
        return torch.randperm(n, generator=g)
    counts = torch.bincount(labels).double()
    weight = counts.clamp_min(1).pow(-cfg.class_balance)[labels]
    # torch.multinomial takes at most 2^24 categories; draw by inverse CDF instead, any n
    cdf = torch.cumsum(weight, 0)
    u = torch.rand(n, generator=g, dtype=torch.float64) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=n - 1)


def data_normalization(x: torch.Tensor, sample: int = 10000) -> tuple[list, list]:
    """Per-channel mean and std of images (a sample of them), for a new model's input normalisation."""
    xs = to_float(x[:sample])
    mean = xs.mean(dim=(0, 2, 3))
    std = xs.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return mean.tolist(), std.tolist()


@dataclass
class OnlineResult:
    batches: int
    samples: int
    saves: int
    loss: float
    seconds: float
    rejected: int = 0  # rows a query defence refused (placeholders), skipped


def train_online(model: nn.Module, batches, num_classes: int, cfg: TrainConfig, device: torch.device,
                 save: Callable[[nn.Module, dict], None], save_every: int = 1, replay_steps: int = 0,
                 progress: ProgressCallback = no_progress) -> OnlineResult:
    """Train on batches as they arrive (a stream on a pipe that never has an end to wait for): each arriving
    batch gets one optimiser step per ``cfg.batch_size`` rows of it, plus ``replay_steps`` steps on random
    rows of everything seen so far (kept in memory as uint8). ``save(model, info)`` is called every
    ``save_every`` arriving batches and once at the end, so a process following the weights file (AEDM's
    ``--follow``) sees the substitute improve while queries are still being asked. No learning-rate
    schedule: the stream's length is unknown."""
    if cfg.class_balance:
        raise KdUsageError("class balancing needs every answer before an epoch starts: not with online training")
    if cfg.mixup:
        raise KdUsageError("--mixup is for training on a whole log or dataset: not with online training (--save-every)")
    cfg.validate()
    if save_every < 1 or replay_steps < 0:
        raise KdUsageError("--save-every must be >= 1 and --replay-steps >= 0")
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    optimizer = make_optimizer(model.parameters(), cfg)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    seen_x: list = []
    seen_t: list = []
    count, n_batches, saves, loss_value = 0, 0, 0, float("nan")
    rejected = 0  # rows a query defence refused: skipped
    loss_name = None
    t0 = time.perf_counter()

    def step(xb: torch.Tensor, tb: Targets) -> float:
        xb = to_float(xb)
        if cfg.augment:
            xb = random_affine(xb, g, hflip=cfg.hflip).clamp_(0, 1)
        out = model(xb.to(device))
        loss = distillation_loss(out, tb.labels.to(device), tb.probs.to(device) if tb.probs is not None else None,
                                 tb.logits.to(device) if tb.logits is not None else None, loss_name, cfg.temperature)
        if not torch.isfinite(loss):
            raise KdError(f"training diverged after {count} samples (loss {loss.item()}); lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    for batch in batches:
        batch, dropped = without_rejected(batch)
        rejected += dropped
        if batch["x"].shape[0] == 0:
            continue
        targets = targets_from(batch, num_classes, "a batch of the input stream")
        if loss_name is None:
            loss_name = cfg.loss_for(targets.soft)
            if loss_name in ("kl", "l1") and not targets.soft:
                raise KdUsageError(f"--loss {loss_name} needs soft targets; the stream has hard labels only")
        x = batch["x"]
        if x.shape[0] == 0:
            continue
        for i in range(0, x.shape[0], cfg.batch_size):
            sl = slice(i, i + cfg.batch_size)
            loss_value = step(x[sl], Targets(targets.labels[sl], None if targets.probs is None else targets.probs[sl],
                                             None if targets.logits is None else targets.logits[sl]))
        seen_x.append(x if x.dtype == torch.uint8 else (x.clamp(0, 1) * 255).round().to(torch.uint8))
        seen_t.append(targets)
        count += x.shape[0]
        n_batches += 1
        if replay_steps:
            all_x = torch.cat(seen_x)
            seen_x = [all_x]
            all_t = Targets(torch.cat([t.labels for t in seen_t]),
                            None if targets.probs is None else torch.cat([t.probs for t in seen_t]),
                            None if targets.logits is None else torch.cat([t.logits for t in seen_t]))
            seen_t = [all_t]
            for _ in range(replay_steps):
                idx = torch.randint(0, count, (cfg.batch_size,), generator=g)
                step(all_x[idx], Targets(all_t.labels[idx], None if all_t.probs is None else all_t.probs[idx],
                                         None if all_t.logits is None else all_t.logits[idx]))
        progress(ProgressEvent("online", count, None, {"loss": loss_value, "batches": n_batches}))
        if n_batches % save_every == 0:
            save(model, {"samples_seen": count, "batches_seen": n_batches, "train_loss": loss_value})
            saves += 1
    if count == 0 and rejected:
        # nothing to learn from: say so instead of writing an untrained model as if it had learned
        raise KdError(f"all {rejected} rows of the input hold refused queries (a query defence); nothing to train on")
    save(model, {"samples_seen": count, "batches_seen": n_batches, "train_loss": loss_value})
    return OnlineResult(n_batches, count, saves + 1, loss_value, time.perf_counter() - t0, rejected)
