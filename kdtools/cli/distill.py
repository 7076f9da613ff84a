"""kd-distill: train a classifier from a labelled dataset (how victims are made) or from an oracle's
answers (a query log, a stream on stdin): the student / substitute."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import torch
import typer

from .. import __version__
from ..data import load_dataset
from ..errors import KdError, KdUsageError, counted
from ..models import ImageClassifier, count_parameters
from ..sources import collect, open_samples
from ..oracle import without_rejected
from ..train import TrainConfig, data_normalization, load_checkpoint, targets_from, train
from ..fileio import stream_descriptor
from ..weights import load_model, save_model
from ._common import (STOP_HINT, DataRootOption, DebugOption, DeviceOption, check_paths, data_root, distributed_setup, finish_distributed, info, make_app,
                      parse_arch_args, progress_bars, run_app, stdin_if, warn)

app = make_app("Train a student from a query log / stream (default: stdin) or a classifier from --data.")


def _normalization(spec: str, x: torch.Tensor, channels: int):
    if spec == "auto":
        return data_normalization(x)
    if spec == "none":
        return [0.0] * channels, [1.0] * channels
    try:
        m, s = (float(v) for v in spec.split(","))
    except ValueError:
        raise KdUsageError(f"--normalize {spec!r}: expected auto, none or MEAN,STD") from None
    if not (math.isfinite(m) and math.isfinite(s) and s > 0):
        raise KdUsageError(f"--normalize {spec!r}: MEAN must be finite and STD a positive number (inputs are divided by it)")
    return [m] * channels, [s] * channels


@app.command(help=app.info.help)  # one-command app: show the app's help
def distill(
    input: Optional[str] = typer.Argument(None, help="Query log (.h5) or stream file; '-' or nothing = stdin. Not with --data."),
    output: str = typer.Option(..., "-o", "--output", help="Weights file to write (.safetensors)."),
    data: Optional[str] = typer.Option(None, "--data", help="Train on a labelled dataset instead: digits | mnist | fashion-mnist | cifar10 | ..."),
    split: str = typer.Option("train", "--split"),
    arch: Optional[str] = typer.Option(None, "--arch", help="mlp | lenet5 | lenet5-half | alexnet | vgg11/13/16/19 | resnet18/34 | torchvision:NAME  (default lenet5; with --init/--resume, the file's architecture)"),
    arch_args: str = typer.Option("{}", "--arch-args", help="JSON architecture arguments, e.g. '{\"hidden\": [512]}'."),
    epochs: int = typer.Option(10, "--epochs"),
    batch_size: int = typer.Option(128, "--batch-size"),
    lr: float = typer.Option(0.01, "--lr"),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd | adam | adamw | rmsprop"),
    momentum: float = typer.Option(0.9, "--momentum"),
    weight_decay: float = typer.Option(5e-4, "--weight-decay"),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine | step | constant"),
    loss: str = typer.Option("auto", "--loss", help="auto | ce | kl | l1 (auto: ce for labels, kl for soft answers)"),
    temperature: float = typer.Option(1.0, "--temperature", "-T"),
    augment: bool = typer.Option(False, "--augment", help="Random rotation/scale/shift of training images."),
    hflip: bool = typer.Option(False, "--hflip", help="Also mirror images when augmenting."),
    class_balance: float = typer.Option(0.0, "--class-balance", help="Draw each epoch's rows with probability ~ count(class)^-P "
                                        "(with replacement): 0 = off, 1 = classes equally often, 0.5 = square root. For logs "
                                        "whose answers pile onto a few classes."),
    mixup: float = typer.Option(0.0, "--mixup", help="mixup's alpha: train on lam*x_i + (1-lam)*x_j against the same mix of "
                                "their targets, lam ~ Beta(alpha, alpha) per batch (0 = off; 0.2-1 are usual)."),
    normalize: str = typer.Option("auto", "--normalize", help="Input normalisation: auto (from the data) | none | MEAN,STD"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Labelled dataset to test on after every epoch."),
    eval_split: str = typer.Option("test", "--eval-split"),
    init: Optional[str] = typer.Option(None, "--init", help="Start from these weights (architecture taken from the file)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue from a checkpoint (FILE.ckpt, or the weights file beside one); a weights file without one "
                                          "(e.g. an attack's substitute) continues from its weights with a fresh optimiser."),
    data_root_opt: Optional[str] = DataRootOption,
    download: bool = typer.Option(False, "--download"),
    image_size: Optional[int] = typer.Option(None, "--image-size"),
    channels: Optional[int] = typer.Option(None, "--channels"),
    seed: int = typer.Option(0, "--seed"),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Online: train on batches as they arrive (one step per "
                                             "--batch-size rows) and rewrite -o every N arriving batches (AEDM's closed loop)."),
    replay_steps: int = typer.Option(0, "--replay-steps", help="Online: extra steps per arriving batch on random rows seen so far."),
    device: str = DeviceOption,
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    debug: bool = DebugOption,
):
    for flag, value in (("--image-size", image_size), ("--channels", channels)):
        if value is not None and value < 1:
            raise KdUsageError(f"{flag} must be at least 1, not {value}")
    if output == "-":
        raise KdUsageError("-o -: kd-distill writes a weights file (.safetensors), not a stream; give -o a file name")
    # before any epoch is trained: -o is a file in a folder, and not the data it learns from (--resume FILE -o FILE,
    # rewriting the weights it continues, is the usual way to go on and stays allowed)
    check_paths({"-o": output}, {"the training file": [input], "--eval-data": [eval_data]}, stdout_flag=None)
    rank, world, dev = distributed_setup(device)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum,
                      weight_decay=weight_decay, schedule=schedule, loss=loss, temperature=temperature,
                      augment=augment, hflip=hflip, seed=seed, class_balance=class_balance, mixup=mixup)
    cfg.validate()
    args = parse_arch_args(arch_args, "--arch-args")
    root = data_root(data_root_opt)
    if save_every is not None:
        if data is not None or world > 1 or resume:
            raise KdUsageError("--save-every (online training) reads a stream or file: not with --data, --resume or torchrun")
        if class_balance:
            raise KdUsageError("--class-balance needs every answer before an epoch starts: not with --save-every (online training)")
        if mixup:
            raise KdUsageError("--mixup is for training on a whole log or dataset: not with --save-every (online training)")
        _online(input, output, init, arch, args, normalize, cfg, save_every, replay_steps, dev, quiet)
        return
    if replay_steps:
        raise KdUsageError("--replay-steps belongs to online training (--save-every N)")

    # 1. training data
    if data is not None:
        if input is not None:
            raise KdUsageError("give either an INPUT file/stream or --data, not both")
        ds = load_dataset(data, split, root, download, image_size, channels)
        if ds.y is None:
            raise KdError(f"{data}: no labels to train on")
        x, targets, num_classes, source = ds.x, targets_from({"label": ds.y}, ds.num_classes), ds.num_classes, f"{data}:{split}"
    else:
        if world > 1 and (input is None or input == "-"):
            raise KdUsageError("under torchrun every rank reads the data: give a file, not stdin")
        src = open_samples(input, stdin_if(input))
        header, batch = collect(src)
        if src.end and src.end.get("status", "complete") != "complete":
            warn(f"{src.where}: the input stopped early ({src.end.get('status')}): {src.end.get('message', '')}; "
                 "training on the rows it holds")
        if header.num_classes is None:
            raise KdError(f"{input or 'stdin'}: the samples carry no answers to learn from (pipe queries through kd-query first)")
        batch, rejected = without_rejected(batch)
        if rejected:
            warn(f"{input or 'stdin'}: skipped {counted(rejected, 'row')} whose query the oracle refused (a query defence); "
                 f"training on the {batch['x'].shape[0]} answered ones")
        x, num_classes, source = batch["x"], header.num_classes, input or "stdin"
        targets = targets_from(batch, num_classes, source)
        if image_size or channels:
            from ..data import ImageSet, adapt_images
            x = adapt_images(ImageSet("input", "", x, None, num_classes), image_size, channels).x
    if x.shape[0] == 0:
        raise KdError(f"{source}: no training samples")
    input_shape = tuple(x.shape[1:])

    # 2. model: fresh, from --init weights, or from a checkpoint. Seed first: --seed must fix the
    #    initial weights too, or two runs of the same command train different students.
    torch.manual_seed(seed)
    # the training state goes beside the weights; an output that is no regular file (-o /dev/null) gets none
    # (/dev/stdout or /dev/fd/N redirected to a file included: no checkpoint beside a descriptor's name)
    ckpt_path = (None if stream_descriptor(output) is not None or (Path(output).exists() and not Path(output).is_file())
                 else Path(output + ".ckpt"))
    resume_state = None
    resumed_ckpt = None
    if resume:
        rp = Path(resume)
        cp = rp if rp.suffix == ".ckpt" else Path(resume + ".ckpt")
        if cp.is_file():
            resume_state = load_checkpoint(cp)
            resumed_ckpt = cp
            weights_src = Path(str(cp)[:-5])
            if not weights_src.is_file():
                raise KdError(f"{cp}: checkpoint without its weights file {weights_src}")
            init = str(weights_src)
        elif rp.is_file():
            init = resume  # weights without training state: continue from them with a fresh optimiser
            if rank == 0 and not quiet:
                info(f"kd-distill: {resume} has no training checkpoint ({cp.name}) beside it: training continues from "
                     "its weights with a fresh optimiser and schedule (as --init)")
        else:
            raise KdError(f"{resume}: no such checkpoint or weights file")
    if init:
        loaded = load_model(init)
        model = loaded.module
        if not isinstance(model, ImageClassifier):
            raise KdError(f"{init}: only kdtools weights files can be trained further")
        if tuple(model.input_shape) != input_shape or model.num_classes != num_classes:
            raise KdError(f"{init}: model takes {model.input_shape} with {model.num_classes} classes; data are {input_shape} with {num_classes}")
        _warn_ignored_arch(arch, args, model, init)
    else:
        mean, std = _normalization(normalize, x, input_shape[0])
        model = ImageClassifier(arch or "lenet5", input_shape, num_classes, args, mean, std)

    eval_set = None
    if eval_data and rank == 0:
        eds = load_dataset(eval_data, eval_split, root, download, image_size or input_shape[1], channels or input_shape[0])
        eval_set = (eds.x, eds.y)
    if rank == 0 and not quiet:
        info(f"kd-distill: {model.arch} ({count_parameters(model):,} parameters) on {x.shape[0]} samples from {source}, "
             f"{num_classes} classes, device {dev}" + (f", {world} processes" if world > 1 else ""))

    options = {"source": source, "arch": model.arch, "arch_args": model.arch_args, **cfg.__dict__,
               # what "auto" became, so the file says how it was made
               "loss_used": cfg.loss_for(targets.soft), "device": str(dev),
               "eval_data": eval_data, "init": init, "resume": resume, "world_size": world, "kdtools": __version__}

    resume_hint = (f"every finished epoch is saved in {ckpt_path}; the same command with --resume {output} "
                   "continues from the last one") if ckpt_path is not None else f"{output} keeps no training checkpoint"

    def record_extra(record):
        extra = {"epochs_done": record.epoch, "train_loss": record.loss}
        if record.eval_accuracy is not None:
            extra["eval_accuracy"] = record.eval_accuracy
        return extra

    saved_epochs = []

    def save(m, record):
        save_model(m, output, options, record_extra(record))
        saved_epochs.append(record.epoch)
        STOP_HINT["text"] = resume_hint  # from now on there is something to resume from

    if rank == 0:
        STOP_HINT["text"] = resume_hint if resume_state is not None else "no epoch had finished, so nothing was saved"
    with progress_bars(rank == 0 and not quiet) as progress:
        result = train(model, x, targets, cfg, dev, eval_set, progress, ckpt_path if rank == 0 else None,
                       resume_state, rank, world, on_epoch_end=save)
    if rank == 0:
        last = result.last
        if not saved_epochs:
            # no epoch trained in this run (--epochs 0, or a checkpoint already at --epochs): the weights as they are
            if resume_state is not None and last is not None:
                warn(f"--epochs {epochs}: {resume} has already done {last.epoch} epochs, so none was trained; "
                     f"{output} holds its weights (give a larger --epochs to train on)")
            save_model(model, output, options, record_extra(last) if last is not None else None)
            if ckpt_path is not None and ckpt_path.exists() and (resume_state is None or not _same_file(ckpt_path, resumed_ckpt)):
                ckpt_path.unlink()  # it belonged to the weights just replaced: a later --resume must not load it
        line = f"kd-distill: wrote {output} in {result.seconds:.1f} s"
        if last is not None:
            line += f"; epoch {last.epoch} loss {last.loss:.4f} train acc {100 * last.train_accuracy:.2f} %"
            if last.eval_accuracy is not None:
                line += f", test acc {100 * last.eval_accuracy:.2f} %"
        info(line)
    finish_distributed(world)


def _same_file(a: Path, b: Optional[Path]) -> bool:
    try:
        return b is not None and os.path.samefile(a, b)
    except OSError:
        return False


def _warn_ignored_arch(arch, args, model, source) -> None:
    # --init/--resume rebuild the model the file describes; an --arch (or --arch-args) that disagrees would be
    # silently dropped, and the user would believe they trained the other architecture
    if arch is not None and arch != model.arch:
        warn(f"--arch {arch} ignored: {source} holds {model.arch!r}, and training continues from it")
    elif args and args != model.arch_args:
        warn(f"--arch-args ignored: {source} holds {model.arch!r} with {json.dumps(model.arch_args)}, and training continues from it")


def _online(input, output, init, arch, args, normalize, cfg, save_every, replay_steps, dev, quiet) -> None:
    """kd-distill --save-every N: online training on a stream, the weights file rewritten as it learns."""
    import itertools

    from ..train import train_online

    src = open_samples(input, stdin_if(input))
    header = src.header
    if header.num_classes is None:
        raise KdError(f"{src.where}: the samples carry no answers to learn from (pipe queries through kd-query first)")
    batches = iter(src)
    first = next(batches, None)
    if first is None:
        raise KdError(f"{src.where}: no training samples")
    input_shape = tuple(first["x"].shape[1:])
    if init:
        model = load_model(init).module
        if not isinstance(model, ImageClassifier):
            raise KdError(f"{init}: only kdtools weights files can be trained further")
        if tuple(model.input_shape) != input_shape or model.num_classes != header.num_classes:
            raise KdError(f"{init}: model takes {model.input_shape} with {model.num_classes} classes; "
                          f"the stream has {input_shape} with {header.num_classes}")
        _warn_ignored_arch(arch, args, model, init)
    else:
        from ..data import to_float

        answered, _ = without_rejected(first)  # refused rows (often noise) must not set the normalisation
        mean, std = _normalization(normalize, to_float(answered["x"] if answered["x"].shape[0] else first["x"]), input_shape[0])
        model = ImageClassifier(arch or "lenet5", input_shape, header.num_classes, args, mean, std)
    options = {"source": src.where, "arch": model.arch, "arch_args": model.arch_args, **cfg.__dict__, "init": init,
               "online": True, "save_every": save_every, "replay_steps": replay_steps, "kdtools": __version__}

    def save(m, extra):
        save_model(m, output, options, extra)
        STOP_HINT["text"] = (f"{output} holds the substitute as of its last save (every {save_every} batches); "
                             "pass it to --init to go on")

    STOP_HINT["text"] = f"no batch had been saved to {output} yet"
    with progress_bars(not quiet) as progress:
        result = train_online(model, itertools.chain([first], batches), header.num_classes, cfg, dev, save, save_every,
                              replay_steps, progress)
    if src.end and src.end.get("status", "complete") != "complete":
        warn(f"{src.where}: the input stopped early ({src.end.get('status')}): {src.end.get('message', '')}; "
             f"trained on the {counted(result.samples, 'row')} it held")
    if not quiet:
        info(f"kd-distill: online on {counted(result.samples, 'sample')} in {counted(result.batches, 'batch', 'batches')}, "
             f"{counted(result.saves, 'save')} of {output} "
             f"in {result.seconds:.1f} s; last loss {result.loss:.4f}"
             + (f"; skipped {counted(result.rejected, 'row')} the oracle refused" if result.rejected else ""))


def main() -> None:
    run_app(app, "kd-distill")


if __name__ == "__main__":
    main()
