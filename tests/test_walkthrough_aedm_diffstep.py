"""Findings of a fresh-eyes walkthrough of `kd-gen-queries aedm` and `kd-diffstep`: every paid answer reaches
the substitute (also across --resume), honest summaries, messages that name the bad option, the batch size
kept, hub ids vs mistyped paths, progress without a terminal, swissroll as an FID reference, what a student
records."""

import json

import h5py
import pytest
import torch

from conftest import kd
from kdtools.extract.aedm import plan_rounds, round_sizes
from kdtools.errors import KdUsageError
from kdtools.weights import load_model, read_metadata

FAST = ["--sampler-steps", 2, "--steer-steps", 1, "--substitute", "lenet5", "--batch-size", 50]


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("prior") / "prior"
    kd("kd-diffstep", "train", "--data", "digits", "--image-size", 8, "--steps", 20, "--unet-channels", "8,8",
       "--iters", 2, "--batch-size", 8, "-o", d, check=True)
    return d


def _weights(path):
    return {k: v.clone() for k, v in load_model(path).module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def aedm(prior_dir, victim_path, out, budget, *extra):
    return kd("kd-gen-queries", "aedm", "--diffusion", prior_dir, "--oracle", victim_path, "--budget", budget, "-o", out,
              *FAST, *extra)


# --- finding 1: every paid answer reaches the substitute ------------------------------------------------

def test_resume_with_more_budget_trains_on_the_new_answers(prior_dir, victim_path, tmp_path):
    out = tmp_path / "att"
    p = aedm(prior_dir, victim_path, out, 100, "-q")
    assert p.returncode == 0, p.stderr.decode()
    before = _weights(out / "substitute.safetensors")
    p = aedm(prior_dir, victim_path, out, 110, "--resume")
    assert p.returncode == 0, p.stderr.decode()
    err = p.stderr.decode()
    assert "10 in this run" in err and "3 iterations" in err
    after = _weights(out / "substitute.safetensors")
    assert not _same(before, after)  # the 10 new answers were learned from
    assert not _same(_weights(out / "checkpoints" / "substitute-100.safetensors"),
                     _weights(out / "checkpoints" / "substitute-110.safetensors"))
    assert read_metadata(out / "substitute.safetensors")["iterations"] == "3"
    assert read_metadata(out / "checkpoints" / "substitute-110.safetensors")["iterations"] == "3"


def test_resume_without_a_saved_state_learns_the_logged_answers_first(prior_dir, victim_path, tmp_path):
    out = tmp_path / "att"
    assert aedm(prior_dir, victim_path, out, 100, "-q").returncode == 0
    (out / "state.pt").unlink()  # as after a SIGTERM before the first state save: only the log is left
    p = aedm(prior_dir, victim_path, out, 150, "--resume")
    assert p.returncode == 0, p.stderr.decode()
    err = p.stderr.decode()
    assert "first learns from the 100 answers" in err and "3 iterations" in err
    meta = read_metadata(out / "substitute.safetensors")
    assert meta["iterations"] == "3" and meta["answers_learned"] == "150" and meta["queries_spent"] == "150"
    with h5py.File(out / "queries.h5") as f:
        assert f["x"].shape[0] == 150


@pytest.mark.parametrize("budget,batch,d_iter,late,before", [
    # iterations of 50 x 2 generator probes + 50 substitute queries = 150; a budget of 200 cuts the second
    # short after its 50 probe answers, which used to be logged but never learned from
    (200, 50, 1, 50, 150),
    # iterations of 10 x 2 probes + 3 substitute batches of 10 = 50; a budget of 95 cuts the second in its third
    # substitute batch: only those 5 answers are unlearned (the two batches before had their step already)
    (95, 10, 3, 5, 50),
])
def test_an_iteration_cut_short_by_the_budget_is_still_learned_from(victim_path, tmp_path, budget, batch, d_iter, late, before):
    out = tmp_path / "dfme"
    p = kd("kd-gen-queries", "dfme", "--oracle", victim_path, "--budget", budget, "--batch-size", batch, "--g-iter", 1,
           "--d-iter", d_iter, "--directions", 1, "--substitute", "lenet5", "--checkpoint-every", 1, "-o", out)
    assert p.returncode == 0, p.stderr.decode()
    assert f" {late} answers learned after their round" in p.stderr.decode()
    assert not _same(_weights(out / "checkpoints" / f"substitute-{before}.safetensors"),
                     _weights(out / "checkpoints" / f"substitute-{budget}.safetensors"))


# --- finding 2: no stale accuracy ------------------------------------------------------------------------

def test_resume_without_eval_data_reports_no_stale_accuracy(prior_dir, victim_path, tmp_path):
    out = tmp_path / "att"
    p = aedm(prior_dir, victim_path, out, 100, "--eval-data", "digits", "--checkpoint-every", 1)
    assert p.returncode == 0 and "accuracy" in p.stderr.decode().splitlines()[-1]
    # stopped after its last checkpoint, before it finished: the resume has nothing to ask, and measures nothing
    state = torch.load(out / "state.pt", weights_only=True)
    state["finished"] = False
    torch.save(state, out / "state.pt")
    (out / "substitute.safetensors").unlink()
    p = aedm(prior_dir, victim_path, out, 100, "--resume")
    last = p.stderr.decode().strip().splitlines()[-1]
    assert p.returncode == 0 and "accuracy" not in last and "None" not in last, last
    assert (out / "substitute.safetensors").is_file()
    assert "eval_accuracy" not in read_metadata(out / "substitute.safetensors")
    # more budget, still without --eval-data
    p = aedm(prior_dir, victim_path, out, 110, "--resume")
    last = p.stderr.decode().strip().splitlines()[-1]
    assert p.returncode == 0 and "accuracy" not in last and "None" not in last


# --- findings 3, 4, 10, 11, 12, 15: AEDM's messages and rounds ------------------------------------------

def test_aedm_messages_name_the_mode_and_the_option(prior_dir, victim_path, tmp_path):
    p = kd("kd-gen-queries", "aedm", "--diffusion", prior_dir, "--oracle", victim_path, "-o", tmp_path / "a")
    err = p.stderr.decode()
    assert p.returncode == 2 and "--substitute FILE -n N" in err and "--generator" not in err and "--budget" in err
    p = kd("kd-gen-queries", "aedm", "--diffusion", prior_dir, "--substitute", tmp_path / "s.safetensors", "-n", 4, "--follow")
    assert p.returncode == 2 and "kd-distill" in p.stderr.decode() and "--epochs 0" in p.stderr.decode()
    for flag in ("--clients", "--sampler-steps"):
        p = aedm(prior_dir, victim_path, tmp_path / "b", 10, flag, 0)
        err = p.stderr.decode().strip()
        assert p.returncode == 2 and err == f"error: {flag} must be at least 1, not 0"
    p = aedm(prior_dir, victim_path, tmp_path / "c", 4, "--clients", 8)
    err = p.stderr.decode()
    assert p.returncode == 2 and "at least 1 query" in err and "batch size" not in err and "--batch-size" not in err
    p = aedm(prior_dir, victim_path, tmp_path / "d", 20, "--sampler-steps", 500, "-q")
    assert p.returncode == 0 and b"--sampler-steps 500" not in p.stderr  # -q: quiet
    p = aedm(prior_dir, victim_path, tmp_path / "e", 20, "--sampler-steps", 500)
    assert p.returncode == 0 and "--sampler-steps 500: the prior has only 20 steps" in p.stderr.decode()


def test_aedm_keeps_the_batch_size_and_makes_the_last_round_smaller(prior_dir, victim_path, tmp_path):
    assert round_sizes(80, 3, 32) == [32, 32, 16] and round_sizes(32, 2, 32) == [31, 1]
    with pytest.raises(KdUsageError, match=r"too small for 8 clients: every client needs at least 1 query$"):
        plan_rounds(4, 8, 128)
    out = tmp_path / "att"
    p = kd("kd-gen-queries", "aedm", "--diffusion", prior_dir, "--oracle", victim_path, "--budget", 80, "-o", out,
           *FAST[:-2], "--batch-size", 32, "--checkpoint-every", 1)
    assert p.returncode == 0, p.stderr.decode()
    assert sorted(int(f.stem.split("-")[1]) for f in (out / "checkpoints").iterdir()) == [32, 64, 80]
    # without a terminal each point is reported once (the checkpoint after a round repeated it)
    lines = [line for line in p.stderr.decode().splitlines() if line.startswith("aedm: spent 32 ")]
    assert len(lines) == 1, p.stderr.decode()
    out = tmp_path / "fed"
    p = kd("kd-gen-queries", "aedm", "--diffusion", prior_dir, "--oracle", victim_path, "--budget", 100, "--clients", 3,
           "-o", out, *FAST[:-2], "--batch-size", 32, "--checkpoint-every", 1, "-q")
    assert p.returncode == 0, p.stderr.decode()
    assert sorted(int(f.stem.split("-")[1]) for f in (out / "checkpoints").iterdir()) == [96, 100]


# --- finding 6: mistyped paths fail at once, in one line ---------------------------------------------------

def test_a_mistyped_local_path_never_goes_to_the_hub(tmp_path):
    (tmp_path / "runs").mkdir()
    for arg in ("runs/x.safetensors", "runs/prior", "./prior", "nowhere/model.pt"):
        p = kd("kd-diffstep", "distill", arg, "--steps", 4, "-o", tmp_path / "x8", cwd=tmp_path, timeout=60)
        err = p.stderr.decode().strip()
        assert p.returncode == 1 and len(err.splitlines()) == 1 and "no such model directory" in err, err


# --- findings 5, 9, 12, 14: kd-diffstep's checks and records --------------------------------------------------

def test_diffstep_train_and_distill_refuse_bad_sizes_and_conflicts(prior_dir, tmp_path):
    for args, words in ((["--unet-channels", "8,8,8", "--image-size", 30], "divisible by 2**2 = 4"),
                        (["--image-size", -4], "--image-size must be at least 1, not -4"),
                        (["--image-size", 0], "--image-size must be at least 1, not 0"),
                        (["-n", 0], "-n must be at least 1, not 0")):
        p = kd("kd-diffstep", "train", "--data", "digits", "--iters", 1, "-o", tmp_path / "t", *args)
        assert p.returncode == 2 and words in p.stderr.decode() and b"Traceback" not in p.stderr, p.stderr.decode()
    p = kd("kd-diffstep", "train", "--data", "swissroll", "--image-size", 28, "--iters", 1, "-o", tmp_path / "t")
    assert p.returncode == 2 and b"--image-size applies to images" in p.stderr
    p = kd("kd-diffstep", "distill", prior_dir, "--steps", 4, "--image-size", 28, "-o", tmp_path / "s")
    assert p.returncode == 2 and b"makes 8x8 images" in p.stderr
    sw = tmp_path / "sw"
    kd("kd-diffstep", "train", "--data", "swissroll", "-n", 200, "--steps", 10, "--hidden-dim", 16, "--num-blocks", 1,
       "--iters", 1, "-o", sw, check=True)
    p = kd("kd-diffstep", "distill", sw, "--steps", 5, "--image-size", 28, "-o", tmp_path / "s")
    assert p.returncode == 2 and b"2-D points" in p.stderr
    assert not (tmp_path / "s").exists()


def test_a_student_records_the_data_it_was_trained_on(prior_dir, tmp_path):
    # the teacher was trained on digits; the student on the digits test split: both recorded, unambiguously
    out = tmp_path / "s"
    kd("kd-diffstep", "distill", prior_dir, "--steps", 4, "--split", "test", "-n", 50, "--iters", 1, "-o", out, check=True)
    info = json.loads((out / "kdtools.json").read_text())
    assert info["data"]["split"] == "test" and info["data"]["num"] == 50 and info["teacher_data"]["split"] == "train"
    assert info["data"]["image_size"] == 8  # the sample space stays the teacher's


# --- findings 7, 13, 15: kd-diffstep sample --------------------------------------------------------------------

def test_sample_reports_progress_without_a_terminal_and_says_what_it_wrote(prior_dir, tmp_path):
    p = kd("kd-diffstep", "sample", prior_dir, "-n", 8, "--grid", tmp_path / "g.png")
    err = p.stderr.decode()
    assert p.returncode == 0 and "sampling 0/8" in err and f"to {tmp_path / 'g.png'}" in err, err
    assert (tmp_path / "g.png").is_file()


def test_sample_progress_is_reported_per_step_from_the_first_batch():
    from kdtools.diffusion.sampling import sample
    from kdtools.diffusion.schedules import Chain, alphas_cumprod_from_betas, make_betas
    from kdtools.diffusion.teachers import DiffusionModel, build_unet

    a = alphas_cumprod_from_betas(make_betas(10))
    m = DiffusionModel(build_unet(8, 1, (8, 8), 1), Chain(list(range(10)), a), {"data": {"kind": "image", "channels": 1, "image_size": 8}})
    events = []
    sample(m, 4, batch_size=4, progress=events.append)
    assert events[0].completed == 0 and len(events) >= 10  # at once, then after every step of the one batch
    assert 0 < events[1].completed < 4


def test_sigterm_during_sampling_says_what_is_kept(prior_dir, tmp_path):
    import os
    import signal
    import subprocess

    from conftest import ROOT, kd_cmd

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([*kd_cmd("kd-diffstep"), "sample", str(prior_dir), "-n", "200000", "--batch-size", "20000",
                          "-o", str(tmp_path / "s.h5")], env=env, stderr=subprocess.PIPE)
    # its first progress line says sampling has begun (the first batch alone takes longer); waiting for it, not
    # for a fixed time, keeps the test right on a loaded machine, where the imports alone can take 10 s
    seen = b""
    while b"sampling" not in seen:
        line = p.stderr.readline()
        assert line, f"ended before sampling: {seen.decode()}"
        seen += line
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    err = (seen + p.communicate(timeout=60)[1]).decode()
    assert p.returncode == 143 and "nothing was written" in err and "run the command again" in err, err
    assert not (tmp_path / "s.h5").exists()


# --- finding 8: swissroll as an FID reference --------------------------------------------------------------

def test_swissroll_is_an_fid_reference_and_a_dataset(tmp_path):
    ref = tmp_path / "ref.h5"
    p = kd("kd-gen-queries", "dataset", "--data", "swissroll", "--split", "test", "-n", 300, "-o", ref)
    assert p.returncode == 0, p.stderr.decode()
    with h5py.File(ref) as f:
        assert f["x"].shape == (300, 2)
    p = kd("kd-eval", "fid", ref, "--ref", "swissroll", "--features", "raw", "--json")
    assert p.returncode == 0, p.stderr.decode()
    report = json.loads(p.stdout)
    assert report["ref_split"] == "test" and report["fid"] < 0.05  # the held-out points against themselves, reshuffled
    p = kd("kd-eval", "fid", ref, "--ref", "swissroll", "--features", "raw", "--ref-num", 0)
    assert p.returncode == 2 and b"--ref-num must be at least 2" in p.stderr
