"""Noise-schedule algebra: pure functions on tensors, no models (diffusers-schedulers style).

Notation follows chapter 6 of the dissertation. The teacher has T steps with cumulative products
alpha_1 > ... > alpha_T (diffusers calls them ``alphas_cumprod`` and indexes them from 0, so the paper's
alpha_t is ``alphas_cumprod[t - 1]``, and the network is called with timestep ``t - 1``); alpha_0 = 1 is the
data itself.

A *chain* is what a sampler needs and nothing more: for each of its n steps (ascending), the timestep
the network is called with and the cumulative alpha of that step. A teacher's own chain is
(0..T-1, alphas_cumprod); DDIM step skipping keeps the teacher's network and a sub-chain; an SFDDM student
has its own network called with 0..T'-1 and the teacher's alphas on the sub-sequence phi (eq. 6.9).

A sub-sequence ``phi`` is a list of teacher steps phi_0 = 0 < phi_1 < ... < phi_T' = T (paper indices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import KdUsageError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def make_betas(num_steps: int, schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Betas as diffusers' DDPMScheduler builds them (float64 here, for exact algebra)."""
    if num_steps <= 0:
        raise KdUsageError(f"the number of diffusion steps must be positive, not {num_steps}")
    # a beta is a per-step noise variance: outside (0, 1) alpha_t = 1 - beta_t is no longer a variance-preserving
    # step, and training "diverges" for a reason --lr cannot fix
    if schedule in ("linear", "scaled_linear") and not (0 < beta_start < 1 and 0 < beta_end < 1):
        raise KdUsageError(f"--beta-start {beta_start} and --beta-end {beta_end}: each must lie in (0, 1)")
    if schedule in ("linear", "scaled_linear") and beta_end < beta_start:
        raise KdUsageError(f"--beta-end {beta_end} is below --beta-start {beta_start}: the noise must grow along the chain")
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    if schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine schedule, betas capped at 0.999
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / num_steps) / f(i / num_steps), 0.999) for i in range(num_steps)],
                            dtype=torch.float64)
    raise KdUsageError(f"beta schedule {schedule!r}: expected one of {', '.join(BETA_SCHEDULES)}")


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas.double(), dim=0)


def betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Inverse of ``alphas_cumprod_from_betas``: beta_t = 1 - alpha_t / alpha_{t-1}, alpha_0 = 1."""
    a = alphas_cumprod.double()
    prev = torch.cat([a.new_ones(1), a[:-1]])
    return 1.0 - a / prev


# ----------------------------------------------------------------------------------------------------
# sub-sequences phi (section 6.2.6 and Table 6.1)

SUBSEQUENCE_KINDS = ("uniform", "scattered", "concentrated:FRACTION", "explicit list 0,...,T")


def make_subsequence(T: int, T_student: int, kind: str = "uniform", seed: int = 0) -> list[int]:
    """A teacher sub-sequence phi with phi_0 = 0, phi_T' = T and T' + 1 strictly increasing entries.

    uniform           phi_t = round(t * T / T')  (the paper's c * t when T' divides T)
    scattered         the interior steps drawn at random (seeded) over the whole chain 1..T-1: a sparse
                      sub-sequence spread across the full teacher chain
    concentrated:P    a fraction P of the interior steps spaced evenly inside a 5 % window of the chain
                      around its midpoint T/2, the others evenly over the remaining steps (Table 6.1 uses
                      P = 0.4 and 0.2)
    "0,12,...,T"      an explicit list (validated by ``check_subsequence``)
    """
    check_student_steps(T, T_student)
    kind = kind.strip()
    if "," in kind or kind.isdigit():
        try:
            phi = [int(v) for v in kind.split(",") if v.strip()]
        except ValueError:
            raise KdUsageError(f"--subsequence {kind!r}: expected uniform, scattered, concentrated:P or a list of integers") from None
        if len(phi) != T_student + 1:
            raise KdUsageError(f"--subsequence has {len(phi)} entries; {T_student} student steps need {T_student + 1} (0 ... {T})")
        check_subsequence(phi, T)
        return phi
    interior = T_student - 1  # steps strictly between 0 and T
    if kind == "uniform":
        phi = [round(t * T / T_student) for t in range(T_student + 1)]
    elif kind == "scattered":
        g = torch.Generator().manual_seed(seed)
        inner = torch.randperm(T - 1, generator=g)[:interior] + 1
        phi = [0, *sorted(int(v) for v in inner), T]
    elif kind.startswith("concentrated"):
        try:
            frac = float(kind.split(":", 1)[1]) if ":" in kind else 0.4
        except ValueError:
            raise KdUsageError(f"--subsequence {kind!r}: expected concentrated:P with P in (0, 1)") from None
        if not 0 < frac < 1:
            raise KdUsageError(f"--subsequence {kind!r}: the concentrated fraction must be in (0, 1)")
        half = max(1, round(0.025 * T))
        lo, hi = max(1, T // 2 - half), min(T - 1, T // 2 + half)
        n_mid = min(round(frac * interior), hi - lo + 1)
        mid = _spread(lo, hi, n_mid)
        # the window is kept for its own steps; when P rounds to none of them, the rest spread over the whole
        # chain (else a 5 % hole would open at the midpoint: concentrated:0.01 should be nearly uniform)
        rest_pool = [s for s in range(1, T) if s < lo or s > hi or not mid]
        n_rest = interior - len(mid)
        if n_rest > len(rest_pool):
            raise KdUsageError(f"--subsequence {kind}: {T_student} steps do not fit this concentration in a {T}-step teacher")
        idx = _spread(0, len(rest_pool) - 1, n_rest)
        phi = [0, *sorted(mid + [rest_pool[i] for i in idx]), T]
    else:
        raise KdUsageError(f"--subsequence {kind!r}: expected one of {', '.join(SUBSEQUENCE_KINDS)}")
    check_subsequence(phi, T)
    return phi


def _spread(lo: int, hi: int, n: int) -> list[int]:
    """n distinct integers spread evenly over [lo, hi] (n <= hi - lo + 1)."""
    if n <= 0:
        return []
    if n == 1:
        return [(lo + hi) // 2]
    vals = sorted({round(lo + i * (hi - lo) / (n - 1)) for i in range(n)})
    return vals


def check_student_steps(T: int, T_student: int) -> None:
    if T_student <= 0:
        raise KdUsageError(f"--steps must be a positive number of student steps, not {T_student}")
    if T_student > T:
        raise KdUsageError(f"--steps {T_student} is larger than the teacher's {T} steps")


def check_subsequence(phi: Sequence[int], T: int) -> None:
    if len(phi) < 2:
        raise KdUsageError("a sub-sequence needs at least two entries (0 and T)")
    if phi[0] != 0:
        raise KdUsageError(f"the sub-sequence must start at 0 (the data), not {phi[0]}")
    if phi[-1] != T:
        raise KdUsageError(f"the sub-sequence must end at the teacher's last step T = {T}, not {phi[-1]}")
    if any(b <= a for a, b in zip(phi, phi[1:])):
        raise KdUsageError("the sub-sequence must be strictly increasing")


# ----------------------------------------------------------------------------------------------------
# the student's forward process (eqs. 6.8-6.9) and posterior (eqs. 6.10-6.14)

def student_alphas_cumprod(teacher_alphas_cumprod: torch.Tensor, phi: Sequence[int]) -> torch.Tensor:
    """alpha'_t = alpha_{phi_t} for t = 1..T' (eq. 6.9): the student's noise levels are the teacher's on phi."""
    a = teacher_alphas_cumprod.double()
    return torch.stack([a[p - 1] for p in phi[1:]])


def student_betas(teacher_alphas_cumprod: torch.Tensor, phi: Sequence[int]) -> torch.Tensor:
    """beta'_t = 1 - alpha_{phi_t} / alpha_{phi_{t-1}} (eq. 6.8): ``DDPMScheduler(T', trained_betas=...)``
    built from these reproduces the teacher's alphas_cumprod on phi."""
    return betas_from_alphas_cumprod(student_alphas_cumprod(teacher_alphas_cumprod, phi))


@dataclass
class Posterior:
    """q(x_{t-1} | x_t, x_0) = N(coef_xt * x_t + coef_x0 * x_0, variance) for each step t = 1..n (eq. 6.10)."""

    coef_xt: torch.Tensor
    coef_x0: torch.Tensor
    variance: torch.Tensor


def posterior(alphas_cumprod: torch.Tensor) -> Posterior:
    """Posterior coefficients of a chain with cumulative alphas a_1..a_n (a_0 = 1), eqs. 6.10 and 6.14:

    coef_xt  = (1 - a_{t-1}) sqrt(a_t) / ((1 - a_t) sqrt(a_{t-1}))
    coef_x0  = (a_{t-1} - a_t) / ((1 - a_t) sqrt(a_{t-1}))
    variance = (1 - a_{t-1}) (a_{t-1} - a_t) / ((1 - a_t) a_{t-1})
    """
    a = alphas_cumprod.double()
    prev = torch.cat([a.new_ones(1), a[:-1]])
    coef_xt = (1 - prev) * a.sqrt() / ((1 - a) * prev.sqrt())
    coef_x0 = (prev - a) / ((1 - a) * prev.sqrt())
    variance = (1 - prev) * (prev - a) / ((1 - a) * prev)
    return Posterior(coef_xt, coef_x0, variance)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: float | torch.Tensor) -> torch.Tensor:
    """f(x_t) = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) (eq. 6.11)."""
    a = torch.as_tensor(alpha_t, dtype=torch.float64)
    return (x_t - (1 - a).sqrt().to(x_t.dtype) * eps) / a.sqrt().to(x_t.dtype)


def q_sample(x0: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (eqs. 6.7 / 6.16); ``alpha_t`` per row, shape (N,)."""
    a = alpha_t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t, alpha_prev, eta: float = 0.0, noise=None,
              clip: float | None = None) -> torch.Tensor:
    """One DDIM step from a chain step with cumulative alpha ``alpha_t`` to ``alpha_prev`` (Song et al.,
    eq. 12); eta = 0 is deterministic, eta = 1 the DDPM posterior variance."""
    a_t = float(alpha_t)
    a_p = float(alpha_prev)
    x0 = predict_x0(x_t, eps, a_t)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        eps = (x_t - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)  # keep eps consistent with the clipped x0
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)) if a_p < 1 else 0.0
    out = math.sqrt(a_p) * x0 + math.sqrt(max(1 - a_p - sigma ** 2, 0.0)) * eps
    if sigma > 0:
        out = out + sigma * (noise if noise is not None else torch.randn_like(x_t))
    return out


@dataclass
class Chain:
    """What a sampler walks: the network timestep and cumulative alpha of each step, ascending."""

    timesteps: list  # int, what the network is called with at chain step k (k = 0 .. n-1)
    alphas_cumprod: torch.Tensor  # float64 (n,)

    def __post_init__(self):
        self.alphas_cumprod = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64)
        if len(self.timesteps) != self.alphas_cumprod.numel():
            raise ValueError("a chain needs one alpha per timestep")

    def __len__(self) -> int:
        return len(self.timesteps)

    def sub(self, phi: Sequence[int]) -> "Chain":
        """The sub-chain on teacher steps phi (phi_0 = 0 dropped): DDIM step skipping."""
        return Chain([self.timesteps[p - 1] for p in phi[1:]], torch.stack([self.alphas_cumprod[p - 1] for p in phi[1:]]))

    def to_json(self) -> dict:
        return {"timesteps": [int(t) for t in self.timesteps], "alphas_cumprod": [float(a) for a in self.alphas_cumprod]}

    @classmethod
    def from_json(cls, d: dict) -> "Chain":
        return cls([int(t) for t in d["timesteps"]], torch.tensor(d["alphas_cumprod"], dtype=torch.float64))
