"""Schedule algebra of kd-diffstep against hand-computed values and diffusers' own schedulers."""

import math

import pytest
import torch

from kdtools.diffusion.baselines import progressive_plan
from kdtools.diffusion.schedules import (Chain, alphas_cumprod_from_betas, betas_from_alphas_cumprod, ddim_step,
                                         make_betas, make_subsequence, posterior, predict_x0, q_sample,
                                         student_alphas_cumprod, student_betas)
from kdtools.diffusion.swissroll import sliced_wasserstein, swiss_roll
from kdtools.errors import KdUsageError


def test_linear_betas_match_diffusers():
    from diffusers import DDPMScheduler

    ours = alphas_cumprod_from_betas(make_betas(1000, "linear", 1e-4, 0.02))
    theirs = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    cos = alphas_cumprod_from_betas(make_betas(50, "squaredcos_cap_v2"))
    assert torch.allclose(cos, DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double(), atol=1e-6)


def test_betas_round_trip():
    a = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    b = betas_from_alphas_cumprod(a)
    # hand: 1 - 0.9 = 0.1, 1 - 0.5/0.9 = 0.4444..., 1 - 0.1/0.5 = 0.8
    assert torch.allclose(b, torch.tensor([0.1, 4 / 9, 0.8], dtype=torch.float64))
    assert torch.allclose(alphas_cumprod_from_betas(b), a)


def test_student_schedule_is_the_teacher_on_phi():
    from diffusers import DDPMScheduler

    T = 1000
    teacher_acp = alphas_cumprod_from_betas(make_betas(T))
    for kind in ("uniform", "scattered", "concentrated:0.4"):
        phi = make_subsequence(T, 16, kind)
        ours = student_alphas_cumprod(teacher_acp, phi)
        expected = torch.stack([teacher_acp[p - 1] for p in phi[1:]])  # paper alpha_{phi_t} = diffusers acp[phi_t - 1]
        assert torch.equal(ours, expected)
        # the diffusers fact: DDPMScheduler(T', trained_betas=1 - a[phi]/a[phi_prev]) reproduces them
        sched = DDPMScheduler(num_train_timesteps=16, trained_betas=student_betas(teacher_acp, phi).tolist())
        assert torch.allclose(sched.alphas_cumprod.double(), expected, rtol=1e-4)
    # hand-made teacher: a = 0.9, 0.8, 0.5, 0.3, 0.1; phi = 0, 2, 5 -> a' = 0.8, 0.1, beta' = 0.2, 0.875
    a = torch.tensor([0.9, 0.8, 0.5, 0.3, 0.1], dtype=torch.float64)
    assert torch.allclose(student_alphas_cumprod(a, [0, 2, 5]), torch.tensor([0.8, 0.1], dtype=torch.float64))
    assert torch.allclose(student_betas(a, [0, 2, 5]), torch.tensor([0.2, 0.875], dtype=torch.float64))


def test_posterior_coefficients_by_hand():
    p = posterior(torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64))
    # step 1 (a_prev = 1): the posterior mean is x_0 itself, no variance
    assert p.coef_xt[0].item() == pytest.approx(0.0)
    assert p.coef_x0[0].item() == pytest.approx(1.0)
    assert p.variance[0].item() == pytest.approx(0.0)
    # step 2: a = 0.5, a_prev = 0.9 (eq. 6.10)
    assert p.coef_xt[1].item() == pytest.approx(0.1 * math.sqrt(0.5) / (0.5 * math.sqrt(0.9)))  # 0.149071
    assert p.coef_xt[1].item() == pytest.approx(0.1490712, abs=1e-6)
    assert p.coef_x0[1].item() == pytest.approx(0.8432740, abs=1e-6)  # 0.4 / (0.5 sqrt(0.9))
    assert p.variance[1].item() == pytest.approx(0.0888889, abs=1e-6)  # 0.1 * 0.4 / (0.5 * 0.9)
    # step 3: a = 0.1, a_prev = 0.5
    assert p.coef_x0[2].item() == pytest.approx(0.4 / (0.9 * math.sqrt(0.5)))
    assert p.variance[2].item() == pytest.approx(0.5 * 0.4 / (0.9 * 0.5))


def test_posterior_matches_diffusers_ddpm_step():
    from diffusers import DDPMScheduler

    teacher_acp = alphas_cumprod_from_betas(make_betas(100))
    phi = make_subsequence(100, 7, "scattered", seed=3)
    a = student_alphas_cumprod(teacher_acp, phi)
    sched = DDPMScheduler(num_train_timesteps=7, trained_betas=betas_from_alphas_cumprod(a).tolist(), clip_sample=False)
    sched.set_timesteps(7)
    p = posterior(a)
    for k in range(7):
        a_prev = a[k - 1] if k > 0 else torch.tensor(1.0, dtype=torch.float64)
        beta = 1 - a[k] / a_prev
        # diffusers' DDPM step (formula 7 of Ho et al.) written with the scheduler's own quantities
        assert p.coef_x0[k].item() == pytest.approx((a_prev.sqrt() * beta / (1 - a[k])).item(), rel=1e-9)
        assert p.coef_xt[k].item() == pytest.approx(((1 - beta).sqrt() * (1 - a_prev) / (1 - a[k])).item(), rel=1e-9, abs=1e-12)
        if k > 0:
            assert p.variance[k].item() == pytest.approx(float(sched._get_variance(k)), rel=1e-3)  # diffusers keeps float32
    # and a full deterministic step: with zero noise variance at t = 1 both give the same sample
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    theirs = sched.step(eps, 0, x).prev_sample
    ours = p.coef_xt[0] * x + p.coef_x0[0] * predict_x0(x, eps, a[0])
    assert torch.allclose(ours.float(), theirs, atol=1e-5)


def test_subsequences():
    assert make_subsequence(500, 50) == list(range(0, 501, 10))
    assert make_subsequence(10, 10) == list(range(11))
    u = make_subsequence(1000, 16)
    assert u[0] == 0 and u[-1] == 1000 and len(u) == 17
    s = make_subsequence(1000, 100, "scattered", seed=1)
    assert s == make_subsequence(1000, 100, "scattered", seed=1) != make_subsequence(1000, 100, "scattered", seed=2)
    assert s[0] == 0 and s[-1] == 1000 and len(s) == 101 and all(b > a for a, b in zip(s, s[1:]))
    c = make_subsequence(1000, 16, "concentrated:0.4")
    inside = [p for p in c[1:-1] if 475 <= p <= 525]
    assert len(c) == 17 and len(inside) == round(0.4 * 15)
    # a fraction too small for one step in the window leaves no hole there: the steps spread over the whole chain
    c = make_subsequence(1000, 16, "concentrated:0.01")
    assert max(b - a for a, b in zip(c, c[1:])) <= 72 and any(450 <= p <= 550 for p in c)
    assert make_subsequence(20, 3, "0,4,11,20") == [0, 4, 11, 20]
    assert make_subsequence(1000, 16, "0," + ",".join(str(62 * i) for i in range(1, 16)) + ",1000")[-1] == 1000


@pytest.mark.parametrize("bad, message", [("1,5,10,20", "start at 0"), ("0,5,10,19", "end at"), ("0,10,5,20", "increasing"),
                                          ("0,5,20", "entries"), ("nonsense", "expected one of")])
def test_bad_subsequences(bad, message):
    with pytest.raises(KdUsageError, match=message):
        make_subsequence(20, 3, bad)


@pytest.mark.parametrize("steps", [0, -1, 21])
def test_bad_student_steps(steps):
    with pytest.raises(KdUsageError):
        make_subsequence(20, steps)


def test_ddim_step_with_the_true_noise_lands_on_the_forward_marginal():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    x_t = q_sample(x0, eps, torch.full((5,), 0.3, dtype=torch.float64))
    x_prev = ddim_step(x_t, eps, 0.3, 0.8)
    assert torch.allclose(x_prev, math.sqrt(0.8) * x0 + math.sqrt(0.2) * eps, atol=1e-6)
    assert torch.allclose(ddim_step(x_t, eps, 0.3, 1.0), x0, atol=1e-6)


def test_chain_sub_and_progressive_plan():
    c = Chain(list(range(10)), torch.linspace(0.9, 0.1, 10))
    s = c.sub([0, 5, 10])
    assert s.timesteps == [4, 9] and torch.allclose(s.alphas_cumprod, c.alphas_cumprod[[4, 9]])
    assert Chain.from_json(s.to_json()).timesteps == [4, 9]
    assert progressive_plan(1000, 16) == (512, 5)
    assert progressive_plan(500, 50) == (400, 3)
    assert progressive_plan(500, 10) == (320, 5)
    assert progressive_plan(16, 16) == (16, 0)


def test_sliced_wasserstein():
    a = swiss_roll(2000, "train")
    assert sliced_wasserstein(a, a) == pytest.approx(0.0, abs=1e-12)
    # a pure shift s: each direction u moves by s.u; the mean of (s.u)^2 over directions is |s|^2 / 2
    shift = torch.tensor([0.3, -0.4])
    assert sliced_wasserstein(a, a + shift, projections=4000) == pytest.approx(0.5 / math.sqrt(2), rel=0.03)
    # unequal sizes are compared at common quantiles
    assert sliced_wasserstein(a, a[::2]) < 0.03  # finite-sample noise of 1000 vs 2000 points
    assert sliced_wasserstein(swiss_roll(3000, "train"), swiss_roll(3000, "test")) < 0.05
