"""SFDDM: single-fold distillation of a T-step diffusion teacher into a T'-step student (chapter 6).

The student's forward process is the teacher's restricted to a sub-sequence phi (eqs. 6.8-6.9): its
cumulative alphas are alpha_{phi_1..phi_T'}, so its step t sees exactly the teacher's x_{phi_t} for the
same x_0 and noise (eq. 6.16). It is trained to predict, at its own step t, what the teacher predicts at
step phi_t on the same input (eq. 6.17, gamma' = 1), plus the hidden-variable term: the distance between
the student's and the teacher's last hidden features on that input (the authors' code uses the features
before the output layer; weight ``hidden_weight``). Optionally the plain denoising loss on the true noise
(eq. 6.15) is mixed in with ``data_weight``. The student samples with its own posterior (eqs. 6.10-6.14,
``sampling.sample_chain(..., "ddpm")``) or with DDIM.

For very few steps, ``select_input_noise`` builds the paper's input-noise set: noises x' optimised so that
the student's deterministic (DDIM) sample from x' reproduces a training image, min ||Student(x') - x_0||;
sampling then draws random convex combinations of them (``--input-noise bank``).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import KdUsageError
from ..progress import ProgressCallback, ProgressEvent, no_progress
from .sampling import sample_chain
from .schedules import Chain, check_subsequence, q_sample, student_alphas_cumprod
from .teachers import DiffusionModel, denoise, fresh_copy, scheduler_config_for, subchain_scheduler_config
from .training import FitConfig, fit, rand_steps, to_model_space

INITS = ("teacher", "fresh")


# What the student network is called with at its step t (t = 1..T'):
#   aligned: the teacher's network timestep at phi_t. The student's time conditioning then starts where
#            eq. 6.17 wants it (with the teacher's weights the loss is 0 from the first step), and the saved
#            directory is the teacher's scheduler with trailing spacing, which diffusers' DDPMPipeline walks
#            exactly on a uniform phi (num_inference_steps=T').
#   own:     its own index t-1 (0..T'-1) with a T'-step scheduler: a plain T'-step DDPM directory, but a student
#            started from the teacher's weights meets every noise level at the wrong timestep embedding and
#            must relearn the time conditioning first.
STUDENT_TIMESTEPS = ("aligned", "own")


def student_chain(teacher: DiffusionModel, phi: Sequence[int], timesteps: str = "own") -> Chain:
    """The student's chain: the teacher's alphas on phi (eq. 6.9), and the network timestep of each step."""
    check_subsequence(phi, teacher.steps)
    if timesteps not in STUDENT_TIMESTEPS:
        raise KdUsageError(f"--student-timesteps {timesteps!r}: expected one of {', '.join(STUDENT_TIMESTEPS)}")
    steps = [teacher.chain.timesteps[p - 1] for p in phi[1:]] if timesteps == "aligned" else list(range(len(phi) - 1))
    return Chain(steps, student_alphas_cumprod(teacher.chain.alphas_cumprod, phi))


def sfddm_loss(teacher: DiffusionModel, phi: Sequence[int], hidden_weight: float, data_weight: float,
               timesteps: str = "own"):
    chain = student_chain(teacher, phi, timesteps)
    alphas = chain.alphas_cumprod.float()
    teacher_steps = torch.tensor([teacher.chain.timesteps[p - 1] for p in phi[1:]], dtype=torch.long)
    student_steps = torch.tensor(chain.timesteps, dtype=torch.long)
    teacher_net = teacher.net

    def loss_fn(student_net, x0, g):
        k = rand_steps(len(chain), x0.shape[0], g)  # student step t = k + 1, teacher step phi_t
        eps = torch.randn(x0.shape, generator=g).to(x0.device)
        x_t = q_sample(x0, eps, alphas[k].to(x0.device))  # = the teacher's x_{phi_t} (eq. 6.16)
        with torch.no_grad():
            eps_teacher, h_teacher = denoise(teacher_net, x_t, teacher_steps[k].to(x0.device), want_hidden=True)
        eps_student, h_student = denoise(student_net, x_t, student_steps[k].to(x0.device), want_hidden=True)
        loss = F.mse_loss(eps_student, eps_teacher)  # eq. 6.17
        if hidden_weight > 0 and h_student.shape == h_teacher.shape:
            loss = loss + hidden_weight * F.mse_loss(h_student, h_teacher)
        if data_weight > 0:
            loss = loss + data_weight * F.mse_loss(eps_student, eps)  # eq. 6.15
        return loss

    return loss_fn


def distill_sfddm(teacher: DiffusionModel, data: torch.Tensor, phi: Sequence[int], cfg: FitConfig,
                  device: torch.device, init: str = "teacher", progress: ProgressCallback = no_progress,
                  rank: int = 0, world_size: int = 1, timesteps: str = "aligned",
                  fit_options: dict | None = None) -> DiffusionModel:
    """Train a len(phi)-1 step SFDDM student of ``teacher`` on images/points ``data`` (the teacher's data).
    ``fit_options`` go to ``fit`` (checkpoint, resume, record, stop_requested)."""
    if init not in INITS:
        raise KdUsageError(f"--init {init!r}: expected one of {', '.join(INITS)}")
    chain = student_chain(teacher, phi, timesteps)
    torch.manual_seed(cfg.seed)
    # the student has the teacher's architecture; starting from its weights keeps what the teacher knows
    # about images (aligned: the student starts at eq. 6.17's optimum; own: it must relearn the time
    # conditioning first). The authors' code starts fresh: --init fresh
    student_net = copy.deepcopy(teacher.net) if init == "teacher" else fresh_copy(teacher.net)
    teacher.net.to(device).eval().requires_grad_(False)
    net, stats = fit(student_net, sfddm_loss(teacher, phi, cfg.hidden_weight, cfg.data_weight, timesteps), data, cfg,
                     device, progress, f"SFDDM {teacher.steps}->{len(chain)}", rank, world_size, **(fit_options or {}))
    info = {"kind": "student", "method": "sfddm", "teacher_steps": teacher.steps, "phi": list(phi), **teacher.inherited(),
            "default_sampler": "ddpm", "fit": cfg.to_json(), "init": init, "student_timesteps": timesteps, "stats": stats}
    if timesteps == "aligned":
        # the teacher's schedule, walked by DDPMPipeline(num_inference_steps=T') on phi - 1 when phi is uniform
        sched = subchain_scheduler_config(teacher.scheduler_config, teacher.chain.alphas_cumprod, info["clip_sample"],
                                          "DDPMScheduler", info["clip_sample_range"], variance_type="fixed_small")
    else:
        sched = scheduler_config_for(chain.alphas_cumprod, info["clip_sample"], "DDPMScheduler", info["clip_sample_range"])
    return DiffusionModel(net.cpu(), chain, info, sched)


def select_input_noise(student: DiffusionModel, data: torch.Tensor, count: int, iters: int = 100, lr: float = 0.05,
                       seed: int = 0, device: torch.device = torch.device("cpu"),
                       progress: ProgressCallback = no_progress) -> torch.Tensor:
    """The paper's input-noise set (section 6.2.5): for ``count`` training samples x_0, a noise x' with
    min ||DDIM_student(x') - x_0||^2, found by gradient descent through the student's deterministic
    sampler. Each x' is kept on the Gaussian shell (per-sample RMS 1) so it stays a plausible noise."""
    if count < 1:
        raise KdUsageError("--noise-bank must be at least 1")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(data.shape[0], generator=g)[:count]
    x0 = to_model_space(data[idx]).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device).requires_grad_(True)
    net = student.net.to(device).eval().requires_grad_(False)
    opt = torch.optim.Adam([noise], lr=lr)
    for it in range(iters):
        with torch.enable_grad():
            out = sample_chain(net, student.chain, noise, "ddim", 0.0, None, student.clip, device, grad=True)
            loss = F.mse_loss(out, x0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            dims = tuple(range(1, noise.dim()))
            noise.div_(noise.pow(2).mean(dim=dims, keepdim=True).sqrt().clamp_min(1e-6))
        progress(ProgressEvent("selecting input noise", it + 1, iters, {"loss": loss.item()}, done=it == iters - 1))
    return noise.detach().cpu()
