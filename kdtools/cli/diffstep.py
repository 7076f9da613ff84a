"""kd-diffstep: train a diffusion teacher, shorten it to any number of steps (SFDDM, chapter 6, or a
baseline), sample from it, and compare a student with its teacher.

  kd-diffstep train --data mnist --image-size 32 --steps 1000 -o teacher/
  kd-diffstep distill teacher/ --steps 16 -o student16/                    # SFDDM, one fold
  kd-diffstep distill teacher/ --steps 16 --method progressive -o prog16/  # or ddim | scratch
  kd-diffstep sample student16/ -n 10000 -o samples.h5 --grid grid.png
  kd-diffstep compare student16/ --teacher teacher/ --pairs pairs.png --interp interp.png
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from .. import __version__
from ..device import resolve_device
from ..errors import KdUsageError, counted
from ._common import (STOP_HINT, DataRootOption, DebugOption, DeviceOption, StopsAtBoundaries, check_paths, data_root,
                      distributed_setup, finish_distributed, info, make_app,
                      open_sink, png_path, progress_reporter, run_app, warn)

app = make_app("Diffusion step distillation: train a teacher, distill it to any number of steps (SFDDM) or "
               "with a baseline, sample, compare.")

TABULAR = ("swissroll",)


def _output_dir(output: str, force: bool, inputs=()):
    """The checked output directory; a stop from here on says that nothing was written."""
    from ..diffusion.teachers import check_output_dir

    out = check_output_dir(output, force, inputs)
    STOP_HINT["text"] = f"nothing was written to {output} (an output directory appears only complete); run the command again"
    return out


def _resume_record(options: dict) -> dict:
    """The options a resumed run must share with the stopped one (not where it runs or whether it may replace)."""
    return {k: v for k, v in options.items() if k not in ("device", "force", "download", "data_root_opt")}


def _checkpoint_hint(output: str, ckpt: Path, stopped=None) -> str:
    """What a stop keeps (STOP_HINT): the step the checkpoint holds when the stop came at a step boundary
    (``stopped``: TrainingStopped), else its last periodic save, if there was one."""
    held = (f"holds the run after step {stopped.done} of {stopped.total}"
            + (f" of {stopped.task.split(':')[0]}" if stopped.task.startswith("progressive fold") else "") if stopped is not None
            else "holds the run as of its last save (every minute), if it got that far")
    return f"nothing was written to {output} yet; {ckpt} {held}: rerun with the same options and --resume to continue it"


def _training_checkpoint(out: Path, resume: bool, cfg, record: dict, prog: str = "kd-diffstep train"):
    """(OUTPUT.ckpt, its loaded state or None). A checkpoint left by a stopped run is never started over silently:
    without --resume it is a usage error, as is --resume without one, or with other options."""
    from ..diffusion.training import load_fit_checkpoint

    ckpt = Path(str(out) + ".ckpt")
    if not resume:
        if ckpt.exists():
            raise KdUsageError(f"{ckpt} holds a stopped run of this output: add --resume to continue it, "
                               "or remove it to start over")
        return ckpt, None
    if not ckpt.is_file():
        raise KdUsageError(f"--resume: there is no {ckpt} to continue (it is written every minute while training runs)")
    state = load_fit_checkpoint(ckpt, cfg)
    theirs = json.loads(state.get("record") or "{}")
    ours = json.loads(json.dumps(record, sort_keys=True, default=str))
    if theirs != ours:
        differ = ", ".join(f"{k} {theirs.get(k)!r} -> {ours.get(k)!r}" for k in sorted(set(theirs) | set(ours))
                           if theirs.get(k) != ours.get(k))
        raise KdUsageError(f"{ckpt} was made with other options ({differ}): resume with the options it was made with")
    fold = f" of fold {state['fold'] + 1}" if isinstance(state.get("fold"), int) else ""  # progressive distillation
    info(f"{prog}: resuming {ckpt} at step {state['iter']} of {cfg.iters}{fold}")
    return ckpt, state


def _load_training_data(data: str, split: str, n: Optional[int], image_size: Optional[int], channels: Optional[int],
                        data_root_opt: Optional[str], download: bool) -> tuple[torch.Tensor, dict]:
    """(x_0 tensor, data description): uint8 images (N, C, H, W) or float points (N, D)."""
    from ..data import check_finite_rows, load_dataset
    from ..diffusion.swissroll import swiss_roll

    if n is not None and n < 1:
        raise KdUsageError(f"-n must be at least 1, not {n} (leave it out to use every point/image)")
    if data.lower() in TABULAR:
        x = swiss_roll(n or 20000, split)
        return x, {"name": "swissroll", "kind": "tabular", "dim": int(x.shape[1]), "split": split}
    if Path(data).is_file():  # a sample file may hold tabular points (float (N, D)) or images
        from ..sources import read_all

        header, batch = read_all(data)
        x = batch["x"]
        check_finite_rows(x, data)  # a NaN point diverges the training; a NaN pixel would silently become 0
        if x.dim() == 2:
            x = x.float()[:n] if n else x.float()
            return x, {"name": data, "kind": "tabular", "dim": int(x.shape[1]), "split": split}
    ds = load_dataset(data, split, data_root(data_root_opt), download, image_size=image_size, channels=channels,
                      also_accepted=tuple(f"{t} (2-D points)" for t in TABULAR))
    check_finite_rows(ds.x, data)
    x = ds.x if ds.x.dtype == torch.uint8 else (ds.x.clamp(0, 1) * 255).round().to(torch.uint8)
    if n:
        x = x[:n]
    return x, {"name": data, "kind": "image", "image_size": int(x.shape[-1]), "channels": int(x.shape[1]), "split": split}


def _fit_config(iters, batch_size, lr, ema, seed, hidden_weight=0.1, data_weight=0.0):
    from ..diffusion.training import FitConfig

    cfg = FitConfig(iters=iters, batch_size=batch_size, lr=lr, ema=ema, seed=seed, hidden_weight=hidden_weight,
                    data_weight=data_weight)
    cfg.validate()
    return cfg


def _check_unet_size(size: int, widths: tuple[int, ...]) -> None:
    """The UNet halves the image at every level but the last: the size must divide by 2**(levels-1)."""
    step = 2 ** (len(widths) - 1)
    if size % step:
        ok = ", ".join(str(v) for v in sorted({max(step, size // step * step), size // step * step + step}))
        raise KdUsageError(f"--image-size {size}: a UNet with {len(widths)} levels (--unet-channels "
                           f"{','.join(map(str, widths))}) needs a size divisible by 2**{len(widths) - 1} = {step} "
                           f"(e.g. {ok}), or fewer levels")


def _channels(text: str) -> tuple[int, ...]:
    try:
        ch = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise KdUsageError(f"--unet-channels {text!r}: expected e.g. 32,64") from None
    if not ch or min(ch) <= 0:
        raise KdUsageError(f"--unet-channels {text!r}: expected positive widths, e.g. 32,64")
    return ch


@app.command()
def train(
    data: str = typer.Option(..., "--data", help="swissroll (2-D points) | digits | mnist | fashion-mnist | cifar10 | FILE.h5"),
    output: str = typer.Option(..., "-o", "--output", help="Model directory to write (diffusers format)."),
    steps: int = typer.Option(1000, "--steps", help="Diffusion steps T."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize images to this size (square)."),
    channels: Optional[int] = typer.Option(None, "--channels", help="Convert images to 1 or 3 channels."),
    split: str = typer.Option("train", "--split"),
    n: Optional[int] = typer.Option(None, "-n", "--num", help="Training points/images (swissroll default 20000; images: all)."),
    beta_schedule: str = typer.Option("linear", "--beta-schedule", help="linear | scaled_linear | squaredcos_cap_v2"),
    beta_start: Optional[float] = typer.Option(None, "--beta-start", help="Default 1e-4 * 1000/T (DDPM's at T = 1000)."),
    beta_end: Optional[float] = typer.Option(None, "--beta-end", help="Default 0.02 * 1000/T."),
    unet_channels: str = typer.Option("32,64", "--unet-channels", help="UNet widths per resolution (images)."),
    layers_per_block: int = typer.Option(1, "--layers-per-block"),
    attention: bool = typer.Option(False, "--attention", help="Self-attention at the lowest resolution."),
    hidden_dim: int = typer.Option(256, "--hidden-dim", help="MLP width (tabular data)."),
    num_blocks: int = typer.Option(3, "--num-blocks", help="MLP residual blocks (tabular data)."),
    iters: int = typer.Option(5000, "--iters", help="Optimiser steps."),
    batch_size: int = typer.Option(128, "--batch-size", help="Per process."),
    lr: float = typer.Option(2e-4, "--lr"),
    ema: float = typer.Option(0.999, "--ema"),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue a stopped run from OUTPUT.ckpt (written every "
                                "minute and when stopped), with the same options."),
    data_root_opt: Optional[str] = DataRootOption,
    download: bool = typer.Option(False, "--download"),
    device: str = DeviceOption,
    debug: bool = DebugOption,
):
    """Train a DDPM (a teacher, or a from-scratch model with few steps) on images or 2-D points.
    Runs under torchrun (DistributedDataParallel; gloo on CPU). A stopped run continues with --resume."""
    # the resolved options, taken before the imports below add their names to locals()
    options = {k: v for k, v in locals().items() if k not in ("debug", "resume") and not k.startswith("_")}
    from ..diffusion.schedules import Chain, alphas_cumprod_from_betas, make_betas
    from ..diffusion.teachers import DiffusionModel, MLPDenoiser, build_unet, save_diffusion, scheduler_config_for
    from ..diffusion.training import denoising_loss, fit

    if steps < 1:
        raise KdUsageError(f"--steps must be at least 1, not {steps}")
    if n is not None and n < 1:
        raise KdUsageError(f"-n must be at least 1, not {n} (leave it out to use every point/image)")
    if image_size is not None and image_size < 1:
        raise KdUsageError(f"--image-size must be at least 1, not {image_size}")
    if channels is not None and channels not in (1, 3):
        raise KdUsageError(f"--channels must be 1 or 3, not {channels}")
    tabular = data.lower() in TABULAR
    if tabular and (image_size is not None or channels is not None):
        flag = "--image-size" if image_size is not None else "--channels"
        raise KdUsageError(f"{flag} applies to images; --data {data} is 2-D points (drop {flag})")
    widths = _channels(unet_channels)
    if image_size is not None and not tabular:
        _check_unet_size(image_size, widths)
    out = _output_dir(output, force, [data])
    cfg = _fit_config(iters, batch_size, lr, ema, seed)
    record = _resume_record(options)  # as given: the resolved defaults are added to ``options`` below
    ckpt, resume_state = _training_checkpoint(out, resume, cfg, record)
    rank, world, dev = distributed_setup(device)
    x, described = _load_training_data(data, split, n, image_size, channels, data_root_opt, download)
    if described["kind"] == "image":
        _check_unet_size(described["image_size"], widths)
    if beta_start is None:
        beta_start = 1e-4 * 1000 / steps
    if beta_end is None:
        beta_end = min(0.999, 0.02 * 1000 / steps)
    # the file records what made it: the defaults as the numbers they resolved to, the device actually used
    options.update(beta_start=beta_start, beta_end=beta_end, device=str(dev), num=int(x.shape[0]),
                   image_size=described.get("image_size"), channels=described.get("channels"))
    betas = make_betas(steps, beta_schedule, beta_start, beta_end)
    acp = alphas_cumprod_from_betas(betas)
    chain = Chain(list(range(steps)), acp)
    torch.manual_seed(seed)  # the same initial weights on every rank
    if described["kind"] == "tabular":
        net = MLPDenoiser(data_dim=described["dim"], hidden_dim=hidden_dim, num_blocks=num_blocks)
    else:
        net = build_unet(described["image_size"], described["channels"], widths, layers_per_block, attention)
    STOP_HINT["text"] = _checkpoint_hint(output, ckpt)
    from ..diffusion.training import TrainingStopped

    # Ctrl-C and SIGTERM wait for the step under way to finish: the checkpoint is then written between two steps
    with progress_reporter(rank == 0, "kd-diffstep train") as progress, StopsAtBoundaries() as stops:
        try:
            net, stats = fit(net, denoising_loss(chain), x, cfg, dev, progress, f"DDPM {steps} steps", rank, world,
                             checkpoint=ckpt, resume=resume_state, record=record, stop_requested=stops.requested)
        except TrainingStopped as stopped:
            STOP_HINT["text"] = _checkpoint_hint(output, ckpt, stopped)
            stops.stop()
    if rank == 0:
        # predicted x_0 is clipped to the data range while sampling: [-1, 1] for images, the points' range
        # (5 % margin) for tabular data, where a few off-manifold DDIM trajectories otherwise run away
        clip_range = 1.0 if described["kind"] == "image" else math.ceil(float(x.abs().max()) * 1.05 * 10) / 10
        sched = scheduler_config_for(acp, True, "DDPMScheduler", clip_range)
        model_info = {"kind": "teacher", "method": "ddpm", "teacher_steps": steps, "data": described, "clip_sample": True,
                      "clip_sample_range": clip_range,
                      "default_sampler": "ddpm", "fit": cfg.to_json(), "stats": stats, "world_size": world,
                      "options": options}
        save_diffusion(DiffusionModel(net.cpu(), chain, model_info, sched), out)
        ckpt.unlink(missing_ok=True)  # the model is complete: nothing left to resume
        info(f"kd-diffstep train: wrote {out} ({steps} steps, loss {stats['loss']:.4f}, {stats['seconds']:.0f} s)"
             + (f"; resumed at step {resume_state['iter']}" if resume_state is not None else ""))
    finish_distributed(world)


@app.command()
def distill(
    teacher: str = typer.Argument(..., help="Teacher directory (diffusers UNet2DModel + scheduler, or a kd-diffstep model)."),
    steps: int = typer.Option(..., "--steps", help="Student steps T' (any 1 <= T' <= T)."),
    output: str = typer.Option(..., "-o", "--output", help="Student directory to write."),
    method: str = typer.Option("sfddm", "--method", help="sfddm | ddim (step skipping) | progressive | scratch"),
    subsequence: str = typer.Option("uniform", "--subsequence",
                                    help="uniform | scattered | concentrated:P | an explicit list 0,...,T (sfddm, ddim, scratch)"),
    init: str = typer.Option("teacher", "--init", help="SFDDM student weights to start from: teacher | fresh"),
    student_timesteps: str = typer.Option("aligned", "--student-timesteps",
                                          help="SFDDM: the network timestep of student step t: aligned (the teacher's at "
                                               "phi_t; with --init teacher eq. 6.17 starts at its optimum) | own (t-1, a plain "
                                               "T'-step DDPM directory)"),
    hidden_weight: float = typer.Option(0.1, "--hidden-weight", help="SFDDM hidden-variable term weight."),
    data_weight: float = typer.Option(0.0, "--data-weight", help="SFDDM: weight of the plain denoising loss (eq. 6.15)."),
    data: Optional[str] = typer.Option(None, "--data", help="Training data x_0 (default: the teacher's, from its kdtools.json)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Must match the teacher's (checked)."),
    split: str = typer.Option("train", "--split"),
    n: Optional[int] = typer.Option(None, "-n", "--num", help="Training points/images."),
    iters: int = typer.Option(2000, "--iters", help="Optimiser steps (per fold for progressive)."),
    batch_size: int = typer.Option(128, "--batch-size"),
    lr: float = typer.Option(2e-4, "--lr"),
    ema: float = typer.Option(0.999, "--ema"),
    noise_bank: int = typer.Option(0, "--noise-bank", help="SFDDM: also select this many input noises (section 6.2.5)."),
    noise_iters: int = typer.Option(100, "--noise-iters"),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    resume: bool = typer.Option(False, "--resume", help="sfddm, scratch, progressive: continue a stopped run from "
                                "OUTPUT.ckpt (written every minute, between progressive's folds, and when stopped), "
                                "with the same options."),
    data_root_opt: Optional[str] = DataRootOption,
    download: bool = typer.Option(False, "--download"),
    device: str = DeviceOption,
    debug: bool = DebugOption,
):
    """Shorten TEACHER to --steps sampling steps: SFDDM in one fold, or a baseline on the same teacher.
    A stopped sfddm, scratch or progressive run continues with --resume."""
    # the resolved options, taken before the imports below add their names to locals()
    options = {k: v for k, v in locals().items() if k not in ("debug", "resume") and not k.startswith("_")}
    from ..diffusion.baselines import METHODS, ddim_skipping, from_scratch, progressive_distillation
    from ..diffusion.schedules import check_student_steps, make_subsequence
    from ..diffusion.sfddm import STUDENT_TIMESTEPS, distill_sfddm, select_input_noise
    from ..diffusion.teachers import load_diffusion, save_diffusion

    if method not in METHODS:
        raise KdUsageError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if student_timesteps not in STUDENT_TIMESTEPS:
        raise KdUsageError(f"--student-timesteps {student_timesteps!r}: expected one of {', '.join(STUDENT_TIMESTEPS)}")
    out = _output_dir(output, force, [teacher, data])
    t = load_diffusion(teacher)
    check_student_steps(t.steps, steps)
    phi = make_subsequence(t.steps, steps, subsequence, seed) if method != "progressive" else None
    if method == "progressive" and subsequence != "uniform":
        # halving folds fix the steps (every other one of a uniform chain); a chosen sub-sequence cannot apply
        warn(f"--subsequence {subsequence} ignored: progressive distillation halves a uniform chain fold by fold")
    d = t.data
    # an option that contradicts the teacher is a usage error (exit 2), like AEDM's prior mismatch
    if image_size is not None and d.get("kind") != "image":
        raise KdUsageError(f"--image-size {image_size}: the teacher {teacher} models {d.get('dim', '?')}-D points, not images "
                           "(drop --image-size)")
    if image_size is not None and int(d["image_size"]) != image_size:
        raise KdUsageError(f"--image-size {image_size}: the teacher {teacher} makes {d['image_size']}x{d['image_size']} "
                           "images (the student keeps the teacher's size; drop --image-size or give the same)")
    if n is not None and n < 1:
        raise KdUsageError(f"-n must be at least 1, not {n} (leave it out to use every point/image)")
    # DDIM step skipping trains nothing: the training flags neither apply nor are checked
    cfg = _fit_config(iters, batch_size, lr, ema, seed, hidden_weight, data_weight) if method != "ddim" else None
    record, ckpt, resume_state = _resume_record(options), None, None
    if method != "ddim":  # a checkpoint continues the fit (progressive: the fold it was in)
        ckpt, resume_state = _training_checkpoint(out, resume, cfg, record, "kd-diffstep distill")
    elif resume:
        raise KdUsageError(f"--resume: --method {method} trains nothing, so it keeps no checkpoint")
    rank, world, dev = distributed_setup(device)
    options["device"] = str(dev)
    x = None
    if method != "ddim":
        name = data or d.get("name")
        if not name:
            raise KdUsageError(f"{teacher}: the teacher does not say what data it was trained on; pass --data")
        tab = d.get("kind") == "tabular"
        x, described = _load_training_data(name, split, n, None if tab else int(d["image_size"]),
                                           None if tab else int(d["channels"]), data_root_opt, download)
        if described["kind"] != d.get("kind", described["kind"]) or tuple(x.shape[1:]) != tuple(t.sample_shape if tab else
                                                                                               (d["channels"], d["image_size"], d["image_size"])):
            raise KdUsageError(f"--data {name}: rows of shape {tuple(x.shape[1:])} do not fit the teacher's {tuple(t.sample_shape)}")
    from ..diffusion.training import TrainingStopped

    if ckpt is not None:
        STOP_HINT["text"] = _checkpoint_hint(output, ckpt)
    # Ctrl-C and SIGTERM wait for the step under way to finish: the checkpoint is then written between two steps
    # (only where a checkpoint is kept: DDIM skipping trains nothing, and a deferred stop would never come)
    with progress_reporter(rank == 0, "kd-diffstep distill") as progress, \
            (StopsAtBoundaries() if ckpt is not None else contextlib.nullcontext()) as stops:
        fit_options = ({"checkpoint": ckpt, "resume": resume_state, "record": record, "stop_requested": stops.requested}
                       if ckpt is not None else None)
        try:
            if method == "sfddm":
                student = distill_sfddm(t, x, phi, cfg, dev, init, progress, rank, world, student_timesteps, fit_options)
            elif method == "ddim":
                student = ddim_skipping(t, phi)
            elif method == "progressive":
                student = progressive_distillation(t, x, steps, cfg, dev, progress, rank, world, fit_options)
            else:
                student = from_scratch(t, x, phi, cfg, dev, progress, rank, world, fit_options)
        except TrainingStopped as stopped:
            STOP_HINT["text"] = _checkpoint_hint(output, ckpt, stopped)
            stops.stop()
    if method == "sfddm" and noise_bank and rank == 0:
        with progress_reporter(True, "kd-diffstep distill") as progress:
            student.noise_bank = select_input_noise(student, x, noise_bank, noise_iters, seed=seed, device=dev, progress=progress)
    if rank == 0:
        student.info["options"] = options
        student.info["teacher"] = str(teacher)
        # what the student was trained on, not the teacher's data (its sample space is the teacher's)
        student.info["teacher_data"] = dict(d)
        if x is not None:
            student.info["data"] = {**d, "name": described["name"], "split": described["split"], "num": int(x.shape[0])}
            options["data"], options["num"] = described["name"], int(x.shape[0])
        else:  # DDIM step skipping trains on nothing
            student.info["data"] = {**d, "name": None, "note": "no training data (ddim step skipping)"}
        save_diffusion(student, out)
        if ckpt is not None:
            ckpt.unlink(missing_ok=True)  # the student is complete: nothing left to resume
        secs = student.info.get("stats", {}).get("seconds", 0.0)
        resumed_fold = (f" of fold {resume_state['fold'] + 1}" if resume_state is not None and isinstance(resume_state.get("fold"), int)
                        else "")
        info(f"kd-diffstep distill: wrote {out}: {method}, {t.steps} -> {student.steps} steps ({secs:.0f} s of training)"
             + (f"; resumed at step {resume_state['iter']}{resumed_fold}" if resume_state is not None else ""))
    finish_distributed(world)


@app.command()
def sample(
    model: str = typer.Argument(..., help="Model directory (teacher or student)."),
    n: int = typer.Option(64, "-n", "--num", help="Samples to draw."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Sample file (.h5, or a stream file); '-' = stdout."),
    grid: Optional[str] = typer.Option(None, "--grid", help="Also write a PNG grid (or scatter plot for 2-D points)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="ddpm | ddim (default: the model's own)."),
    eta: float = typer.Option(0.0, "--eta", help="DDIM noise (0 = deterministic)."),
    input_noise: str = typer.Option("gaussian", "--input-noise", help="gaussian | bank (SFDDM's selected noises)."),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(256, "--batch-size"),
    device: str = DeviceOption,
    debug: bool = DebugOption,
):
    """Draw samples: images as uint8 (N, C, H, W), 2-D points as float32 (N, D)."""
    from ..diffusion.plots import save_grid
    from ..diffusion.sampling import sample as draw, to_uint8_images
    from ..diffusion.teachers import load_diffusion
    from ..stream import StreamHeader

    if n < 1:
        raise KdUsageError(f"-n must be at least 1, not {n}")
    if batch_size < 1:
        raise KdUsageError(f"--batch-size must be at least 1, not {batch_size}")
    if eta < 0:
        raise KdUsageError(f"--eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), not {eta}")
    if output is None and grid is None:
        raise KdUsageError("nothing to write: give -o FILE (or -o - for stdout) and/or --grid PNG")
    from ..diffusion.sampling import SAMPLERS

    if sampler is not None and sampler not in SAMPLERS:  # now, not after minutes of sampling
        raise KdUsageError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    png_path(grid, "--grid")
    # before minutes of sampling: the outputs are files in folders, not each other, and not inside the model
    check_paths({"-o": output, "--grid": grid}, {})
    for flag, path in (("-o", output), ("--grid", grid)):
        if path and path != "-" and Path(os.path.realpath(model)) in Path(os.path.realpath(path)).parents:
            raise KdUsageError(f"{flag} {path} is inside the model directory {model}: writing it would damage the model; "
                               f"give {flag} a path outside it")
    if output == "-":
        from ._common import binary_stdout

        binary_stdout()  # a terminal is refused now, not after minutes of sampling
    m = load_diffusion(model)
    dev = resolve_device(device)
    if eta > 0 and (sampler or m.info.get("default_sampler", "ddpm")) == "ddpm":
        warn(f"--eta {eta} ignored: it sets DDIM's noise, and {model} samples with DDPM (give --sampler ddim to use it)")
    STOP_HINT["text"] = ("nothing was written" + (f" to {output}" if output not in (None, "-") else "")
                         + (f" nor {grid}" if grid else "") + " (samples are written once they are all drawn); run the command again")
    with progress_reporter(True, "kd-diffstep sample") as progress:
        x = draw(m, n, seed, sampler, eta, batch_size, dev, input_noise, progress=progress)
    if grid:
        save_grid(x, grid)
        STOP_HINT["text"] = f"the grid {grid} is written; the samples are not"
    if output is None:
        info(f"kd-diffstep sample: wrote a {'scatter plot' if x.dim() == 2 else 'grid'} of {min(n, 64) if x.dim() > 2 else n} "
             f"of {n} samples to {grid}")
        return
    options = {"model": model, "n": n, "sampler": sampler or m.info.get("default_sampler", "ddpm"), "eta": eta, "seed": seed,
               "input_noise": input_noise, "device": str(dev), "kdtools_version": __version__}
    if x.dim() == 2:
        rows = x.float()
        header = StreamHeader(kind="samples", fields={"x": {"dtype": "float32", "shape": [int(x.shape[1])]}},
                              value_range=(float(x.min()), float(x.max())), extra={"generator": options, "space": "tabular"})
    else:
        rows = to_uint8_images(x)
        header = StreamHeader(kind="samples", fields={"x": {"dtype": "uint8", "shape": list(rows.shape[1:])}},
                              value_range=(0.0, 1.0), extra={"generator": options})
    sink = open_sink(header, output)
    try:
        for i in range(0, rows.shape[0], 1024):
            sink.write({"x": rows[i:i + 1024]})
    except BaseException:
        sink.abort()
        raise
    sink.close()
    if output != "-":
        info(f"kd-diffstep sample: wrote {counted(n, 'sample')} to {output}" + (f" and a grid to {grid}" if grid else ""))


@app.command()
def compare(
    student: str = typer.Argument(..., help="Student directory."),
    teacher: str = typer.Option(..., "--teacher", help="Teacher directory."),
    n: int = typer.Option(256, "-n", "--num", help="Noises for the consistency measure."),
    pairs: Optional[str] = typer.Option(None, "--pairs", help="PNG: teacher (top) and student (bottom) from the same noises."),
    interp: Optional[str] = typer.Option(None, "--interp", help="PNG: interpolation between two noises, teacher and student rows."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout instead of a table."),
    device: str = DeviceOption,
    debug: bool = DebugOption,
):
    """Teacher/student consistency: DDIM samples from the same noises and their mean distance."""
    from ..diffusion.plots import save_pairs, save_scatter, save_image_rows
    from ..diffusion.sampling import consistency, interpolations
    from ..diffusion.teachers import load_diffusion

    if n < 1:
        raise KdUsageError(f"-n must be at least 1, not {n}")
    png_path(pairs, "--pairs")
    png_path(interp, "--interp")
    t = load_diffusion(teacher)
    s = load_diffusion(student)
    dev = resolve_device(device)
    result = consistency(t, s, n, seed, device=dev)
    if pairs:
        k = n if result["teacher"].dim() == 2 else min(n, 16)
        save_pairs(result["teacher"][:k], result["student"][:k], pairs, (f"teacher ({t.steps} steps)", f"student ({s.steps} steps)"))
    if interp:
        rows = interpolations([t, s], 8 if result["teacher"].dim() > 2 else 64, seed, dev)
        if rows[0].dim() == 2:
            save_scatter(rows, [f"teacher ({t.steps})", f"student ({s.steps})"], interp)
        else:
            save_image_rows(rows, interp)
    facts = {k: v for k, v in result.items() if k not in ("teacher", "student")}
    facts.update({"teacher": teacher, "student": student, "method": s.info.get("method")})
    if as_json:
        sys.stdout.write(json.dumps(facts) + "\n")
        return
    table = Table(title="kd-diffstep compare", show_header=False)
    for k, v in facts.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)


def main() -> None:
    run_app(app, "kd-diffstep")


if __name__ == "__main__":
    main()
