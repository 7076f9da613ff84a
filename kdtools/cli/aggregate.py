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
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import KdError, KdUsageError, counted
from ._common import STOP_HINT, DebugOption, check_paths, file_key, info, make_app, progress_bars, run_app, warn

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
    from ..aggregate.crowdio import normalise_label

    # read like the labels themselves, so --classes 1.0,2.0 fixes the classes a file's 1.0 and 2.0 are read as
    classes = [normalise_label(c) for c in text.split(",")]
    if not classes or any(not c for c in classes) or len(set(classes)) != len(classes):
        raise KdUsageError("--classes must be a comma-separated list of distinct, non-empty class names "
                           "(whole numbers are read as numbers: 1.0 and 1 are one class)")
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


# ------------------------------------------------------------------------------------------------
# what kd-aggregate and kd-eval aggregation share: the input options and their reader, the checks of
# numbers and paths (one definition, used by both commands)

FormatOption = typer.Option("long", "--format",
                            help="long (task,worker,label rows) | dense (item x worker matrix, -1 = missing).")
DelimiterOption = typer.Option(None, "--delimiter",
                               help="Field separator (default: tab for .tsv or a tab-separated header, else comma; 'tab' works).")
TaskColOption = typer.Option("task", "--task-col", help="Header name of the task column (dense: the header's first cell).")
WorkerColOption = typer.Option("worker", "--worker-col", help="Header name of the worker column.")
LabelColOption = typer.Option("label", "--label-col", help="Header name of the label column.")
SEED_MAX = 2 ** 32 - 1
# the default is crowdio.DEFAULT_INITIAL_SIZE (not imported here: that would load torch for --help; a test
# checks that the two agree)
INITIAL_HELP = ("Tasks in the first chunk (the initial set, from which BiLA-CM starts). Default: 500 (the benchmarks' "
                "setting), or the chunk size if larger; a small initial set makes BiLA-CM much worse.")


@dataclass
class LabelInput:
    """How label files are read: the format, the column names and the separator (None: guessed per file)."""

    fmt: str
    columns: object  # crowdio.Columns
    delimiter: Optional[str]

    def read(self, stream, name: str, classes=None, meta=None):
        from ..aggregate import crowdio

        return crowdio.read_rows(stream, name, self.fmt, self.columns, self.delimiter, classes, meta)

    def read_whole(self, path: str) -> list:
        """Every row of one file, or of stdin for '-' (read whole)."""
        from ..aggregate import crowdio

        if path == "-":
            return list(self.read(_stdin_text(), "<stdin>"))
        with crowdio.open_text(path) as f:
            return list(self.read(f, path))


def label_input(fmt: str, delimiter: Optional[str], task_col: str, worker_col: str, label_col: str) -> LabelInput:
    """The checked input options (usage errors name the flag)."""
    from ..aggregate import crowdio

    if fmt not in ("long", "dense"):
        raise KdUsageError("--format must be long or dense")
    if delimiter is not None:
        delimiter = {"\\t": "\t", "tab": "\t"}.get(delimiter, delimiter)
        if len(delimiter) != 1 or delimiter in "\r\n\"":
            raise KdUsageError("--delimiter must be one character (or 'tab'), not a quote or a line break")
    names = {"--task-col": task_col.strip(), "--worker-col": worker_col.strip(), "--label-col": label_col.strip()}
    for flag, value in names.items():
        if not value:
            raise KdUsageError(f"{flag} must name a column")
    seen: dict[str, str] = {}
    for flag, value in names.items():
        if value in seen and fmt == "long":
            raise KdUsageError(f"{seen[value]} and {flag} both name the column {value!r}; each role needs its own column")
        seen.setdefault(value, flag)
    return LabelInput(fmt, crowdio.Columns(*names.values()), delimiter)


def _stdin_text():
    if sys.stdin is None or sys.stdin.isatty():
        raise KdUsageError("'-' reads labels from standard input, but it is a terminal; pipe a CSV in")
    return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="")


def check_seed(seed: Optional[int]) -> None:
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise KdUsageError(f"--seed must be a whole number from 0 to {SEED_MAX}, not {seed}")


def check_sizes(**sizes: Optional[int]) -> None:
    """Counts that must be at least 1 (``chunk_size=...`` checks --chunk-size)."""
    for key, value in sizes.items():
        if value is not None and value < 1:
            raise KdUsageError(f"--{key.replace('_', '-')} must be >= 1, not {value}"
                               + (" (a chunk holds at least one task)" if key in ("chunk_size", "initial_size") else ""))


def check_number(flag: str, value: Optional[float], low: float, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False) -> None:
    """A float option: finite and in its range, else a usage error naming the flag."""
    if value is None:
        return
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo = f"{'>' if low_open else '>='} {low:g}"
        hi = "" if math.isinf(high) else f" and {'<' if high_open else '<='} {high:g}"
        raise KdUsageError(f"{flag} must be a finite number {lo}{hi}, not {value}")


def check_gold_and_plot(gold: Optional[str], plot: Optional[str]) -> None:
    """The gold file is a file (stdin carries the labels) and the plot's name gives a known image format
    ('-' for the plot is refused by check_paths)."""
    if gold == "-":
        raise KdUsageError("--gold must name a file ('-' is for the labels)")
    if plot and plot != "-":
        from ..figures import image_format

        try:
            image_format(plot)
        except KdUsageError as e:
            raise KdUsageError(f"--plot {e}") from None


def gold_warning(gold_name: str, gold_map: dict, agg) -> Optional[str]:
    """The warning for gold truths that are no class of the labels (None when all are classes)."""
    from ..aggregate import crowdio

    unknown = crowdio.unknown_truths(gold_map, agg.tasks.items, agg.classes.items)
    return crowdio.describe_unknown_truths(gold_name, unknown, agg.classes.items) if unknown else None


# ------------------------------------------------------------------------------------------------


def _chunks(inputs: list[str], spec: LabelInput, chunk_size: Optional[int], first_size: Optional[int], classes=None):
    """Yield (name, source, rows, row_numbers) per chunk (source: the file, or <stdin>); files are read (and checked) whole, stdin is streamed.
    ``row_numbers``: the chunk's task ids are row numbers (a dense file without a header)."""
    from ..aggregate import crowdio

    first = first_size
    for path in inputs:
        meta: dict = {}
        if path == "-":
            rows = spec.read(_stdin_text(), "<stdin>", classes, meta)
            n = 0
            for chunk in crowdio.stream_chunks(rows, chunk_size, first):
                n += 1
                first = None
                yield f"<stdin> chunk {n}", "<stdin>", chunk, meta.get("row_numbers", False)
            if n == 0:
                raise KdError("<stdin>: empty chunk (no labels)")
        else:
            with crowdio.open_text(path) as f:
                rows = list(spec.read(f, path, classes, meta))
            if not rows:
                raise KdError(f"{path}: empty chunk (no labels)")
            groups = crowdio.group_by_task(rows)
            pieces = crowdio.split_groups(groups, chunk_size, first)
            first = None
            for i, chunk in enumerate(pieces):
                yield (path if len(pieces) == 1 else f"{path} chunk {i + 1}"), path, chunk, meta.get("row_numbers", False)


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
    ctx: typer.Context,
    inputs: Optional[List[str]] = typer.Argument(None, help="Label files (task,worker,label), each a chunk; '-' = stdin."),
    state: Optional[str] = typer.Option(None, "--state", help="State file: created when missing, updated when the command succeeds."),
    output: str = typer.Option("-", "-o", "--output", help="Aggregated labels (CSV task,label,confidence); '-' = stdout."),
    method: Optional[str] = typer.Option(None, "--method", "-m",
                                         help="bila | mv | ds | mace; a comma list runs them side by side (labels of the first "
                                              "are written). Default: the --state file's method, else bila."),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", help="Tasks per chunk (stdin: cut the stream; files: split each file)."),
    initial_size: Optional[int] = typer.Option(None, "--initial-size", help=INITIAL_HELP + " Needs --chunk-size."),
    fmt: str = FormatOption,
    delimiter: Optional[str] = DelimiterOption,
    task_col: str = TaskColOption,
    worker_col: str = WorkerColOption,
    label_col: str = LabelColOption,
    classes: Optional[str] = typer.Option(None, "--classes", help="Declare the classes (comma list, in order); other labels are errors."),
    proba: bool = typer.Option(False, "--proba", help="Add one p_<class> column per class (the full posterior). On stdout, a class "
                                                      "first seen after the header is an error: declare them with --classes."),
    confusion: Optional[str] = typer.Option(None, "--confusion", help="Write per-worker confusion matrices to this HDF5 file."),
    gold: Optional[str] = typer.Option(None, "--gold", help="task,truth CSV: report the error rate of what was aggregated so far."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Image of the error rate after each chunk per method (needs --gold); format from the suffix (.png, .svg(z), .pdf, .jpg, .tif), PNG when none."),
    relabel_all: bool = typer.Option(False, "--relabel-all", help="After the inputs, write labels for every task seen so far (BiLA)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for initialisation, batches and random tie-breaks (default 0)."),
    zeta: Optional[float] = typer.Option(None, "--zeta", help="BiLA: weight of the KL term (eq. 2.11; >= 0, default 1.0)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="BiLA: learning rate mu of the optimiser (> 0, default 0.01)."),
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
    STOP_HINT["text"] = ""
    inputs = list(inputs or [])
    spec = label_input(fmt, delimiter, task_col, worker_col, label_col)
    class_list = _parse_classes(classes)
    check_sizes(chunk_size=chunk_size, initial_size=initial_size, max_epochs=max_epochs, batch_size=batch_size)
    check_seed(seed)
    check_number("--lr", lr, 0, low_open=True)
    check_number("--zeta", zeta, 0)
    if initial_size is not None and chunk_size is None:
        raise KdUsageError("--initial-size sets the first chunk of a --chunk-size split: give --chunk-size too "
                           "(without it each file, and all of stdin, is one chunk)")
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
    check_gold_and_plot(gold, plot)
    check_paths({"-o": output, "--confusion": confusion, "--plot": plot, "--state": state},
                {"the label file": inputs, "--gold": [gold]}, stdout_carries="the labels")
    seen_inputs: dict = {}
    for i, p in enumerate(inputs):
        if p != "-" and Path(p).is_file():
            first = seen_inputs.setdefault(file_key(p), i)
            if first != i:
                warn(f"{p} is the same file as {inputs[first]}, given earlier: its labels are aggregated again (each "
                     f"repeated label replaces the earlier one, and its tasks are labelled twice)")
    if method is None:
        # a state keeps one method: without --method, the state's
        from ..aggregate.state import read_metadata

        method = read_metadata(state)["method"] if state and Path(state).exists() else "bila"
    methods = _parse_methods(method)
    if state and len(methods) > 1:
        raise KdUsageError("--state keeps one method's model; give a single --method with --state")
    if relabel_all and methods[0] != "bila":
        raise KdUsageError(f"--relabel-all re-infers every task from BiLA-CM's confusion matrices: not with --method {methods[0]}")
    if relabel_all and not inputs and not state:
        raise KdUsageError("--relabel-all without inputs relabels what a --state file holds: give --state FILE (or label files)")
    if relabel_all and not inputs and not Path(state).exists():
        raise KdError(f"{state}: no such state file, so nothing to relabel (--relabel-all without inputs reads it)")

    from ..aggregate import crowdio
    from ..aggregate.bila import BilaConfig
    from ..aggregate.online import Aggregator
    from ..fileio import atomic_path, writes_in_place

    given_cfg = {"zeta": zeta, "lr": lr, "max_epochs": max_epochs, "batch_size": batch_size, "decision": decision,
                 "step_count": step_count, "seed": seed}
    options = {"method": methods, "chunk_size": chunk_size, "initial_size": initial_size, "format": spec.fmt,
               "classes": class_list, "columns": [spec.columns.task, spec.columns.worker, spec.columns.label], "seed": seed,
               "inputs": inputs, "state": state, "bila": {k: v for k, v in given_cfg.items() if v is not None}}

    if state:
        # from reading the state to saving it, no other run may update it (its update would be lost);
        # released when the command ends in any way (the click context closes even on an error)
        from ..fileio import exclusive_use

        held = ExitStack()
        locked = held.enter_context(exclusive_use(state, "kd-aggregate"))
        ctx.call_on_close(held.close)
        if not locked:
            warn(f"{state}: cannot be locked here (the file system does not support it, or its folder takes no "
                 f"lock file); do not run two kd-aggregate commands on this state at once")

    # the aggregators: one per method, the first one may come from the state file
    aggs: dict[str, Aggregator] = {}
    if state and Path(state).exists():
        from ..aggregate.state import load_state

        agg = load_state(state)
        if agg.method != methods[0]:
            raise KdError(f"{state} holds a {agg.method} state, not {methods[0]}; use --method {agg.method} "
                          f"(or leave --method out) or a new state file")
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
    if initial_size is not None and not fresh:
        warn(f"--initial-size {initial_size} is not used: {state} already holds {main_agg.chunks} chunk(s) (the initial "
             f"set is the first chunk of a new state)")
    first_size = (initial_size or crowdio.default_initial_size(chunk_size)) if fresh else None
    # record what the run used, not only what was typed (the state, --confusion and --plot keep these options)
    options["initial_size"] = first_size
    options["seed"] = main_agg.seed
    if "bila" in aggs:
        options["bila"] = aggs["bila"].config.to_dict()
    allowed = dict.fromkeys(main_agg.classes.items) if main_agg.classes_fixed else None  # ordered, O(1) lookups
    gold_map = crowdio.read_gold(gold, classes=allowed) if gold else None
    if gold_map is not None and not gold_map:
        raise KdError(f"{gold}: no gold labels")
    curves: dict[str, list[tuple[int, float]]] = {m: [] for m in methods}
    timing = {m: 0.0 for m in methods}
    n_chunks = n_rows_out = n_crowd = replaced = 0
    out_name = "stdout" if output == "-" else output
    kept = ([f"{output} is as it was" if Path(output).exists() else f"{output} was not written"] if output != "-" else
            ["the labels of the chunks finished so far went to stdout"])
    if state:
        kept.append(f"the state {state} is as it was" if Path(state).exists() else f"the state {state} was not written")
    STOP_HINT["text"] = "; ".join(kept) + "; run the same command again: it redoes all of its input"

    with ExitStack() as stack:
        if output == "-":
            out = sys.stdout
        else:
            tmp = stack.enter_context(atomic_path(output))
            out = stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
        progress = stack.enter_context(progress_bars(not quiet))
        header_classes: Optional[list[str]] = None  # the p_ columns of the header on stdout
        pending: list = []  # -o FILE with --proba: the chunks' results, written once every class is known
        chunk_iter = _chunks(inputs, spec, chunk_size, first_size, allowed) if inputs else []
        if (output == "-" or writes_in_place(output)) and "-" not in inputs:
            # the labels go out chunk by chunk (stdout, a FIFO): read and check every file before the first one, so
            # that a bad or missing later file sends nothing (stdin alone cannot be read ahead: it streams)
            chunk_iter = list(chunk_iter)
        warned_row_numbers: set = set()
        state_chunks = main_agg.chunks
        for name, source, rows, row_numbers in chunk_iter:
            if row_numbers and source not in warned_row_numbers:
                # a dense file without a header numbers its tasks 0, 1, ...: so does every such file
                held = [r[0] for r in rows if r[0] in main_agg.tasks.index]
                if held:
                    warned_row_numbers.add(source)
                    where = (f"the state {state}" if n_chunks == 0 else
                             f"the state {state} or an earlier file" if state_chunks else "an earlier file")
                    warn(f"{source}: a dense file without a header: its task ids are row numbers, and task "
                         f"{held[0]!r} (and others) is already held by {where}: their labels are merged (same worker: "
                         f"the later label wins); give the file a header {spec.columns.task},<worker ids> with real task "
                         f"ids to keep them apart")
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
            n_crowd += len(rows)
            replaced += res.replaced
            if res.new_classes and main_agg.chunks > 1:
                warn(f"{name}: new classes {', '.join(res.new_classes)}; the model grew to {len(res.classes)} classes")
            if not relabel_all:
                if proba and output != "-" and not main_agg.classes_fixed:
                    # classes may still grow: the file gets one header with every class (see below); with fixed
                    # classes the chunks stream to the file as they come, holding nothing in memory
                    pending.append(res)
                else:
                    if proba and header_classes is not None and res.classes != header_classes:
                        new = [c for c in res.classes if c not in header_classes]
                        raise KdError(f"{name}: new class(es) {', '.join(new)} after the --proba header went to stdout with "
                                      f"the classes {','.join(header_classes)}; declare every class with --classes "
                                      f"(or write to -o FILE, which gets columns for every class)")
                    crowdio.write_labels(out, res.tasks, res.labels, res.confidence, res.proba if proba else None,
                                         res.classes, header=header_classes is None)
                    header_classes = list(res.classes)
                    if output == "-":
                        out.flush()
                n_rows_out += len(res.tasks)
            if verbose:
                line = f"{name}: {counted(len(res.tasks), 'task')}, {counted(res.n_labels, 'label')}"
                if res.replaced:
                    line += f", {res.replaced} repeated labels replaced"
                if gold_map is not None and curves[methods[0]]:
                    line += "; error so far " + ", ".join(f"{m} {100 * curves[m][-1][1]:.2f} %" for m in methods if curves[m])
                info(line)
        if pending:
            # -o FILE with --proba: one header with every class; a class the model did not have yet when a chunk
            # was aggregated has probability 0 for that chunk's tasks (classes are only ever appended)
            final = pending[-1].classes
            for i, res in enumerate(pending):
                p = res.proba
                if p.shape[1] < len(final):
                    import numpy as np

                    p = np.pad(p, ((0, 0), (0, len(final) - p.shape[1])))
                crowdio.write_labels(out, res.tasks, res.labels, res.confidence, p, final, header=i == 0)
            header_classes = list(final)
        if relabel_all:
            res = main_agg.relabel_all()
            crowdio.write_labels(out, res.tasks, res.labels, res.confidence, res.proba if proba else None, res.classes)
            n_rows_out = len(res.tasks)
            header_classes = list(res.classes)
        if header_classes is None:
            crowdio.write_labels(out, [], [], [], None, [])
        if output != "-":
            out.flush()
        # the side files before the labels are committed (leaving this block renames -o into place): a
        # side file that cannot be written leaves a previous -o, like the state, untouched
        n_gold = aggs[methods[0]].error_rate(gold_map)[1] if gold_map is not None else 0
        if gold_map is not None and n_gold == 0:
            warn(f"no task of {gold} was aggregated ({len(gold_map)} gold tasks, {len(main_agg.tasks)} tasks "
                 f"{'in the state' if state else 'aggregated'}): no error rate" + (f"; {plot} not written" if plot else ""))
        elif gold_map is not None:
            line = gold_warning(gold, gold_map, main_agg)
            if line:
                warn(line)
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
        STOP_HINT["text"] = (f"the labels were written to {out_name}, but the state {state} is as it was (it was being "
                             f"saved); run the same command again: it redoes all of its input")
        from ..aggregate.state import save_state

        save_state(state, main_agg, options)
    STOP_HINT["text"] = ""
    if not quiet:
        # "state:" only when there is one; otherwise the counts are this run's alone
        labels = counted(n_rows_out, "task label") + " written"
        written = (f"{labels} (every task seen so far)" if relabel_all and not n_chunks else
                   labels + (" (every task seen so far)" if relabel_all else "") + f" from {counted(n_crowd, 'crowd label')}")
        msg = (f"kd-aggregate: {counted(n_chunks, 'chunk')}, {written}; "
               + (f"state: {counted(main_agg.chunks, 'chunk')}, " if state else "")
               + f"{counted(len(main_agg.tasks), 'task')}, {counted(len(main_agg.workers), 'worker')}, "
               + counted(len(main_agg.classes), "class", "classes"))
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

    STOP_HINT["text"] = ""
    if (truth is None) == (not mnist):
        raise KdUsageError("give exactly one of --truth CSV or --mnist")
    if split not in ("train", "test"):
        raise KdUsageError("--split must be train or test")
    check_number("--noise", noise, 0, 1)
    check_number("--missing", missing, 0, 1, high_open=True)
    check_seed(seed)
    check_paths({"-o": output, "--truth-out": truth_out}, {"--truth": [truth]}, stdout_carries="the labels")
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
    files = [f for f in (output if output != "-" else None, truth_out) if f]
    STOP_HINT["text"] = (f"{' and '.join(files)} {'is' if len(files) == 1 else 'are'} as before (nothing was renamed into "
                         f"place); run the same command again") if files else ""
    with ExitStack() as stack:  # both files are renamed into place only when both were written
        if truth_out:
            with open(stack.enter_context(atomic_path(truth_out)), "w", encoding="utf-8", newline="") as f:
                f.write("task,truth\n")
                for t, c in zip(tasks, np.asarray(idx).tolist()):
                    f.write(f"{t},{classes[c]}\n")
        if output == "-":
            crowdio.write_long(sys.stdout, rows)
        else:
            with open(stack.enter_context(atomic_path(output)), "w", encoding="utf-8", newline="") as f:
                crowdio.write_long(f, rows)
    STOP_HINT["text"] = ""
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
