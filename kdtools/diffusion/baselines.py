"""The other ways to cut a teacher's steps, under the same interface as SFDDM (so one benchmark compares
them on one teacher):

  ddim         DDIM step skipping (Song et al.): no training; the teacher's network sampled on the
               sub-chain phi with the deterministic DDIM update.
  progressive  progressive distillation (Salimans & Ho 2022): folds that each halve the steps. The
               starting grid is the uniform T'*2^k-step sub-chain of the teacher with the largest
               T'*2^k <= T (so any T' is reachable, e.g. 1000 -> 512 -> ... -> 16; 500 -> 400 -> 200 ->
               100 -> 50). In each fold the student (initialised from the fold's teacher) learns to do in
               one DDIM step what the fold's teacher does in two: the target x~ solves
               z_{t''} = DDIM(z_t, x~), i.e. x~ = (z_t'' - r z_t) / (sqrt(a_t'') - r sqrt(a_t)),
               r = sqrt(1 - a_t'') / sqrt(1 - a_t). The student keeps the teacher's epsilon output and
               regresses the epsilon implied by x~ (plain epsilon MSE; Salimans & Ho's x-space loss with
               truncated-SNR weighting is not used, because with epsilon outputs it multiplies the loss at
               the noisiest step by 1/SNR ~ 10^4). Networks keep the teacher's time conditioning.
  scratch      a T'-step DDPM trained from data alone, fresh weights, on the same noise levels as the
               SFDDM student (the teacher's alphas on phi): the paper's "from scratch" baseline.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F

from ..progress import ProgressCallback, no_progress
from .schedules import Chain, check_student_steps, make_subsequence, q_sample
from .sfddm import student_chain
from .teachers import DiffusionModel, denoise, fresh_copy, scheduler_config_for, subchain_scheduler_config
from .training import FitConfig, denoising_loss, fit, rand_steps, save_fit_checkpoint

METHODS = ("sfddm", "ddim", "progressive", "scratch")


def ddim_skipping(teacher: DiffusionModel, phi: Sequence[int]) -> DiffusionModel:
    """The teacher itself, sampled on the sub-chain phi with DDIM (eta = 0)."""
    chain = teacher.chain.sub(phi)
    info = {"kind": "student", "method": "ddim", "teacher_steps": teacher.steps, "phi": list(phi), **teacher.inherited(),
            "default_sampler": "ddim", "stats": {"seconds": 0.0}}
    sched = subchain_scheduler_config(teacher.scheduler_config, teacher.chain.alphas_cumprod, info["clip_sample"],
                                      "DDIMScheduler", info["clip_sample_range"])
    return DiffusionModel(teacher.net, chain, info, sched)


def progressive_plan(T: int, T_student: int) -> tuple[int, int]:
    """(starting steps N0 = T' * 2^folds <= T, folds)."""
    check_student_steps(T, T_student)
    folds = 0
    while T_student * 2 ** (folds + 1) <= T:
        folds += 1
    return T_student * 2 ** folds, folds


def progressive_loss(fold_teacher_net, fold_chain: Chain, clip):
    """Loss of one progressive fold: the student (N/2 steps) matches two DDIM steps of the fold teacher (N)."""
    a = fold_chain.alphas_cumprod
    ts = fold_chain.timesteps
    n_student = len(fold_chain) // 2

    def loss_fn(student_net, x0, g):
        j = rand_steps(n_student, x0.shape[0], g)  # student step j+1 = fold-teacher step 2(j+1)
        hi, mid = 2 * j + 1, 2 * j  # 0-based chain indices of fold steps 2(j+1) and 2(j+1)-1
        a_t = a[hi].float().to(x0.device)
        a_mid = a[mid].float().to(x0.device)
        a_lo = torch.where(j > 0, a[(2 * j - 1).clamp_min(0)], torch.ones_like(a[hi])).float().to(x0.device)
        eps = torch.randn(x0.shape, generator=g).to(x0.device)
        z_t = q_sample(x0, eps, a_t)
        shape = (-1, *([1] * (x0.dim() - 1)))
        with torch.no_grad():
            t_hi = torch.tensor(ts, dtype=torch.long)[hi].to(x0.device)
            t_mid = torch.tensor(ts, dtype=torch.long)[mid].to(x0.device)
            z_mid = _ddim_rows(z_t, denoise(fold_teacher_net, z_t, t_hi), a_t, a_mid, clip)
            z_lo = _ddim_rows(z_mid, denoise(fold_teacher_net, z_mid, t_mid), a_mid, a_lo, clip)
            r = ((1 - a_lo) / (1 - a_t)).sqrt().view(shape)
            x_target = (z_lo - r * z_t) / (a_lo.sqrt().view(shape) - r * a_t.sqrt().view(shape))
            if clip is not None:
                x_target = x_target.clamp(-clip, clip)
            eps_target = (z_t - a_t.sqrt().view(shape) * x_target) / (1 - a_t).sqrt().view(shape)
        return F.mse_loss(denoise(student_net, z_t, t_hi), eps_target)

    return loss_fn


def _ddim_rows(x, eps, a_t, a_prev, clip):
    """Deterministic DDIM step with per-row alphas (shape (N,))."""
    shape = (-1, *([1] * (x.dim() - 1)))
    a_t, a_prev = a_t.view(shape), a_prev.view(shape)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def progressive_distillation(teacher: DiffusionModel, data: torch.Tensor, steps: int, cfg: FitConfig,
                             device: torch.device, progress: ProgressCallback = no_progress,
                             rank: int = 0, world_size: int = 1, fit_options: dict | None = None) -> DiffusionModel:
    """Halving folds from the teacher down to ``steps``; ``cfg.iters`` optimiser steps per fold.

    ``fit_options`` (checkpoint, resume, record, stop_requested) keep one checkpoint for the whole run: inside a
    fold it is ``fit``'s, with the fold's number, its teacher (the previous fold's student) and the finished folds'
    statistics added; between two folds it holds the next fold at step 0. ``resume`` (that checkpoint, loaded)
    continues from there: on one process exactly the uninterrupted run."""
    import json

    n0, folds = progressive_plan(teacher.steps, steps)
    phi0 = make_subsequence(teacher.steps, n0, "uniform")
    chain = teacher.chain.sub(phi0)
    clip = teacher.clip
    net = teacher.net.to(device).eval()
    total = {"seconds": 0.0, "folds": []}
    options = dict(fit_options or {})
    resume = options.pop("resume", None)
    checkpoint = options.get("checkpoint")
    first = 0
    if resume is not None:  # the folds finished before the stop are not trained again
        first = int(resume["fold"])
        net = copy.deepcopy(teacher.net).to(device)
        net.load_state_dict(resume["fold_teacher"])
        net.eval()
        total["folds"] = json.loads(resume["fold_stats"])
        total["seconds"] = sum(f["seconds"] for f in total["folds"])
        for _ in range(first):
            chain = _halved(chain)
        if int(resume["iter"]) == 0:
            resume = None  # stopped between two folds: the next one starts afresh, as it would have
    torch.manual_seed(cfg.seed)
    for fold in range(first, folds):
        fold_teacher = net.eval().requires_grad_(False)
        student_net = copy.deepcopy(fold_teacher).requires_grad_(True)
        fold_cfg = _with_seed(cfg, cfg.seed + fold)
        n = len(chain)
        where = {"fold": fold, "fold_teacher": fold_teacher.state_dict(), "fold_stats": json.dumps(total["folds"])}
        net, stats = fit(student_net, progressive_loss(fold_teacher, chain, clip), data, fold_cfg, device, progress,
                         f"progressive fold {fold + 1}/{folds}: {n}->{n // 2}", rank, world_size,
                         resume=resume if fold == first else None, extra_state=where if checkpoint else None, **options)
        chain = _halved(chain)
        total["seconds"] += stats["seconds"]
        total["folds"].append(stats)
        if checkpoint is not None and rank == 0 and fold + 1 < folds:
            # between two folds: a stop now must not train the finished fold again
            save_fit_checkpoint(checkpoint, {
                "kind": "kdtools.diffusion.fit", "fit": _with_seed(cfg, cfg.seed + fold + 1).to_json(), "iter": 0,
                "seconds": 0.0, "world_size": world_size, "fold": fold + 1, "fold_teacher": net.state_dict(),
                "fold_stats": json.dumps(total["folds"]),
                "record": json.dumps(options.get("record") or {}, sort_keys=True, default=str)})
    info = {"kind": "student", "method": "progressive", "teacher_steps": teacher.steps, "start_steps": n0, "folds": folds,
            **teacher.inherited(), "default_sampler": "ddim",
            "fit": cfg.to_json(), "stats": total}
    sched = subchain_scheduler_config(teacher.scheduler_config, teacher.chain.alphas_cumprod, info["clip_sample"],
                                      "DDIMScheduler", info["clip_sample_range"])
    return DiffusionModel(net.cpu(), chain, info, sched)


def _halved(chain: Chain) -> Chain:
    """Every other step of a chain (a fold's student does two of its teacher's steps in one)."""
    n = len(chain)
    return Chain([chain.timesteps[i] for i in range(1, n, 2)], chain.alphas_cumprod[1::2])


def _with_seed(cfg: FitConfig, seed: int) -> FitConfig:
    c = copy.copy(cfg)
    c.seed = seed
    return c


def from_scratch(teacher: DiffusionModel, data: torch.Tensor, phi: Sequence[int], cfg: FitConfig, device: torch.device,
                 progress: ProgressCallback = no_progress, rank: int = 0, world_size: int = 1,
                 fit_options: dict | None = None) -> DiffusionModel:
    """A fresh T'-step model trained on data only, with the SFDDM student's noise levels. ``fit_options`` go to
    ``fit`` (checkpoint, resume, record, stop_requested)."""
    chain = student_chain(teacher, phi)
    torch.manual_seed(cfg.seed)
    net, stats = fit(fresh_copy(teacher.net), denoising_loss(chain), data, cfg, device, progress,
                     f"from scratch, {len(chain)} steps", rank, world_size, **(fit_options or {}))
    info = {"kind": "student", "method": "scratch", "teacher_steps": teacher.steps, "phi": list(phi), **teacher.inherited(),
            "default_sampler": "ddpm", "fit": cfg.to_json(),
            "stats": stats}
    return DiffusionModel(net.cpu(), chain, info, scheduler_config_for(chain.alphas_cumprod, info["clip_sample"], "DDPMScheduler",
                                                                                   info["clip_sample_range"]))
