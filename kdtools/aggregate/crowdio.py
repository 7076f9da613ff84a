"""Reading crowd labels: long CSV/TSV (``task,worker,label``) and the dense item x worker matrix.

Everything here works on plain strings: ids and labels are kept exactly as written (after
stripping surrounding blanks), so ``"007"`` and ``"7"`` are different workers. The numeric
vocabularies are built by :mod:`kdtools.aggregate.online`.

Rules (documented in docs/kd-aggregate.md):

* A label row is ``(task, worker, label)``. A label cell that is empty or reads NaN/NA/null/None
  is an error (a crowd label cannot be missing in the long format; leave the row out instead).
* Labels (long and dense alike) and gold truths are read by :func:`normalise_label`: a whole number
  is read as that number (``1.0``, ``01``, ``+1`` are all ``1``), anything else is kept as written.
  Task and worker ids are never rewritten.
* Repeated ``(task, worker)`` pairs: **the last label wins** (the order of the input), inside a chunk
  and across chunks; the number of replaced labels is reported.
* Dense matrix: one row per item, one column per worker, ``-1`` (or an empty cell) for a missing
  label. With a header whose first cell is the task column name, the first column holds the task
  ids and the other header cells the worker ids; without it, tasks are the 0-based row numbers of
  the file and workers the 0-based column numbers. A first line that looks like a header but does
  not start with the task column name is refused (:func:`_refuse_likely_header`), never read as
  labels.
* Chunks count *tasks*: a file is one chunk (or, with ``chunk_size``, its tasks in order of first
  appearance are split into chunks of that many tasks, each task with all its labels of that file);
  a stream (stdin) is cut when a new task would make the chunk exceed ``chunk_size`` tasks. A task
  seen again after its chunk was closed goes into the current chunk and is merged with the labels
  stored for it.
"""

from __future__ import annotations

import csv
import io
import math
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Collection, Iterable, Iterator, Optional, Sequence

from ..errors import KdError, KdUsageError

Row = tuple  # (task, worker, label) as strings

# labels that mean "no label" (case-insensitive) and are refused with the line named, unless --classes declares
# the word as a class (a data set whose classes include "None" or "NA")
MISSING_WORDS = {"", "nan", "na", "n/a", "null", "none"}

# a dense file without a header: this many lines after the first are read ahead to tell a header line
# from a row of labels
DENSE_LOOKAHEAD = 1000

# the initial set (the paper's L*) when none is given: the benchmarks' setting (docs/aggregate-benchmarks.md);
# a chunk larger than this is the initial set itself
DEFAULT_INITIAL_SIZE = 500

_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+(\.0*)?")
# a number in exponent notation (numpy's savetxt default, 3.000000000000000000e+00): a whole number when its value is one
_EXPONENT_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)[eE][+-]?[0-9]+")


def default_initial_size(chunk_size: Optional[int]) -> Optional[int]:
    """The initial set used when none is given: ``DEFAULT_INITIAL_SIZE`` tasks, or the chunk size if larger
    (None without a chunk size: nothing is split)."""
    return None if chunk_size is None else max(chunk_size, DEFAULT_INITIAL_SIZE)


def normalise_label(value: str) -> str:
    """A label or gold truth as the aggregators see it: a whole number is read as that number (``1.0``,
    ``01``, ``+1`` -> ``1``; ``-0`` -> ``0``), anything else (``1.5``, ``cat``) is kept as written (stripped).
    Exponent notation counts too (``3.000000000000000000e+00``, numpy's ``savetxt`` default, -> ``3``).
    The same rule for the long and the dense format and for the gold file."""
    v = value.strip()
    if _WHOLE_NUMBER.fullmatch(v):
        return str(int(v.split(".")[0]))
    if _EXPONENT_NUMBER.fullmatch(v):
        f = float(v)
        if math.isfinite(f) and f == int(f) and abs(f) < 2 ** 53:  # exactly a whole number: read as that number
            return str(int(f))
    return v


def _delimiter_hint(first_line: str, delim: str) -> str:
    """Advice for a header that did not split: it holds another likely separator and not the one used."""
    if delim in first_line:
        return ""
    # a comma comes first: a .tsv file (read with tabs) whose lines are comma-separated is a common mix-up
    for sep, word in ((",", "','"), (";", "';'"), ("\t", "tab"), ("|", "'|'")):
        if sep in first_line:
            return f"; the header line looks {word}-separated: give --delimiter {word}"
    return ""


def _class_check(classes, label: str, task: str, worker: str, name: str, lineno: int) -> None:
    if classes is not None and label not in classes:
        items = list(classes)
        known = ", ".join(items[:10]) + (" ..." if len(items) > 10 else "")
        raise KdError(f"{name}:{lineno}: label {label!r} (task {task!r}, worker {worker!r}) is not one of the fixed "
                      f"classes ({known}; fixed by --classes, now or when the state was made)")


@dataclass
class Columns:
    task: str = "task"
    worker: str = "worker"
    label: str = "label"


def guess_delimiter(name: str, first_line: str) -> str:
    """Tab for .tsv/.tab files or a header that has tabs and no commas; comma otherwise."""
    lower = name.lower()
    if lower.endswith((".tsv", ".tab", ".tsv.txt")):
        return "\t"
    if "\t" in first_line and "," not in first_line:
        return "\t"
    return ","


def _is_missing_word(value: str, classes: Optional[Collection[str]] = None) -> bool:
    """Whether a label means "no label" (one of MISSING_WORDS), unless it is one of the declared ``classes``."""
    v = value.strip()
    return v.lower() in MISSING_WORDS and not (classes is not None and v in classes)


def _missing_advice(value: str) -> str:
    return "" if not value.strip() else f" (or, if {value.strip()!r} is a class, declare every class with --classes)"


def _records(reader, name: str, first_line: int) -> Iterator[tuple[int, list[str]]]:
    """``(line, fields)`` for each record of a ``csv.reader``; ``line`` is the line of the file where the
    record *starts* (``first_line`` is the file line of the reader's first line). A quoting error is
    reported at the line where the broken record starts, not at the last good one (a quote left
    open swallows every following line, so the reader only notices at the end of the data)."""
    while True:
        start = first_line + reader.line_num  # the lines consumed so far; the next record starts after them
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise KdError(f"{name}:{start}: malformed line: {e}") from None
        yield start, fields


def read_long(stream: IO[str], name: str, columns: Columns = Columns(),
              delimiter: Optional[str] = None, classes: Optional[Collection[str]] = None,
              meta: Optional[dict] = None) -> Iterator[Row]:
    """Yield ``(task, worker, label)`` from a long CSV/TSV with a header; raise KdError on a bad line
    (with ``classes``, a label outside them is one, reported at its line)."""
    first = stream.readline()
    if not first.strip():
        raise KdError(f"{name}: empty input (no header line)")
    delim = delimiter or guess_delimiter(name, first)
    header = next(csv.reader([first], delimiter=delim))
    header = [h.strip().lstrip("\ufeff") for h in header]
    try:
        ti, wi, li = (header.index(columns.task), header.index(columns.worker), header.index(columns.label))
    except ValueError:
        raise KdError(f"{name}: the header must name the columns {columns.task!r}, {columns.worker!r} and "
                      f"{columns.label!r} (found {', '.join(repr(h) for h in header)}); "
                      f"set --task-col/--worker-col/--label-col{_delimiter_hint(first, delim)}") from None
    width = len(header)
    reader = csv.reader(stream, delimiter=delim, strict=True)
    try:
        for lineno, fields in _records(reader, name, first_line=2):
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line
            if len(fields) != width:
                raise KdError(f"{name}:{lineno}: malformed line: expected {width} fields, found {len(fields)}")
            task, worker, label = fields[ti].strip(), fields[wi].strip(), fields[li].strip()
            if not task:
                raise KdError(f"{name}:{lineno}: empty task id")
            if not worker:
                raise KdError(f"{name}:{lineno}: empty worker id")
            if _is_missing_word(label, classes):
                raise KdError(f"{name}:{lineno}: the label of task {task!r} by worker {worker!r} is missing "
                              f"({label or 'empty'}); drop the row instead{_missing_advice(label)}")
            label = normalise_label(label)
            _class_check(classes, label, task, worker, name, lineno)
            yield (task, worker, label)
    except UnicodeDecodeError as e:
        raise KdError(f"{name}: not a text file ({e.reason})") from None


def _dense_value(cell: str, name: str, lineno: int, classes: Optional[Collection[str]] = None) -> Optional[str]:
    v = cell.strip()
    if v == "" or v == "-1":
        return None
    if _is_missing_word(v, classes):
        raise KdError(f"{name}:{lineno}: a cell reads {v!r}; write -1 (or leave it empty) for a missing label"
                      f"{_missing_advice(v)}")
    if classes is not None and v in classes:
        return v
    try:
        f = float(v)
    except ValueError:
        return v
    if math.isnan(f):
        raise KdError(f"{name}:{lineno}: a cell reads {v!r}; write -1 for a missing label")
    if f == -1:
        return None
    return normalise_label(v)


def read_dense(stream: IO[str], name: str, columns: Columns = Columns(),
               delimiter: Optional[str] = None, classes: Optional[Collection[str]] = None,
               meta: Optional[dict] = None) -> Iterator[Row]:
    """Yield label rows from an item x worker matrix (-1 or empty = no label).

    ``meta``, when given, receives ``row_numbers``: True when the file has no header, so its task ids
    are the row numbers (the same ids in every such file)."""
    first = stream.readline()
    if not first.strip():
        raise KdError(f"{name}: empty input")
    delim = delimiter or guess_delimiter(name, first)
    if delim == "," and "," not in first and (" " in first.strip()):
        delim = " "
    split = (lambda line: line.split()) if delim == " " else (lambda line: next(csv.reader([line], delimiter=delim, strict=True)))
    try:
        cells = [c.strip() for c in split(first.rstrip("\r\n"))]
    except csv.Error as e:
        raise KdError(f"{name}:1: malformed line: {e}") from None
    if delimiter is None and len(cells) == 1 and _delimiter_hint(first, delim):
        raise KdError(f"{name}:1: one field per line with the separator {delim!r}{_delimiter_hint(first, delim)}")
    has_header = bool(cells) and cells[0].lstrip("\ufeff") == columns.task
    pending: list[str] = []
    if has_header:
        workers = cells[1:]
        if len(set(workers)) != len(workers):
            raise KdError(f"{name}:1: repeated worker ids in the header")
    else:
        workers = [str(j) for j in range(len(cells))]
        # read ahead: a header line that does not start with the task column name must not become a task. Only a
        # line that could be a header (its label cells all different) costs a read-ahead, so a stream of label
        # rows is not held back
        if _could_be_header(cells):
            for line in stream:
                pending.append(line)
                if len(pending) >= DENSE_LOOKAHEAD:
                    break
            _refuse_likely_header(cells, pending, split, name, columns)
        pending.insert(0, first)
    if meta is not None:
        meta["row_numbers"] = not has_header
    width = len(cells)
    row_index = 0

    def lines() -> Iterator[tuple[int, str]]:
        n = 1 if has_header else 0
        for line in pending:
            n += 1
            yield n, line
        for line in stream:
            n += 1
            yield n, line

    lineno = 1
    try:
        for lineno, line in lines():
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = split(line)
            if len(fields) != width:
                raise KdError(f"{name}:{lineno}: malformed line: expected {width} fields, found {len(fields)}")
            if has_header:
                task = fields[0].strip()
                if not task:
                    raise KdError(f"{name}:{lineno}: empty task id")
                values = fields[1:]
            else:
                task = str(row_index)
                values = fields
            row_index += 1
            for worker, cell in zip(workers, values):
                label = _dense_value(cell, name, lineno, classes)
                if label is not None:
                    _class_check(classes, label, task, worker, name, lineno)
                    yield (task, worker, label)
    except csv.Error as e:
        raise KdError(f"{name}:{lineno}: malformed line: {e}") from None
    except UnicodeDecodeError as e:
        raise KdError(f"{name}: not a text file ({e.reason})") from None


def _could_be_header(cells: list[str]) -> bool:
    """A first line whose cells after the first (missing labels aside) are at least two and all different."""
    values = [c for c in cells[1:] if c and c != "-1"]
    return len(values) >= 2 and len(set(values)) == len(values)


def _refuse_likely_header(cells: list[str], following: list[str], split, name: str, columns: Columns) -> None:
    """Refuse a first line that is a header in all but name (``item,w1,w2,...`` or the worker ids alone).

    A row of labels repeats classes (more workers than classes) and uses the classes of the other rows;
    a header names each worker once. So the first line is taken for a header when its cells after the
    first (the first column may hold task ids, in the header as in the rows) are all different (at least
    two of them) and more than half of them never occur in those columns of the lines after it (up to
    ``DENSE_LOOKAHEAD`` of them)."""
    values = [c for c in cells[1:] if c and c != "-1"]
    if not _could_be_header(cells) or not following:
        return
    seen: set[str] = set()
    for line in following:
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            fields = split(line)
        except csv.Error:
            return  # the reader reports the line itself
        seen.update(normalise_label(f) for f in fields[1:])
    if not seen:
        return
    unseen = [v for v in values if normalise_label(v) not in seen]
    if 2 * len(unseen) <= len(values):
        return
    examples = ", ".join(unseen[:3]) + (" ..." if len(unseen) > 3 else "")
    first = cells[0].lstrip("\ufeff")
    named = bool(first) and not _WHOLE_NUMBER.fullmatch(first)  # a name, not a label: likely the task column's
    raise KdError(f"{name}:1: the first line looks like a header, not labels ({len(unseen)} of its {len(values)} worker "
                  f"cells, e.g. {examples}, never occur as a label below it), but a dense header starts with the task "
                  f"column name {columns.task!r}: " + (f"give --task-col {first} if its first column holds the task "
                  f"ids, or " if named else "") +
                  f"write the header as {columns.task},<worker ids> (or remove the line: without a header, tasks are "
                  f"row numbers and workers column numbers)")


def read_rows(stream: IO[str], name: str, fmt: str = "long", columns: Columns = Columns(),
              delimiter: Optional[str] = None, classes: Optional[Collection[str]] = None,
              meta: Optional[dict] = None) -> Iterator[Row]:
    """Label rows of a long or dense file. ``classes``: the allowed labels (another label is an error at
    its line); ``meta``: filled by the reader (dense: ``row_numbers``)."""
    if fmt not in ("long", "dense"):
        raise KdUsageError(f"unknown input format {fmt!r} (expected long or dense)")
    return _text_only(read_long if fmt == "long" else read_dense, stream, name, columns, delimiter, classes, meta)


def _text_only(reader, stream: IO[str], name: str, columns: Columns, delimiter: Optional[str], classes=None,
               meta=None) -> Iterator[Row]:
    """The reader's rows; a binary file (an HDF5 log given by mistake, say) is one clear error, not a codec's."""
    try:
        yield from reader(stream, name, columns, delimiter, classes, meta)
    except UnicodeDecodeError as e:
        raise KdError(f"{name}: not a UTF-8 text file (byte 0x{e.object[e.start]:02x} cannot be decoded); expected "
                      "CSV/TSV text with task, worker and label columns") from None


def open_text(path: str | os.PathLike) -> IO[str]:
    try:
        return open(path, "r", encoding="utf-8", newline="")
    except FileNotFoundError:
        raise KdError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise KdError(f"{path}: is a directory") from None
    except PermissionError:
        raise KdError(f"{path}: permission denied") from None


def group_by_task(rows: Iterable[Row]) -> list[list[Row]]:
    """Rows grouped per task, tasks in order of first appearance, rows in input order."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row[0], []).append(row)
    return list(groups.values())


def _check_sizes(chunk_size: Optional[int], first_size: Optional[int]) -> None:
    for what, value in (("chunk_size", chunk_size), ("first_size", first_size)):
        if value is None:
            continue
        try:
            ok = operator.index(value) >= 1
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{what} must be a whole number of tasks >= 1 (or None), not {value!r}")


def split_groups(groups: Sequence[list[Row]], chunk_size: Optional[int],
                 first_size: Optional[int] = None) -> list[list[Row]]:
    """Cut task groups into chunks of ``chunk_size`` tasks (the first one ``first_size``).

    ``chunk_size`` None: one chunk holding everything (offline). A size below 1 is refused
    (ValueError): a zero or negative step would never reach the end of the groups."""
    _check_sizes(chunk_size, first_size)
    if not groups:
        return []
    if chunk_size is None:
        return [[r for g in groups for r in g]]
    chunks = []
    start = 0
    size = first_size or chunk_size
    while start < len(groups):
        chunks.append([r for g in groups[start:start + size] for r in g])
        start += size
        size = chunk_size
    return chunks


def stream_chunks(rows: Iterable[Row], chunk_size: Optional[int],
                  first_size: Optional[int] = None) -> Iterator[list[Row]]:
    """Cut a stream into chunks of at most ``chunk_size`` distinct tasks, in arrival order.

    A chunk is closed when a task not in it arrives and it already holds ``chunk_size`` tasks, so a
    stream grouped by task gives the same chunks as :func:`split_groups` on the whole file.
    Sizes as for :func:`split_groups` (None: one chunk; below 1: ValueError, raised at the call).
    """
    _check_sizes(chunk_size, first_size)
    return _stream_chunks(rows, chunk_size, first_size)


def _stream_chunks(rows: Iterable[Row], chunk_size: Optional[int], first_size: Optional[int]) -> Iterator[list[Row]]:
    if chunk_size is None:
        rows = list(rows)
        if rows:
            yield rows
        return
    size = first_size or chunk_size
    chunk: list[Row] = []
    tasks: set = set()
    for row in rows:
        if row[0] not in tasks and len(tasks) >= size:
            yield chunk
            chunk, tasks = [], set()
            size = chunk_size
        tasks.add(row[0])
        chunk.append(row)
    if chunk:
        yield chunk


def dedupe(rows: Sequence[Row]) -> tuple[list[Row], int]:
    """Keep the last label of each (task, worker) pair; return the rows (first-appearance order) and
    the number of labels replaced."""
    last: dict[tuple[str, str], str] = {}
    for task, worker, label in rows:
        last[(task, worker)] = label
    return [(t, w, l) for (t, w), l in last.items()], len(rows) - len(last)


def read_gold(path: str | os.PathLike, task_col: str = "task", truth_col: str = "truth",
              delimiter: Optional[str] = None, classes: Optional[Collection[str]] = None) -> dict[str, str]:
    """Read ``task,truth`` (the second column is used when no column is named ``truth``).

    Truths are read as labels are (:func:`normalise_label`: ``3.0`` is ``3``). A task without gold is
    left out of the file; an empty (or NaN) truth, an empty task id and a task given two different
    truths are errors naming the line. A truth that is one of the declared ``classes`` is never "missing"."""
    name = str(path)
    try:  # around everything: the decoder reads ahead, so a bad byte can surface at the header line
        return _read_gold(path, name, task_col, truth_col, delimiter, classes)
    except UnicodeDecodeError as e:
        raise KdError(f"{name}: not a UTF-8 text file (byte 0x{e.object[e.start]:02x} cannot be decoded)") from None


def _read_gold(path, name: str, task_col: str, truth_col: str, delimiter: Optional[str],
               classes: Optional[Collection[str]] = None) -> dict[str, str]:
    with open_text(path) as f:
        first = f.readline()
        if not first.strip():
            raise KdError(f"{name}: empty gold file")
        delim = delimiter or guess_delimiter(name, first)
        header = [h.strip().lstrip("\ufeff") for h in next(csv.reader([first], delimiter=delim))]
        if task_col not in header:
            raise KdError(f"{name}: the gold file needs a {task_col!r} column (found {', '.join(header)})"
                          f"{_delimiter_hint(first, delim)}")
        ti = header.index(task_col)
        if truth_col in header:
            gi = header.index(truth_col)
        else:
            others = [i for i in range(len(header)) if i != ti]
            if len(others) != 1:
                raise KdError(f"{name}: no {truth_col!r} column in the gold file")
            gi = others[0]
        gold: dict[str, str] = {}
        where: dict[str, int] = {}
        reader = csv.reader(f, delimiter=delim, strict=True)  # broken quoting is an error, as in the labels
        for lineno, fields in _records(reader, name, first_line=2):
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if len(fields) != len(header):
                raise KdError(f"{name}:{lineno}: malformed line: expected {len(header)} fields, found {len(fields)}")
            task, truth = fields[ti].strip(), fields[gi].strip()
            if not task:
                raise KdError(f"{name}:{lineno}: empty task id")
            if _is_missing_word(truth, classes):
                raise KdError(f"{name}:{lineno}: the truth of task {task!r} is missing ({truth or 'empty'}); "
                              f"leave a task without gold out of the gold file{_missing_advice(truth)}")
            truth = normalise_label(truth)
            if task in gold and gold[task] != truth:
                raise KdError(f"{name}:{lineno}: task {task!r} has the truth {truth!r} here and {gold[task]!r} on "
                              f"line {where[task]}; give each task one truth")
            gold[task] = truth
            where.setdefault(task, lineno)
    return gold


def unknown_truths(gold: dict[str, str], tasks: Iterable[str], classes: Collection[str]) -> dict[str, int]:
    """Truth values of the gold tasks among ``tasks`` that are none of ``classes``, with their counts (such
    tasks can only count as errors: a truth written otherwise than the labels, say)."""
    known = set(classes)
    out: dict[str, int] = {}
    for t in tasks:
        truth = gold.get(t)
        if truth is not None and truth not in known:
            out[truth] = out.get(truth, 0) + 1
    return out


def describe_unknown_truths(gold_name: str, unknown: dict[str, int], classes: Sequence[str]) -> str:
    """The warning line for :func:`unknown_truths`."""
    n = sum(unknown.values())
    vals = ", ".join(repr(v) for v in list(unknown)[:5]) + (" ..." if len(unknown) > 5 else "")
    cls = ", ".join(list(classes)[:10]) + (" ..." if len(classes) > 10 else "")
    return (f"{n} gold task(s) of {gold_name} have a truth that is no class of the labels ({vals}; the classes are "
            f"{cls}): they count as errors; write the truth as the labels are written")


def write_labels(out: IO[str], task_ids: Sequence[str], labels: Sequence[str], confidence: Sequence[float],
                 proba=None, classes: Sequence[str] = (), header: bool = True) -> None:
    """Write ``task,label,confidence`` (+ one ``p_<class>`` column per class when ``proba`` is given)."""
    w = csv.writer(out, lineterminator="\n")
    if header:
        w.writerow(["task", "label", "confidence"] + ([f"p_{c}" for c in classes] if proba is not None else []))
    for i, (t, l, c) in enumerate(zip(task_ids, labels, confidence)):
        row = [t, l, f"{c:.6f}"]
        if proba is not None:
            row += [f"{p:.6f}" for p in proba[i]]
        w.writerow(row)


def write_long(out: IO[str], rows: Iterable[Row], columns: Columns = Columns()) -> None:
    w = csv.writer(out, lineterminator="\n")
    w.writerow([columns.task, columns.worker, columns.label])
    for r in rows:
        w.writerow(r)


def read_all(paths: Sequence[str | os.PathLike], fmt: str = "long", columns: Columns = Columns(),
             delimiter: Optional[str] = None) -> list[Row]:
    """Every row of every file (read whole)."""
    rows: list[Row] = []
    for p in paths:
        with open_text(p) as f:
            rows.extend(read_rows(f, str(p), fmt, columns, delimiter))
    return rows


def text_stream(data: str) -> IO[str]:
    return io.StringIO(data)


def natural_order(values: Iterable[str]) -> list[str]:
    """Integers first, in numeric order, then every other value in string order (``10, 2, x`` -> ``2, 10, x``)."""
    def key(v: str):
        try:
            return (0, int(v), v)
        except ValueError:
            return (1, 0, v)
    return sorted(dict.fromkeys(values), key=key)


def path_name(path: str | Path) -> str:
    return "<stdin>" if str(path) == "-" else str(path)
