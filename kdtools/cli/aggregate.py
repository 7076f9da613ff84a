"""kd-aggregate: online crowd label aggregation (BiLA-CM) with a state file; baselines side by side.

    kd-aggregate chunk-001.csv --state crowd.state -o clean-001.csv
    cat labels.csv | kd-aggregate - --state crowd.state --chunk-size 200 > clean.csv
    kd-aggregate labels.csv --method ds
    kd-aggregate simulate --truth truth.csv --workers 10 --noise 0.6 --missing 0.1 -o labels.csv --truth-out gold.csv
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import KdError, KdUsageError
from ._common import DebugOption, info, make_app, progress_bars, run_app, warn

app = make_app(
    "Aggregate crowd labels chunk by chunk (BiLA-CM), keeping what was learned in a state file.\n\n"
    "INPUTS are CSV/TSV files of task,worker,label (each file is a chunk) or '-' for stdin "
    "(cut into chunks of --chunk-size tasks). Writes task,label,confidence on stdout or -o.\n\n"
    "Synthetic crowds: kd-aggregate simulate --help")

sim_app = make_app(
    "Simulate a crowd as in the dissertation: N workers label every item, a label is missing with "
    "probability --missing and drawn from the noise distribution with probability --noise (the paper's "
    "mislabelling probability): a bimodal distribution over the classes (centres 3.0 and 7.0, sd 1.0 and "
    "0.5) that may hit the true class (--draw pmf), or a rounded draw that never does (--draw rounded). "
    "Writes task,worker,label and task,truth.")


def _parse_classes(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    classes = [c.strip() for c in text.split(",")]
    if not classes or any(not c for c in classes) or len(set(classes)) != len(classes):
        raise KdUsageError("--classes must be a comma-separated list of distinct, non-empty class names")
    return classes


def _parse_methods(text: str) -> list[str]:
    from ..aggregate import METHODS

    methods = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not methods:
        raise KdUsageError("--method needs at least one method")
    for m in methods:
        if m not in METHODS:
            raise KdUsageError(f"unknown method {m!r} (choose from {', '.join(METHODS)})")
    if len(set(methods)) != len(methods):
        raise KdUsageError("--method lists a method twice")
    return methods


def _chunks(inputs: list[str], fmt: str, columns, delimiter: Optional[str], chunk_size: Optional[int],
            first_size: Optional[int]):
    """Yield (name, rows) per chunk; files are read (and checked) whole, stdin is streamed."""
    from ..aggregate import crowdio

    first = first_size
    for path in inputs:
        if path == "-":
            if sys.stdin is None or sys.stdin.isatty():
                raise KdUsageError("'-' reads labels from standard input, but it is a terminal; pipe a CSV in")
            stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="")
            rows = crowdio.read_rows(stream, "<stdin>", fmt, columns, delimiter)
            n = 0
            for chunk in crowdio.stream_chunks(rows, chunk_size, first):
                n += 1
                first = None
                yield f"<stdin> chunk {n}", chunk
            if n == 0:
                raise KdError("<stdin>: empty chunk (no labels)")
        else:
            with crowdio.open_text(path) as f:
                rows = list(crowdio.read_rows(f, path, fmt, columns, delimiter))
            if not rows:
                raise KdError(f"{path}: empty chunk (no labels)")
            groups = crowdio.group_by_task(rows)
            pieces = crowdio.split_groups(groups, chunk_size, first)
            first = None
            for i, chunk in enumerate(pieces):
                yield (path if len(pieces) == 1 else f"{path} chunk {i + 1}"), chunk


def _check_outputs(paths: dict[str, Optional[str]]) -> None:
    """Output paths are checked before any work: none is a directory, no two are the same file."""
    seen: dict[str, str] = {}
    for flag, path in paths.items():
        if not path:
            continue
        if Path(path).is_dir():
            raise KdUsageError(f"{flag} {path}: is a directory; give a file name")
        parent = Path(path).parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent  # missing folders are created; the first existing one must be a folder
        if not parent.is_dir():
            raise KdUsageError(f"{flag} {path}: {parent} is not a directory")
        if Path(path).exists() and not Path(path).is_file():
            continue  # a device such as /dev/null: several outputs may share it
        key = os.path.realpath(path)
        if key in seen:
            raise KdUsageError(f"{seen[key]} and {flag} name the same file {path}; give each output its own file")
        seen[key] = flag


def _check_config(state_path: str, saved: dict, given: dict) -> None:
    for key, value in given.items():
        if value is None:
            continue
        if key in saved and saved[key] != value:
            raise KdUsageError(f"{state_path} was made with {key.replace('_', '-')} {saved[key]!r}; "
                               f"drop --{key.replace('_', '-')} or start a new state")


def _write_confusion(path: str, agg, options: dict) -> None:
    import h5py
    import numpy as np

    from .. import __version__
    from ..fileio import atomic_path

    conf = agg.confusion()
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            d = f.create_dataset("confusion", data=np.asarray(conf, dtype=np.float32), compression="gzip")
            d.attrs["axes"] = "worker, true class, given label"
            d.attrs["description"] = "p(worker says label | true class); NaN rows: no estimate for that worker"
            f.create_dataset("workers", data=np.array(agg.workers.items, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("classes", data=np.array(agg.classes.items, dtype=object), dtype=h5py.string_dtype())
            f.attrs["kdtools_version"] = __version__
            f.attrs["method"] = agg.method
            f.attrs["options"] = json.dumps(options, sort_keys=True, default=str)
            f.attrs["chunks"] = agg.chunks


# a one-command typer app shows the command's help, not the app's: pass it on
@app.command(help=app.info.help)
def aggregate(
    inputs: Optional[List[str]] = typer.Argument(None, help="Label files (task,worker,label), each a chunk; '-' = stdin."),
    state: Optional[str] = typer.Option(None, "--state", help="State file: created when missing, updated when the command succeeds."),
    output: str = typer.Option("-", "-o", "--output", help="Aggregated labels (CSV task,label,confidence); '-' = stdout."),
    method: str = typer.Option("bila", "--method", "-m",
                               help="bila | mv | ds | mace; a comma list runs them side by side (labels of the first are written)."),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", help="Tasks per chunk (stdin: cut the stream; files: split each file)."),
    initial_size: Optional[int] = typer.Option(None, "--initial-size", help="Tasks in the first chunk of a new state (the initial set)."),
    fmt: str = typer.Option("long", "--format", help="long (task,worker,label rows) | dense (item x worker matrix, -1 = missing)."),
    delimiter: Optional[str] = typer.Option(None, "--delimiter", help="Field separator (default: tab for .tsv or a tab-separated header, else comma)."),
    task_col: str = typer.Option("task", "--task-col", help="Header name of the task column."),
    worker_col: str = typer.Option("worker", "--worker-col", help="Header name of the worker column."),
    label_col: str = typer.Option("label", "--label-col", help="Header name of the label column."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Declare the classes (comma list, in order); other labels are errors."),
    proba: bool = typer.Option(False, "--proba", help="Add one p_<class> column per class (the full posterior)."),
    confusion: Optional[str] = typer.Option(None, "--confusion", help="Write per-worker confusion matrices to this HDF5 file."),
    gold: Optional[str] = typer.Option(None, "--gold", help="task,truth CSV: report the error rate of what was aggregated so far."),
    plot: Optional[str] = typer.Option(None, "--plot", help="PNG of the error rate after each chunk per method (needs --gold)."),
    relabel_all: bool = typer.Option(False, "--relabel-all", help="After the inputs, write labels for every task seen so far (BiLA)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for initialisation, batches and random tie-breaks (default 0)."),
    zeta: Optional[float] = typer.Option(None, "--zeta", help="BiLA: weight of the KL term (eq. 2.11; default 1.0)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="BiLA: learning rate mu of the optimiser (default 0.01)."),
    max_epochs: Optional[int] = typer.Option(None, "--max-epochs", help="BiLA: most epochs per chunk (default 100)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="BiLA: mini-batch size in tasks (default 128)."),
    decision: Optional[str] = typer.Option(None, "--decision", help="BiLA: likelihood (the chapter's rule, default) | posterior (x prior)."),
    step_count: Optional[str] = typer.Option(None, "--step-count",
                                             help="BiLA: optimiser step count t: global (one t for the stream) | per-parameter "
                                                  "(each parameter counts from its creation) | sparse (a worker's matrix counts "
                                                  "only batches with its labels). Default global."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="One line per chunk on stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary and no progress bar."),
    debug: bool = DebugOption,
):
    from .. import __version__
    from ..aggregate import crowdio
    from ..aggregate.bila import BilaConfig
    from ..aggregate.online import Aggregator
    from ..fileio import atomic_path

    inputs = list(inputs or [])
    methods = _parse_methods(method)
    class_list = _parse_classes(classes)
    if fmt not in ("long", "dense"):
        raise KdUsageError("--format must be long or dense")
    for name, value in (("--chunk-size", chunk_size), ("--initial-size", initial_size), ("--max-epochs", max_epochs),
                        ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise KdUsageError(f"{name} must be >= 1")
    if decision is not None and decision not in ("likelihood", "posterior"):
        raise KdUsageError("--decision must be likelihood or posterior")
    from ..aggregate.bila import STEP_COUNTS

    if step_count is not None and step_count not in STEP_COUNTS:
        raise KdUsageError(f"--step-count must be one of {', '.join(STEP_COUNTS)}")
    if inputs.count("-") > 1:
        raise KdUsageError("'-' (stdin) can be given once")
    if not inputs and not relabel_all:
        raise KdUsageError("name label files or '-' for stdin (see --help)")
    if plot and not gold:
        raise KdUsageError("--plot needs --gold (the plot shows error rates)")
    if plot:
        from ..aggregate.plot import image_format

        try:
            image_format(plot)
        except KdUsageError as e:
            raise KdUsageError(f"--plot {e}") from None
    _check_outputs({"-o": None if output == "-" else output, "--confusion": confusion, "--plot": plot, "--state": state})
    if state and len(methods) > 1:
        raise KdUsageError("--state keeps one method's model; give a single --method with --state")
    if relabel_all and methods[0] != "bila":
        raise KdUsageError(f"--relabel-all re-infers every task from BiLA-CM's confusion matrices: not with --method {methods[0]}")
    if relabel_all and not inputs and not state:
        raise KdUsageError("--relabel-all without inputs relabels what a --state file holds: give --state FILE (or label files)")
    if relabel_all and not inputs and not Path(state).exists():
        raise KdError(f"{state}: no such state file, so nothing to relabel (--relabel-all without inputs reads it)")
    if delimiter is not None:
        delimiter = {"\\t": "\t", "tab": "\t"}.get(delimiter, delimiter)
        if len(delimiter) != 1:
            raise KdUsageError("--delimiter must be one character (or 'tab')")

    given_cfg = {"zeta": zeta, "lr": lr, "max_epochs": max_epochs, "batch_size": batch_size, "decision": decision,
                 "step_count": step_count, "seed": seed}
    options = {"method": methods, "chunk_size": chunk_size, "initial_size": initial_size, "format": fmt,
               "classes": class_list, "columns": [task_col, worker_col, label_col], "seed": seed,
               "inputs": inputs, "state": state, "bila": {k: v for k, v in given_cfg.items() if v is not None}}

    # the aggregators: one per method, the first one may come from the state file
    aggs: dict[str, Aggregator] = {}
    if state and Path(state).exists():
        from ..aggregate.state import load_state

        agg = load_state(state)
        if agg.method != methods[0]:
            raise KdError(f"{state} holds a {agg.method} state, not {methods[0]}; use --method {agg.method} or a new state file")
        if class_list is not None and class_list != agg.classes.items:
            how = "" if agg.classes_fixed else " (learned from its labels, not declared)"
            raise KdError(f"{state} was made for classes {','.join(agg.classes.items)}{how}, not {','.join(class_list)}; "
                          f"start a new state file for other classes")
        if class_list is not None and not agg.classes_fixed:
            # a state that learned exactly these classes: --classes declares them from now on (other labels
            # are errors in this run, and the state records the classes as declared)
            agg.classes_fixed = True
        _check_config(state, {**agg.config.to_dict(), "seed": agg.seed}, given_cfg)
        aggs[methods[0]] = agg
    cfg_kwargs = {k: v for k, v in given_cfg.items() if v is not None}
    for m in methods:
        if m not in aggs:
            aggs[m] = Aggregator(m, classes=class_list, config=BilaConfig(**cfg_kwargs), seed=seed or 0)
    main_agg = aggs[methods[0]]
    fresh = main_agg.chunks == 0
    gold_map = crowdio.read_gold(gold) if gold else None
    if gold_map is not None and not gold_map:
        raise KdError(f"{gold}: no gold labels")
    curves: dict[str, list[tuple[int, float]]] = {m: [] for m in methods}
    columns = crowdio.Columns(task_col, worker_col, label_col)
    timing = {m: 0.0 for m in methods}
    n_chunks = n_rows_out = replaced = 0

    with ExitStack() as stack:
        if output == "-":
            out = sys.stdout
        else:
            tmp = stack.enter_context(atomic_path(output))
            out = stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
        progress = stack.enter_context(progress_bars(not quiet))
        header_written = False
        chunk_iter = _chunks(inputs, fmt, columns, delimiter, chunk_size, initial_size if fresh else None) if inputs else []
        for name, rows in chunk_iter:
            results = {}
            for m in methods:
                t0 = time.perf_counter()
                results[m] = aggs[m].process(rows, progress=progress, chunk_name=name)
                timing[m] += time.perf_counter() - t0
                if gold_map is not None:
                    err, n_gold = aggs[m].error_rate(gold_map)
                    if n_gold:
                        curves[m].append((len(aggs[m].tasks), err))
            res = results[methods[0]]
            n_chunks += 1
            replaced += res.replaced
            if res.new_classes and main_agg.chunks > 1:
                warn(f"{name}: new classes {', '.join(res.new_classes)}; the model grew to {len(res.classes)} classes")
            if not relabel_all:
                crowdio.write_labels(out, res.tasks, res.labels, res.confidence, res.proba if proba else None,
                                     res.classes, header=not header_written)
                header_written = True
                n_rows_out += len(res.tasks)
                if output == "-":
                    out.flush()
            if verbose:
                line = f"{name}: {len(res.tasks)} tasks, {res.n_labels} labels"
                if res.replaced:
                    line += f", {res.replaced} repeated labels replaced"
                if gold_map is not None and curves[methods[0]]:
                    line += "; error so far " + ", ".join(f"{m} {100 * curves[m][-1][1]:.2f} %" for m in methods if curves[m])
                info(line)
        if relabel_all:
            res = main_agg.relabel_all()
            crowdio.write_labels(out, res.tasks, res.labels, res.confidence, res.proba if proba else None, res.classes)
            n_rows_out = len(res.tasks)
            header_written = True
        if not header_written:
            crowdio.write_labels(out, [], [], [], None, [])
        if output != "-":
            out.flush()
        # the side files before the labels are committed (leaving this block renames -o into place): a
        # side file that cannot be written leaves a previous -o, like the state, untouched
        n_gold = aggs[methods[0]].error_rate(gold_map)[1] if gold_map is not None else 0
        if gold_map is not None and n_gold == 0:
            warn(f"no task of {gold} was aggregated ({len(gold_map)} gold tasks, {len(main_agg.tasks)} tasks "
                 f"{'in the state' if state else 'aggregated'}): no error rate" + (f"; {plot} not written" if plot else ""))
        if confusion:
            _write_confusion(confusion, main_agg, options)
        if plot and n_gold:
            from ..aggregate.plot import has_points, plot_error_curves

            if has_points(curves):
                plot_error_curves(curves, plot, options=options)
            else:  # gold tasks only in the state (--relabel-all without inputs): no chunk, no point
                warn(f"no chunk was aggregated in this run, so there is no error curve to draw; {plot} not written")
    # the labels are out; now the state (last: a failure before this point leaves the previous state untouched)
    if state:
        from ..aggregate.state import save_state

        save_state(state, main_agg, options)
    if not quiet:
        # "state:" only when there is one; otherwise the counts are this run's alone
        msg = (f"kd-aggregate: {n_chunks} chunk(s), {n_rows_out} labels written; "
               + (f"state: {main_agg.chunks} chunks, " if state else "")
               + f"{len(main_agg.tasks)} tasks, {len(main_agg.workers)} workers, {len(main_agg.classes)} classes")
        if replaced:
            msg += f"; {replaced} repeated (task, worker) labels replaced by the later one"
        info(msg)
        if gold_map is not None:
            for m in methods:
                err, n_gold = aggs[m].error_rate(gold_map)
                rate = f"{100 * err:.2f} % on {n_gold} gold tasks" if n_gold else "n/a (no gold task aggregated)"
                speed = f", {aggs[m].labels_seen / timing[m]:.0f} labels/s" if timing[m] > 0 else ""
                info(f"  {m}: error {rate}{speed}")


@sim_app.command(help=sim_app.info.help)
def simulate(
    truth: Optional[str] = typer.Option(None, "--truth", help="CSV of true labels (task,truth)."),
    mnist: bool = typer.Option(False, "--mnist", help="Use MNIST's labels (torchvision raw files under --data-root)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Root holding MNIST/raw (default: $KD_DATA/vision)."),
    split: str = typer.Option("train", "--split", help="MNIST split: train | test."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N items."),
    workers: int = typer.Option(10, "--workers", help="Workers per item."),
    noise: float = typer.Option(0.6, "--noise", help="Probability that a label comes from the noise distribution."),
    draw: str = typer.Option("pmf", "--draw", help="Noise draw: pmf (the paper's, may hit the truth) | rounded (always wrong)."),
    missing: float = typer.Option(0.1, "--missing", help="Probability that a label is missing."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    output: str = typer.Option("-", "-o", "--output", help="Labels CSV (task,worker,label); '-' = stdout."),
    truth_out: Optional[str] = typer.Option(None, "--truth-out", help="Write task,truth here."),
    debug: bool = DebugOption,
):
    import numpy as np

    from ..aggregate import crowdio
    from ..aggregate.simulate import load_mnist_labels, simulate_crowd
    from ..fileio import atomic_path

    if (truth is None) == (not mnist):
        raise KdUsageError("give exactly one of --truth CSV or --mnist")
    if split not in ("train", "test"):
        raise KdUsageError("--split must be train or test")
    if not 0 <= noise <= 1 or not 0 <= missing < 1:
        raise KdUsageError("--noise must be in [0, 1] and --missing in [0, 1)")
    if draw not in ("pmf", "rounded"):
        raise KdUsageError("--draw must be pmf or rounded")
    if workers < 1 or (limit is not None and limit < 1):
        raise KdUsageError("--workers and --limit must be >= 1")
    if mnist:
        root = data_root or (os.path.join(os.environ["KD_DATA"], "vision") if os.environ.get("KD_DATA") else None)
        if root is None:
            raise KdUsageError("--mnist needs --data-root or the KD_DATA environment variable")
        y = load_mnist_labels(root, train=split == "train")
        tasks = [str(i) for i in range(len(y))]
        classes = [str(c) for c in range(10)]
        idx = y
    else:
        gold = crowdio.read_gold(truth)
        if not gold:
            raise KdError(f"{truth}: no true labels")
        tasks = list(gold)
        classes = crowdio.natural_order(gold.values())
        cindex = {c: i for i, c in enumerate(classes)}
        idx = np.array([cindex[gold[t]] for t in tasks])
    if limit is not None:
        tasks, idx = tasks[:limit], idx[:limit]
    n_classes = max(len(classes), 2) if not mnist else 10
    if len(classes) < 2:
        raise KdError("the true labels hold a single class; a wrong label needs at least two")
    crowd = simulate_crowd(np.asarray(idx), n_classes, workers, noise, missing, seed, draw=draw)
    rows = ((tasks[i], f"w{w}", classes[c]) for i, w, c in zip(crowd.items.tolist(), crowd.workers.tolist(), crowd.labels.tolist()))
    if output == "-":
        crowdio.write_long(sys.stdout, rows)
    else:
        with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
            crowdio.write_long(f, rows)
    if truth_out:
        with atomic_path(truth_out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write("task,truth\n")
            for t, c in zip(tasks, np.asarray(idx).tolist()):
                f.write(f"{t},{classes[c]}\n")
    info(f"kd-aggregate simulate: {len(tasks)} items x {workers} workers, noise {noise}, missing {missing}: "
         f"{len(crowd.labels)} labels")


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "simulate":
        sys.argv = [sys.argv[0]] + argv[1:]
        run_app(sim_app, "kd-aggregate simulate")
    else:
        sys.argv = [sys.argv[0]] + argv
        run_app(app, "kd-aggregate")


if __name__ == "__main__":
    main()
