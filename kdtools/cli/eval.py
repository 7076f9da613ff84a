"""kd-eval: measure what distillation produced (accuracy and fidelity today; curves, label error, FID later)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..data import load_dataset
from ..device import resolve_device
from ..errors import KdError, KdUsageError, counted
from ..evaluate import evaluate_accuracy
from ..figures import image_format
from ..weights import load_classifier, load_model, parse_shape
from ._common import DataRootOption, DebugOption, DeviceOption, check_paths, data_root, make_app, run_app, stdin_if

app = make_app("Evaluate models: accuracy on a labelled split and fidelity to a reference (the victim).")


@app.command()
def accuracy(
    model: str = typer.Argument(..., help="Model file (kdtools weights, TorchScript, torch.export), or ensemble:F1,F2,... "
                                         "(the mean of the files' softmax outputs)."),
    data: str = typer.Option(..., "--data", help="digits | mnist | fashion-mnist | cifar10 | ... | a labelled FILE (.h5 or stream) | - (a stream on stdin)"),
    split: str = typer.Option("test", "--split"),
    reference: Optional[str] = typer.Option(None, "--reference", help="Also measure agreement with this model (e.g. the victim)."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="CxHxW, for model files that do not record it."),
    data_root_opt: Optional[str] = DataRootOption,
    download: bool = typer.Option(False, "--download"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout instead of a table."),
    by_class: bool = typer.Option(False, "--per-class", help="Also a table per true class (the JSON always has per_class)."),
    device: str = DeviceOption,
    debug: bool = DebugOption,
):
    """Accuracy of MODEL on a split, and with --reference its fidelity (agreement) with that model."""
    dev = resolve_device(device)
    shape = parse_shape(input_shape) if input_shape else None
    m = load_classifier(model, input_shape=shape)
    mshape = m.input_shape or shape
    ref = load_classifier(reference, input_shape=shape) if reference else None
    # with a reference of another size the data stay as they are: each model gets them resized once, to its size
    same_size = mshape is not None and (ref is None or ref.input_shape is None or tuple(ref.input_shape) == tuple(mshape))
    ds = load_dataset(data, split, data_root(data_root_opt), download,
                      image_size=mshape[1] if same_size else None, channels=mshape[0] if same_size else None,
                      stdin=stdin_if(data) if data == "-" else None)
    report = evaluate_accuracy(m.module.to(dev), model, mshape or ds.shape, ds, dev,
                               ref.module.to(dev) if ref else None, reference, ref.input_shape if ref else None)
    if as_json:
        sys.stdout.write(json.dumps(asdict(report), allow_nan=False) + "\n")
        return
    table = Table(title="kd-eval accuracy", show_header=False)
    for k, v in report.rows():
        table.add_row(k, v)
    Console().print(table)
    if by_class:
        pct = lambda v: "-" if v is None else f"{100 * v:.2f} %"  # None: no sample of the class
        t = Table(title="per class")
        for col in ["class", "samples", "accuracy"] + (["reference accuracy", "fidelity"] if reference else []):
            t.add_column(col, justify="left" if col == "class" else "right")
        for r in report.per_class:
            cells = [f"{r['class']} {r['name']}" if r["name"] != str(r["class"]) else r["name"], str(r["samples"]), pct(r["accuracy"])]
            if reference:
                cells += [pct(r["reference_accuracy"]), pct(r["fidelity"])]
            t.add_row(*cells)
        Console().print(t)


def check_plot_path(flag: str, path: str, inputs: dict[str, list]) -> None:
    """Every check on a plot's name before any work: a file (stdout carries the table or JSON), not a
    directory nor one of the inputs, in a format the figure module writes."""
    if path == "-":
        raise KdUsageError(f"{flag} -: the plot is written to a file (stdout carries the table or JSON); give a file name")
    check_paths({flag: path}, inputs, stdout_flag=None)
    try:
        image_format(path)
    except KdUsageError as e:
        raise KdUsageError(f"{flag} {e}") from None


@app.command()
def log(
    path: str = typer.Argument(..., help="A query log or sample file (.h5)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout instead of a table."),
    grid: Optional[str] = typer.Option(None, "--grid", help="Also draw the queries as an image, one row per answered "
                                       "class (queries spread evenly over its rows, first to last), format from the suffix: .png, .svg, .pdf, ..."),
    per_class: int = typer.Option(8, "--per-class", min=1, max=64, help="Queries drawn per class with --grid."),
    title: str = typer.Option("", "--title", help="Title of the --grid image (default: the log's name)."),
    debug: bool = DebugOption,
):
    """Accounting of a query log: rows answered, queries spent (probes included), budget, oracle, mode,
    and how the answers spread over the classes; --grid draws what was asked, by answer."""
    from ..h5store import log_overview

    if grid:
        check_plot_path("--grid", grid, {"LOG": [path]})
    # one reading of the log, so the figures agree with each other even while a run is still appending to it
    seen = log_overview(path, per_class=per_class if grid else 0)
    facts, answers = seen["facts"], seen["answers"]
    if answers is not None:
        facts["answers_by_class"], facts["rejected"] = answers["by_class"], answers["rejected"]
    if grid:
        from ..logplot import plot_answer_grid

        if answers is None:
            raise KdUsageError(f"--grid: {path} holds no class answers to sort its queries by (queries without "
                               "answers, or answers without a class count)")
        plot_answer_grid(seen["examples"], answers["by_class"], grid, title or f"queries of {path} by answer",
                         options={"log": path, "per_class": per_class})
    if as_json:
        sys.stdout.write(json.dumps(facts) + "\n")
        return
    table = Table(title=f"kd-eval log {path}", show_header=False)
    for k, v in facts.items():
        if k == "answers_by_class":
            from ..logplot import share_text

            v = "  ".join(f"{c}: {share_text(n, sum(v))}" for c, n in enumerate(v))
        table.add_row(k.replace("_", " "), "unlimited" if k == "budget" and v < 0 else str(v))
    Console().print(table)


@app.command()
def curve(
    inputs: list[str] = typer.Argument(..., help="Checkpoints: a run directory (its checkpoints/), a query log (.h5) whose run saved "
                                                  "checkpoints, or weights files with queries_spent in their metadata."),
    data: str = typer.Option(..., "--data", help="digits | mnist | fashion-mnist | cifar10 | ... | FILE.h5"),
    split: str = typer.Option("test", "--split"),
    reference: Optional[str] = typer.Option(None, "--reference", help="Also measure fidelity (agreement) with this model (the victim)."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write the curve as an image, in the format of the suffix: .png, .svg(z), .pdf, .jpg, .tif."),
    title: str = typer.Option("", "--title", help="Title of the plot."),
    data_root_opt: Optional[str] = DataRootOption,
    download: bool = typer.Option(False, "--download"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout instead of a table."),
    device: str = DeviceOption,
    debug: bool = DebugOption,
):
    """Substitute accuracy (and fidelity) against queries spent, from the checkpoints an attack run saved.

    Several run directories or query logs are compared: one line per run in the table, the plot and the JSON."""
    from pathlib import Path

    from ..curve import curve_json, evaluate_curve, find_checkpoints, is_run, plot_curves, run_label

    if plot:  # every check on the plot's name before any work
        check_plot_path("--plot", plot, {"checkpoint": inputs, "--reference": [reference]})
    # several runs (directories or logs) are compared, one series each; weights files make one series
    if len(inputs) > 1 and all(is_run(i) for i in inputs):
        groups = [(run_label(i), find_checkpoints([i])) for i in inputs]
    else:
        groups = [("", find_checkpoints(inputs))]
    dev = resolve_device(device)
    first = load_model(groups[0][1][0][1])
    shape = first.input_shape
    ds = load_dataset(data, split, data_root(data_root_opt), download, image_size=shape[1], channels=shape[0])
    ref = load_classifier(reference, input_shape=shape) if reference else None
    series = []
    for name, checkpoints in groups:
        points, ref_acc = evaluate_curve(checkpoints, ds, dev, ref.module if ref else None, ref.input_shape if ref else None)
        series.append((name, points))
    options = {"inputs": inputs, "data": data, "split": split, "reference": reference, "plot": plot}
    if plot:
        plot_curves(series, plot, title or f"{ds.title}", ref_acc, options)
    if as_json:
        doc = curve_json(series, f"{ds.title}", reference, ref_acc, options)
        sys.stdout.write(json.dumps(doc) + "\n")
        return
    table = Table(title=f"kd-eval curve: {ds.title}, {len(ds)} images")
    if len(series) > 1:
        table.add_column("run")
    table.add_column("queries", justify="right")
    table.add_column("accuracy", justify="right")
    if reference:
        table.add_column("fidelity", justify="right")
    table.add_column("checkpoint")
    for name, points in series:
        for p in points:
            row = ([name] if len(series) > 1 else []) + [f"{p.queries:,}", f"{100 * p.accuracy:.2f} %"]
            if reference:
                row.append(f"{100 * p.fidelity:.2f} %")
            table.add_row(*row, Path(p.path).name)
    if ref_acc is not None:
        table.caption = f"victim accuracy {100 * ref_acc:.2f} %"
    Console().print(table)


@app.command()
def fid(
    samples: str = typer.Argument(..., help="Generated samples: a sample file (.h5) or stream file; '-' = stdin."),
    ref: str = typer.Option(..., "--ref", help="Reference: mnist | fashion-mnist | cifar10 | digits | ... | swissroll (2-D points, "
                            "kd-diffstep's generator) | FILE.h5"),
    features: str = typer.Option(..., "--features", help="inception:PT_INCEPTION.pth | lenet:WEIGHTS.safetensors | raw"),
    ref_split: Optional[str] = typer.Option(None, "--ref-split", help="Split of a reference dataset (default train; swissroll: "
                                            "test, the held-out points)."),
    n: Optional[int] = typer.Option(None, "-n", "--num", help="Use at most this many samples (at least 2)."),
    ref_n: Optional[int] = typer.Option(None, "--ref-num", help="Use at most this many reference rows (at least 2; default: as "
                                        "many as samples)."),
    batch_size: int = typer.Option(256, "--batch-size"),
    data_root_opt: Optional[str] = DataRootOption,
    download: bool = typer.Option(False, "--download"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout instead of a table."),
    device: str = DeviceOption,
    debug: bool = DebugOption,
):
    """FID of SAMPLES against a reference set, in Inception or any classifier's feature space (issue #5)."""
    from pathlib import Path

    from ..fid import fid as compute_fid, limit_rows, open_features
    from ..sources import read_all
    from ._common import progress_bars, stdin_if

    from ..errors import KdUsageError

    if batch_size < 1:
        raise KdUsageError(f"--batch-size must be at least 1, not {batch_size}")
    for flag, value in (("-n", n), ("--ref-num", ref_n)):
        if value is not None and value < 2:
            raise KdUsageError(f"{flag} must be at least 2 (FID needs two rows to estimate a covariance), not {value}"
                               + ("; leave it out for the default" if flag == "--ref-num" else ""))
    extractor = open_features(features, resolve_device(device))
    _, batch = read_all(samples, stdin_if(samples))
    x = limit_rows(batch["x"], n)
    if x.shape[0] < 2:
        raise KdError(f"{samples}: {x.shape[0]} samples; FID needs at least 2")
    if Path(ref).is_file():  # a sample file: used as it is (its rows must have the samples' shape)
        rx = read_all(ref)[1]["x"]
        if rx.shape[0] < 2:
            raise KdError(f"{ref}: {rx.shape[0]} reference rows; FID needs at least 2")
        ref_split = None
    elif ref.lower() == "swissroll":  # kd-diffstep's 2-D points, from the same generator and split seeds
        from ..diffusion.swissroll import swiss_roll

        ref_split = ref_split or "test"
        rx = swiss_roll(ref_n or max(x.shape[0], 2), ref_split)
    else:  # a dataset: at the samples' resolution (diffusion teachers are trained on resized images)
        ref_split = ref_split or "train"
        rx = load_dataset(ref, ref_split, data_root(data_root_opt), download,
                          image_size=x.shape[-1] if x.dim() == 4 else None, also_accepted=("swissroll (2-D points)",)).x
    rx = limit_rows(rx, ref_n or min(rx.shape[0], max(x.shape[0], 2)))
    with progress_bars() as progress:
        report = compute_fid(x, rx, extractor, batch_size, progress)
    report.update({"samples_file": samples, "ref": ref, **({"ref_split": ref_split} if ref_split else {})})
    from ._common import warn
    if report["few_samples"]:
        warn(f"FID from {min(report['samples'], report['reference'])} rows with {report['feature_dim']} features: the "
             "covariances are singular, so the value is biased upward and not comparable with published FIDs "
             "(use more rows than features; 10 000 is the convention)")
    elif report["singular"]:
        warn("FID: the product of the feature covariances is singular (constant or dead feature units?); "
             "a small offset was added to both, as the reference FID code does")
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    table = Table(title="kd-eval fid", show_header=False)
    for k, v in report.items():
        table.add_row(k.replace("_", " "), f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)


from .aggregate import (DelimiterOption, FormatOption, INITIAL_HELP, LabelColOption, TaskColOption,  # noqa: E402
                        WorkerColOption)


@app.command()
def aggregation(
    labels: str = typer.Argument(..., help="Crowd labels CSV (task,worker,label); '-' = stdin."),
    gold: str = typer.Option(..., "--gold", help="task,truth CSV (used for scoring only)."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Also draw the curves to this image (format from the suffix, PNG when none)."),
    methods: str = typer.Option("bila,ds,mv", "--method", help="Comma list of methods."),
    chunk_size: int = typer.Option(25, "--chunk-size", help="Tasks per chunk (>= 1; for one chunk holding "
                                                               "everything give at least the number of tasks)."),
    initial_size: Optional[int] = typer.Option(None, "--initial-size", help=INITIAL_HELP),
    fmt: str = FormatOption,
    delimiter: Optional[str] = DelimiterOption,
    task_col: str = TaskColOption,
    worker_col: str = WorkerColOption,
    label_col: str = LabelColOption,
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation, batches and random tie-breaks (as kd-aggregate's)."),
    debug: bool = DebugOption,
):
    """Error rate after each chunk for each crowd aggregation method (as kd-aggregate runs them): CSV
    method,tasks,error on stdout, drawn to --plot. Reads labels with kd-aggregate's input options."""
    from ..aggregate import crowdio
    from ..aggregate.online import error_curves
    from ..aggregate.plot import plot_error_curves
    from ..errors import KdError
    from ._common import STOP_HINT, info, warn
    from .aggregate import _parse_methods, check_gold_and_plot, check_seed, check_sizes, label_input

    # every check before any work: kd-aggregate's rules
    STOP_HINT["text"] = ""
    spec = label_input(fmt, delimiter, task_col, worker_col, label_col)
    ms = _parse_methods(methods)  # kd-aggregate's rule: known methods, none twice
    check_sizes(chunk_size=chunk_size, initial_size=initial_size)
    check_seed(seed)
    check_gold_and_plot(gold, plot)
    check_paths({"--plot": plot}, {"the label file": [labels], "--gold": [gold]}, stdout_flag=None)
    rows = spec.read_whole(labels)
    name = crowdio.path_name(labels)
    if not rows:
        raise KdError(f"{name}: no labels")
    gold_map = crowdio.read_gold(gold)
    if not gold_map:
        raise KdError(f"{gold}: no gold labels")
    groups = crowdio.group_by_task(rows)
    if not any(g[0][0] in gold_map for g in groups):
        raise KdError(f"no task of {name} has a gold label in {gold} ({len(groups)} tasks, {len(gold_map)} gold tasks): "
                      "nothing to score")
    unknown = crowdio.unknown_truths(gold_map, (g[0][0] for g in groups), crowdio.natural_order(r[2] for r in rows))
    if unknown:
        warn(crowdio.describe_unknown_truths(gold, unknown, crowdio.natural_order(r[2] for r in rows)))
    first = initial_size or crowdio.default_initial_size(chunk_size)
    chunks = crowdio.split_groups(groups, chunk_size, first)
    STOP_HINT["text"] = "nothing was written" + (f" ({plot} is as it was)" if plot else "") + "; run the same command again"
    curves = error_curves(chunks, gold_map, ms, seed=seed)
    if plot:
        plot_error_curves(curves, plot, options={"labels": labels, "method": ms, "chunk_size": chunk_size,
                                                 "initial_size": first, "seed": seed})
    STOP_HINT["text"] = ""
    # the numbers behind the plot are data: stdout, for a spreadsheet or the next command
    lines = ["method,tasks,error"] + [f"{m},{tasks},{err:.6f}" for m, pts in curves.items() for tasks, err in pts]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
    for m, pts in curves.items():
        if pts:
            info(f"{m}: final error {100 * pts[-1][1]:.2f} % after {counted(pts[-1][0], 'task')}")


def main() -> None:
    run_app(app, "kd-eval")


if __name__ == "__main__":
    main()
