"""kdtools.fileio: the atomic writer every output goes through, and the lock a state-updating run holds.

A symbolic link is written through (the link stays, its target gets the data), a path naming an open stream
(/dev/stdout) is written to directly, '..' after a missing folder names the file it lands on, folders made for
a write that fails are removed again, and a second run on a locked state file is refused at once."""

from __future__ import annotations

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


def test_no_lock_while_the_folder_does_not_exist(tmp_path):
    with exclusive_use(tmp_path / "new" / "crowd.state", "kd-aggregate"):
        pass
    assert not (tmp_path / "new").exists()  # nothing made just to hold a lock
