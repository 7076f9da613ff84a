"""Samplers along a chain: DDPM ancestral sampling with the posterior of eqs. 6.10-6.14, and DDIM.

Both work for any DiffusionModel (teacher, SFDDM student, DDIM-skipping view, progressive student)
because all they need is the chain: the network timestep and cumulative alpha of each step.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..errors import KdUsageError
from ..progress import ProgressCallback, ProgressEvent, no_progress
from .schedules import Chain, ddim_step, posterior, predict_x0
from .teachers import DiffusionModel, denoise

SAMPLERS = ("ddpm", "ddim")


def draw_noise(model: DiffusionModel, n: int, generator: torch.Generator, input_noise: str = "gaussian") -> torch.Tensor:
    """Input noise x_T: standard Gaussian, or (SFDDM, section 6.2.5) a random convex combination of the
    selected noises in the model's noise bank, rescaled to unit variance per element."""
    shape = (n, *model.sample_shape)
    if input_noise == "gaussian":
        return torch.randn(shape, generator=generator)
    if input_noise != "bank":
        raise KdUsageError(f"--input-noise {input_noise!r}: expected gaussian or bank")
    if model.noise_bank is None:
        raise KdUsageError("--input-noise bank: this model has no noise bank (distill with --noise-bank N)")
    bank = model.noise_bank.float()
    k = min(4, bank.shape[0])
    idx = torch.stack([torch.randperm(bank.shape[0], generator=generator)[:k] for _ in range(n)])
    w = -torch.log(torch.rand(n, k, generator=generator).clamp_min(1e-12))  # Dirichlet(1) weights
    w = w / w.sum(1, keepdim=True)
    mix = (w.view(n, k, *([1] * len(model.sample_shape))) * bank[idx]).sum(1)
    # a convex combination of independent unit Gaussians has variance sum(w^2); rescale back to 1
    return mix / w.pow(2).sum(1).sqrt().view(n, *([1] * len(model.sample_shape)))


def sample_chain(net, chain: Chain, x_T: torch.Tensor, sampler: str = "ddpm", eta: float = 0.0,
                 generator: Optional[torch.Generator] = None, clip: Optional[float] = None,
                 device: torch.device = torch.device("cpu"), grad: bool = False,
                 on_step: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Run the reverse process from x_T down the chain; returns x_0 (on the CPU unless ``grad``).
    ``on_step(done, total)`` is called after every step of the chain."""
    if sampler not in SAMPLERS:
        raise KdUsageError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    with torch.set_grad_enabled(grad):  # gradients only for input-noise selection
        return _walk(net, chain, x_T.to(device), sampler, eta, generator, clip, device, grad, on_step)


def _walk(net, chain, x, sampler, eta, generator, clip, device, grad, on_step=None):
    a = chain.alphas_cumprod
    post = posterior(a)
    n = len(chain)
    for k in reversed(range(n)):
        t = torch.full((x.shape[0],), int(chain.timesteps[k]), device=device, dtype=torch.long)
        eps = denoise(net, x, t).float()
        alpha_prev = float(a[k - 1]) if k > 0 else 1.0
        if sampler == "ddim":
            noise = torch.randn(x.shape, generator=generator).to(device) if eta > 0 else None
            x = ddim_step(x, eps, float(a[k]), alpha_prev, eta, noise, clip)
        else:
            x0 = predict_x0(x, eps, float(a[k]))
            if clip is not None:
                x0 = x0.clamp(-clip, clip)
            mean = float(post.coef_xt[k]) * x + float(post.coef_x0[k]) * x0
            if k > 0:
                noise = torch.randn(x.shape, generator=generator).to(device)
                x = mean + math.sqrt(float(post.variance[k])) * noise
            else:
                x = mean
        if on_step is not None:
            on_step(n - k, n)
    return x if grad else x.cpu()


def sample(model: DiffusionModel, n: int, seed: int = 0, sampler: Optional[str] = None, eta: float = 0.0,
           batch_size: int = 256, device: torch.device = torch.device("cpu"), input_noise: str = "gaussian",
           x_T: Optional[torch.Tensor] = None, progress: ProgressCallback = no_progress) -> torch.Tensor:
    """``n`` samples in model space ([-1, 1] images or raw tabular values), from seeded noise."""
    sampler = sampler or model.info.get("default_sampler", "ddpm")
    g = torch.Generator().manual_seed(seed)
    if x_T is None:
        x_T = draw_noise(model, n, g, input_noise)
    model.net.to(device).eval()
    out = []
    progress(ProgressEvent("sampling", 0, n, {"steps": len(model.chain)}))  # the bar appears at once
    for i in range(0, n, batch_size):
        m = min(batch_size, n - i)
        # progress after every step of the chain, in samples (fractions of the batch): a batch of a
        # 1000-step teacher takes minutes on a CPU
        step = (lambda done, total, i=i, m=m: progress(ProgressEvent("sampling", i + m * done / total, n,
                                                                      {"steps": total})))
        out.append(sample_chain(model.net, model.chain, x_T[i:i + batch_size], sampler, eta, g, model.clip, device,
                                on_step=step))
    progress(ProgressEvent("sampling", n, n, done=True))
    return torch.cat(out) if out else x_T[:0]


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model-space images to uint8 pixels."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation between two noises (keeps the Gaussian norm, unlike a straight line)."""
    af, bf = a.flatten(), b.flatten()
    omega = torch.arccos((af @ bf / (af.norm() * bf.norm())).clamp(-1, 1))
    if omega.abs() < 1e-6:
        return (1 - w) * a + w * b
    return (torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / torch.sin(omega)


def consistency(teacher: DiffusionModel, student: DiffusionModel, n: int = 64, seed: int = 0, batch_size: int = 256,
                device: torch.device = torch.device("cpu")) -> dict:
    """Teacher and student DDIM (eta = 0) samples from the same noises (section 6.3.3) and their distance:
    for images the mean absolute per-pixel difference in [0, 1] pixel units, for points the mean
    Euclidean distance."""
    if tuple(teacher.sample_shape) != tuple(student.sample_shape):
        raise KdUsageError(f"teacher samples {teacher.sample_shape} and student samples {student.sample_shape} differ in shape")
    x_T = torch.randn((n, *teacher.sample_shape), generator=torch.Generator().manual_seed(seed))
    xt = sample(teacher, n, seed, "ddim", 0.0, batch_size, device, x_T=x_T)
    xs = sample(student, n, seed, "ddim", 0.0, batch_size, device, x_T=x_T)
    if xt.dim() == 2:
        dist = (xt - xs).norm(dim=1).mean().item()
        unit = "mean Euclidean distance"
    else:
        dist = ((xt.clamp(-1, 1) - xs.clamp(-1, 1)).abs() / 2).mean().item()
        unit = "mean per-pixel |difference| in [0, 1] units"
    return {"distance": dist, "unit": unit, "n": n, "teacher_steps": teacher.steps, "student_steps": student.steps,
            "teacher": xt, "student": xs}


def interpolations(models: list, n_points: int = 8, seed: int = 0, device: torch.device = torch.device("cpu")) -> list:
    """For each model, DDIM samples along the spherical interpolation between two seeded noises
    (section 6.3.4); the same noises for every model."""
    shape = models[0].sample_shape
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    x_T = torch.stack([slerp(a, b, i / max(1, n_points - 1)) for i in range(n_points)])
    return [sample(m, n_points, seed, "ddim", 0.0, n_points, device, x_T=x_T) for m in models]
