"""CAKE: Contrastive Abductive Knowledge Extraction (Braun, Mundt & Kersting, "Deep Classifier Mimicry
without Data Access", AISTATS 2024; the poster of that name).

White-box and data-free: no generator network and no training data, only the teacher's gradients. The
queries are synthesised in sets of ``batch_size`` samples. A set is a grid of ``rows x groups`` samples;
the ``groups`` samples of one row are given ``groups`` *different* target classes. Starting from noise,
``steps`` gradient steps on the samples themselves minimise

    w_cls   * groups * CE(f(x), y)                                  push each sample to its class's side
  + w_contr * 0.5 * groups^2 * mean_{row, i, j, c} (f_c(x_ri) - f_c(x_rj))^2
                                                                    pull the samples of a row (all from
                                                                    different classes) towards each other
  + w_tv    * mean over samples and channels of TV(z)               smooth images (domain knowledge)

so the samples settle on both sides of the decision boundaries, close to them. The step size eta of set
``m`` of ``M`` decays geometrically over the sets (``decay_decades`` orders of magnitude, linearly or along
a cosine in log10 eta), which scatters the sets at several distances from the boundaries; with plain SGD
that stochasticity is CAKE's "implicit" noise, with ``langevin`` explicit noise sqrt(2 eta) N(0, I) is added
after every step (the LAKE variant).

The scaling constants (groups, 0.5 x groups^2: MSE's mean over every ordered pair), the loss weights
1e3 / 1e1 / 1e5, SGD, eta = 0.1 decaying by 4 decades, 500 steps, sets of 100 in 10 groups and 256 sets
are the defaults of the authors' code (docs/kd-gen-queries.md, "CAKE").

Departure, because kdtools queries are images in [0, 1] (every oracle's domain): the samples are
optimised as z with pixels x = mean + std * z (mean, std: the teacher's own input normalisation, so the
teacher's network sees z itself, as in the paper), and z is projected onto the box that keeps x in [0, 1]
at the start and after every step; the paper's samples live unbounded in the normalised space. ``z``
starts as N(0, I) projected onto that box, and TV is taken on z, as the paper takes it on its normalised
samples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import KdError, KdUsageError
from ..progress import ProgressCallback, ProgressEvent, no_progress


@dataclass
class CakeConfig:
    batch_size: int = 100  # samples per set (rows x groups)
    groups: int = 10  # samples per row, each of a different class (<= classes, divides batch_size)
    steps: int = 500  # gradient steps per set
    lr: float = 0.1  # eta of the first set (SGD step size; the Langevin noise scale)
    decay_decades: float = 4.0  # eta of the last set = lr / 10**decay_decades (0: constant)
    schedule: str = "linear"  # linear | cosine: how log10(eta) goes down over the sets
    w_cls: float = 1e3
    w_contr: float = 1e1
    w_tv: float = 1e5
    optimizer: str = "sgd"  # sgd | adam
    langevin: bool = False  # explicit noise sqrt(2 eta) N(0, I) after every step (LAKE)
    # x = clamp(mean + std * z): the teacher's input normalisation, one value or one per channel
    pixel_mean: tuple = (0.5,)
    pixel_std: tuple = (0.5,)
    seed: int = 0

    def check(self, num_classes: int, shape: tuple | None = None) -> None:
        if self.batch_size < 1 or self.groups < 1 or self.steps < 1:
            raise KdUsageError("--batch-size, --groups and --steps must be positive")
        floats = {"--lr": self.lr, "--decay-decades": self.decay_decades, "--w-cls": self.w_cls,
                  "--w-contr": self.w_contr, "--w-tv": self.w_tv}
        floats.update({"--pixel-mean": v for v in self.pixel_mean if not math.isfinite(v)})
        floats.update({"--pixel-std": v for v in self.pixel_std if not math.isfinite(v)})
        bad = [f"{k} {v}" for k, v in floats.items() if not math.isfinite(v)]
        if bad:
            raise KdUsageError(f"{', '.join(bad)}: expected finite numbers")
        if not 0 <= self.seed < 2 ** 32:
            raise KdUsageError(f"--seed {self.seed}: expected 0 <= seed < 2^32")
        if shape is not None:
            if len(shape) != 3:
                raise KdUsageError(f"CAKE synthesises images (C x H x W); the teacher takes {'x'.join(map(str, shape))}")
            if len(self.pixel_mean) not in (1, shape[0]) or len(self.pixel_std) not in (1, shape[0]):
                raise KdUsageError(f"--pixel-mean/--pixel-std: give one value or one per channel ({shape[0]})")
        if self.groups > num_classes:
            raise KdUsageError(f"--groups {self.groups}: a row's samples need different classes, and the teacher has "
                               f"{num_classes}")
        if self.batch_size % self.groups:
            raise KdUsageError(f"--batch-size {self.batch_size} must be a multiple of --groups {self.groups} "
                               "(every row holds one sample per group)")
        if self.schedule not in ("linear", "cosine"):
            raise KdUsageError(f"--schedule {self.schedule!r}: expected linear or cosine")
        if self.optimizer not in ("sgd", "adam"):
            raise KdUsageError(f"--optimizer {self.optimizer!r}: expected sgd or adam")
        if not self.lr > 0 or min(self.pixel_std) <= 0 or self.decay_decades < 0:
            raise KdUsageError("--lr and --pixel-std must be positive and --decay-decades not negative")
        if min(self.w_cls, self.w_contr, self.w_tv) < 0:
            raise KdUsageError("the loss weights must not be negative")


def step_size(set_index: int, num_sets: int, start: float, decades: float, schedule: str = "linear") -> float:
    """eta of set ``set_index`` (0-based) of ``num_sets``: log10(eta) goes from log10(start) towards
    log10(start) - decades, linearly or along half a cosine (the end value itself is reached at index
    num_sets, one past the last set, as in the authors' code)."""
    frac = set_index / num_sets
    top = math.log10(start)
    if schedule == "linear":
        return 10 ** (top - frac * decades)
    if schedule == "cosine":
        return 10 ** (top - decades + 0.5 * decades * (1 + math.cos(frac * math.pi)))
    raise KdUsageError(f"schedule {schedule!r}: expected linear or cosine")


def total_variation(z: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of vertically and of horizontally adjacent pixels, per sample and channel,
    summed over the two directions and averaged over samples and channels (a direction of length 1 has no
    neighbours and adds 0)."""
    tv = z.new_zeros(z.shape[:-2])
    if z.shape[-2] > 1:
        tv = tv + (z[..., 1:, :] - z[..., :-1, :]).abs().mean(dim=(-2, -1))
    if z.shape[-1] > 1:
        tv = tv + (z[..., :, 1:] - z[..., :, :-1]).abs().mean(dim=(-2, -1))
    return tv.mean()


def cake_losses(logits: torch.Tensor, targets: torch.Tensor, z: torch.Tensor) -> dict:
    """The three unweighted terms for one set: ``logits`` (rows, groups, classes), ``targets`` (rows, groups)
    with different classes along each row, ``z`` the samples (any shape ending in H, W)."""
    rows, groups, classes = logits.shape
    cls = F.cross_entropy(logits.reshape(-1, classes), targets.reshape(-1)) * groups
    # every ordered pair (i, j) of a row, the pair (i, i) included (it adds 0): MSE's mean over
    # rows x groups x groups x classes, times groups^2 / 2 (each unordered pair is counted twice)
    diff = logits.unsqueeze(1) - logits.unsqueeze(2)
    contr = diff.pow(2).mean() * 0.5 * groups ** 2
    return {"cls": cls, "contr": contr, "tv": total_variation(z)}


def row_targets(rows: int, groups: int, num_classes: int, g: torch.Generator) -> torch.Tensor:
    """For each row, ``groups`` different classes: the first ``groups`` of a random permutation."""
    return torch.stack([torch.randperm(num_classes, generator=g)[:groups] for _ in range(rows)])


def synthesise(teacher: nn.Module, shape: tuple, num_classes: int, n: int, cfg: CakeConfig,
               device: torch.device | str = "cpu", progress: ProgressCallback = no_progress,
               start_set: int = 0) -> Iterator[dict]:
    """Yield ``n`` CAKE samples as batches ``{"x": float32 (m, *shape) in [0, 1]}``, one set at a time.

    The teacher must be differentiable (a model file, not a remote oracle); it is put in eval mode and
    never changed. Every set is drawn from its own seeded generator (seed, set index), so a run is
    reproducible and set ``m`` does not depend on how many sets came before it: ``start_set`` skips the
    sets a stopped run already made, and the rest are those the uninterrupted run makes."""
    if n <= 0:
        raise KdUsageError("-n must be positive")
    if start_set < 0:
        raise KdUsageError("start_set must be >= 0")
    cfg.check(num_classes, tuple(shape))
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    rows = cfg.batch_size // cfg.groups
    num_sets = math.ceil(n / cfg.batch_size)
    c = shape[0]
    mean = torch.tensor(cfg.pixel_mean, dtype=torch.float32).expand(c).reshape(c, 1, 1).to(device)
    std = torch.tensor(cfg.pixel_std, dtype=torch.float32).expand(c).reshape(c, 1, 1).to(device)
    lo, hi = (0.0 - mean) / std, (1.0 - mean) / std  # the box of z that keeps x in [0, 1]
    emitted = min(n, start_set * cfg.batch_size)
    for m in range(start_set, num_sets):
        eta = step_size(m, num_sets, cfg.lr, cfg.decay_decades, cfg.schedule)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + m)
        y = row_targets(rows, cfg.groups, num_classes, g).to(device)
        z = torch.randn(rows, cfg.groups, *shape, generator=g).to(device).clamp_(lo, hi).requires_grad_(True)
        opt = torch.optim.SGD([z], lr=eta) if cfg.optimizer == "sgd" else torch.optim.Adam([z], lr=eta)
        for _ in range(cfg.steps):
            logits = teacher(mean + std * z.reshape(-1, *shape)).reshape(rows, cfg.groups, -1)
            terms = cake_losses(logits, y, z)
            loss = cfg.w_cls * terms["cls"] + cfg.w_contr * terms["contr"] + cfg.w_tv * terms["tv"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                if cfg.langevin:
                    z.add_(torch.randn(z.shape, generator=g).to(device), alpha=math.sqrt(2 * eta))
                z.clamp_(lo, hi)
        with torch.no_grad():
            # z is inside the box, so the clamp only removes float rounding at 0 and 1
            x = (mean + std * z.reshape(-1, *shape)).clamp_(0, 1).float()
            if not bool(torch.isfinite(x).all()):
                raise KdError(f"CAKE: set {m} diverged (non-finite samples at eta {eta:.3g}); lower --lr or the loss weights")
            hit = (teacher(x).reshape(rows, cfg.groups, -1).argmax(-1) == y).float().mean().item()
        take = min(cfg.batch_size, n - emitted)
        emitted += take
        info = {"eta": eta, "loss": float(loss.detach()), "on target": hit}
        progress(ProgressEvent("cake sets", m + 1, num_sets, info, done=m + 1 == num_sets))
        yield {"x": x[:take].cpu().contiguous()}


def recorded_normalization(module: nn.Module) -> tuple | None:
    """(mean, std) per channel that a kdtools model applies to its [0, 1] input (the same for every member of an
    ensemble), or None when the model does not say (TorchScript, torch.export, foreign files)."""
    members = list(module.members) if hasattr(module, "members") else [module]
    found = set()
    for m in members:
        mean, std = getattr(m, "mean", None), getattr(m, "std", None)
        if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor):
            return None
        found.add((tuple(round(v, 6) for v in mean.flatten().tolist()), tuple(round(v, 6) for v in std.flatten().tolist())))
    return found.pop() if len(found) == 1 else None


def options_record(cfg: CakeConfig) -> dict:
    """The resolved options, for the stream header."""
    return {"method": "cake", **asdict(cfg)}
