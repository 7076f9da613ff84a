"""Small file helpers shared by every format module: atomic replacement and file sniffing."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator


# paths that name a stream the shell already opened (stdout, stderr, an inherited descriptor): writing to the
# path itself sends the data there; renaming a new file over it would replace the link instead
_STREAM_PATH = re.compile(r"/dev/(stdout|stderr|fd/[0-9]+)|/proc/(self|thread-self|[0-9]+)/fd/[0-9]+")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    A crash or an exception leaves the previous file untouched and removes the temporary one,
    so a reader never sees a half-written file (rename is atomic on POSIX file systems). A symbolic
    link is written through: the file it points to is replaced and the link stays. Missing folders
    are made, and removed again if the write fails.
    """
    path = Path(path)
    if (path.exists() and not path.is_file() and not path.is_dir()) or _STREAM_PATH.fullmatch(str(path)):
        # a device or a pipe (-o /dev/null, /dev/stdout, a FIFO): renaming over it would replace the device
        # itself with a regular file (as root, /dev/null for the whole machine); such a target has no previous
        # contents to protect, so it is written directly
        yield path
        return
    # the file the path names once links and '..' are followed: a link is written through (it stays a link),
    # and 'new/../x' is x, without making 'new'
    path = Path(os.path.realpath(path))
    made = _make_parents(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except BaseException:
        _remove_made(made)
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    done = False
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # make the bytes durable before they become visible
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp_path, path)
        done = True
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
        if not done:
            _remove_made(made)


@contextlib.contextmanager
def exclusive_use(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for one run that reads, updates and rewrites it (a state file).

    Two such runs at once would each start from the same file, and the one that finishes last would drop
    the other's update. The lock is a hidden ``.NAME.lock`` beside the file, held with ``flock`` and removed
    when the run ends; if the run is killed, the system still releases the lock, and the file left behind
    blocks nothing. A second run is refused at once (KdError) rather than kept waiting: a scheduler can
    simply run it again. Without ``fcntl`` (Windows), or while the file's folder does not exist yet, nothing
    is locked.
    """
    from .errors import KdError

    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX systems
        yield
        return
    given = path
    path = Path(os.path.realpath(path))
    if not path.parent.is_dir():
        yield
        return
    lock_path = path.parent / f".{path.name}.lock"
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            yield  # a read-only folder: the state cannot be rewritten there either, and saving it will say so
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise KdError(f"{given}: another {what} run is using it (it holds {lock_path.name}); try again when that "
                          f"run has ended or been stopped") from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        # the holder before us removed the lock file between our open and our flock: we hold a lock on a file
        # nobody else will see; take the new one instead
        os.close(fd)
    try:
        yield
    finally:
        try:
            lock_path.unlink()  # while still holding it: a run that opened this file will see it gone and retry
        except OSError:
            pass
        os.close(fd)


def _make_parents(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; return the folders made, deepest first."""
    missing = []
    f = folder
    while not f.exists() and f != f.parent:
        missing.append(f)
        f = f.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_made(made: list[Path]) -> None:
    """Remove the folders a failed write made (deepest first), where they are still empty."""
    for f in made:
        try:
            f.rmdir()
        except OSError:
            break


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def sniff(path: str | os.PathLike) -> str:
    """Guess a file's container from its first bytes: 'hdf5', 'zip', 'pickle', 'safetensors' or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(HDF5_MAGIC):
        return "hdf5"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return "pickle"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 0 < n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"
