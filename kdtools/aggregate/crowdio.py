"""Reading crowd labels: long CSV/TSV (``task,worker,label``) and the dense item x worker matrix.

Everything here works on plain strings: ids and labels are kept exactly as written (after
stripping surrounding blanks), so ``"007"`` and ``"7"`` are different workers. The numeric
vocabularies are built by :mod:`kdtools.aggregate.online`.

Rules (documented in docs/kd-aggregate.md):

* A label row is ``(task, worker, label)``. A label cell that is empty or reads NaN/NA/null/None
  is an error (a crowd label cannot be missing in the long format; leave the row out instead).
* Repeated ``(task, worker)`` pairs: **the last label wins** (the order of the input), inside a chunk
  and across chunks; the number of replaced labels is reported.
* Dense matrix: one row per item, one column per worker, ``-1`` (or an empty cell) for a missing
  label. With a header whose first cell is the task column name, the first column holds the task
  ids and the other header cells the worker ids; without it, tasks are the 0-based row numbers of
  the file and workers the 0-based column numbers.
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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator, Optional, Sequence

from ..errors import KdError, KdUsageError

Row = tuple  # (task, worker, label) as strings

MISSING_WORDS = {"", "nan", "na", "n/a", "null", "none"}


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


def _is_missing_word(value: str) -> bool:
    return value.strip().lower() in MISSING_WORDS


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
              delimiter: Optional[str] = None) -> Iterator[Row]:
    """Yield ``(task, worker, label)`` from a long CSV/TSV with a header; raise KdError on a bad line."""
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
                      f"set --task-col/--worker-col/--label-col") from None
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
            if _is_missing_word(label):
                raise KdError(f"{name}:{lineno}: the label of task {task!r} by worker {worker!r} is missing "
                              f"({label or 'empty'}); drop the row instead")
            yield (task, worker, label)
    except UnicodeDecodeError as e:
        raise KdError(f"{name}: not a text file ({e.reason})") from None


def _dense_value(cell: str, name: str, lineno: int) -> Optional[str]:
    v = cell.strip()
    if v == "" or v == "-1":
        return None
    if v.lower() in MISSING_WORDS:
        raise KdError(f"{name}:{lineno}: a cell reads {v!r}; write -1 (or leave it empty) for a missing label")
    try:
        f = float(v)
    except ValueError:
        return v
    if math.isnan(f):
        raise KdError(f"{name}:{lineno}: a cell reads {v!r}; write -1 for a missing label")
    if f == -1:
        return None
    if f.is_integer():
        return str(int(f))
    return v


def read_dense(stream: IO[str], name: str, columns: Columns = Columns(),
               delimiter: Optional[str] = None) -> Iterator[Row]:
    """Yield label rows from an item x worker matrix (-1 or empty = no label)."""
    first = stream.readline()
    if not first.strip():
        raise KdError(f"{name}: empty input")
    delim = delimiter or guess_delimiter(name, first)
    if delim == "," and "," not in first and (" " in first.strip()):
        delim = " "
    split = (lambda line: line.split()) if delim == " " else (lambda line: next(csv.reader([line], delimiter=delim, strict=True)))
    cells = [c.strip() for c in split(first.rstrip("\r\n"))]
    has_header = bool(cells) and cells[0].lstrip("\ufeff") == columns.task
    if has_header:
        workers = cells[1:]
        if len(set(workers)) != len(workers):
            raise KdError(f"{name}:1: repeated worker ids in the header")
        width = len(cells)
        pending: list[str] = []
    else:
        workers = [str(j) for j in range(len(cells))]
        width = len(cells)
        pending = [first]
    row_index = 0

    def lines() -> Iterator[tuple[int, str]]:
        n = 1
        for line in pending:
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
                label = _dense_value(cell, name, lineno)
                if label is not None:
                    yield (task, worker, label)
    except csv.Error as e:
        raise KdError(f"{name}:{lineno}: malformed line: {e}") from None
    except UnicodeDecodeError as e:
        raise KdError(f"{name}: not a text file ({e.reason})") from None


def read_rows(stream: IO[str], name: str, fmt: str = "long", columns: Columns = Columns(),
              delimiter: Optional[str] = None) -> Iterator[Row]:
    if fmt not in ("long", "dense"):
        raise KdUsageError(f"unknown input format {fmt!r} (expected long or dense)")
    return _text_only(read_long if fmt == "long" else read_dense, stream, name, columns, delimiter)


def _text_only(reader, stream: IO[str], name: str, columns: Columns, delimiter: Optional[str]) -> Iterator[Row]:
    """The reader's rows; a binary file (an HDF5 log given by mistake, say) is one clear error, not a codec's."""
    try:
        yield from reader(stream, name, columns, delimiter)
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
              delimiter: Optional[str] = None) -> dict[str, str]:
    """Read ``task,truth`` (the second column is used when no column is named ``truth``)."""
    name = str(path)
    try:  # around everything: the decoder reads ahead, so a bad byte can surface at the header line
        return _read_gold(path, name, task_col, truth_col, delimiter)
    except UnicodeDecodeError as e:
        raise KdError(f"{name}: not a UTF-8 text file (byte 0x{e.object[e.start]:02x} cannot be decoded)") from None


def _read_gold(path, name: str, task_col: str, truth_col: str, delimiter: Optional[str]) -> dict[str, str]:
    with open_text(path) as f:
        first = f.readline()
        if not first.strip():
            raise KdError(f"{name}: empty gold file")
        delim = delimiter or guess_delimiter(name, first)
        header = [h.strip().lstrip("\ufeff") for h in next(csv.reader([first], delimiter=delim))]
        if task_col not in header:
            raise KdError(f"{name}: the gold file needs a {task_col!r} column (found {', '.join(header)})")
        ti = header.index(task_col)
        if truth_col in header:
            gi = header.index(truth_col)
        else:
            others = [i for i in range(len(header)) if i != ti]
            if len(others) != 1:
                raise KdError(f"{name}: no {truth_col!r} column in the gold file")
            gi = others[0]
        gold: dict[str, str] = {}
        reader = csv.reader(f, delimiter=delim, strict=True)  # broken quoting is an error, as in the labels
        for lineno, fields in _records(reader, name, first_line=2):
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if len(fields) != len(header):
                raise KdError(f"{name}:{lineno}: malformed line: expected {len(header)} fields, found {len(fields)}")
            truth = fields[gi].strip()
            if _is_missing_word(truth):
                continue  # a task without gold
            gold[fields[ti].strip()] = truth
    return gold


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


def read_all(paths: Sequence[str | os.PathLike], fmt: str = "long", columns: Columns = Columns()) -> list[Row]:
    """Convenience for scripts and tests: every row of every file."""
    rows: list[Row] = []
    for p in paths:
        with open_text(p) as f:
            rows.extend(read_rows(f, str(p), fmt, columns))
    return rows


def text_stream(data: str) -> IO[str]:
    return io.StringIO(data)


def natural_order(values: Iterable[str]) -> list[str]:
    """Integers in numeric order when every value is an integer, otherwise string order."""
    vals = list(dict.fromkeys(values))
    try:
        return sorted(vals, key=lambda v: (int(v), v))
    except ValueError:
        return sorted(vals)


def path_name(path: str | Path) -> str:
    return "<stdin>" if str(path) == "-" else str(path)
