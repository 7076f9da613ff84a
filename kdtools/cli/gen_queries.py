"""kd-gen-queries: synthesise queries for a black-box model and write them as a stream or file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import typer

from .. import __version__
from ..data import load_dataset
from ..errors import KdError, KdUsageError, counted
from ..queries import dataset_batches, noise_batches
from ..stream import StreamHeader, fields_of
from ..weights import load_model, parse_shape
from .query import ApiKeyEnvOption, MaxBatchOption, RateLimitOption, RetriesOption, TimeoutOption, WireOption, remote_options, warn_http_only
from ._common import (STOP_HINT, DataRootOption, DebugOption, DeviceOption, StopsAtBoundaries, check_paths, data_root,
                      finish_distributed, info, make_app, open_sink, oracle_files, parse_arch_args, run_app, stderr, warn)

app = make_app("Synthesise queries: noise, public data, the data-free attacks TandemGAN, DFME and IDEAL, AEDM (a steered diffusion "
               "prior), or CAKE (white-box: samples diffused towards a teacher's decision boundaries).\n\n"
               "noise/dataset and generator mode (--generator G -n N) write a kdtools stream on stdout (pipe it into kd-query) "
               "or a file with -o (.h5 for HDF5), as cake does. Attack mode (--oracle SPEC --budget N -o DIR) steals the oracle within the "
               "budget and writes DIR/substitute.safetensors, DIR/generator.safetensors, checkpoints and the query log.")

Output = typer.Option("-", "-o", "--output", help="Output file (.h5 -> HDF5, else stream file); '-' = stdout.")


def _check_output(output: str, inputs) -> None:
    """-o is a file in a folder and none of the files the command reads (--like, a dataset FILE, --teacher, the
    --generator): checked before the first query is made."""
    check_paths({"-o": output}, {"the input file": [str(p) for p in inputs if isinstance(p, (str, Path)) and p]})


def _write(batches, n: int, source: dict, output: str, inputs=()) -> None:
    _check_output(output, inputs)
    first = next(batches, None)
    if first is None:
        raise KdUsageError("-n must be positive")
    header = StreamHeader("queries", fields_of(first), extra={"generator": source, "kdtools": __version__})
    sink = open_sink(header, output)
    try:
        sink.write(first)
        for b in batches:
            sink.write(b)
    except BaseException:
        sink.abort()
        raise
    sink.close()
    info(f"kd-gen-queries: wrote {counted(sink.rows, 'query', 'queries')} {'x'.join(map(str, header.x_shape))}" + ("" if output == "-" else f" to {output}"))


def _like_shape(like: Optional[str], shape: Optional[str]) -> Optional[tuple]:
    if shape:
        return parse_shape(shape)
    if like:
        loaded = load_model(like)
        return loaded.input_shape
    return None


@app.command()
def noise(
    n: int = typer.Option(..., "-n", help="Number of queries."),
    shape: Optional[str] = typer.Option(None, "--shape", help="Image shape CxHxW, e.g. 1x28x28."),
    like: Optional[str] = typer.Option(None, "--like", help="Take the shape from a weights file."),
    dist: str = typer.Option("uniform", "--dist", help="uniform | gaussian"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    output: str = Output,
    debug: bool = DebugOption,
):
    """Random images, uniform on [0,1] or gaussian (mean 0.5, sd 0.25) clipped to [0,1]."""
    s = _like_shape(like, shape)
    if s is None:
        raise KdUsageError("give --shape CxHxW or --like WEIGHTS")
    if n <= 0:
        raise KdUsageError("-n must be positive")
    options = {"method": "noise", "n": n, "shape": list(s), "dist": dist, "seed": seed}
    _write(noise_batches(s, n, batch_size, dist, seed), n, options, output, [like])


@app.command()
def dataset(
    n: int = typer.Option(..., "-n", help="Number of queries (cycles through the data when larger than it)."),
    data: str = typer.Option(..., "--data", help="digits | mnist | fashion-mnist | cifar10 | cifar100 | svhn | folder:DIR | FILE | "
                             "swissroll (2-D points; splits train, test)"),
    split: str = typer.Option("train", "--split"),
    data_root_opt: Optional[str] = DataRootOption,
    download: bool = typer.Option(False, "--download", help="Download the dataset if missing (needs internet)."),
    like: Optional[str] = typer.Option(None, "--like", help="Resize / convert channels to fit this weights file's input."),
    image_size: Optional[int] = typer.Option(None, "--image-size"),
    channels: Optional[int] = typer.Option(None, "--channels"),
    augment: bool = typer.Option(False, "--augment", help="Random rotation/scale/shift of every image."),
    hflip: bool = typer.Option(False, "--hflip", help="Also mirror images when augmenting."),
    no_shuffle: bool = typer.Option(False, "--no-shuffle"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    output: str = Output,
    debug: bool = DebugOption,
):
    """Images of a public dataset as queries (their labels are never used); swissroll: kd-diffstep's 2-D points
    (e.g. a reference file for kd-eval fid)."""
    if n <= 0:
        raise KdUsageError("-n must be positive")
    if data.lower() == "swissroll":
        from ..diffusion.swissroll import swiss_roll

        if like or image_size or channels or augment or hflip:
            raise KdUsageError("--data swissroll is 2-D points: --like, --image-size, --channels, --augment and --hflip "
                               "apply to images")
        pts = swiss_roll(n, split)  # the generator and split seeds kd-diffstep trains and scores with
        if not no_shuffle:
            pts = pts[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
        options = {"method": "dataset", "data": "swissroll", "split": split, "n": n, "seed": seed, "shape": [int(pts.shape[1])]}
        _write(({"x": pts[i:i + batch_size].contiguous()} for i in range(0, n, batch_size)), n, options, output)
        return
    s = _like_shape(like, None)
    if s is not None:
        channels, image_size = channels or s[0], image_size or s[1]
    ds = load_dataset(data, split, data_root(data_root_opt), download, image_size, channels,
                      also_accepted=("swissroll (2-D points)",))
    options = {"method": "dataset", "data": data, "split": split, "n": n, "augment": augment, "hflip": hflip,
               "seed": seed, "shape": list(ds.shape)}
    _write(dataset_batches(ds, n, batch_size, not no_shuffle, augment, seed, hflip), n, options, output, [data, like])


# --- data-free attacks (issue #4): attack mode and generator mode -----------------------------------------

Oracle = typer.Option(None, "--oracle", help="Attack mode: the victim: a model file, http(s)://URL, exec:CMD or replay:LOG.h5.")
Budget = typer.Option(None, "--budget", help="Attack mode: hard cap on oracle calls, gradient probes included.")
Substitute = typer.Option(None, "--substitute", help="Substitute architecture (any kd-distill --arch); default: the paper's.")
SubstituteArgs = typer.Option("{}", "--substitute-args", help="JSON arguments of the substitute's architecture (as kd-distill "
                              "--arch-args), e.g. '{\"width\": 2}' for a LeNet-5 twice as wide.")
OutDir = typer.Option(None, "-o", "--output", help="Attack mode: output DIR. Generator mode: stream file ('-' = stdout, the default).")
Log = typer.Option(None, "--log", help="Query log (HDF5); default DIR/queries.h5.")
EvalData = typer.Option(None, "--eval-data", help="Labelled test set to report substitute accuracy on (never shown to the attack).")
EvalSplit = typer.Option("test", "--eval-split")
Resume = typer.Option(False, "--resume", help="Continue the attack in DIR from its saved state and its log (nothing is paid twice).")
GeneratorOpt = typer.Option(None, "--generator", help="Generator mode: a generator.safetensors written by an attack.")
N = typer.Option(None, "-n", help="Generator mode: number of queries to write.")
Seed = typer.Option(0, "--seed")
CheckpointEvery = typer.Option(None, "--checkpoint-every", help="Queries between checkpoints (default: a tenth of the budget).")
StateEvery = typer.Option(60.0, "--state-every", help="Seconds between resume-state saves (0: every iteration).")
FinalEpochs = typer.Option(0, "--final-epochs", help="kdtools: epochs over every paid answer once the budget is spent (no queries).")
FinalLr = typer.Option(0.01, "--final-lr")
FinalOptimizer = typer.Option("sgd", "--final-optimizer", help="sgd | adam | rmsprop, for --final-epochs.")
InputShape = typer.Option(None, "--input-shape", help="CxHxW, for model files that do not record it.")
TrustPickle = typer.Option(False, "--trust-pickle", help="Allow a pickled model file (runs code from it!).")
Quiet = typer.Option(False, "--quiet", "-q", help="No progress output.")
PixelMean = typer.Option(None, "--pixel-mean", help="Generator output = clamp(MEAN + STD x normalised activations) instead of "
                         "(tanh + 1) / 2, e.g. 0.1307 for MNIST-like victims (what reference code does implicitly).")
PixelStd = typer.Option(None, "--pixel-std", help="See --pixel-mean (e.g. 0.3081).")
Augment = typer.Option(False, "--augment", help="kdtools: random shift/rotation of replayed answers when training the substitute.")


def _generate(method: str, generator: str, n: Optional[int], output: Optional[str], seed: int, batch_size: int) -> None:
    """Generator mode: sample a trained generator into a query stream (pipe it into kd-query)."""
    import torch

    from ..extract.genweights import load_generator

    if n is None or n <= 0:
        raise KdUsageError("generator mode needs -n N (a positive number of queries)")
    gen, meta = load_generator(generator)
    z_dim = int(meta["arch_args"]["z_dim"])

    def batches():
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for i in range(0, n, batch_size):
                m = min(batch_size, n - i)
                yield {"x": gen(torch.randn(m, z_dim, generator=g)).float().clamp_(0, 1).contiguous()}

    options = {"method": method, "generator": generator, "generator_arch": meta.get("arch"), "n": n, "seed": seed,
               "trained_by": meta.get("kdtools.version")}
    _write(batches(), n, options, output or "-", [generator])


def _attack(method: str, common: dict, config, make=None, substitute=None, client=None) -> None:
    """Attack mode: run the attack against an oracle under a hard budget, writing DIR."""
    import time

    from ..device import resolve_device
    from ..extract import METHODS, AttackOptions, AttackRun
    from ..oracle import open_oracle, parse_mode
    from ._common import progress_bars

    c = common
    if not c["oracle"] or c["budget"] is None or not c["output"]:
        other = ("--substitute FILE -n N for stream mode" if method == "aedm" else "--generator G -n N for generator mode")
        missing = ", ".join(f for f, v in (("--oracle", c["oracle"]), ("--budget", c["budget"]), ("-o DIR", c["output"]))
                            if v is None or v == "")
        raise KdUsageError(f"kd-gen-queries {method}: attack mode needs --oracle, --budget and -o DIR (missing: {missing}; "
                           f"or {other})")
    kind, _ = parse_mode(c["mode"])
    if kind not in ("label", "probs"):
        raise KdUsageError(f"--mode {c['mode']}: the data-free attacks work with label or probs answers")
    if c["budget"] <= 0:
        raise KdUsageError("--budget must be a positive number of queries")
    if c["output"] == "-":
        raise KdUsageError("attack mode writes a directory: give -o DIR")
    if (c["pixel_mean"] is None) != (c["pixel_std"] is None):
        raise KdUsageError("give both --pixel-mean and --pixel-std, or neither")
    for flag, name in (("--s-optimizer", getattr(config, "s_optimizer", "sgd")), ("--final-optimizer", c["final_optimizer"])):
        if name not in ("sgd", "adam", "rmsprop"):
            raise KdUsageError(f"{flag} {name!r}: expected sgd, adam or rmsprop")
    if getattr(config, "s_loss", "l1") not in ("l1", "l1-logit", "kl"):
        raise KdUsageError(f"--s-loss {config.s_loss!r}: expected l1, l1-logit or kl")
    device = resolve_device(c["device"])
    # the same remote-oracle options as kd-query (API key from the environment, timeouts, retries, rate limit)
    remote = remote_options(c["api_key_env"], c["timeout"], c["retries"], c["rate_limit"], c["wire"], "error", c["max_batch"])
    oracle = open_oracle(c["oracle"], device, c["trust_pickle"], parse_shape(c["input_shape"]) if c["input_shape"] else None,
                         remote=remote)
    if client is None or client["rank"] == 0:  # once, not once per federated rank
        warn_http_only(oracle, remote)
    eval_set = None
    if c["eval_data"]:
        ds = load_dataset(c["eval_data"], c["eval_split"], data_root(c["data_root"]), False,
                          oracle.input_shape[1], oracle.input_shape[0])
        if ds.y is None:
            raise KdUsageError(f"--eval-data {c['eval_data']}: no labels to measure accuracy against")
        eval_set = (ds.x, ds.y)
    options = AttackOptions(method, kind, c["budget"], c["substitute"], c["batch_size"], c["seed"], c["checkpoint_every"],
                            c["state_every"], c["final_epochs"], c["final_lr"], c["final_optimizer"], c["augment"],
                            c["pixel_mean"], c["pixel_std"], c["substitute_args"])
    run = AttackRun(c["output"], c["log"])
    if client is not None:  # one torchrun rank of a federated attack: its own share, log and state
        options.budget = client["budget"]
        run = AttackRun(Path(c["output"]) / f"client-{client['rank']}", client.get("log"))
    quiet = c["quiet"] or (client is not None and client["rank"] != 0)

    with progress_bars(not quiet) as bars:
        last = {"t": 0.0, "spent": None}

        def progress(event):
            bars(event)
            # without a terminal (logs, CI) a line now and then says how it goes (once per point: the
            # checkpoint after an iteration repeats its figures)
            now = time.monotonic()
            if (not quiet and not stderr.is_terminal and (event.task == "checkpoint" or now - last["t"] > 30)
                    and not (event.task == "checkpoint" and event.info.get("spent") == last["spent"]
                             and now - last["t"] < 1.0)):
                last["t"], last["spent"] = now, event.info.get("spent")
                info(f"{method}: " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in event.info.items()))

        if make is None:
            attack = METHODS[method][0](oracle, options, config, run, device, eval_set, progress, c["resume"])
        else:
            attack = make(oracle=oracle, options=options, config=config, run=run, device=device, eval_set=eval_set,
                          progress=progress, resume=c["resume"], substitute=substitute)
        # only now is there a log to point to (an attack stopped while being set up leaves none behind)
        if client is None:
            STOP_HINT["text"] = (f"every answer paid for is in {run.log_path}; the same command with --resume continues "
                                 "without paying twice")
        else:
            STOP_HINT["text"] = (f"client {client['rank']}: its paid answers are in {run.log_path}; the last averaged "
                                 f"substitute is kept in {Path(c['output']) / 'substitute.safetensors'}")
        if c["resume"] and attack.reused_rows:
            pending = attack.pending_at_resume
            info(f"kd-gen-queries {method}: resuming {run.dir} at iteration {attack.iterations}: {counted(attack.reused_rows, 'answer')} "
                 f"in the log reused, {attack.oracle.spent} of {c['budget']} queries spent"
                 + (f"; the substitute first learns from the {counted(pending, 'answer')} paid after its last saved state"
                    if pending else ""))
        if client is None:
            # Ctrl-C and SIGTERM wait for the iteration under way: the state is then saved between two iterations,
            # and a --resume from it is query for query the uninterrupted run. A second Ctrl-C stops at once (the
            # answers paid are kept either way). Not under torchrun: the clients would stop at different rounds.
            with StopsAtBoundaries() as stops:
                result = attack.run_attack(stop_requested=stops.requested)
                unit = "round" if method == "aedm" else "iteration"
                if result.status == "stopped":
                    STOP_HINT["text"] = (f"stopped after {unit} {result.iterations} ({result.spent} of {result.budget} queries "
                                         f"spent, every answer in {run.log_path}), its state saved in {run.dir}: the same "
                                         "command with --resume continues from there without paying twice")
                    stops.stop()
                elif result.status == "stopped_in_final_epochs":
                    STOP_HINT["text"] = (f"stopped in the final epochs (all {result.spent} queries spent, every answer in "
                                         f"{run.log_path}), its state from before them saved in {run.dir}: the same command "
                                         "with --resume trains the final epochs again, without a query")
                    stops.stop()
        else:
            result = attack.run_attack()
    line = (f"kd-gen-queries {method}: {result.spent} oracle calls spent of {result.budget} ({result.paid_this_run} in this run, "
            f"{result.reused_rows} reused from the log), {counted(result.iterations, 'iteration')} in {result.seconds:.1f} s")
    if result.learned_late:
        line += f"; {counted(result.learned_late, 'answer')} learned after their round (interrupted, or cut short by the budget)"
    line += f"; wrote {run.substitute_path}"
    if attack.generator() is not None:
        line += f" and {run.generator_path}"
    if result.accuracy is not None and c["eval_data"]:  # measured in this run, never an earlier run's figure
        line += f"; substitute accuracy {100 * result.accuracy:.2f} % on {c['eval_data']} ({c['eval_split']})"
    if client is None or client["rank"] == 0:
        info(line)


def _dispatch(method: str, common: dict, config, generator: Optional[str], n: Optional[int]) -> None:
    common = {**common, "substitute_args": parse_arch_args(common["substitute_args"], "--substitute-args")}
    if generator:
        if common["oracle"] or common["budget"] is not None or common["resume"] or common["substitute_args"]:
            raise KdUsageError("--generator (generator mode) does not take --oracle, --budget, --resume or --substitute-args")
        _generate(method, generator, n, common["output"], common["seed"], common["batch_size"])
    else:
        if n is not None:
            raise KdUsageError("-n belongs to generator mode (--generator G -n N); attack mode stops at --budget")
        _attack(method, common, config)


# the options every attack command shares, by parameter name (data_root_opt is renamed data_root)
COMMON_OPTIONS = ("oracle", "mode", "budget", "substitute", "substitute_args", "output", "log", "eval_data", "eval_split", "resume", "seed",
                  "batch_size", "checkpoint_every", "state_every", "final_epochs", "final_lr", "final_optimizer",
                  "input_shape", "trust_pickle", "device", "quiet", "pixel_mean", "pixel_std", "augment",
                  "api_key_env", "timeout", "retries", "rate_limit", "wire", "max_batch")


def _common(options: dict) -> dict:
    """The shared options out of a command's locals(), so each command lists them once (in its signature)."""
    return {**{k: options[k] for k in COMMON_OPTIONS}, "data_root": options["data_root_opt"]}


@app.command()
def tandemgan(
    oracle: Optional[str] = Oracle, mode: str = typer.Option("probs", "--mode", help="label | probs"),
    budget: Optional[int] = Budget, substitute: str = typer.Option("vgg11", "--substitute", help="Substitute architecture (paper: vgg11)."),
    substitute_args: str = SubstituteArgs,
    output: Optional[str] = OutDir, log: Optional[str] = Log, eval_data: Optional[str] = EvalData, eval_split: str = EvalSplit,
    data_root_opt: Optional[str] = DataRootOption, resume: bool = Resume, generator: Optional[str] = GeneratorOpt,
    n: Optional[int] = N, seed: int = Seed, batch_size: int = typer.Option(256, "--batch-size", min=1),
    n_x: int = typer.Option(1, "--n-x", help="Exploration (Gx) steps per round."),
    n_e: int = typer.Option(1, "--n-e", help="Exploitation (Ge) steps per round."),
    n_s: int = typer.Option(5, "--n-s", help="Substitute steps per round."),
    lr_s: float = typer.Option(1e-3, "--lr-s"), lr_gx: float = typer.Option(1e-5, "--lr-gx"), lr_ge: float = typer.Option(1e-6, "--lr-ge"),
    directions: int = typer.Option(1, "--directions", help="Random directions M of the forward-difference estimate."),
    eps: float = typer.Option(1e-3, "--eps"), z_dim: int = typer.Option(128, "--z-dim"),
    s_loss: str = typer.Option("l1", "--s-loss", help="Probability mode: l1 (paper) | l1-logit | kl."),
    replay_steps: int = typer.Option(0, "--replay-steps", help="kdtools: extra substitute steps per round on every paid answer."),
    s_optimizer: str = typer.Option("rmsprop", "--s-optimizer", help="rmsprop (paper) | adam | sgd."),
    checkpoint_every: Optional[int] = CheckpointEvery, state_every: float = StateEvery, final_epochs: int = FinalEpochs,
    final_lr: float = FinalLr, final_optimizer: str = FinalOptimizer, input_shape: Optional[str] = InputShape, trust_pickle: bool = TrustPickle,
    pixel_mean: Optional[float] = PixelMean, pixel_std: Optional[float] = PixelStd, augment: bool = Augment,
    api_key_env: str = ApiKeyEnvOption, timeout: float = TimeoutOption, retries: int = RetriesOption,
    rate_limit: Optional[float] = RateLimitOption, wire: str = WireOption, max_batch: Optional[int] = MaxBatchOption,
    device: str = DeviceOption, quiet: bool = Quiet, debug: bool = DebugOption,
):
    """TandemGAN (chapter 3): explore with Gx, exploit with Ge, imitate with S; label or probs oracles."""
    from ..extract import TandemConfig

    if min(n_x, n_e, n_s) < 0 or n_s == 0 or directions <= 0 or eps <= 0:
        raise KdUsageError("--n-x/--n-e must be >= 0, --n-s and --directions >= 1, --eps > 0")
    cfg = TandemConfig(n_x, n_e, n_s, lr_s, lr_gx, lr_ge, directions, eps, z_dim, s_loss, replay_steps, s_optimizer)
    _dispatch("tandemgan", _common(locals()),
              cfg, generator, n)


@app.command()
def dfme(
    oracle: Optional[str] = Oracle, mode: str = typer.Option("probs", "--mode", help="probs (label: as IDEAL's paper ran it)"),
    budget: Optional[int] = Budget, substitute: str = typer.Option("vgg11", "--substitute"), substitute_args: str = SubstituteArgs,
    output: Optional[str] = OutDir, log: Optional[str] = Log, eval_data: Optional[str] = EvalData, eval_split: str = EvalSplit,
    data_root_opt: Optional[str] = DataRootOption, resume: bool = Resume, generator: Optional[str] = GeneratorOpt,
    n: Optional[int] = N, seed: int = Seed, batch_size: int = typer.Option(256, "--batch-size", min=1),
    g_iter: int = typer.Option(1, "--g-iter"), d_iter: int = typer.Option(5, "--d-iter"),
    lr_s: float = typer.Option(0.1, "--lr-s"), lr_g: float = typer.Option(1e-4, "--lr-g"),
    directions: int = typer.Option(1, "--directions"), eps: float = typer.Option(1e-3, "--eps"),
    z_dim: int = typer.Option(256, "--z-dim"), s_loss: str = typer.Option("l1-logit", "--s-loss", help="l1-logit (paper) | l1 | kl"),
    replay_steps: int = typer.Option(0, "--replay-steps"),
    s_optimizer: str = typer.Option("sgd", "--s-optimizer", help="sgd (paper) | adam | rmsprop."),
    checkpoint_every: Optional[int] = CheckpointEvery, state_every: float = StateEvery, final_epochs: int = FinalEpochs,
    final_lr: float = FinalLr, final_optimizer: str = FinalOptimizer, input_shape: Optional[str] = InputShape, trust_pickle: bool = TrustPickle,
    pixel_mean: Optional[float] = PixelMean, pixel_std: Optional[float] = PixelStd, augment: bool = Augment,
    api_key_env: str = ApiKeyEnvOption, timeout: float = TimeoutOption, retries: int = RetriesOption,
    rate_limit: Optional[float] = RateLimitOption, wire: str = WireOption, max_batch: Optional[int] = MaxBatchOption,
    device: str = DeviceOption, quiet: bool = Quiet, debug: bool = DebugOption,
):
    """DFME (Truong et al. 2021): the data-free baseline; generator by forward differences through the oracle."""
    from ..extract import DFMEConfig

    if g_iter < 0 or d_iter <= 0 or directions <= 0 or eps <= 0:
        raise KdUsageError("--g-iter must be >= 0, --d-iter and --directions >= 1, --eps > 0")
    cfg = DFMEConfig(g_iter, d_iter, lr_s, lr_g, directions, eps, z_dim, s_loss, replay_steps=replay_steps, s_optimizer=s_optimizer)
    _dispatch("dfme", _common(locals()),
              cfg, generator, n)


@app.command()
def ideal(
    oracle: Optional[str] = Oracle, mode: str = typer.Option("label", "--mode", help="label (the paper) | probs"),
    budget: Optional[int] = Budget, substitute: str = typer.Option("lenet5", "--substitute"), substitute_args: str = SubstituteArgs,
    output: Optional[str] = OutDir, log: Optional[str] = Log, eval_data: Optional[str] = EvalData, eval_split: str = EvalSplit,
    data_root_opt: Optional[str] = DataRootOption, resume: bool = Resume, generator: Optional[str] = GeneratorOpt,
    n: Optional[int] = N, seed: int = Seed, batch_size: int = typer.Option(250, "--batch-size", min=1, help="Samples (= queries) per epoch."),
    g_steps: int = typer.Option(5, "--g-steps", help="E_G: generator steps per epoch (paper 5; its MNIST code 30)."),
    lr_g: float = typer.Option(1e-3, "--lr-g"), lr_s: float = typer.Option(1e-2, "--lr-s"),
    lambda_info: float = typer.Option(5.0, "--lambda-info"), z_dim: int = typer.Option(100, "--z-dim"),
    pool_epochs: int = typer.Option(1, "--pool-epochs", help="Passes over every paid answer per epoch (0: one step on the new batch)."),
    pool_steps: int = typer.Option(0, "--pool-steps", help="kdtools: cap each epoch's pool training at this many random mini-batches "
                                   "(0: --pool-epochs full passes, whose cost grows with the pool)."),
    s_optimizer: str = typer.Option("sgd", "--s-optimizer", help="sgd (paper) | adam (kdtools; use --lr-s 1e-3)."),
    balance_pool: bool = typer.Option(False, "--balance-pool", help="kdtools: ask the generator for the classes the oracle answered least."),
    mix_fraction: float = typer.Option(0.0, "--mix-fraction", help="kdtools, experimental: this share of each epoch's queries are mixes "
                                       "of two answered samples in different classes (boundary queries; 0 = the paper's). Measured "
                                       "worse on Fashion-MNIST at 0.5 (docs/extraction-benchmarks.md)."),
    select_from: int = typer.Option(1, "--select-from", help="kdtools, experimental: draw this many generated candidates per query "
                                    "and ask the ones the substitute is least sure of (uncertainty sampling; 1 = the paper's)."),
    checkpoint_every: Optional[int] = CheckpointEvery, state_every: float = StateEvery, final_epochs: int = FinalEpochs,
    final_lr: float = FinalLr, final_optimizer: str = FinalOptimizer, input_shape: Optional[str] = InputShape, trust_pickle: bool = TrustPickle,
    pixel_mean: Optional[float] = PixelMean, pixel_std: Optional[float] = PixelStd, augment: bool = Augment,
    api_key_env: str = ApiKeyEnvOption, timeout: float = TimeoutOption, retries: int = RetriesOption,
    rate_limit: Optional[float] = RateLimitOption, wire: str = WireOption, max_batch: Optional[int] = MaxBatchOption,
    device: str = DeviceOption, quiet: bool = Quiet, debug: bool = DebugOption,
):
    """IDEAL (ICLR 2023): hard labels, small budget; generator trained through the student, one query per sample."""
    from ..extract import IDEALConfig

    if g_steps < 0 or pool_epochs < 0 or pool_steps < 0:
        raise KdUsageError("--g-steps, --pool-epochs and --pool-steps must be >= 0")
    if not 0.0 <= mix_fraction <= 1.0:
        raise KdUsageError(f"--mix-fraction {mix_fraction}: expected a share between 0 and 1")
    if select_from < 1:
        raise KdUsageError(f"--select-from {select_from}: expected at least 1 candidate per query")
    if generator and select_from > 1:
        # the selection ranks candidates by the substitute's uncertainty; generator mode has no substitute
        raise KdUsageError(f"--select-from {select_from} needs the attack's substitute; generator mode (--generator) has none")
    cfg = IDEALConfig(g_steps, lr_g, lr_s, lambda_info, z_dim, pool_epochs, s_optimizer=s_optimizer, balance_pool=balance_pool,
                      pool_steps=pool_steps, mix_fraction=mix_fraction, select_from=select_from)
    _dispatch("ideal", _common(locals()),
              cfg, generator, n)


REMOTE_PREFIXES = ("http://", "https://", "exec:", "replay:")


@app.command()
def cake(
    teacher: str = typer.Option(..., "--teacher", help="The model to mimic: a model file or ensemble:A,B,... (CAKE needs "
                                "its gradients, so not an HTTP, exec: or replay: oracle)."),
    n: int = typer.Option(..., "-n", help="Number of queries (the paper: 256 sets of 100 = 25 600)."),
    batch_size: int = typer.Option(100, "--batch-size", help="Samples per set, optimised together (a multiple of --groups)."),
    groups: int = typer.Option(10, "--groups", help="Samples per row of a set, each given a different target class "
                               "(at most the number of classes)."),
    steps: int = typer.Option(500, "--steps", help="Gradient steps per set."),
    lr: float = typer.Option(0.1, "--lr", help="Step size eta of the first set (the Langevin noise scale too)."),
    decay_decades: float = typer.Option(4.0, "--decay-decades", help="eta falls by this many orders of magnitude over the "
                                        "sets (0: constant)."),
    schedule: str = typer.Option("linear", "--schedule", help="linear | cosine: how log10(eta) falls over the sets."),
    w_cls: float = typer.Option(1e3, "--w-cls", help="Weight of the classification term."),
    w_contr: float = typer.Option(1e1, "--w-contr", help="Weight of the contrastive term (pulls a row's samples together)."),
    w_tv: float = typer.Option(1e5, "--w-tv", help="Weight of the total-variation term (smooth images)."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd | adam, on the samples."),
    langevin: bool = typer.Option(False, "--langevin", help="Add noise sqrt(2 eta) N(0, I) after every step (LAKE)."),
    pixel_mean: Optional[str] = typer.Option(None, "--pixel-mean", help="Samples are MEAN + STD x z, z optimised: the "
                                             "teacher's input normalisation, one value or one per channel (0.49,0.48,0.45). "
                                             "Default: what a kdtools teacher file records, else 0.5."),
    pixel_std: Optional[str] = typer.Option(None, "--pixel-std", help="See --pixel-mean (default: recorded, else 0.5)."),
    seed: int = Seed,
    input_shape: Optional[str] = InputShape,
    trust_pickle: bool = TrustPickle,
    output: str = Output,
    resume: bool = typer.Option(False, "--resume", help="With -o FILE: continue a stopped run from the sets kept in "
                                "FILE.partial.h5 (the finished file is the uninterrupted run's)."),
    device: str = DeviceOption,
    quiet: bool = Quiet,
    debug: bool = DebugOption,
):
    """CAKE (Braun et al., AISTATS 2024): white-box, data-free queries diffused contrastively towards the
    teacher's decision boundaries, written as a stream. Pipe it into kd-query (answers and a log) and
    kd-distill, e.g. `kd-gen-queries cake --teacher t.safetensors -n 25600 | kd-query t.safetensors --mode probs
    --log q.h5 | kd-distill --arch lenet5-half -o student.safetensors`."""
    from ..device import resolve_device
    from ..extract.cake import CakeConfig, options_record, recorded_normalization, synthesise
    from ..sources import partial_path, partial_rows, write_through_partial
    from ..weights import load_classifier, probe_num_classes
    from ._common import binary_stdout, progress_reporter

    if teacher.startswith(REMOTE_PREFIXES):
        raise KdUsageError(f"--teacher {teacher}: CAKE needs the teacher's gradients, so a model file (or ensemble:); "
                           "a black-box oracle cannot give them (use ideal, dfme or tandemgan against it)")
    if n <= 0:
        raise KdUsageError("-n must be positive")
    if (pixel_mean is None) != (pixel_std is None):
        raise KdUsageError("give both --pixel-mean and --pixel-std, or neither (the teacher's recorded normalisation)")
    if output == "-":
        binary_stdout()  # refuse a terminal now, not after the first set's minute of work
        if resume:
            raise KdUsageError("--resume needs -o FILE: a stream on stdout keeps nothing to resume from (kd-query's "
                               "log does: a rerun of the pipe pays the oracle only for what it lacks)")

    def floats(flag: str, text: str) -> tuple:
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            raise KdUsageError(f"{flag} {text!r}: expected a number or comma-separated numbers, one per channel") from None

    dev = resolve_device(device)
    loaded = load_classifier(teacher, trust_pickle=trust_pickle,
                             input_shape=parse_shape(input_shape) if input_shape else None)
    if loaded.input_shape is None:
        raise KdUsageError(f"--teacher {teacher}: the file does not record its input shape; pass --input-shape CxHxW")
    shape = tuple(loaded.input_shape)
    classes = loaded.num_classes or probe_num_classes(loaded.module.to(dev), shape, dev, teacher)
    if pixel_mean is not None:
        norm = (floats("--pixel-mean", pixel_mean), floats("--pixel-std", pixel_std))
    else:
        norm = recorded_normalization(loaded.module)
        if norm is None:
            norm = ((0.5,), (0.5,))
            if not quiet:
                warn(f"kd-gen-queries cake: {teacher} does not record its input normalisation; using mean 0.5, std 0.5 "
                     "(give --pixel-mean/--pixel-std)")
    cfg = CakeConfig(batch_size, groups, steps, lr, decay_decades, schedule, w_cls, w_contr, w_tv, optimizer, langevin,
                     norm[0], norm[1], seed)
    cfg.check(classes, shape)
    # the teacher's identity (file hash) is recorded beside the path it was given by: a resume must use the very
    # same teacher, wherever it is named from
    source = {**options_record(cfg), "teacher": teacher, "teacher_identity": loaded.identity, "n": n, "shape": list(shape)}
    _check_output(output, oracle_files(teacher))
    if output == "-":
        with progress_reporter(not quiet, "kd-gen-queries cake") as progress:
            _write(synthesise(loaded.module, shape, classes, n, cfg, dev, progress), n, source, output, oracle_files(teacher))
        return
    # a file output keeps every finished set in FILE.partial.h5, so a stopped run (minutes a set on a CPU)
    # loses at most the set in flight; sets are independently seeded, so skipping the kept ones is exact
    partial = partial_path(output)
    kept = partial_rows(partial, source, resume, ignore=("teacher",))
    if kept % cfg.batch_size and kept < n:
        raise KdError(f"{partial}: {kept} samples is not a whole number of sets of {cfg.batch_size} (damaged); delete it")
    if resume and not quiet:
        info(f"kd-gen-queries cake: {kept} of {n} samples kept in {partial}; making the rest" if kept else
             f"kd-gen-queries cake: nothing kept in {partial}; starting from the first set")
    STOP_HINT["text"] = f"the sets finished so far are kept in {partial}; the same command with --resume continues from them"
    with progress_reporter(not quiet, "kd-gen-queries cake") as progress:
        # ceil: a partial holding all n samples (stopped while the output was being made from it) makes no set again,
        # even when the last set is a short one
        batches = synthesise(loaded.module, shape, classes, n, cfg, dev, progress, start_set=-(-kept // cfg.batch_size))
        rows = write_through_partial(batches, output, source, __version__, cfg.batch_size)
    info(f"kd-gen-queries: wrote {counted(rows, 'query', 'queries')} {'x'.join(map(str, shape))} to {output}")


@app.command()
def aedm(
    diffusion: str = typer.Option(..., "--diffusion", help="The prior: a diffusers UNet2DModel + scheduler directory (kd-diffstep train/distill "
                                  "output, or a hub id when online), trained on public data."),
    substitute: str = typer.Option("vgg16", "--substitute", help="Attack mode: an architecture (paper: vgg16) or a weights file to start "
                                   "from. Stream mode: the weights file to steer against (required)."),
    substitute_args: str = SubstituteArgs,
    follow: bool = typer.Option(False, "--follow", help="Stream mode: reload the substitute whenever its file changes (closed loop with "
                                "kd-query | kd-distill --save-every)."),
    oracle: Optional[str] = Oracle, mode: str = typer.Option("probs", "--mode", help="label | probs (the paper)"),
    budget: Optional[int] = Budget,
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Attack mode: output DIR. Stream mode: file ('-' = stdout, default)."),
    log: Optional[str] = Log, eval_data: Optional[str] = EvalData, eval_split: str = EvalSplit,
    data_root_opt: Optional[str] = DataRootOption, resume: bool = Resume,
    n: Optional[int] = typer.Option(None, "-n", help="Stream mode: number of queries to write."),
    seed: int = Seed, batch_size: int = typer.Option(128, "--batch-size", help="Queries per round (per client when federated); "
                                                     "the last round asks what is left of the budget."),
    sampler_steps: int = typer.Option(8, "--sampler-steps", help="Deterministic DDIM steps of the prior D (paper: 8)."),
    steer_steps: int = typer.Option(5, "--steer-steps", help="n_d: Adam steps on the input noise per batch (paper: 5)."),
    lr_steer: float = typer.Option(0.01, "--lr-steer", help="mu_d (paper: 0.01)."),
    lr_s: float = typer.Option(1e-4, "--lr-s", help="mu_s, the substitute's online step (paper: RMSprop 1e-4)."),
    s_optimizer: str = typer.Option("rmsprop", "--s-optimizer", help="rmsprop (paper) | adam | sgd."),
    s_loss: str = typer.Option("l1", "--s-loss", help="l1 (eq. 4.2) | kl."),
    replay_steps: int = typer.Option(0, "--replay-steps", help="kdtools: substitute steps on random paid answers per round (no queries)."),
    clients: int = typer.Option(1, "--clients", help="Federated extraction (Algorithm 4.2) with K clients simulated in one process; "
                                "under torchrun every rank is one client instead."),
    checkpoint_every: Optional[int] = CheckpointEvery, state_every: float = StateEvery, final_epochs: int = FinalEpochs,
    final_lr: float = FinalLr, final_optimizer: str = FinalOptimizer, input_shape: Optional[str] = InputShape, trust_pickle: bool = TrustPickle,
    augment: bool = Augment,
    api_key_env: str = ApiKeyEnvOption, timeout: float = TimeoutOption, retries: int = RetriesOption,
    rate_limit: Optional[float] = RateLimitOption, wire: str = WireOption, max_batch: Optional[int] = MaxBatchOption,
    device: str = DeviceOption, quiet: bool = Quiet, debug: bool = DebugOption,
):
    """AEDM (chapter 4): queries steered through a diffusion prior to maximise the substitute's entropy.

    Attack mode (--oracle --budget -o DIR) runs Algorithm 4.1 in this process (--clients K: Algorithm 4.2);
    stream mode (-n N, no --oracle) writes steered queries for kd-query, steering against --substitute FILE,
    reloaded as it changes with --follow."""
    import os

    from ..diffusion.teachers import load_diffusion
    from ..extract.aedm import AEDMConfig, make_aedm

    # one message per bad option, naming it and its value
    problems = [f"{flag} must be {rule}, not {value}" for flag, value, ok, rule in (
        ("--sampler-steps", sampler_steps, sampler_steps >= 1, "at least 1"),
        ("--clients", clients, clients >= 1, "at least 1"),
        ("--batch-size", batch_size, batch_size >= 1, "at least 1"),
        ("--steer-steps", steer_steps, steer_steps >= 0, ">= 0"),
        ("--replay-steps", replay_steps, replay_steps >= 0, ">= 0"),
        ("--lr-steer", lr_steer, lr_steer > 0, "> 0"),
        ("--lr-s", lr_s, lr_s > 0, "> 0")) if not ok]
    if problems:
        raise KdUsageError("; ".join(problems))
    if s_optimizer not in ("rmsprop", "adam", "sgd"):
        raise KdUsageError(f"--s-optimizer {s_optimizer!r}: expected rmsprop, adam or sgd")
    if s_loss not in ("l1", "kl"):
        raise KdUsageError(f"--s-loss {s_loss!r}: expected l1 or kl")
    arch_args = parse_arch_args(substitute_args, "--substitute-args")
    if arch_args and oracle is None:
        raise KdUsageError("--substitute-args shapes a new substitute in attack mode; stream mode steers against "
                           "the --substitute file as it is")
    if arch_args and Path(substitute).is_file():
        raise KdUsageError(f"--substitute-args shapes a new substitute; {substitute} is a weights file, whose "
                           "architecture is its own")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if oracle is None:
        if budget is not None or resume or clients != 1 or world > 1:
            raise KdUsageError("stream mode (no --oracle) takes -n, not --budget, --resume or --clients; "
                               "federated extraction needs --oracle")
        prior = load_diffusion(diffusion)
        _aedm_stream(prior, diffusion, substitute, follow, n, output or "-", seed, batch_size, sampler_steps, steer_steps,
                     lr_steer, device, quiet)
        return
    if n is not None or follow:
        raise KdUsageError("-n and --follow belong to stream mode (no --oracle); attack mode stops at --budget")
    if world > 1 and output:  # before the prior is loaded: a refusal should not wait for it
        _refuse_other_client_count(Path(output), world, resume)
    prior = load_diffusion(diffusion)
    start = None
    if Path(substitute).is_file():
        from ..weights import load_model

        from ..models import ImageClassifier

        start = load_model(substitute).module
        if not isinstance(start, ImageClassifier):  # the attack trains it and saves it with its architecture
            raise KdUsageError(f"--substitute {substitute}: not a kdtools weights file (a foreign model cannot be trained "
                               "and saved as a substitute); give an architecture or a kdtools .safetensors file")
    elif substitute.endswith((".safetensors", ".pt")):
        raise KdUsageError(f"--substitute {substitute}: no such weights file")
    common = {**_common({**locals(), "pixel_mean": None, "pixel_std": None}),
              "substitute": start.arch if start is not None else substitute,
              "substitute_args": start.arch_args if start is not None else arch_args}
    cfg = AEDMConfig(str(diffusion), sampler_steps, steer_steps, lr_steer, lr_s, s_optimizer, s_loss, replay_steps, clients,
                     substitute_init=substitute if start is not None else "")
    if world <= 1:
        _attack("aedm", common, cfg, lambda **kw: _noted(make_aedm(prior, **kw), quiet), start)
        return
    _aedm_federated_rank(prior, common, cfg, start, world)


def _noted(attack, quiet: bool):
    if attack.steerer.note and not quiet:
        info(f"kd-gen-queries aedm: {attack.steerer.note}")
    _warn_steps(attack.steerer, attack.config.sampler_steps, quiet)
    return attack


def _warn_steps(steerer, asked: int, quiet: bool) -> None:
    if asked > steerer.sampler_steps and not quiet:
        warn(f"--sampler-steps {asked}: the prior has only {steerer.sampler_steps} steps; its whole chain is walked "
             f"({steerer.sampler_steps} steps)")


def _aedm_federated_rank(prior, common: dict, cfg, start, world: int) -> None:
    """One torchrun rank = one client of Algorithm 4.2: its share of the budget, its own log and state in
    DIR/client-RANK/, the substitutes averaged over gloo/nccl after every round; rank 0 writes the
    averaged substitute to DIR/substitute.safetensors after every round (atomically), so a client that
    dies leaves the last average behind."""
    import datetime
    import os

    import torch
    import torch.distributed as dist

    from ..device import resolve_device
    from ..extract.aedm import DistributedAverage, client_shares, make_aedm, plan_rounds
    from ..weights import save_model

    if cfg.clients != 1:
        raise KdUsageError("under torchrun every rank is one client: drop --clients")
    if common["budget"] is None or not common["output"] or common["output"] == "-":
        raise KdUsageError("federated attack mode needs --oracle, --budget and -o DIR")
    device = resolve_device(common["device"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        common = {**common, "device": str(device)}
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=300))
    try:
        rank = dist.get_rank()
        cfg.rounds = plan_rounds(common["budget"], world, common["batch_size"])
        cfg.ranks = world  # recorded in each client's log: a resume with another count is refused
        share = client_shares(common["budget"], world)[rank]
        out = Path(common["output"])
        out.mkdir(parents=True, exist_ok=True)
        log = None
        if common["log"]:
            p = Path(common["log"])
            log = str(p.with_name(f"{p.stem}-client-{rank}{p.suffix}"))

        def on_round(r: int, model) -> None:
            if rank == 0:
                save_model(model, out / "substitute.safetensors",
                           {**{k: v for k, v in common.items() if k != "api_key_env"}, **cfg.__dict__, "method": "aedm",
                            "clients": world},
                           {"federated_round": r, "rounds": cfg.rounds, "clients": world})

        torch.manual_seed(common["seed"])  # every client starts from the same substitute
        _attack("aedm", {**common, "seed": common["seed"]}, cfg,
                lambda **kw: _noted(make_aedm(prior, sync=DistributedAverage(str(out / "substitute.safetensors")), on_round=on_round, **kw), common["quiet"] or rank != 0), start,
                client={"rank": rank, "budget": share, "log": log})
    finally:
        # no barrier: after a failure here another rank may never reach it (each rank stops on its own errors)
        finish_distributed(world, wait=False)


def _refuse_other_client_count(out: Path, world: int, resume: bool) -> None:
    """A federated attack resumed by another number of torchrun processes would give each client another
    share of the budget and pair logs with the wrong clients: refused, on every rank alike (each reads the same
    files) and before the process group forms, so no rank waits for another that has stopped. The count is
    the averaged substitute's (rank 0 writes it after every round), else any client log's (logs written before the
    count was recorded say nothing, and then each client's own checks are all there is)."""
    import re

    from ..h5store import log_options
    from ..weights import read_metadata

    if not resume or not out.is_dir():
        return
    recorded = None
    averaged = out / "substitute.safetensors"
    if averaged.is_file():
        try:
            recorded = int(read_metadata(averaged).get("clients", 0)) or None
        except (KdError, OSError, ValueError):
            recorded = None  # unreadable: the logs below, or the clients' own checks, speak for it
    if recorded is None:  # stopped before the first round's average
        for d in sorted(out.iterdir()):
            if re.fullmatch(r"client-\d+", d.name) and (d / "queries.h5").is_file():
                try:
                    recorded = int((log_options(d / "queries.h5") or {}).get("ranks", 0)) or None
                except (KdError, OSError, ValueError):
                    recorded = None
                if recorded is not None:
                    break
    if recorded is not None and recorded != world:
        raise KdError(f"{out}: this federated attack was run by {recorded} clients (torchrun --nproc_per_node "
                      f"{recorded}), not {world}; resume it with {recorded} processes (each client's share of the "
                      "budget and its log depend on the count)")


def _aedm_stream(prior, prior_path: str, substitute: str, follow: bool, n: Optional[int], output: str, seed: int,
                 batch_size: int, sampler_steps: int, steer_steps: int, lr_steer: float, device_opt: str, quiet: bool) -> None:
    from ..device import resolve_device
    from ..extract.aedm import QuerySteerer, SubstituteFollower, steered_batches

    if n is None or n <= 0:
        raise KdUsageError("stream mode needs -n N (a positive number of queries)")
    if not Path(substitute).is_file():
        raise KdUsageError(f"stream mode steers against a substitute weights file: --substitute {substitute} is not a file; "
                           "make an initial (untrained) one first, e.g. kd-distill --data digits --arch lenet5 --epochs 0 "
                           f"--normalize 0.5,0.5 -o {substitute}")
    device = resolve_device(device_opt)
    follower = SubstituteFollower(substitute, device)
    model = follower.model
    if getattr(model, "input_shape", None) is None:
        raise KdUsageError(f"{substitute}: the substitute does not record its input shape")
    steerer = QuerySteerer(prior, model.input_shape, sampler_steps, steer_steps, lr_steer, device)
    if steerer.note and not quiet:
        info(f"kd-gen-queries aedm: {steerer.note}")
    _warn_steps(steerer, sampler_steps, quiet)
    current = follower.current if follow else (lambda: model)
    options = {"method": "aedm", "diffusion": prior_path, "substitute": substitute, "follow": follow, "n": n, "seed": seed,
               "sampler_steps": steerer.sampler_steps, "steer_steps": steer_steps, "lr_steer": lr_steer}
    _write(steered_batches(steerer, current, n, batch_size, seed), n, options, output, [substitute, prior_path])
    if follow and not quiet:
        info(f"kd-gen-queries aedm: substitute reloaded {follower.reloads} times"
             + (f", {follower.skipped} unreadable versions skipped" if follower.skipped else ""))


def main() -> None:
    run_app(app, "kd-gen-queries")


if __name__ == "__main__":
    main()
