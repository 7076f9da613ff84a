"""Where rows of samples come from: a kdtools stream (stdin or file) or an HDF5 sample file.

Every command that reads a stream also reads the same data from an HDF5 path, and vice versa, through
``open_samples``.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

import torch

from . import h5store
from .errors import KdError, KdUsageError, counted
from .fileio import sniff
from .stream import StreamHeader, StreamReader, fields_of


class SampleSource:
    """A header plus an iterator of batches (dicts of tensors). ``end`` is the stream's end record."""

    def __init__(self, header: StreamHeader, batches: Iterator[dict], where: str, reader: Optional[StreamReader] = None,
                 end: Optional[dict] = None):
        self.header = header
        self._batches = batches
        self.where = where
        self.reader = reader
        self._end = end or {"status": "complete", "message": ""}  # a file's recorded end (HDF5 has no end record)

    def __iter__(self):
        return iter(self._batches)

    @property
    def end(self) -> Optional[dict]:
        return self.reader.end if self.reader else self._end


def open_samples(path: Optional[str | Path], stdin: Optional[BinaryIO] = None, batch_size: int = h5store.READ_CHUNK) -> SampleSource:
    """Open ``path`` (HDF5 or stream file), or the binary ``stdin`` when path is None or '-'."""
    if path is None or str(path) == "-":
        if stdin is None:
            raise KdError("no input: name a file or pipe a stream in")
        reader = StreamReader(stdin, "stdin")
        return SampleSource(reader.header, iter(reader), "stdin", reader)
    p = Path(path)
    if not p.is_file():
        raise KdError(f"{p}: no such file")
    kind = sniff(p)
    if kind == "hdf5":
        header = h5store.read_header(p)
        return SampleSource(header, h5store.iter_batches(p, batch_size), str(p), end=h5store.read_end(p))
    if kind == "safetensors":
        f = open(p, "rb")
        reader = StreamReader(f, str(p))
        return SampleSource(reader.header, _closing(iter(reader), f), str(p), reader)
    raise KdError(f"{p}: not an HDF5 file nor a kdtools stream")


def _closing(it, f):
    try:
        yield from it
    finally:
        f.close()


def read_all(path: Optional[str | Path], stdin: Optional[BinaryIO] = None) -> tuple[StreamHeader, dict]:
    """All rows of a source concatenated into one dict of tensors."""
    return collect(open_samples(path, stdin))


def collect(src: SampleSource) -> tuple[StreamHeader, dict]:
    """All rows of an opened source concatenated into one dict of tensors."""
    parts: dict[str, list] = {name: [] for name in src.header.fields}
    for batch in src:
        for name in parts:
            parts[name].append(batch[name])
    if not parts.get("x"):
        return src.header, {name: torch.empty((0, *spec["shape"]), dtype=getattr(torch, spec["dtype"]))
                            for name, spec in src.header.fields.items()}
    return src.header, {name: torch.cat(v) for name, v in parts.items()}


class SampleSink:
    """Where rows go: a stream on a binary file object, or a file (HDF5 by .h5/.hdf5 suffix, else a
    stream file), written under a temporary name and renamed into place by ``close`` so a failed run
    never leaves a half-written file behind."""

    def __init__(self, header: StreamHeader, out: Optional[BinaryIO] = None, path: Optional[str | Path] = None):
        from .stream import StreamWriter

        self.header = header
        self.path = Path(path) if path is not None else None
        self.rows = 0
        self._h5 = None
        self._file = None
        if self.path is None:
            self._stream = StreamWriter(out, header)
            return
        from contextlib import ExitStack

        from .fileio import atomic_path

        # the shared atomic writer: a temporary file renamed into place at the end, and never a rename over what is
        # not a regular file (-o /dev/null is written directly, a symbolic link is written through, a read-only
        # file is refused)
        self._atomic = ExitStack()
        self._tmp = Path(self._atomic.enter_context(atomic_path(self.path)))
        self._target = self.path  # where atomic_path puts the file; ``retarget`` may send it elsewhere
        try:
            if self.path.suffix.lower() in (".h5", ".hdf5"):
                if self._tmp.is_file() and not self._tmp.is_symlink():
                    self._tmp.unlink()  # h5py creates its file itself (a device is written as it is)
                self._h5 = h5store.SampleWriter(self._tmp, header, resume=False)
                self._stream = None
            else:
                self._file = open(self._tmp, "wb")
                self._stream = StreamWriter(self._file, header)
        except BaseException as e:
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise

    def write(self, batch: dict) -> None:
        if self._h5 is not None:
            self._h5.append(batch)
        else:
            self._stream.write(batch)
        self.rows += next(iter(batch.values())).shape[0]

    def in_place(self) -> bool:
        """Whether the output is written as it goes (a device, a FIFO, a pipe behind /dev/stdout): there is no
        temporary file to put elsewhere."""
        from .fileio import stream_descriptor

        return self.path is not None and (self._tmp == self._target or stream_descriptor(self._target) is not None)

    def retarget(self, path: str | Path) -> None:
        """Put the finished file at ``path`` instead of the path it was opened with (a run that stopped early keeps
        its rows beside an earlier output, never in place of it). Only for outputs with a temporary file."""
        if not self.in_place():
            self.path = Path(path)

    def close(self, status: str = "complete", message: str = "") -> None:
        """Finish the output. For files, ``status`` other than complete still keeps what was written
        (the end record says why it stopped)."""
        if self._stream is not None:
            self._stream.close(status, message)
        if self.path is None:
            return
        if self._h5 is not None:
            try:
                if status != "complete":
                    self._h5.mark_end(status, message)  # what a stream's end record says, for the file's readers
            finally:
                self._h5.close()
        if self._file is not None:
            self._file.close()
        if self.path == self._target:
            self._atomic.close()  # fsync, the permissions, the rename into place
            return
        from .fileio import atomic_path

        # retargeted: the finished temporary file is linked (or copied) to the new path through the same writer,
        # then dropped from the old one's folder; the path it was opened with stays as it was
        try:
            with atomic_path(self.path) as tmp:
                _place_copy(self._tmp, tmp)
        finally:  # placed or not, the first temporary file goes now (not whenever the sink is collected)
            self._atomic.__exit__(KdError, KdError("moved"), None)

    def abort(self, message: str = "the writer failed") -> None:
        """Drop a file output (the previous file, if any, stays as it was); end a stream as failed."""
        if self.path is None:
            try:
                self._stream.close("error", message)
            except (BrokenPipeError, OSError, ValueError):
                pass
            return
        try:
            if self._h5 is not None:
                self._h5.close()
            if self._file is not None:
                self._file.close()
        finally:
            dropped = KdError(message)
            self._atomic.__exit__(KdError, dropped, None)  # the temporary file goes; the previous file stays


# A generator whose samples cost minutes each (CAKE on a CPU) must not lose them to a kill: its finished
# batches go to FILE.partial.h5 beside the output, flushed batch by batch, and the output is made from it at
# the end. A rerun with --resume counts what the partial holds and generates only the rest.

def partial_path(output: str | Path) -> Path:
    """Where the batches of a run writing ``output`` are kept until it finishes."""
    return Path(str(output) + ".partial.h5")


def partial_rows(partial: Path, generator: dict, resume: bool, ignore: tuple = ()) -> int:
    """Rows a stopped run kept in ``partial`` (0 when there is none). The partial must have been made with the
    same options (``generator``, the record the output's header carries, but for the keys in ``ignore``), and is
    only used with ``resume``: otherwise it is an error to run over it, so that a rerun never silently throws
    away paid-for work."""
    if not partial.exists():
        return 0
    rows = h5store.log_info(partial)["rows"]
    if not resume:
        raise KdUsageError(f"{partial} holds {counted(rows, 'sample')} of a run that was stopped: the same command with --resume "
                           "continues it; delete the file to start over")
    made = h5store.read_header(partial).extra.get("generator") or {}
    wanted = json.loads(json.dumps(generator, default=str))  # as the header stores it: tuples become lists
    differing = sorted(k for k in set(made) | set(wanted) if k not in ignore and made.get(k) != wanted.get(k))
    if differing:
        raise KdUsageError(f"{partial} was made with other options ({', '.join(differing)}); resume with the same "
                           "options, or delete it to start over")
    return rows


def write_through_partial(batches: Iterator[dict], output: str | Path, generator: dict, version: str,
                          frame_rows: int) -> int:
    """Append ``batches`` to ``output``'s partial file, each flushed as it comes, then make ``output`` from the
    partial atomically (an .h5 output is the partial renamed; a stream file is written from it in frames of
    ``frame_rows``) and remove the partial. Returns the rows of the output."""
    partial = partial_path(output)
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a directory of the path should be, or no permission
        raise KdError(f"{output}: cannot make the directory {partial.parent} ({e.strerror or e})") from None
    # the first batch may cost minutes: find out now, not after it, that the directory takes no new file
    try:
        tempfile.TemporaryFile(dir=partial.parent).close()
    except OSError as e:
        # TemporaryFile tries more than one way, and the last one's reason can mislead ("No such file" on /proc):
        # name only the reasons that say what to do
        why = f" ({e.strerror})" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT) else ""
        raise KdError(f"{output}: cannot create a file in {partial.parent}{why}") from None
    writer = None
    try:
        for batch in batches:
            if writer is None:
                header = StreamHeader("queries", fields_of(batch), extra={"generator": generator, "kdtools": version})
                writer = h5store.SampleWriter(partial, header, resume=True)
            writer.append(batch)
    finally:
        if writer is not None:
            writer.close()
    if not partial.exists():
        raise KdError("nothing was generated")
    rows = h5store.log_info(partial)["rows"]
    out = Path(output)
    if out.suffix.lower() in (".h5", ".hdf5"):
        from .fileio import atomic_path

        # through the shared atomic writer (a link is written through, a read-only file refused, a device written
        # as it is); the partial is linked, not moved, into the temporary file, so a failure there keeps it
        with atomic_path(out) as tmp:
            _place_copy(partial, tmp)
        partial.unlink()
        return rows
    sink = SampleSink(h5store.read_header(partial), path=out)
    try:
        for batch in h5store.iter_batches(partial, batch_size=frame_rows):
            sink.write(batch)
    except BaseException:
        sink.abort()
        raise
    sink.close()
    partial.unlink()
    return rows


def _place_copy(source: Path, tmp: Path) -> None:
    """Give the temporary file ``tmp`` (made by ``atomic_path``) the contents of ``source``, which stays: a hard
    link where the file system allows it (no copy of a large partial), a copy otherwise (another file system, a
    device such as /dev/null, a FIFO)."""
    import shutil

    if tmp.is_file() and not tmp.is_symlink():
        tmp.unlink()
        try:
            os.link(source, tmp)
            return
        except OSError:
            pass
    with open(source, "rb") as src, open(tmp, "wb") as dst:  # not copyfile: it refuses FIFOs
        shutil.copyfileobj(src, dst)
