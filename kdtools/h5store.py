"""HDF5 sample sets and query logs: the one module that owns their layout.

A sample file holds rows of queries and, where known, their answers. A query log is the same layout
written by ``kd-query`` (or any attack) with the oracle's identity and budget accounting added.

  /x              (N, C, H, W)  uint8 for 8-bit images (0..255 meaning [0, 1]), else float32
  /label          (N,)          int64         hard labels              } whichever the response
  /probs          (N, K)        float32       probabilities            } mode produced; a labelled
  /logits         (N, K)        float32       logits                   } dataset has /label
  /topk_index     (N, k)        int64, /topk_value (N, k) float32
  /batch_start    (M,)          int64         first row of each appended batch
  /batch_rows     (M,)          int64         rows in it
  /batch_time     (M,)          float64       unix time it was written
  attributes: kdtools.format ("samples"), kdtools.schema, kdtools.version, kind ("queries"|"samples"),
  fields (JSON, per-row dtype/shape), num_classes, value_range, mode, extra (JSON: resolved options),
  oracle (identity: "sha256:..." of a model file, "ensemble:sha256:...,sha256:..." of an ensemble, or a URL), budget (-1 when unlimited;
  the cap a resumed run keeps to unless it is given a new one: ``SampleWriter(budget=None)`` leaves it as
  recorded) and spent (oracle calls paid for, probes included; always >= rows).

Datasets are chunked and resizable; every append is flushed, so a killed writer loses at most the batch
in flight. Budget accounting is persisted *before* the oracle is called (``reserve``), so a crash can waste
queries but never overspend.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator, Optional

import h5py
import numpy as np
import torch

from . import __version__
from .errors import KdError
from .fileio import sniff
from .stream import DTYPES, StreamHeader, dtype_name

H5_SCHEMA = "1"
READ_CHUNK = 4096


def _check_ours(f: h5py.File, path) -> None:
    if f.attrs.get("kdtools.format") != "samples":
        raise KdError(f"{path}: an HDF5 file, but not a kdtools sample set or query log")
    if str(f.attrs.get("kdtools.schema")) != H5_SCHEMA:
        raise KdError(f"{path}: HDF5 schema {f.attrs.get('kdtools.schema')} (kdtools {f.attrs.get('kdtools.version')}) "
                      f"is not supported by kdtools {__version__}")


def _open(path, mode: str) -> h5py.File:
    path = Path(path)
    if mode == "r" and not path.is_file():
        raise KdError(f"{path}: no such file")
    if path.exists() and sniff(path) != "hdf5":
        raise KdError(f"{path}: not an HDF5 file")
    try:
        return h5py.File(path, mode)
    except OSError as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "unable to lock file" in why:
            # the writer (kd-query, kd-gen-queries) holds HDF5's file lock until it closes the log
            raise KdError(f"{path}: another process has it open for writing (HDF5 locks the file); try again when "
                          f"that run has ended or been stopped (h5py: {why})") from None
        if "truncated file" in why:
            # h5py says "Unable to synchronously open file (truncated file: eof = ..., stored_eof = ...)"
            raise KdError(f"{path}: truncated HDF5 file (cut short by a full disk or an interrupted copy?); kdtools "
                          f"cannot read it or append to it: move it aside (h5py: {why})") from None
        if mode != "r" and not path.exists():
            reason = os.strerror(e.errno) if e.errno else why
            raise KdError(f"{path}: cannot create the HDF5 file ({reason})") from None
        raise KdError(f"{path}: unreadable HDF5 file ({why})") from None


def read_header(path) -> StreamHeader:
    with _open(path, "r") as f:
        _check_ours(f, path)
        return _header_from_attrs(f)


def read_end(path) -> dict:
    """How a samples file ended: {"status": "complete", ...} unless its writer recorded an early stop (mark_end),
    in the form of a stream's end record."""
    with _open(path, "r") as f:
        return {"status": str(f.attrs.get("end_status", "complete")), "message": str(f.attrs.get("end_message", ""))}


def _header_from_attrs(f: h5py.File) -> StreamHeader:
    a = f.attrs
    return StreamHeader(kind=str(a["kind"]), fields=json.loads(a["fields"]),
                        num_classes=int(a["num_classes"]) if int(a["num_classes"]) >= 0 else None,
                        value_range=tuple(json.loads(a["value_range"])), mode=str(a["mode"]),
                        extra=json.loads(a["extra"]), version=str(a["kdtools.version"]))


def _committed_rows(f: h5py.File, fields) -> int:
    """Rows of complete batches. ``append`` writes the fields first and the batch index last, so a writer
    stopped mid-batch (kill -9, an exception between two fields) leaves fields longer than the index says:
    those tail rows were never committed. Files without a batch index count their x rows."""
    if "batch_start" not in f or "batch_rows" not in f:
        return int(f["x"].shape[0])
    m = min(f["batch_start"].shape[0], f["batch_rows"].shape[0])
    if m == 0:
        return 0
    n = int(f["batch_start"][m - 1]) + int(f["batch_rows"][m - 1])
    short = [name for name in fields if name not in f or f[name].shape[0] < n]
    if short:
        raise KdError(f"{f.filename}: field {short[0]!r} is missing or shorter than its batch index (damaged file)")
    return n


def log_info(path) -> dict:
    """Accounting of a sample file or query log: rows, spent, budget, oracle, mode."""
    with _open(path, "r") as f:
        _check_ours(f, path)
        return _facts(f, _committed_rows(f, _header_from_attrs(f).fields))


def log_options(path) -> Optional[dict]:
    """The resolved options a query log was started with (its header), or None when it records none."""
    with _open(path, "r") as f:
        _check_ours(f, path)
        options = _header_from_attrs(f).extra.get("options")
    return options if isinstance(options, dict) else None


def _facts(f: h5py.File, rows: int) -> dict:
    facts = {"rows": rows, "spent": int(f.attrs["spent"]), "budget": int(f.attrs["budget"]),
             "oracle": str(f.attrs["oracle"]), "mode": str(f.attrs["mode"]), "batches": int(f["batch_start"].shape[0]),
             "kdtools_version": str(f.attrs["kdtools.version"])}
    if "end_status" in f.attrs:  # an output whose run (or the one before it in a pipeline) stopped early
        facts["stopped_early"] = f"{f.attrs['end_status']}: {f.attrs.get('end_message', '')}"
    return facts


def _answer_field(header: StreamHeader) -> Optional[str]:
    """The field holding the oracle's answer, or None for a file without answers (or without a class count)."""
    if not header.num_classes:
        return None
    return next((k for k in ("label", "probs", "logits", "topk_index") if k in header.fields), None)


def _scan_answers(f: h5py.File, header: StreamHeader, n: int, chunk: int, keep: bool) -> tuple[dict, Optional[torch.Tensor]]:
    """Count the class answered in each of the first ``n`` rows (the label, or the argmax / first of top-k), chunk by
    chunk: ({"by_class": count per class, "rejected": rows holding a refused query's placeholders}, classes). A label
    past the class count is left out of the counts. With ``keep`` the classes come back too (int32 a row, -1 for a
    refused row: 40 MB for ten million rows, paid only when examples are drawn); else memory stays one chunk's."""
    from .oracle import rejected_rows

    field, num_classes = _answer_field(header), int(header.num_classes)
    by_class, rejected, parts = torch.zeros(num_classes, dtype=torch.int64), 0, []
    for i in range(0, n, chunk):
        # a writer stopped mid-batch leaves rows past n that were never committed: never read them
        v = torch.from_numpy(np.ascontiguousarray(f[field][i:min(i + chunk, n)]))
        top = v if field == "label" else v[:, 0] if field == "topk_index" else v.float().argmax(1)
        answered = torch.where(rejected_rows({field: v}), -1, top.reshape(-1).long())
        ok = answered[answered >= 0]
        by_class += torch.bincount(ok, minlength=num_classes)[:num_classes]
        rejected += answered.numel() - ok.numel()
        if keep:
            parts.append(answered.to(torch.int32))
    counts = {"by_class": by_class.tolist(), "rejected": rejected}
    if not keep:
        return counts, None
    return counts, torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)


def _examples(f: h5py.File, answered: torch.Tensor, num_classes: int, per_class: int) -> dict:
    """Up to ``per_class`` rows of x per answered class, spread evenly over that class's rows (first and last
    included); only the chosen rows of x are read."""
    # the rows grouped by class in one stable sort (log order kept within a class), not one pass per class:
    # a log of a thousand classes costs the same as one of ten
    rows = torch.nonzero(answered >= 0).flatten()
    classes = answered[rows].long()
    rows = rows[torch.argsort(classes, stable=True)]
    # (a label past the class count sorts last and is left out, as the counts leave it out)
    counts = torch.bincount(classes, minlength=num_classes).tolist()[:num_classes]
    picks, start = {}, 0
    for c, count in enumerate(counts):
        if count:
            # evenly spaced positions at least one apart, so rounding keeps them distinct
            at = torch.linspace(0, count - 1, min(per_class, count), dtype=torch.float64).round().long()
            picks[c] = rows[start + at].tolist()
        start += count
    return {c: torch.from_numpy(np.ascontiguousarray(f["x"][r])) for c, r in picks.items()}


def log_overview(path, per_class: int = 0, chunk: int = 65536) -> dict:
    """Everything ``kd-eval log`` shows, read in one opening of the file and counted over one set of committed
    rows, so a log left by a writer stopped mid-batch gives figures that agree with each other (a log that a running
    writer holds open is refused by HDF5's file lock): log_info's facts, plus
    "answers" (answer_counts' dict, None for a file without answers) and, with ``per_class``, "examples"
    (answer_examples' dict)."""
    if per_class < 0:
        raise ValueError(f"per_class must be 0 or more, not {per_class}")
    with _open(path, "r") as f:
        _check_ours(f, path)
        header = _header_from_attrs(f)
        n = _committed_rows(f, header.fields)
        out = {"facts": _facts(f, n), "answers": None, "examples": None}
        if _answer_field(header) is None:
            return out
        out["answers"], answered = _scan_answers(f, header, n, chunk, keep=per_class > 0)
        if per_class:
            out["examples"] = _examples(f, answered, int(header.num_classes), per_class)
        return out


def answer_counts(path, chunk: int = 65536) -> Optional[dict]:
    """How the oracle's answers in a log spread over the classes: {"by_class": [count per class of the
    answered label / argmax], "rejected": rows holding a refused query's placeholders}; None for a file
    without answers. Queries that all land in two classes teach a substitute little about the others."""
    return log_overview(path, chunk=chunk)["answers"]


def answer_examples(path, per_class: int, chunk: int = 65536) -> Optional[dict]:
    """Up to ``per_class`` queries answered with each class, spread evenly over that class's rows in log order
    (the first and the last included): {class: x tensor}, classes never answered left out; None for a file
    without answers. Spreading them shows a generator's late queries beside its untrained first ones. The
    answers are read once; of the queries only the chosen rows, so a log of millions of images stays cheap."""
    if per_class < 1:
        raise ValueError(f"per_class must be 1 or more, not {per_class}")
    return log_overview(path, per_class=per_class, chunk=chunk)["examples"]


def iter_batches(path, batch_size: int = READ_CHUNK, start: int = 0, stop: Optional[int] = None) -> Iterator[dict]:
    """Rows of a sample file as dicts of tensors, ``batch_size`` rows at a time."""
    with _open(path, "r") as f:
        _check_ours(f, path)
        header = _header_from_attrs(f)
        rows = _committed_rows(f, header.fields)
        n = rows if stop is None else min(stop, rows)
        for name in header.fields:
            if name not in f or f[name].shape[0] < n:
                raise KdError(f"{path}: field {name!r} is missing or shorter than x (damaged file)")
        for i in range(start, n, batch_size):
            j = min(i + batch_size, n)
            yield {name: torch.from_numpy(np.ascontiguousarray(f[name][i:j])) for name in header.fields}


class SampleWriter:
    """Appends batches to a new or existing sample file / query log, flushing each one.

    ``resume=True`` reopens an existing file (same fields required) and continues its accounting.
    """

    def __init__(self, path, header: StreamHeader, oracle: str = "", budget: Optional[int] = None, resume: bool = True,
                 oracle_aliases: tuple = ()):
        self.path = Path(path)
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists and not resume:
            raise KdError(f"{self.path}: exists; remove it or resume it")
        if not exists:
            try:  # a new log in a new folder, as for every other output
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise KdError(f"{self.path}: cannot make its folder ({e.strerror or e})") from None
        self.f = _open(self.path, "a" if exists else "w")
        self.budget_before: Optional[int] = None  # the file's budget before this writer set its own
        try:
            if exists:
                _check_ours(self.f, self.path)
                old = _header_from_attrs(self.f)
                if old.fields != header.fields:
                    raise KdError(f"{self.path}: the log holds {_describe(old.fields)}, this run produces {_describe(header.fields)}; use a new log")
                if old.mode != header.mode:
                    raise KdError(f"{self.path}: the log was recorded in mode {old.mode!r}, this run asks {header.mode!r}; use a new log")
                # ``oracle_aliases``: other names the same oracle was recorded under (an HTTP server's URL, which
                # logs recorded before they recorded the model the server names)
                if oracle and self.f.attrs["oracle"] and str(self.f.attrs["oracle"]) not in (oracle, *oracle_aliases):
                    raise KdError(f"{self.path}: the log was recorded from another oracle ({self.f.attrs['oracle']}); use a new log")
                self.header = old
                self._drop_uncommitted()
            else:
                self._create(header, oracle)
                self.header = header
            # handles and the spent counter are cached: looking them up per batch cost more than the writes
            self._ds = {name: self.f[name] for name in (*self.header.fields, "batch_start", "batch_rows", "batch_time")}
            self._spent = int(self.f.attrs["spent"])
            if budget is not None:
                if budget < self.spent:
                    raise KdError(f"--budget {budget} is smaller than the {self.spent} queries {self.path} already spent")
                self.budget_before = int(self.f.attrs["budget"])
                self.f.attrs["budget"] = int(budget)
            self.f.flush()
        except BaseException:
            self.f.close()
            raise

    def _drop_uncommitted(self) -> None:
        """Cut the rows of a batch whose writer stopped before recording it in the batch index."""
        f = self.f
        n = _committed_rows(f, self.header.fields)
        m = min(f["batch_start"].shape[0], f["batch_rows"].shape[0])
        for name in self.header.fields:
            if f[name].shape[0] > n:
                f[name].resize(n, axis=0)
        for name in ("batch_start", "batch_rows", "batch_time"):
            if f[name].shape[0] > m:
                f[name].resize(m, axis=0)

    def _create(self, header: StreamHeader, oracle: str) -> None:
        f = self.f
        for name, spec in header.fields.items():
            shape = tuple(spec["shape"])
            row_bytes = int(np.prod(shape, dtype=np.int64)) * torch.tensor([], dtype=DTYPES[spec["dtype"]]).element_size()
            chunk_rows = int(max(1, min(1024, (1 << 20) // max(1, row_bytes))))
            f.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), chunks=(chunk_rows, *shape),
                             dtype=np.dtype(spec["dtype"]))
        f.create_dataset("batch_start", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
        f.create_dataset("batch_rows", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
        f.create_dataset("batch_time", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(1024,))
        a = f.attrs
        a["kdtools.format"] = "samples"
        a["kdtools.schema"] = H5_SCHEMA
        a["kdtools.version"] = __version__
        a["kind"] = header.kind
        a["fields"] = json.dumps(header.fields)
        a["num_classes"] = -1 if header.num_classes is None else int(header.num_classes)
        a["value_range"] = json.dumps(list(header.value_range))
        a["mode"] = header.mode
        a["extra"] = json.dumps(header.extra, default=str)
        a["oracle"] = oracle
        a["budget"] = -1
        a["spent"] = 0

    @property
    def rows(self) -> int:
        return int(self._ds["x"].shape[0])

    @property
    def spent(self) -> int:
        return self._spent

    @property
    def budget(self) -> Optional[int]:
        b = int(self.f.attrs["budget"])
        return None if b < 0 else b

    def reserve(self, n: int) -> None:
        """Record ``n`` oracle calls as spent, durably, before they are made."""
        self._spent += int(n)
        self.f.attrs["spent"] = self._spent
        self.f.flush()

    def release(self, n: int) -> None:
        """Give back ``n`` reserved calls that were never made or cost nothing (a replayed log that does not hold
        the query, a local model that refused it)."""
        self._spent -= int(n)
        self.f.attrs["spent"] = self._spent
        self.f.flush()

    def append(self, batch: dict) -> None:
        n = None
        for name, spec in self.header.fields.items():
            t = batch[name]
            if dtype_name(t.dtype) != spec["dtype"] or list(t.shape[1:]) != list(spec["shape"]):
                raise KdError(f"{self.path}: batch field {name!r} does not match the log")
            n = t.shape[0] if n is None else n
        start = self.rows
        for name in self.header.fields:
            d = self._ds[name]
            d.resize(start + n, axis=0)
            d[start:start + n] = batch[name].detach().cpu().numpy()
        m = self._ds["batch_start"].shape[0]
        for name, value in (("batch_start", start), ("batch_rows", n), ("batch_time", time.time())):
            self._ds[name].resize(m + 1, axis=0)
            self._ds[name][m] = value
        self.f.flush()

    def set_attr(self, key: str, value) -> None:
        self.f.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value, default=str)
        self.f.flush()

    def read_rows(self, start: int, stop: int) -> dict:
        return {name: torch.from_numpy(np.ascontiguousarray(self._ds[name][start:stop])) for name in self.header.fields}

    def restore_budget(self) -> None:
        """Put back the budget the file had before this writer opened it (a run refused before it asked
        anything must leave an existing log as it found it)."""
        if self.budget_before is not None and self.f.id.valid:
            self.f.attrs["budget"] = self.budget_before
            self.f.flush()

    def mark_end(self, status: str, message: str = "") -> None:
        """Record that the rows stop early (a stream's end record, for a file that has none): the kd-query before
        this one reached its budget, say. Readers see it as ``read_end``; without it a file is complete."""
        # HDF5 strings cannot hold NUL (a server's error text may): the record must never cost the rows it describes
        self.f.attrs["end_status"] = status.replace("\x00", "")
        self.f.attrs["end_message"] = message.replace("\x00", "\\0")[:1000]
        self.f.flush()

    def close(self) -> None:
        if self.f.id.valid:
            self.f.flush()
            self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _describe(fields: dict) -> str:
    return ", ".join(f"{k}:{v['dtype']}{v['shape']}" for k, v in fields.items())


def write_samples(path, header: StreamHeader, batches, oracle: str = "") -> int:
    """Write a whole sample set atomically (temporary file + rename). Returns the row count."""
    from .fileio import atomic_path

    with atomic_path(path) as tmp:
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink()  # h5py must create the file itself (never unlink what is not our temporary file: /dev/null)
        with SampleWriter(tmp, header, oracle=oracle, resume=False) as w:
            for b in batches:
                w.append(b)
            rows = w.rows
            w.f.attrs["spent"] = rows if header.kind == "samples" and oracle else 0
    return rows
