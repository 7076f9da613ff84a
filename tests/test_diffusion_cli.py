"""kd-diffstep end to end through real subprocesses: train -> distill (every method) -> sample -> compare,
diffusers interoperability, bad inputs (clear error, exit 1/2, no partial output directory), torchrun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, kd, torchrun_failure

FAST = {"OMP_NUM_THREADS": "1"}


def run(*args):
    return kd("kd-diffstep", *args, env=FAST)


@pytest.fixture(scope="module")
def tabular_teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sr") / "teacher"
    p = run("train", "--data", "swissroll", "-n", 2000, "--steps", 40, "--hidden-dim", 32, "--num-blocks", 1,
            "--iters", 150, "--batch-size", 128, "--lr", 2e-3, "-o", out)
    assert p.returncode == 0, p.stderr.decode()
    assert not Path(str(out) + ".ckpt").exists()  # a finished run leaves no checkpoint behind
    return out


@pytest.fixture(scope="module")
def image_teacher(tmp_path_factory) -> Path:
    """A tiny UNet2DModel teacher on 8x8 digits, 20 steps."""
    out = tmp_path_factory.mktemp("img") / "teacher"
    p = run("train", "--data", "digits", "--image-size", 8, "--channels", 1, "--steps", 20, "--unet-channels", "16,32",
            "--iters", 4, "--batch-size", 8, "-o", out)
    assert p.returncode == 0, p.stderr.decode()
    return out


def test_tabular_train_distill_sample_compare(tabular_teacher, tmp_path):
    t = tabular_teacher
    assert (t / "denoiser" / "config.json").is_file() and (t / "scheduler" / "scheduler_config.json").is_file()
    info = json.loads((t / "kdtools.json").read_text())
    assert info["kind"] == "teacher" and len(info["chain"]["timesteps"]) == 40 and info["kdtools.version"]
    # the recorded options are the command's own parameters, nothing the function imported
    assert info["options"]["steps"] == 40 and info["options"]["hidden_dim"] == 32
    assert not {"Chain", "fit", "make_betas", "save_diffusion"} & set(info["options"])
    # defaults are recorded as what they resolved to: DDPM's betas scaled to 40 steps, the device used
    assert info["options"]["beta_start"] == pytest.approx(1e-4 * 1000 / 40) and info["options"]["beta_end"] == pytest.approx(0.5)
    assert info["options"]["device"] == "cpu"
    out = tmp_path / "sfddm"
    p = run("distill", t, "--steps", 5, "--iters", 20, "--batch-size", 64, "-o", out)
    assert p.returncode == 0, p.stderr.decode()
    # SFDDM: the student's alphas are the teacher's on phi, and its scheduler config reproduces them
    s = json.loads((out / "kdtools.json").read_text())
    assert s["method"] == "sfddm" and s["phi"] == [0, 8, 16, 24, 32, 40]
    assert s["options"]["steps"] == 5 and not {"distill_sfddm", "load_diffusion", "METHODS"} & set(s["options"])
    assert s["chain"]["alphas_cumprod"] == [info["chain"]["alphas_cumprod"][p - 1] for p in s["phi"][1:]]
    from diffusers import DDPMScheduler

    # aligned (default): the teacher's 40-step schedule, which diffusers walks on phi - 1 with 5 inference steps
    assert s["student_timesteps"] == "aligned" and s["chain"]["timesteps"] == [p - 1 for p in s["phi"][1:]]
    sched = DDPMScheduler.from_pretrained(str(out), subfolder="scheduler")
    sched.set_timesteps(5)
    walked = list(reversed(sched.timesteps.tolist()))
    assert walked == s["chain"]["timesteps"]
    assert torch.allclose(sched.alphas_cumprod[walked].double(), torch.tensor(s["chain"]["alphas_cumprod"], dtype=torch.float64), rtol=1e-4)
    # own: a plain 5-step DDPM directory whose scheduler reproduces the student's alphas
    own = tmp_path / "sfddm-own"
    p = run("distill", t, "--steps", 5, "--iters", 5, "--batch-size", 64, "--student-timesteps", "own", "-o", own)
    assert p.returncode == 0, p.stderr.decode()
    sched = DDPMScheduler.from_pretrained(str(own), subfolder="scheduler")
    assert torch.allclose(sched.alphas_cumprod.double(), torch.tensor(s["chain"]["alphas_cumprod"], dtype=torch.float64), rtol=1e-4)
    # DDIM skipping: the teacher's schedule, which diffusers' DDIMScheduler walks on the same chain
    from diffusers import DDIMScheduler

    ddim = tmp_path / "ddim5"
    # step skipping trains nothing, so a training flag like --iters 0 is not its business
    p = run("distill", t, "--steps", 5, "--method", "ddim", "--iters", 0, "-o", ddim)
    assert p.returncode == 0, p.stderr.decode()
    d = json.loads((ddim / "kdtools.json").read_text())
    sched = DDIMScheduler.from_pretrained(str(ddim), subfolder="scheduler")
    sched.set_timesteps(5)
    assert list(reversed(sched.timesteps.tolist())) == d["chain"]["timesteps"] == [7, 15, 23, 31, 39]
    # sample to a file and a PNG; the same seed gives the same samples
    p = run("sample", out, "-n", 50, "-o", tmp_path / "a.h5", "--grid", tmp_path / "g.png")
    assert p.returncode == 0, p.stderr.decode()
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    from kdtools.sources import read_all

    x = read_all(tmp_path / "a.h5")[1]["x"]
    assert x.shape == (50, 2) and x.dtype == torch.float32
    run("sample", out, "-n", 50, "-o", tmp_path / "b.h5")
    assert torch.equal(x, read_all(tmp_path / "b.h5")[1]["x"])
    # --eta only shapes DDIM: with the teacher's own DDPM sampler it is named as ignored, with ddim it is not
    p = run("sample", t, "-n", 4, "--eta", 0.5, "-o", tmp_path / "eta.h5")
    assert p.returncode == 0 and b"--eta 0.5 ignored" in p.stderr
    p = run("sample", t, "-n", 4, "--eta", 0.5, "--sampler", "ddim", "-o", tmp_path / "eta.h5")
    assert p.returncode == 0 and b"ignored" not in p.stderr
    p = run("compare", out, "--teacher", t, "-n", 32, "--pairs", tmp_path / "pairs.png", "--interp",
            tmp_path / "interp.png", "--json")
    assert p.returncode == 0, p.stderr.decode()
    facts = json.loads(p.stdout)
    assert facts["teacher_steps"] == 40 and facts["student_steps"] == 5 and facts["distance"] >= 0
    assert (tmp_path / "pairs.png").is_file() and (tmp_path / "interp.png").is_file()


@pytest.mark.slow
def test_every_baseline_through_the_cli(tabular_teacher, tmp_path):
    t = tabular_teacher
    for method in ("ddim", "progressive", "scratch"):
        out = tmp_path / method
        p = run("distill", t, "--steps", 5, "--method", method, "--iters", 20, "--batch-size", 64, "-o", out)
        assert p.returncode == 0, (method, p.stderr.decode())
        s = json.loads((out / "kdtools.json").read_text())
        assert s["method"] == method and len(s["chain"]["timesteps"]) == 5
    # progressive from 40 steps to 5: 40 -> 20 -> 10 -> 5
    assert json.loads((tmp_path / "progressive" / "kdtools.json").read_text())["folds"] == 3
    p = run("sample", tmp_path / "progressive", "-n", 20, "-o", "-")
    assert p.returncode == 0 and p.stdout[:8]
    # DDIM skipping with every step is the teacher itself: distance 0
    run("distill", t, "--steps", 40, "--method", "ddim", "-o", tmp_path / "ddim40")
    p = run("compare", tmp_path / "ddim40", "--teacher", t, "-n", 16, "--json")
    assert json.loads(p.stdout)["distance"] == pytest.approx(0.0, abs=1e-6)


def test_image_teacher_is_a_diffusers_pipeline(image_teacher, tmp_path):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(str(image_teacher), local_files_only=True)
    assert pipe.unet.config.sample_size == 8 and pipe.scheduler.config.num_train_timesteps == 20
    out = tmp_path / "s7"
    p = run("distill", image_teacher, "--steps", 7, "--subsequence", "scattered", "--iters", 2, "--batch-size", 4,
            "--noise-bank", 3, "--noise-iters", 2, "-o", out)
    assert p.returncode == 0, p.stderr.decode()
    assert (out / "noise_bank.safetensors").is_file()
    student = DDPMPipeline.from_pretrained(str(out), local_files_only=True)
    # aligned (default): the teacher's 20-step schedule; a scattered phi is walked with custom timesteps
    chain = json.loads((out / "kdtools.json").read_text())["chain"]["timesteps"]
    assert student.scheduler.config.num_train_timesteps == 20 and len(chain) == 7
    student.scheduler.set_timesteps(timesteps=list(reversed(chain)))
    assert list(reversed(student.scheduler.timesteps.tolist())) == chain
    p = run("sample", out, "-n", 6, "-o", tmp_path / "x.h5", "--input-noise", "bank", "--grid", tmp_path / "grid.png")
    assert p.returncode == 0, p.stderr.decode()
    from kdtools.sources import read_all

    x = read_all(tmp_path / "x.h5")[1]["x"]
    assert x.shape == (6, 1, 8, 8) and x.dtype == torch.uint8


def test_foreign_diffusers_directory_loads(tmp_path):
    """A plain diffusers UNet2DModel + DDPMScheduler directory (as saved from the hub), no kdtools.json."""
    from diffusers import DDPMScheduler, UNet2DModel

    from kdtools.diffusion.teachers import load_diffusion

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=16)
    unet.save_pretrained(tmp_path / "m" / "unet")
    DDPMScheduler(num_train_timesteps=30).save_pretrained(tmp_path / "m" / "scheduler")
    m = load_diffusion(tmp_path / "m")
    assert m.steps == 30 and m.sample_shape == (3, 8, 8) and m.clip == 1.0
    p = run("distill", tmp_path / "m", "--steps", 3, "--method", "ddim", "-o", tmp_path / "d")
    assert p.returncode == 0, p.stderr.decode()


def _no_partial(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [q for q in parent.iterdir() if q.name.startswith(f".{name}")], list(parent.iterdir())


def _one_line(p):
    err = p.stderr.decode()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_bad_inputs(image_teacher, tabular_teacher, tmp_path):
    """Each bad input: the right exit code, one line naming the problem, no traceback, no partial output.
    The cases are independent processes (most of their time is importing torch), run two at a time."""
    from concurrent.futures import ThreadPoolExecutor

    broken = tmp_path / "noscheduler"  # a teacher directory without a scheduler
    shutil.copytree(image_teacher, broken)
    shutil.rmtree(broken / "scheduler")
    keep = tmp_path / "keep"  # an existing output directory is kept as it was
    keep.mkdir()
    (keep / "x").write_text("mine")
    cases = [  # (arguments, exit code, what the line says, output that must not appear)
        (["distill", broken, "--steps", 4, "-o", tmp_path / "o1"], 1, b"no scheduler", "o1"),
        # a missing local directory written like "owner/name/": said as such, not as a failed hub download
        (["distill", "nonexist/", "--steps", 4, "-o", tmp_path / "o1b"], 1, b"nonexist/: no such model directory", "o1b"),
        # a teacher with a different image size than asked for: an option against the teacher, a usage error
        (["distill", image_teacher, "--steps", 4, "--image-size", 32, "-o", tmp_path / "o2"], 2, b"8x8", "o2"),
        # training data that does not fit the teacher (2-D points for an image teacher)
        (["distill", image_teacher, "--steps", 4, "--data", "swissroll", "-n", 100, "-o", tmp_path / "o6"], 2,
         b"do not fit the teacher", "o6"),
        # --steps larger than the teacher's, or zero
        (["distill", image_teacher, "--steps", 21, "-o", tmp_path / "o3a"], 2, b"--steps", "o3a"),
        (["distill", image_teacher, "--steps", 0, "-o", tmp_path / "o3b"], 2, b"--steps", "o3b"),
        # an unknown --student-timesteps is a usage error before any work
        (["distill", tabular_teacher, "--steps", 4, "--student-timesteps", "teacher", "-o", tmp_path / "o5"], 2,
         b"aligned, own", "o5"),
        # sub-sequences that do not start at 0 or do not end at T
        (["distill", tabular_teacher, "--steps", 4, "--subsequence", "1,10,20,30,40", "-o", tmp_path / "o4a"], 2,
         b"start at 0", "o4a"),
        (["distill", tabular_teacher, "--steps", 4, "--subsequence", "0,10,20,30,39", "-o", tmp_path / "o4b"], 2,
         b"end at", "o4b"),
        (["distill", tabular_teacher, "--steps", 4, "--method", "ddim", "-o", keep], 2, b"", None),
        (["sample", tmp_path / "nowhere", "-n", 2, "-o", tmp_path / "s.h5"], 1, b"", "s.h5"),
        (["sample", tabular_teacher, "-n", 2, "--batch-size", 0, "-o", tmp_path / "s0.h5"], 2, b"--batch-size", "s0.h5"),
        # figures are PNG: another name is refused before sampling, not filled with PNG bytes
        (["sample", tabular_teacher, "-n", 2, "--grid", tmp_path / "g.jpg"], 2, b"ending in .png", "g.jpg"),
        # betas are per-step variances in (0, 1), growing along the chain: a usage error, not "lower --lr"
        (["train", "--data", "swissroll", "--steps", 10, "--beta-end", 1.5, "--iters", 5, "-o", tmp_path / "t1"], 2,
         b"must lie in (0, 1)", "t1"),
        (["train", "--data", "swissroll", "--steps", 10, "--beta-start", 0.5, "--beta-end", 0.1, "--iters", 5,
          "-o", tmp_path / "t2"], 2, b"below --beta-start", "t2"),
        # a bad training flag is named with its value
        (["train", "--data", "swissroll", "--steps", 10, "--iters", 5, "--lr", 0, "-o", tmp_path / "t3"], 2,
         b"--lr must be > 0, not 0.0", "t3"),
        # a stopped run's checkpoint is never started over silently, and --resume needs one
        (["train", "--data", "swissroll", "--steps", 10, "--iters", 5, "-o", tmp_path / "t4"], 2,
         b"t4.ckpt holds a stopped run of this output: add --resume", "t4"),
        (["train", "--data", "swissroll", "--steps", 10, "--iters", 5, "--resume", "-o", tmp_path / "t5"], 2,
         b"--resume: there is no", "t5"),
    ]
    cases += [
        (["distill", tabular_teacher, "--steps", 4, "--iters", 5, "-o", tmp_path / "d1"], 2,
         b"d1.ckpt holds a stopped run of this output: add --resume", "d1"),
        (["distill", tabular_teacher, "--steps", 4, "--method", "progressive", "--resume", "-o", tmp_path / "d2"], 2,
         b"--resume: there is no", "d2"),
        (["distill", tabular_teacher, "--steps", 4, "--method", "ddim", "--resume", "-o", tmp_path / "d3"], 2,
         b"--method ddim trains nothing, so it keeps no checkpoint", "d3"),
    ]
    (tmp_path / "t4.ckpt").write_bytes(b"a stopped run")
    (tmp_path / "d1.ckpt").write_bytes(b"a stopped run")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: run(*case[0]), cases))
    for (args, code, what, out), p in zip(cases, results):
        assert p.returncode == code and what in p.stderr, (args, p.stderr)
        _one_line(p)
        if out:
            _no_partial(tmp_path, out)
    assert (keep / "x").read_text() == "mine" and [q.name for q in keep.iterdir()] == ["x"]


def test_outputs_never_destroy_inputs_or_other_work(tabular_teacher, tmp_path):
    """--force once deleted any folder (-o runs --force took the notes in it; -o teacher --force replaced the teacher
    it distilled from), and sample -o wrote into the model directory it sampled. Each is now a usage error before
    any work, with the files left as they were."""
    import shutil

    from conftest import sha

    teacher = tmp_path / "w" / "teacher"
    shutil.copytree(tabular_teacher, teacher)
    (tmp_path / "w" / "notes.txt").write_text("precious\n")
    student = tmp_path / "s5"
    assert run("distill", teacher, "--steps", 5, "--method", "ddim", "-o", student).returncode == 0
    index = sha(student / "kdtools.json")
    (tmp_path / "afile").write_text("x\n")
    # the rules, on the function train and distill call before any work (a process each would cost seconds)
    from kdtools.diffusion.teachers import check_output_dir
    from kdtools.errors import KdUsageError

    for out, force, inputs, why in ((tmp_path / "w", True, [teacher], "holds the input"),
                                    (teacher, True, [teacher], "is the input"),
                                    (tmp_path / "w", True, [], "replaces only a model directory"),
                                    (tmp_path / "afile" / "t", False, [], "is not a directory")):
        with pytest.raises(KdUsageError, match=why):
            check_output_dir(out, force, inputs)
    assert check_output_dir(student, True, [teacher]) == student  # a model directory may be replaced
    # and through the commands
    cases = [
        (["distill", teacher, "--steps", 5, "--method", "ddim", "-o", tmp_path / "w", "--force"], "holds the input"),
        (["sample", student, "-n", 4, "-o", student / "kdtools.json"], "inside the model directory"),
        (["sample", student, "-n", 4, "--grid", student / "grid.png"], "inside the model directory"),
    ]
    for args, why in cases:
        p = run(*args)
        assert p.returncode == 2 and why in p.stderr.decode(), (args, p.stderr.decode())
        _one_line(p)
    assert (tmp_path / "w" / "notes.txt").read_text() == "precious\n" and (teacher / "model_index.json").is_file()
    assert sha(student / "kdtools.json") == index and not (student / "grid.png").exists()
    # a model directory is still replaced with --force, as before
    assert run("distill", teacher, "--steps", 4, "--method", "ddim", "-o", student, "--force").returncode == 0


def test_a_stopped_train_keeps_its_steps_and_resumes(tmp_path):
    # SIGTERM (a scheduler's time limit) used to lose every step of a teacher's training; now the step under way
    # finishes, OUTPUT.ckpt is written, and --resume continues from it (equal to the uninterrupted run: the library
    # test in test_diffusion_core checks that weight for weight)
    import signal
    import time

    from conftest import kd_cmd

    out, err = tmp_path / "t", tmp_path / "err.txt"
    args = ["train", "--data", "swissroll", "-n", 500, "--steps", 10, "--hidden-dim", 16, "--num-blocks", 1,
            "--iters", 3000, "--batch-size", 16, "-o", out]
    with open(err, "wb") as f:
        p = subprocess.Popen(kd_cmd("kd-diffstep") + [str(a) for a in args], stderr=f, env={**os.environ, **FAST})
        deadline = time.monotonic() + 120
        while b"steps 1/3000" not in err.read_bytes() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # training has started (its first progress line)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 143
    state = torch.load(Path(str(out) + ".ckpt"), weights_only=True)
    assert 1 <= state["iter"] < 3000 and not out.exists()
    assert f"t.ckpt holds the run after step {state['iter']} of 3000".encode() in err.read_bytes()
    r = run(*args)  # without --resume: the stopped run is not started over
    assert r.returncode == 2 and b"holds a stopped run" in r.stderr
    r = run(*args, "--iters", 3001, "--resume")  # other options: named
    assert r.returncode == 2 and b"iters 3000 -> 3001" in r.stderr
    r = run(*args, "--resume")
    assert r.returncode == 0 and f"resumed at step {state['iter']}".encode() in r.stderr, r.stderr
    assert (out / "model_index.json").is_file() and not Path(str(out) + ".ckpt").exists()


def test_sigterm_stops_a_progressive_distillation_in_its_fold_and_resume_finishes_it(tabular_teacher, tmp_path):
    # progressive's folds kept no checkpoint, so a scheduler's time limit lost every fold; now the stop waits for the
    # step under way, OUTPUT.ckpt holds the fold and its step, and --resume goes on from there
    import signal
    import time

    from conftest import kd_cmd

    out, err = tmp_path / "p", tmp_path / "err.txt"
    args = ["distill", tabular_teacher, "--steps", 5, "--method", "progressive", "--iters", 2000, "-o", out]
    with open(err, "wb") as f:
        p = subprocess.Popen(kd_cmd("kd-diffstep") + [str(a) for a in args], stderr=f, env={**os.environ, **FAST})
        deadline = time.monotonic() + 120
        while b"progressive fold 1" not in err.read_bytes() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        try:
            assert p.wait(timeout=30) == 143
        finally:
            p.kill()  # a regressed run that ignores SIGTERM must not train on after the test
            p.wait()
    assert not out.exists()
    state = torch.load(Path(str(out) + ".ckpt"), weights_only=True)
    assert state["fold"] == 0 and 1 <= state["iter"] <= 2000
    assert f"p.ckpt holds the run after step {state['iter']} of 2000 of progressive fold 1/3".encode() in err.read_bytes(), err.read_bytes()
    r = run(*args, "--resume")
    assert r.returncode == 0 and f"resumed at step {state['iter']} of fold 1".encode() in r.stderr, r.stderr
    assert (out / "model_index.json").is_file() and not Path(str(out) + ".ckpt").exists()
    assert run("sample", out, "-n", 8, "-o", tmp_path / "s.h5").returncode == 0


def test_train_under_torchrun_two_processes(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    # TMPDIR: torchrun's torchelastic_* directory goes under the test's own directory, not the user's /tmp
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    out = tmp_path / "ddp"
    p = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "kdtools.cli.diffstep", "train",
                        "--data", "swissroll", "-n", "500", "--steps", "10", "--hidden-dim", "16", "--num-blocks", "1",
                        "--iters", "20", "--batch-size", "32", "--device", "cpu", "-o", str(out)],
                       capture_output=True, env=env, timeout=300)
    assert p.returncode == 0, torchrun_failure(p.stderr)
    info = json.loads((out / "kdtools.json").read_text())
    assert info["world_size"] == 2
    from kdtools.diffusion.teachers import load_diffusion

    assert load_diffusion(out).steps == 10


def test_a_nan_training_point_is_named(tmp_path):
    # it diverged the training ("lower --lr"); a NaN pixel was silently cast to 0
    from kdtools.h5store import write_samples
    from kdtools.stream import StreamHeader

    x = torch.randn(64, 2)
    x[7, 0] = float("nan")
    data = tmp_path / "pts.h5"
    write_samples(data, StreamHeader("samples", {"x": {"dtype": "float32", "shape": [2]}}), [{"x": x}])
    p = run("train", "--data", data, "--steps", 10, "--iters", 1, "--hidden-dim", 16, "--num-blocks", 1, "-o", tmp_path / "t")
    assert p.returncode == 1 and b"NaN or infinite values in 1 row (first at row 7)" in p.stderr
    _one_line(p)
    assert not (tmp_path / "t").exists()
