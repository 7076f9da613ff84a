"""Small file helpers shared by every format module: atomic replacement and file sniffing."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import stat
import tempfile
from pathlib import Path
from typing import Iterator, Optional


# paths that name a descriptor the command inherited (stdout, stderr, /dev/fd/N): re-opening such a path would
# start a new file description (truncating a redirected file, ignoring '>>'), and renaming over it would replace
# the link itself, so the output goes to the open descriptor instead
_STREAM_PATH = re.compile(r"/dev/(?:stdout|stderr|fd/(?P<fd>[0-9]+))|/proc/(?P<pid>self|thread-self|[0-9]+)/fd/(?P<pfd>[0-9]+)")


def stream_descriptor(path: str | os.PathLike) -> Optional[int]:
    """The descriptor of this process that ``path`` names (/dev/stdout -> 1, /dev/fd/3 -> 3), else None."""
    text = str(path)
    m = _STREAM_PATH.fullmatch(text)
    if m is None:
        return None
    if text in ("/dev/stdout", "/dev/stderr"):
        return 1 if text == "/dev/stdout" else 2
    if m.group("fd") is not None:
        return int(m.group("fd"))
    pid = m.group("pid")
    if pid in ("self", "thread-self") or int(pid) == os.getpid():
        return int(m.group("pfd"))
    return None  # another process's descriptor: an ordinary path


def _descriptor_is_regular_file(fd: int) -> Optional[bool]:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return None  # not open


def writes_in_place(path: str | os.PathLike) -> bool:
    """Whether :func:`atomic_path` writes ``path`` as it goes (a device, a FIFO, a pipe or terminal behind
    /dev/stdout) instead of all at once at the end."""
    p = Path(path)
    fd = stream_descriptor(p)
    if fd is not None:
        return _descriptor_is_regular_file(fd) is False
    return p.exists() and not p.is_file() and not p.is_dir()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success the complete file becomes ``path``.

    A crash or an exception leaves the previous file untouched and removes the temporary one, so a reader
    never sees a half-written file (the temporary file is renamed over ``path``: atomic on POSIX file
    systems). Where ``path`` names an inherited descriptor (``/dev/stdout``, ``/dev/fd/N``) redirected to a
    file, the complete file is copied to that descriptor at its current position (so ``>>`` and a shell
    group's other output are kept); into a pipe, a terminal or a socket it is written as it goes. A symbolic link is written through (the link stays) when its target may be written; a file
    or a link target the user cannot write is refused (KdError), never replaced. A replaced file keeps its
    permissions. Missing folders are made, and removed again if this write fails. A device or a FIFO
    (``/dev/null``, a named pipe) is written directly.
    """
    from .errors import KdError

    path = Path(path)
    fd = stream_descriptor(path)
    if fd is not None and _descriptor_is_regular_file(fd) is None:
        raise KdError(f"{path}: descriptor {fd} is not open (was it closed with >&-?); nothing was written")
    if fd is not None and _descriptor_is_regular_file(fd):
        # a redirected file: re-opening the path would truncate it and ignore '>>'; the complete output is
        # copied to the descriptor instead. A pipe, a terminal or a socket is written as it goes (below): a
        # pipeline downstream reads while this command still works, and re-opening those truncates nothing
        handle, tmp = tempfile.mkstemp(prefix="kdtools-", suffix=".tmp")
        os.close(handle)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            _copy_to_descriptor(tmp_path, fd, path)
        finally:
            tmp_path.unlink(missing_ok=True)
        return
    if fd is not None or (path.exists() and not path.is_file() and not path.is_dir()):
        # a device or a pipe (-o /dev/null, a FIFO, /dev/stdout into a pipe): renaming over it would replace the
        # device itself with a regular file (as root, /dev/null for the whole machine); it has no previous
        # contents to protect
        with _naming_output(path):
            yield path
        return
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.parent.is_dir():
            raise KdError(f"{path} is a link to {target}, whose folder does not exist; remove the link or write elsewhere")
        if target.exists() and _read_only(target):
            raise KdError(f"{path} is a link to the read-only file {target} (a cache or store?): it is not replaced; "
                          f"remove the link or write elsewhere")
        path = target
    else:
        # the file the path names once '..' and linked folders are followed: 'new/../x' is x, without making 'new'
        path = Path(os.path.realpath(path))
        if path.exists() and _read_only(path):
            raise KdError(f"{path} is read-only: it is not replaced; make it writable or write elsewhere")
    mode = (path.stat().st_mode & 0o7777) if path.exists() else (0o666 & ~_umask())
    made = _make_parents(path.parent)
    try:
        remove_stale_temporaries(path)
        handle, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    except BaseException:
        _remove_made(made)
        raise
    os.close(handle)
    tmp_path = Path(tmp)
    done = False
    try:
        with _naming_output(path, tmp_path):
            yield tmp_path
        with _naming_output(path, tmp_path), open(tmp_path, "rb+") as f:  # make the bytes durable before they become visible
            os.fsync(f.fileno())  # (a full disk or quota on NFS often shows only here)
        os.chmod(tmp_path, mode)  # mkstemp makes 0600: a new output gets the usual permissions, a replaced one its own
        os.replace(tmp_path, path)
        done = True
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
        if not done:
            _remove_made(made)


def _host() -> str:
    """This host's name (only the characters a host name may hold, so the temporary file's name parses back),
    with the inode of this process's pid namespace where Linux shows it: containers that share a host name
    (host networking, one Kubernetes pod) have pid namespaces of their own, where a live writer's pid looks dead."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "localhost"
    try:
        return f"{host}+{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return host


def _temporary_prefix(path: Path) -> str:
    """``.NAME.HOST@PID@``: a temporary file names its writer, so a later write can tell a dead writer's leftover
    (a kill -9, a power cut) from another writer's file in progress."""
    return f".{path.name}.{_host()}@{os.getpid()}@"


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files a writer of ``path`` on this host left when it was killed before renaming
    them (its process is gone). Files of a live process, of another host (a shared file system) or of an older
    kdtools (no writer in the name) are left alone; so are those of another pid namespace (see ``_host``).
    Returns what was removed."""
    # mkstemp's random part is letters, digits and '_': another output's temporary never parses as one of ours
    pattern = re.compile(re.escape(f".{path.name}.{_host()}@") + r"(?P<pid>[0-9]+)@[A-Za-z0-9_]+\.tmp")
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or not _process_is_gone(int(m.group("pid"))):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            pass  # not ours to remove after all (permissions, or removed meanwhile)
    return removed


def _process_is_gone(pid: int) -> bool:
    if os.name != "posix" or pid <= 0 or pid == os.getpid():
        return False  # (on Windows, os.kill(pid, 0) would terminate the process, not ask about it)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OverflowError, OSError):  # PermissionError among them
        return False  # alive under another user, or not a pid we can ask about: keep the file
    return False


def _read_only(path: Path) -> bool:
    """A file this user may not write, or one nobody may write (no write bit at all: ``chmod a-w``, a DVC or
    Hugging Face cache blob). The mode bits count for root too, for whom ``os.access`` is always true."""
    return not os.access(path, os.W_OK) or (path.stat().st_mode & 0o222) == 0


# errno values that mean "this file could not be written": full disk or quota, file too large, read-only file
# system, a device error, a stale NFS handle
WRITE_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EIO", "ESTALE")
                         if hasattr(errno, name))


@contextlib.contextmanager
def _naming_output(path: Path, temporary: Optional[Path] = None) -> Iterator[None]:
    """A write error that names no file (a full disk while writing the output: ``[Errno 28] No space left on
    device``) is given the output's path, so its one-line report says which file could not be written. Only
    write errors: the caller's whole computation runs inside, and a dropped connection to an HTTP oracle
    (``[Errno 104] Connection reset by peer``) is not the output's fault. HDF5 names the file in its message
    ("filename = '/data/log.h5'"): another file's name is kept (a query log written beside the output), but the
    output's ``temporary`` (a hidden name removed at once) is replaced by the output's."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno in WRITE_ERRNOS:
            named = HDF5_FILENAME.search(str(e))
            if named is None or (temporary is not None and os.path.abspath(named.group(1)) == os.path.abspath(temporary)):
                e.filename = str(path)
        raise


# HDF5's errors carry the file in a multi-line report: "... filename = '/dev/full', file descriptor = 4, ..."
HDF5_FILENAME = re.compile(r"filename = '([^']*)'")


def _copy_to_descriptor(tmp: Path, fd: int, path: Path) -> None:
    """Append a finished output to an inherited descriptor at its current position (without re-opening it)."""
    import shutil
    import sys

    from .errors import KdError

    for stream in ((sys.stdout,) if fd == 1 else (sys.stderr,) if fd == 2 else ()):
        try:
            stream.flush()  # what Python already buffered for that descriptor goes first
        except (AttributeError, OSError, ValueError):
            pass
    try:
        out = os.dup(fd)
    except OSError:
        raise KdError(f"{path}: descriptor {fd} is not open (was it closed with >&-?); nothing was written") from None
    with open(tmp, "rb") as src, os.fdopen(out, "wb") as dst:
        shutil.copyfileobj(src, dst)


@contextlib.contextmanager
def exclusive_use(path: str | os.PathLike, what: str) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` for one run that reads, updates and rewrites it (a state file).

    Two such runs at once would each start from the same file, and the one that finishes last would drop
    the other's update. The lock is a hidden ``.NAME.lock`` beside the file, held with ``flock`` and removed
    when the run ends; if the run is killed, the system still releases the lock, and a file left behind
    blocks nothing. A second run is refused at once (KdError) rather than kept waiting: a scheduler can
    simply run it again. The file's folder is made first if missing (a first run is locked too) and removed
    again if it is still empty at the end.

    Yields True while the lock is held, False where it cannot be (no ``fcntl``, a file system without
    ``flock``, a folder that takes no file): the caller may say so; the run goes on unlocked, as before.
    """
    from .errors import KdError

    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX systems
        yield False
        return
    given = path
    path = Path(os.path.realpath(path))
    lock_path = path.parent / f".{path.name}.lock"
    made: list[Path] = []
    fd: Optional[int] = None
    try:
        try:
            made = _make_parents(path.parent)
        except OSError:
            pass  # the state cannot be written there either: saving it will say so
        for _ in range(100):
            fd = _open_lock_file(lock_path)
            if fd is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise KdError(f"{given}: another {what} run is using it (it holds {lock_path.name}); try again when "
                              f"that run has ended or been stopped") from None
            except OSError:  # ENOSYS, ENOLCK, EOPNOTSUPP: this file system does not lock (e.g. Lustre without flock)
                os.close(fd)
                fd = None
                _unlink_quietly(lock_path)
                break
            try:
                on_disk = os.stat(lock_path)
                here = os.fstat(fd)
                same = (on_disk.st_dev, on_disk.st_ino) == (here.st_dev, here.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            # the run before us removed the lock file between our open and our flock: we hold a lock on a file
            # nobody else will see; take the new one instead
            os.close(fd)
            fd = None
        yield fd is not None
    finally:
        if fd is not None:
            _unlink_quietly(lock_path)  # while still holding it: a run that opened this file sees it gone and retries
            os.close(fd)
        _remove_made(made)


def _open_lock_file(lock_path: Path) -> Optional[int]:
    """A descriptor on the lock file (made if missing), or None where the folder takes no file.

    Another user's lock file (0644 under the usual umask) is opened read-only: flock works on any descriptor."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)  # a link planted in a shared folder is not followed
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT | nofollow, 0o666)
    except PermissionError:
        try:
            return os.open(lock_path, os.O_RDONLY | nofollow)
        except OSError:
            return None
    except OSError:
        return None


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


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
