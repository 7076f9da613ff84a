"""kd-diffstep library pieces in-process (fast): the baselines' training loops on a tiny model, and the
student's sampler equal to diffusers' DDPMScheduler on the same schedule."""

import json

import torch

from kdtools.diffusion.baselines import ddim_skipping, from_scratch, progressive_distillation
from kdtools.diffusion.sampling import consistency, sample
from kdtools.diffusion.schedules import Chain, alphas_cumprod_from_betas, make_betas, make_subsequence
from kdtools.diffusion.sfddm import distill_sfddm
from kdtools.diffusion.swissroll import swiss_roll
from kdtools.diffusion.teachers import DiffusionModel, MLPDenoiser
from kdtools.diffusion.training import FitConfig

CPU = torch.device("cpu")


def tiny_teacher(T=24):
    torch.manual_seed(0)
    acp = alphas_cumprod_from_betas(make_betas(T, "linear", 1e-4 * 1000 / T, min(0.999, 0.02 * 1000 / T)))
    return DiffusionModel(MLPDenoiser(hidden_dim=16, num_blocks=1).eval(), Chain(list(range(T)), acp),
                          {"data": {"name": "swissroll", "kind": "tabular", "dim": 2}, "clip_sample": True, "clip_sample_range": 1.7})


def test_every_method_in_process():
    t = tiny_teacher()
    data = swiss_roll(500)
    cfg = FitConfig(iters=5, batch_size=32)
    phi = make_subsequence(24, 3)
    s = distill_sfddm(t, data, phi, cfg, CPU)  # aligned: the network sees the teacher's timesteps on phi
    assert s.steps == 3 and s.chain.timesteps == [7, 15, 23] and s.info["student_timesteps"] == "aligned"
    assert torch.equal(s.chain.alphas_cumprod, t.chain.alphas_cumprod[[7, 15, 23]])
    own = distill_sfddm(t, data, phi, cfg, CPU, timesteps="own")
    assert own.chain.timesteps == [0, 1, 2] and torch.equal(own.chain.alphas_cumprod, s.chain.alphas_cumprod)
    p = progressive_distillation(t, data, 3, cfg, CPU)  # 24 -> 12 -> 6 -> 3
    assert p.info["folds"] == 3 and p.steps == 3 and p.chain.timesteps[-1] == 23
    d = ddim_skipping(t, phi)
    assert d.chain.timesteps == [7, 15, 23] and d.net is t.net
    f = from_scratch(t, data, phi, cfg, CPU)
    assert f.steps == 3
    for m in (s, p, d, f):
        x = sample(m, 10, seed=1)
        assert x.shape == (10, 2) and torch.isfinite(x).all() and x.abs().max() <= 1.7 + 1e-5
    assert consistency(t, ddim_skipping(t, list(range(25))), 8)["distance"] < 1e-6


def test_student_ddpm_sampler_equals_diffusers_pipeline_loop():
    """Our posterior sampler and diffusers' DDPMScheduler, given the same model outputs and noises."""
    from diffusers import DDPMScheduler

    from kdtools.diffusion.schedules import betas_from_alphas_cumprod

    t = tiny_teacher()
    phi = make_subsequence(24, 5, "scattered", seed=2)
    a = t.chain.sub(phi).alphas_cumprod
    sched = DDPMScheduler(num_train_timesteps=5, trained_betas=betas_from_alphas_cumprod(a).tolist(), clip_sample=False)
    sched.set_timesteps(5)
    _assert_scheduler_walks_our_posterior(sched, a)


def _assert_scheduler_walks_our_posterior(sched, a):
    """Walk the chain with cumulative alphas ``a`` twice, with our posterior step (eqs. 6.10-6.14) and with
    ``sched.step`` at its own timesteps (descending), on the same model outputs and noises."""
    from kdtools.diffusion.schedules import posterior, predict_x0

    n = a.numel()
    post = posterior(a)
    g = torch.Generator().manual_seed(0)
    x_ours = x_theirs = torch.randn(4, 2, generator=g)
    for k in reversed(range(n)):
        eps, noise = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
        mean = post.coef_xt[k] * x_ours + post.coef_x0[k] * predict_x0(x_ours, eps, a[k])
        x_ours = (mean + (post.variance[k].sqrt() * noise if k > 0 else 0)).float()
        tk = int(sched.timesteps[n - 1 - k])
        out = sched.step(eps, tk, x_theirs).pred_original_sample
        # diffusers draws its own noise; rebuild its step with ours from its own coefficients
        a_prev = a[k - 1] if k > 0 else torch.tensor(1.0, dtype=torch.float64)
        beta = 1 - a[k] / a_prev
        theirs_mean = (a_prev.sqrt() * beta / (1 - a[k])) * out + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a[k])) * x_theirs
        x_theirs = (theirs_mean + (sched._get_variance(tk).double().sqrt() * noise if k > 0 else 0)).float()
        assert torch.allclose(x_ours, x_theirs, atol=1e-3)


def test_aligned_student_from_the_teacher_starts_and_stays_at_the_optimum_of_eq_6_17():
    """With the teacher's timesteps and weights the student's prediction is the teacher's at every aligned step:
    the loss is 0, Adam takes zero steps, and the student equals the teacher on phi (DDIM skipping's network)."""
    from kdtools.diffusion.sfddm import sfddm_loss

    t = tiny_teacher()
    phi = make_subsequence(24, 4)
    student = distill_sfddm(t, swiss_roll(300), phi, FitConfig(iters=6, batch_size=32, ema=0.9), CPU)
    for a, b in zip(student.net.state_dict().values(), t.net.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    loss = sfddm_loss(t, phi, 0.1, 0.0, "aligned")(student.net, swiss_roll(64), torch.Generator().manual_seed(0))
    assert loss.item() == 0.0
    # the own-index student starts away from it: its time conditioning is the teacher's at the wrong noise levels
    assert sfddm_loss(t, phi, 0.1, 0.0, "own")(student.net, swiss_roll(64), torch.Generator().manual_seed(0)).item() > 0
    skip = ddim_skipping(t, phi)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(sample(student, 16, seed=2, sampler="ddpm", x_T=x_T), sample(skip, 16, seed=2, sampler="ddpm", x_T=x_T),
                          atol=1e-5)


def test_aligned_student_scheduler_walks_phi_in_diffusers():
    """The aligned student's directory keeps the teacher's schedule with trailing spacing: DDPMScheduler.set_timesteps(T')
    lands on phi - 1 for a uniform phi, and its step() is our posterior step (eqs. 6.10-6.14) on the student chain."""
    from diffusers import DDPMScheduler

    from kdtools.diffusion.schedules import betas_from_alphas_cumprod

    t = tiny_teacher()
    phi = make_subsequence(24, 5)
    student = distill_sfddm(t, swiss_roll(100), phi, FitConfig(iters=1, batch_size=16), CPU)
    cfg = dict(student.scheduler_config)
    cfg["trained_betas"] = betas_from_alphas_cumprod(t.chain.alphas_cumprod).tolist()  # the tiny teacher has no saved config
    cfg["clip_sample"] = False
    sched = DDPMScheduler.from_config(cfg)
    sched.set_timesteps(5)
    assert sched.timesteps.tolist() == list(reversed(student.chain.timesteps)) == [p - 1 for p in reversed(phi[1:])]
    _assert_scheduler_walks_our_posterior(sched, student.chain.alphas_cumprod)


class _RecordingDenoiser(MLPDenoiser):
    """Returns its timestep as the noise prediction and records what it was called with."""

    def __init__(self):
        super().__init__(hidden_dim=4, num_blocks=1)
        self.calls = []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        out = t.float().view(-1, 1).expand_as(x)
        return out, out


def test_sfddm_loss_uses_the_aligned_teacher_step():
    """Eq. 6.17 by hand: student step t (network timestep t-1) and teacher step phi_t (network timestep
    phi_t - 1) see the same x = sqrt(a_{phi_t}) x_0 + sqrt(1 - a_{phi_t}) eps; with networks that output
    their timestep the loss is mean((t-1 - (phi_t-1))^2) * (1 + hidden weight)."""
    from kdtools.diffusion.schedules import q_sample
    from kdtools.diffusion.sfddm import sfddm_loss

    t = tiny_teacher()
    teacher_net, student_net = _RecordingDenoiser(), _RecordingDenoiser()
    t.net = teacher_net
    phi = [0, 5, 11, 24]
    x0 = swiss_roll(6)
    loss = sfddm_loss(t, phi, hidden_weight=0.5, data_weight=0.0)(student_net, x0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # replay the loss's draws
    k = torch.randint(3, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    teacher_t = torch.tensor([phi[i + 1] - 1 for i in k.tolist()])
    x_t = q_sample(x0, eps, t.chain.alphas_cumprod.float()[teacher_t])
    (xt_teacher, tt), = teacher_net.calls
    (xt_student, ts), = student_net.calls
    assert torch.equal(tt, teacher_t) and torch.equal(ts, k)
    assert torch.allclose(xt_teacher, x_t) and torch.equal(xt_student, xt_teacher)
    expected = ((k - teacher_t).float() ** 2).mean() * 1.5
    assert torch.isclose(loss, expected)
    # aligned: the student network is called with the teacher's timestep phi_t - 1 on the same x
    aligned_net = _RecordingDenoiser()
    loss = sfddm_loss(t, phi, 0.5, 0.0, "aligned")(aligned_net, x0, torch.Generator().manual_seed(3))
    (xt_aligned, ta), = aligned_net.calls
    assert torch.equal(ta, teacher_t) and torch.equal(xt_aligned, x_t) and loss.item() == 0.0


def test_a_stopped_training_run_resumes_from_its_checkpoint_to_the_uninterrupted_weights(tmp_path):
    """kd-diffstep train keeps OUTPUT.ckpt: a stop (Ctrl-C, SIGTERM) writes it at the step reached, and the resumed
    run ends with the weights (EMA included) of the run that was never stopped."""
    import copy

    import pytest

    from kdtools.diffusion.schedules import Chain
    from kdtools.diffusion.training import TrainingStopped, denoising_loss, fit, load_fit_checkpoint
    from kdtools.errors import KdError, KdUsageError
    from kdtools.progress import ProgressEvent

    t = tiny_teacher()
    chain, data, cfg = Chain(list(range(24)), t.chain.alphas_cumprod), swiss_roll(300), FitConfig(iters=120, batch_size=16)
    whole, _ = fit(copy.deepcopy(t.net), denoising_loss(chain), data, cfg, CPU)

    seen = []

    def after_51_steps(event: ProgressEvent):
        seen.append(event.completed)  # progress is reported after steps 1, 51, 101, ...

    ckpt = tmp_path / "teacher.ckpt"
    with pytest.raises(TrainingStopped, match="stopped after step 51 of 120"):
        # the stop is asked for between two steps (the CLI defers Ctrl-C and SIGTERM to that point)
        fit(copy.deepcopy(t.net), denoising_loss(chain), data, cfg, CPU, after_51_steps, checkpoint=ckpt,
            save_every_s=1e9, stop_requested=lambda: 51 in seen)
    state = load_fit_checkpoint(ckpt, cfg)
    assert state["iter"] == 51
    resumed, stats = fit(copy.deepcopy(t.net), denoising_loss(chain), data, cfg, CPU, checkpoint=ckpt, resume=state)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert stats["iters"] == 120
    # other training options are named; a file that is not a checkpoint is a data error
    with pytest.raises(KdUsageError, match=r"other training options \(iters 120 -> 200\)"):
        load_fit_checkpoint(ckpt, FitConfig(iters=200, batch_size=16))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(KdError, match="not a readable training checkpoint"):
        load_fit_checkpoint(tmp_path / "junk.ckpt", cfg)


def test_a_stopped_progressive_distillation_resumes_in_its_fold_to_the_uninterrupted_weights(tmp_path):
    """Progressive distillation keeps one checkpoint across its folds: a stop inside fold 2 resumes there (fold 1 is
    not trained again), and so does a kill between two folds; both end with the uninterrupted run's weights."""
    import pytest

    from kdtools.diffusion.training import TrainingStopped, load_fit_checkpoint
    from kdtools.errors import KdUsageError
    from kdtools.progress import ProgressEvent

    t = tiny_teacher()  # 24 steps -> 3: folds 24->12, 12->6, 6->3
    data, cfg = swiss_roll(300), FitConfig(iters=60, batch_size=16)
    whole = progressive_distillation(t, data, 3, cfg, CPU)

    tasks = []

    def record(event: ProgressEvent):
        tasks.append(event.task)

    ckpt = tmp_path / "p.ckpt"
    stop = {"checkpoint": ckpt, "stop_requested": lambda: any(task.startswith("progressive fold 2/3") for task in tasks)}
    with pytest.raises(TrainingStopped, match=r"progressive fold 2/3: 12->6: stopped after step 1 of 60"):
        progressive_distillation(tiny_teacher(), data, 3, cfg, CPU, record, fit_options=stop)
    state = load_fit_checkpoint(ckpt, cfg)  # fold 2 trains with seed + 1: accepted as the same options
    assert (state["fold"], state["iter"]) == (1, 1) and len(json.loads(state["fold_stats"])) == 1
    tasks.clear()
    resumed = progressive_distillation(tiny_teacher(), data, 3, cfg, CPU, record, fit_options={"checkpoint": ckpt, "resume": state})
    assert not any(task.startswith("progressive fold 1/3") for task in tasks)  # fold 1 was not trained again
    for a, b in zip(whole.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.chain.timesteps == whole.chain.timesteps and len(resumed.info["stats"]["folds"]) == 3
    # the resumed run wrote the state between folds 2 and 3 (a kill there resumes at fold 3, step 0)
    between = load_fit_checkpoint(ckpt, cfg)
    assert (between["fold"], between["iter"]) == (2, 0)
    with pytest.raises(KdUsageError, match=r"other training options \(seed 0 -> 5\)"):  # the run's seed, not fold 3's
        load_fit_checkpoint(ckpt, FitConfig(iters=60, batch_size=16, seed=5))
    again = progressive_distillation(tiny_teacher(), data, 3, cfg, CPU, fit_options={"resume": between})
    for a, b in zip(whole.net.state_dict().values(), again.net.state_dict().values()):
        assert torch.equal(a, b)


def _ddp_stop_worker(rank, world, port, stop_after, ckpt, results):
    """One rank of test_ranks_stop_after_the_same_step: its stop signal is noticed after stop_after[rank] steps."""
    import os

    import torch.distributed as dist

    from kdtools.diffusion.schedules import Chain
    from kdtools.diffusion.training import TrainingStopped, denoising_loss, fit

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = MLPDenoiser(hidden_dim=16, num_blocks=1)
    chain = Chain(list(range(10)), alphas_cumprod_from_betas(make_betas(10, "linear", 1e-2, 0.2)))
    polls = {"n": 0}

    def stop_requested():
        polls["n"] += 1
        return polls["n"] >= stop_after[rank]

    try:
        fit(net, denoising_loss(chain), swiss_roll(200), FitConfig(iters=1000, batch_size=8), CPU, rank=rank,
            world_size=world, checkpoint=ckpt if rank == 0 else None, save_every_s=1e9, stop_requested=stop_requested)
        results[rank] = "finished"
    except TrainingStopped as e:
        results[rank] = str(e)
    except Exception as e:  # the failure this test guards against: a rank stranded in an all-reduce
        results[rank] = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()


def test_ranks_stop_after_the_same_step_and_rank_0_saves(tmp_path):
    """Under torchrun each rank gets the signal at its own moment: rank 1 noticing it a step before rank 0 used to
    leave rank 0 in the next all-reduce (a gloo error, no checkpoint). The ranks now agree on the step."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    ckpt = tmp_path / "ddp.ckpt"
    mp.spawn(_ddp_stop_worker, args=(2, port, {0: 12, 1: 10}, ckpt, results), nprocs=2, join=True)
    assert dict(results) == {0: "training: stopped after step 10 of 1000", 1: "training: stopped after step 10 of 1000"}
    assert torch.load(ckpt, weights_only=True)["iter"] == 10
