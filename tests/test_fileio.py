"""kdtools.fileio: the atomic writer every output goes through, and the lock a state-updating run holds.

A symbolic link is written through (the link stays, its target gets the data), a path naming an open stream
(/dev/stdout) is written to directly, '..' after a missing folder names the file it lands on, folders made for
a write that fails are removed again, and a second run on a locked state file is refused at once."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kdtools.errors import KdError
from kdtools.fileio import atomic_path, exclusive_use


def write(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def test_a_symlink_is_written_through_and_stays_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "target.csv"
    target.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(Path("real") / "target.csv")
    write(link, "new\n")
    assert link.is_symlink()
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["target.csv"]  # no temporary left behind


def test_a_dotdot_after_a_missing_folder_names_the_file_it_lands_on(tmp_path):
    (tmp_path / "x.csv").write_text("old\n")
    write(tmp_path / "missing" / ".." / "x.csv", "new\n")
    assert (tmp_path / "x.csv").read_text() == "new\n"
    assert not (tmp_path / "missing").exists()


def test_folders_made_for_a_failed_write_are_removed(tmp_path):
    out = tmp_path / "a" / "b" / "out.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            Path(tmp).write_text("half")
            raise RuntimeError("the writer failed")
    assert not (tmp_path / "a").exists()
    # a folder that was there before stays, even if the write fails
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "kept" / "new" / "out.csv"):
            raise RuntimeError("the writer failed")
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "new").exists()


@pytest.mark.skipif(not Path("/dev/fd/1").exists(), reason="no /dev/fd")
def test_a_stream_path_redirected_to_a_file_is_written_through(tmp_path):
    # a real process whose stdout is a regular file. /dev/stdout is the path users type and takes the same branch,
    # but is not used here: the old writer renamed a temporary file over the path, and a regression run as root
    # would replace the machine's /dev/stdout link (under /dev/fd the rename can only fail)
    out = tmp_path / "out.txt"
    code = "from pathlib import Path\nfrom kdtools.fileio import atomic_path\n" \
           "with atomic_path('/dev/fd/1') as p:\n    Path(p).write_text('data\\n')\n"
    with open(out, "w") as f:
        subprocess.run([sys.executable, "-c", code], stdout=f, check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.read_text() == "data\n"


def test_the_stream_paths_are_written_directly():
    from kdtools.fileio import _STREAM_PATH

    for p in ("/dev/stdout", "/dev/stderr", "/dev/fd/1", "/proc/self/fd/1", "/proc/123/fd/4"):
        assert _STREAM_PATH.fullmatch(p), p
    for p in ("/dev/stdout.csv", "out/dev/stdout", "/proc/self/fd", "/dev/fd/x"):
        assert not _STREAM_PATH.fullmatch(p), p


def test_a_second_user_of_a_locked_file_is_refused_at_once(tmp_path):
    state = tmp_path / "crowd.state"
    with exclusive_use(state, "kd-aggregate"):
        with pytest.raises(KdError, match="another kd-aggregate run is using it"):
            with exclusive_use(state, "kd-aggregate"):
                pass
    with exclusive_use(state, "kd-aggregate"):  # released on leaving: the next run may go
        assert (tmp_path / ".crowd.state.lock").exists()
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the run


def test_the_lock_is_released_when_the_holder_fails(tmp_path):
    state = tmp_path / "crowd.state"
    with pytest.raises(RuntimeError):
        with exclusive_use(state, "kd-aggregate"):
            raise RuntimeError("the run failed")
    assert list(tmp_path.iterdir()) == []
    with exclusive_use(state, "kd-aggregate"):
        pass


def test_a_first_run_into_a_new_folder_is_locked_too(tmp_path):
    state = tmp_path / "new" / "crowd.state"
    with exclusive_use(state, "kd-aggregate") as locked:
        assert locked
        with pytest.raises(KdError, match="another kd-aggregate run"):
            with exclusive_use(state, "kd-aggregate"):
                pass
    assert not (tmp_path / "new").exists()  # made for the lock, empty at the end: removed


def test_another_users_lock_file_is_locked_read_only(tmp_path, monkeypatch):
    # the lock file of another user is 0644: opening it read-write fails, and the run used to go on unlocked
    import kdtools.fileio as fileio

    state = tmp_path / "crowd.state"
    real_open = os.open

    def as_another_user(path, flags, *mode):
        if str(path).endswith(".lock") and Path(path).exists() and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *mode)

    with exclusive_use(state, "kd-aggregate"):
        monkeypatch.setattr(fileio.os, "open", as_another_user)
        with pytest.raises(KdError, match="another kd-aggregate run"):
            with exclusive_use(state, "kd-aggregate"):
                pass
        monkeypatch.setattr(fileio.os, "open", real_open)


@pytest.mark.parametrize("errno_name", ["ENOSYS", "ENOLCK", "EOPNOTSUPP"])
def test_a_file_system_without_flock_runs_unlocked_and_says_so(tmp_path, monkeypatch, errno_name):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(getattr(errno, errno_name), "not supported")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with exclusive_use(tmp_path / "crowd.state", "kd-aggregate") as locked:
        assert locked is False
    assert list(tmp_path.iterdir()) == []  # no lock file left behind


# -- writing to an inherited descriptor: at its position, never re-opened ---------------------------------

def _shell(command: str, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run(command, shell=True, check=True, cwd=tmp_path, env=env, executable="/bin/bash")


WRITE_FD1 = (f"{sys.executable} -c \"from pathlib import Path; from kdtools.fileio import atomic_path\n"
             f"with atomic_path('/dev/fd/1') as p: Path(p).write_text('data\\n')\"")


@pytest.mark.skipif(not Path("/dev/fd/1").exists(), reason="no /dev/fd")
def test_a_stream_path_appends_under_double_redirect(tmp_path):
    (tmp_path / "log.txt").write_text("old\n")
    _shell(f"{WRITE_FD1} >> log.txt", tmp_path)
    assert (tmp_path / "log.txt").read_text() == "old\ndata\n"


@pytest.mark.skipif(not Path("/dev/fd/1").exists(), reason="no /dev/fd")
def test_a_stream_path_keeps_a_shell_groups_other_output(tmp_path):
    _shell(f"{{ echo header; {WRITE_FD1}; echo footer; }} > group.txt", tmp_path)
    assert (tmp_path / "group.txt").read_text() == "header\ndata\nfooter\n"


@pytest.mark.skipif(not Path("/dev/fd/1").exists(), reason="no /dev/fd")
def test_a_stream_path_into_a_pipe_is_written_as_it_goes(tmp_path):
    _shell(f"{WRITE_FD1} | cat > piped.txt", tmp_path)
    assert (tmp_path / "piped.txt").read_text() == "data\n"


def test_writes_in_place_tells_pipes_from_files(tmp_path):
    from kdtools.fileio import writes_in_place

    r, w = os.pipe()
    try:
        assert writes_in_place(f"/dev/fd/{w}")  # a pipe: streamed, so kd-aggregate reads its inputs ahead
    finally:
        os.close(r)
        os.close(w)
    with open(tmp_path / "f.txt", "w") as f:
        assert not writes_in_place(f"/dev/fd/{f.fileno()}")  # a redirected file: copied once complete
    assert not writes_in_place(tmp_path / "f.txt")
    assert writes_in_place("/dev/null")


def test_nothing_reaches_the_stream_when_the_write_fails(tmp_path, capfd):
    with pytest.raises(RuntimeError):
        with atomic_path("/dev/fd/1") as p:
            Path(p).write_text("half")
            raise RuntimeError("the writer failed")
    assert capfd.readouterr().out == ""


def test_stream_descriptor_names():
    from kdtools.fileio import stream_descriptor

    assert stream_descriptor("/dev/stdout") == 1 and stream_descriptor("/dev/stderr") == 2
    assert stream_descriptor("/dev/fd/3") == 3 and stream_descriptor("/proc/self/fd/4") == 4
    assert stream_descriptor(f"/proc/{os.getpid()}/fd/5") == 5
    assert stream_descriptor("/proc/1/fd/5") is None or os.getpid() == 1  # another process's: a plain path
    assert stream_descriptor("out.csv") is None and stream_descriptor("/dev/null") is None


# -- files that must not be replaced ----------------------------------------------------------------------

def test_a_link_to_a_read_only_target_is_refused_and_untouched(tmp_path, monkeypatch):
    import kdtools.fileio as fileio

    store = tmp_path / "cache"
    store.mkdir()
    blob = store / "ab12"
    blob.write_text("cached\n")
    blob.chmod(0o444)
    link = tmp_path / "labels.csv"
    link.symlink_to(blob)
    real_access = os.access
    # root may write anything: ask as a user would be answered
    monkeypatch.setattr(fileio.os, "access", lambda p, m: False if Path(p) == blob else real_access(p, m))
    with pytest.raises(KdError, match="read-only"):
        write(link, "new\n")
    assert link.is_symlink() and blob.read_text() == "cached\n"
    assert oct(blob.stat().st_mode & 0o777) == oct(0o444)


def test_a_read_only_output_is_refused(tmp_path, monkeypatch):
    import kdtools.fileio as fileio

    out = tmp_path / "out.csv"
    out.write_text("keep\n")
    real_access = os.access
    monkeypatch.setattr(fileio.os, "access", lambda p, m: False if Path(p) == out else real_access(p, m))
    with pytest.raises(KdError, match="read-only"):
        write(out, "new\n")
    assert out.read_text() == "keep\n"


def test_a_file_nobody_may_write_is_refused_even_for_root(tmp_path):
    # as root os.access says every file is writable: the mode bits decide (chmod a-w, a cache blob)
    out = tmp_path / "ro.safetensors"
    out.write_text("keep\n")
    out.chmod(0o444)
    with pytest.raises(KdError, match="read-only"):
        write(out, "new\n")
    assert out.read_text() == "keep\n"
    link = tmp_path / "link.safetensors"
    link.symlink_to(out)
    with pytest.raises(KdError, match="read-only"):
        write(link, "new\n")
    assert out.read_text() == "keep\n"


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    out = tmp_path / "crowd.state"
    out.write_text("old")
    out.chmod(0o600)
    write(out, "new")
    assert out.read_text() == "new" and out.stat().st_mode & 0o777 == 0o600


def test_a_dangling_link_into_a_missing_folder_makes_nothing(tmp_path):
    link = tmp_path / "out.csv"
    link.symlink_to(tmp_path / "unmounted" / "out.csv")
    with pytest.raises(KdError, match="folder does not exist"):
        write(link, "x")
    assert not (tmp_path / "unmounted").exists() and link.is_symlink()


# ------------------------------------------------------------------------------------------------
# A full disk (or any refusal of the machine) is one line naming the file, from every command


def test_a_write_error_without_a_file_name_gets_the_outputs_path(tmp_path):
    out = tmp_path / "out.csv"
    out.write_text("old\n")
    with pytest.raises(OSError) as raised:
        with atomic_path(out):
            raise OSError(28, "No space left on device")  # what a full disk raises from write(): no file name
    assert raised.value.filename == str(out)
    assert out.read_text() == "old\n"


def test_a_full_disk_at_fsync_names_the_output_too(tmp_path, monkeypatch):
    # on NFS or under a quota the write often succeeds and fsync (or close) reports the full disk
    out = tmp_path / "out.csv"
    out.write_text("old\n")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as raised:
        with atomic_path(out) as tmp:
            tmp.write_text("new\n")
    assert raised.value.filename == str(out)
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_a_full_disk_reported_by_hdf5_for_another_file_keeps_that_files_name(tmp_path):
    from kdtools.cli._common import describe_unexpected

    out = tmp_path / "out.csv"
    with pytest.raises(OSError) as raised:
        with atomic_path(out):  # a query log written beside the output fills the disk
            raise OSError(28, "Can't write data (file write failed: time = Sun Dec  6 07:00:00 2026\n, "
                              "filename = '/data/queries.h5', file descriptor = 4, errno = 28)")
    assert raised.value.filename is None
    assert describe_unexpected(raised.value) == "/data/queries.h5: No space left on device"
    # the output's own temporary file named by HDF5 (hidden, and removed at once) reads as the output
    with pytest.raises(OSError) as raised:
        with atomic_path(out) as tmp:
            raise OSError(27, f"Can't write data (file write failed: ..., filename = '{tmp}', file descriptor = 4, errno = 27)")
    assert describe_unexpected(raised.value) == f"{out}: File too large"


def test_an_error_that_is_not_a_write_error_is_not_blamed_on_the_output(tmp_path):
    # the caller's whole computation runs inside atomic_path: an HTTP oracle's dropped connection is no
    # fault of the output file, and its report must not name it
    out = tmp_path / "out.csv"
    for error in (ConnectionResetError(104, "Connection reset by peer"), OSError(110, "Connection timed out")):
        with pytest.raises(OSError) as raised:
            with atomic_path(out):
                raise error
        assert raised.value.filename is None and str(out) not in str(raised.value)
    assert not out.exists()


def test_describe_unexpected_is_one_line_naming_the_file():
    from kdtools.cli._common import describe_unexpected

    # h5py's report of a full disk: errno 28, the file only inside a multi-line text
    h5 = OSError(28, "Unable to synchronously create file (file write failed: time = Sat Dec  5 21:34:58 2026\n"
                     ", filename = '/data/conf.h5', file descriptor = 4, errno = 28)")
    assert describe_unexpected(h5) == "/data/conf.h5: No space left on device"
    assert describe_unexpected(PermissionError(13, "Permission denied", "/x/y")) == "/x/y: Permission denied"
    bug = ValueError("first line\nsecond line")
    line = describe_unexpected(bug)
    assert "\n" not in line and line.startswith("ValueError: first line second line") and "--debug" in line


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="making a device node needs root")
@pytest.mark.parametrize("which", ["-o", "--confusion"])
def test_a_full_device_is_one_line_naming_it(tmp_path, which):
    # a device node of our own (the kernel's "full" device, 1:7): a regressed writer that renamed over it would
    # replace this node, never the machine's /dev/full
    full, null = tmp_path / "full", tmp_path / "null"
    os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    labels = tmp_path / "l.csv"
    labels.write_text("task,worker,label\n1,a,0\n1,b,1\n2,a,1\n2,b,1\n")
    args = ["-o", full] if which == "-o" else ["--confusion", full, "-o", null]
    r = subprocess.run([sys.executable, "-m", "kdtools.cli.aggregate", str(labels), "--method", "mv", *map(str, args)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: {full}: No space left on device"]
    assert stat.S_ISCHR(os.lstat(full).st_mode) and stat.S_ISCHR(os.lstat(null).st_mode)


def test_a_writer_killed_before_its_rename_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    import signal
    import socket

    out = tmp_path / "labels.csv"
    out.write_text("old\n")
    # a writer killed with SIGKILL in the middle of its write: its temporary file stays, the output is intact
    code = ("import sys, time; from kdtools.fileio import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    open(tmp, 'w').write('half')\n    print('writing', flush=True)\n    time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"writing\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    left = [p.name for p in tmp_path.iterdir() if p.name != "labels.csv"]
    assert len(left) == 1 and left[0].startswith(".labels.csv.") and f"@{child.pid}@" in left[0], left
    assert out.read_text() == "old\n"
    # files that are not a dead writer's of this host stay: a live process's (this one), another host's
    # (a shared file system), an older kdtools's (no writer in the name), and another output's
    host = left[0][len(".labels.csv."):].split("@")[0]
    name = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())
    namespace = os.stat("/proc/self/ns/pid").st_ino
    assert host == f"{name}+{namespace}"
    # (another pid namespace under the same host name: a container with host networking, where the pid means
    # another process; and an output whose name holds ours followed by a writer's part)
    keep = [f".labels.csv.{host}@{os.getpid()}@abc.tmp", f".labels.csv.otherhost@{child.pid}@abc.tmp",
            ".labels.csv.abc123.tmp", f".other.csv.{host}@{child.pid}@abc.tmp",
            f".labels.csv.{name}+{namespace + 1}@{child.pid}@abc.tmp", f".labels.csv.{name}@{child.pid}@abc.tmp",
            f".labels.csv.{host}@{child.pid}@x.{host}@999@abc.tmp"]
    for name in keep:
        (tmp_path / name).write_text("in progress\n")
    write(out, "new\n")
    assert out.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["labels.csv", *keep])
