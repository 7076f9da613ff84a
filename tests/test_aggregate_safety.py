"""kd-aggregate never destroys what it reads and never saves a broken or raced state.

Found by a fresh-eyes walkthrough (session 19), each case failed before its fix:
- an output path through a folder that does not exist yet ('new/../labels.csv') named an input and
  overwrote it, exit 0;
- two runs on one --state at once both succeeded and the first one's chunk was lost;
- a huge --zeta made the model NaN, and a state whose numbers were NaN was accepted: every later label was
  class 0 with confidence nan, and the NaN was saved back;
- with several label files and the labels on stdout, a bad later file came after the earlier files' labels;
- 'none', 'NA', ... could never be classes, even declared with --classes;
- a dense file saved by numpy (3.000000000000000000e+00) gave class names like that;
- mixed labels (10, 2, x) were ordered as strings;
- kd-eval aggregation took a method twice; a closed stdout was a TypeError; the recorded options said null
  for the seed and the BiLA settings a run used.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_error_line, write_csv
from safetensors import safe_open
from safetensors.torch import save_file
from test_aggregate_edges import ROOT, agg, keval, run_sub

__all__ = ["agg", "keval"]  # the fixtures of test_aggregate_edges.py, used here by name

from kdtools.errors import counted
from kdtools.fileio import exclusive_use


def crowd_rows(n_tasks=60, n_workers=5, classes=("a", "b", "c"), start=0, seed=0):
    """A small crowd: each worker right 70 % of the time, else a random other class."""
    rng = random.Random(seed)
    rows = []
    for t in range(start, start + n_tasks):
        truth = classes[t % len(classes)]
        for w in range(n_workers):
            label = truth if rng.random() < 0.7 else rng.choice([c for c in classes if c != truth])
            rows.append((f"t{t}", f"w{w}", label))
    return rows


@pytest.fixture()
def chunks(tmp_path):
    return (write_csv(tmp_path / "chunk1.csv", crowd_rows()),
            write_csv(tmp_path / "chunk2.csv", crowd_rows(start=60, seed=1)))


# -- outputs never overwrite inputs ------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["-o", "--state", "--confusion"])
def test_an_output_through_a_missing_folder_that_names_an_input_is_refused(agg, chunks, tmp_path, flag):
    label_file = chunks[0]
    before = label_file.read_bytes()
    sneaky = str(tmp_path / "not-yet" / ".." / label_file.name)
    r = agg(label_file, flag, sneaky)
    one_error_line(r, 2, "would overwrite the input")
    assert label_file.read_bytes() == before
    assert not (tmp_path / "not-yet").exists()


def test_the_gold_file_is_protected_the_same_way(agg, chunks, tmp_path):
    gold = tmp_path / "gold.csv"
    gold.write_text("task,truth\nt0,a\nt1,b\n")
    before = gold.read_bytes()
    r = agg(chunks[0], "--gold", gold, "--confusion", tmp_path / "new" / ".." / "gold.csv")
    one_error_line(r, 2, "the --gold file")
    assert gold.read_bytes() == before


def test_simulate_does_not_overwrite_its_truth_file(agg, tmp_path):
    truth = tmp_path / "truth.csv"
    truth.write_text("task,truth\n" + "".join(f"t{i},{i % 3}\n" for i in range(30)))
    before = truth.read_bytes()
    r = agg("simulate", "--truth", truth, "-o", tmp_path / "new" / ".." / "truth.csv")
    one_error_line(r, 2, "would overwrite the input")
    assert truth.read_bytes() == before


# -- the state: one run at a time, never NaN ----------------------------------------------------------

def test_a_second_run_on_a_state_in_use_is_refused_and_loses_nothing(agg, chunks, tmp_path):
    state = tmp_path / "crowd.state"
    assert agg(chunks[0], "--state", state, "-q").returncode == 0
    before = state.read_bytes()
    with exclusive_use(state, "kd-aggregate"):  # another run holds it
        r = agg(chunks[1], "--state", state, "-q")
    one_error_line(r, 1, "another kd-aggregate run is using it", "try again")
    assert state.read_bytes() == before
    r = agg(chunks[1], "--state", state)  # once it has ended, the chunk goes in
    assert r.returncode == 0, r.stderr
    assert "state: 2 chunks" in r.stderr


def test_two_processes_on_one_state_never_lose_a_chunk(chunks, tmp_path):
    # real processes, no timing: the first run reads its labels from a pipe this test holds open, so it is
    # certainly still running (state read, not yet saved) when the second run starts. Every run must either
    # refuse (exit 1) or land its chunk: the state's chunk count equals the runs that succeeded. Before the lock,
    # both exited 0 and the first run's save dropped the second's chunk.
    import os

    state = tmp_path / "crowd.state"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "kdtools.cli.aggregate", "-", "--state", str(state), "-q",
                              "-o", str(tmp_path / "out1.csv")], cwd=ROOT, stdin=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    lock = tmp_path / ".crowd.state.lock"
    deadline = time.time() + 30
    while not lock.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)  # the lock is taken before any input is read
    time.sleep(0.5)
    second = run_sub("kdtools.cli.aggregate", [chunks[1], "--state", state, "-q", "-o", tmp_path / "out2.csv"])
    first_err = first.communicate(Path(chunks[0]).read_text(), timeout=300)[1]
    codes = [first.returncode, second.returncode]
    assert set(codes) <= {0, 1} and 0 in codes, (codes, first_err, second.stderr)
    for code, err in zip(codes, (first_err, second.stderr)):
        if code == 1:
            assert "another kd-aggregate run is using it" in err, err
    done = run_sub("kdtools.cli.aggregate", ["--state", state, "--relabel-all", "-o", tmp_path / "all.csv"])
    assert f"state: {counted(codes.count(0), 'chunk')}," in done.stderr, (codes, done.stderr)


def test_a_diverging_zeta_is_an_error_before_anything_is_saved(agg, chunks, tmp_path):
    state = tmp_path / "crowd.state"
    out = tmp_path / "labels.csv"
    r = agg(chunks[0], "--state", state, "--zeta", "1e30", "-o", out)
    one_error_line(r, 1, "diverged", "--zeta")
    assert not state.exists() and not out.exists()


def _corrupt(state: Path, key: str, value) -> None:
    with safe_open(state, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[key] = value(tensors[key])
    save_file(tensors, str(state), metadata=meta)


@pytest.mark.parametrize("key,value,needle", [
    ("bila.param.omega", lambda t: torch.full_like(t, float("nan")), "NaN or infinite"),
    ("bila.param.W1", lambda t: torch.full_like(t, float("inf")), "NaN or infinite"),
    ("bila.v.b1", lambda t: torch.full_like(t, -1.0), "second moments"),
    ("bila.t", lambda t: torch.full_like(t, -1), "step counter"),
])
def test_a_state_with_impossible_numbers_is_refused_and_left_as_it_is(agg, chunks, tmp_path, key, value, needle):
    state = tmp_path / "crowd.state"
    assert agg(chunks[0], "--state", state, "-q").returncode == 0
    _corrupt(state, key, value)
    before = state.read_bytes()
    r = agg(chunks[1], "--state", state, "-q")
    one_error_line(r, 1, "inconsistent state file", needle)
    assert state.read_bytes() == before


# -- inputs are all checked before labels reach stdout ------------------------------------------------

@pytest.mark.parametrize("later", ["missing", "malformed", "empty"])
def test_a_bad_later_file_sends_no_labels_to_stdout(agg, chunks, tmp_path, later):
    bad = tmp_path / "bad.csv"
    if later == "malformed":
        bad.write_text("task,worker,label\nt0,w0,a\nt1,w1\n")
    elif later == "empty":
        bad.write_text("task,worker,label\n")
    r = agg(chunks[0], bad)
    assert r.returncode == 1, r.stderr
    assert r.stdout == ""


def test_the_same_file_twice_is_warned_about(agg, chunks):
    r = agg(chunks[0], str(chunks[0].parent / "." / chunks[0].name), "-q")
    assert r.returncode == 0
    assert "is the same file as" in r.stderr


# -- labels as users write them --------------------------------------------------------------------------

def test_a_declared_class_named_none_is_a_class_in_labels_and_gold(agg, tmp_path):
    labels = write_csv(tmp_path / "l.csv", [("a", "1", "none"), ("a", "2", "none"), ("b", "1", "positive"),
                                            ("b", "2", "positive"), ("c", "1", "NA"), ("c", "2", "NA")])
    gold = tmp_path / "g.csv"
    gold.write_text("task,truth\na,none\nb,positive\nc,NA\n")
    r = agg(labels, "--classes", "none,positive,NA", "--gold", gold, "--method", "mv")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1:] == ["a,none,1.000000", "b,positive,1.000000", "c,NA,1.000000"]
    assert "error 0.00 %" in r.stderr
    # undeclared, the word still means a missing label, and the message says how to declare it
    r = agg(labels, "--method", "mv")
    one_error_line(r, 1, "is missing (none)", "--classes")


def test_a_dense_file_saved_by_numpy_reads_whole_numbers_as_numbers(agg, tmp_path):
    path = tmp_path / "dense.csv"
    np.savetxt(path, np.array([[3, -1, 3], [1, 1, -1], [-1, 2, 2]]), delimiter=",")  # numpy's default %.18e
    assert "3.000000000000000000e+00" in path.read_text()
    r = agg(path, "--format", "dense", "--method", "mv", "--proba")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "task,label,confidence,p_1,p_2,p_3"
    assert [l.split(",")[1] for l in lines[1:]] == ["3", "1", "2"]


def test_exponent_notation_is_a_number_only_when_whole():
    from kdtools.aggregate.crowdio import normalise_label

    assert normalise_label("3.000000000000000000e+00") == "3"
    assert normalise_label("-2E0") == "-2"
    assert normalise_label("1e3") == "1000"
    assert normalise_label("2.5e0") == "2.5e0"  # not whole: kept as written
    assert normalise_label("1e400") == "1e400"  # not finite


def test_mixed_labels_order_integers_first_then_strings():
    from kdtools.aggregate.crowdio import natural_order

    assert natural_order(["10", "x", "2", "b", "-1"]) == ["-1", "2", "10", "b", "x"]
    assert natural_order(["10", "2", "1"]) == ["1", "2", "10"]
    assert natural_order(["cat", "ant"]) == ["ant", "cat"]


def test_mixed_labels_give_proba_columns_in_that_order(agg, tmp_path):
    labels = write_csv(tmp_path / "l.csv", [("a", "1", "10"), ("a", "2", "2"), ("b", "1", "x")])
    r = agg(labels, "--method", "mv", "--proba")
    assert r.stdout.splitlines()[0] == "task,label,confidence,p_2,p_10,p_x"


# -- smaller things ---------------------------------------------------------------------------------------

def test_kd_eval_aggregation_refuses_a_method_twice(keval, chunks, tmp_path):
    gold = tmp_path / "g.csv"
    gold.write_text("task,truth\nt0,a\n")
    r = keval(chunks[0], "--gold", gold, "--method", "mv,mv")
    one_error_line(r, 2, "twice")


def test_a_closed_stdout_is_one_line(chunks):
    r = subprocess.run(f"{sys.executable} -m kdtools.cli.aggregate {chunks[0]} >&-", shell=True, cwd=ROOT,
                       capture_output=False, stderr=subprocess.PIPE, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "stdout is closed" in lines[0], r.stderr


def test_the_state_records_the_options_the_run_used(agg, chunks, tmp_path):
    state = tmp_path / "crowd.state"
    assert agg(chunks[0], "--state", state, "--chunk-size", "20", "-q").returncode == 0
    with safe_open(state, "pt") as f:
        options = json.loads(f.metadata()["options"])
    assert options["seed"] == 0
    assert options["initial_size"] == 500  # the default initial set, resolved
    assert options["bila"]["lr"] == 0.01 and options["bila"]["zeta"] == 1.0 and options["bila"]["final_lr"] == 0.1


# -- review mends (helper-3) --------------------------------------------------------------------------

def test_a_state_that_cannot_be_locked_is_used_with_a_warning(agg, chunks, tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)  # Lustre without -o flock, say: this used to fail every run
    r = agg(chunks[0], "--state", tmp_path / "crowd.state", "-q", "-o", tmp_path / "out.csv")
    assert r.returncode == 0, r.stderr
    assert "cannot be locked here" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk1.csv", "chunk2.csv", "crowd.state", "out.csv"]


def test_a_one_letter_file_given_twice_is_warned_about(agg, chunks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a").write_text(chunks[0].read_text())
    r = agg("a", "a", "-q", "--method", "mv")
    assert r.returncode == 0
    assert "a is the same file as a" in r.stderr


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs")
def test_a_bad_later_file_sends_nothing_into_a_fifo(chunks, tmp_path):
    import os

    fifo = tmp_path / "labels.fifo"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    r = subprocess.run([sys.executable, "-m", "kdtools.cli.aggregate", str(chunks[0]), str(tmp_path / "missing.csv"),
                        "-o", str(fifo), "-q"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    got = reader.communicate(timeout=60)[0]
    assert r.returncode == 1 and "missing.csv" in r.stderr
    assert got == b""
