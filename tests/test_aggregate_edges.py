"""kd-aggregate and kd-eval aggregation at their edges: chunk sizes that cannot cut a file, --classes on a
state that learned its classes, side files (--plot, --confusion) that fail or cannot be written, CSV
quoting errors reported at the right line, stdin for kd-eval aggregation, and --gold that matches no
aggregated task. Each case asserts the exit code, the one-line message and that outputs are left intact."""

from __future__ import annotations

import csv
import io
import os
import resource
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import one_error_line, write_csv

from kdtools.aggregate import crowdio
from kdtools.errors import KdError

ROOT = Path(__file__).resolve().parents[1]


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _limit_memory():  # a runaway loop fails fast instead of eating the machine's memory
    resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))  # torch's CUDA build maps ~3 GB at import


def run_sub(module, args, stdin=None, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    try:
        return subprocess.run([sys.executable, "-m", module, *map(str, args)], input=stdin, capture_output=True,
                              text=True, cwd=ROOT, env=env, timeout=timeout, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{module} {' '.join(map(str, args))} still running after {timeout} s")


def run_here(main, argv0, args, capsys, monkeypatch, stdin=None):
    """A command in this process: exit code, stdout and stderr as the console would see them."""
    from kdtools.cli import _common

    _common.DEBUG["on"] = False
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((stdin or "").encode()), encoding="utf-8"))
    capsys.readouterr()
    code = 0
    try:
        main([str(a) for a in args]) if argv0 == "kd-aggregate" else _eval_main(monkeypatch, args, main)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return Result(code, out.out, out.err)


def _eval_main(monkeypatch, args, main):
    monkeypatch.setattr(sys, "argv", ["kd-eval", *map(str, args)])
    main()


@pytest.fixture()
def agg(capsys, monkeypatch):
    from kdtools.cli.aggregate import main

    monkeypatch.setattr(sys, "argv", ["kd-aggregate"])
    return lambda *args, stdin=None: run_here(main, "kd-aggregate", args, capsys, monkeypatch, stdin)


@pytest.fixture()
def keval(capsys, monkeypatch):
    from kdtools.cli.eval import main

    return lambda *args, stdin=None: run_here(main, "kd-eval", ["aggregation", *args], capsys, monkeypatch, stdin)


@pytest.fixture(scope="module")
def crowd(tmp_path_factory):
    """60 tasks, 3 workers, labels red/green/blue; truth; and 10 other tasks with gold that no label file has."""
    d = tmp_path_factory.mktemp("crowd")
    colours = ["red", "green", "blue"]
    rows, truth = [], {}
    for i in range(60):
        y = colours[i % 3]
        truth[f"t{i}"] = y
        for w in range(3):
            rows.append((f"t{i}", f"w{w}", y if (i + w) % 5 else colours[(i + 1) % 3]))
    write_csv(d / "labels.csv", rows)
    write_csv(d / "truth.csv", list(truth.items()), header=("task", "truth"))
    write_csv(d / "other-truth.csv", [(f"z{i}", "red") for i in range(10)], header=("task", "truth"))
    return d


# ------------------------------------------------------------------------------------------------
# 1. chunk sizes


@pytest.mark.parametrize("flags, needle", [
    (["--chunk-size", -3], "--chunk-size must be >= 1"),
    (["--chunk-size", 0], "--chunk-size must be >= 1"),
    (["--initial-size", -5, "--chunk-size", 100], "--initial-size must be >= 1"),
    (["--initial-size", 0], "--initial-size must be >= 1"),
])
def test_kd_eval_aggregation_refuses_chunk_sizes_below_one(crowd, tmp_path, flags, needle):
    # a real process with a memory limit and a timeout: the old code looped forever on -3
    r = run_sub("kdtools.cli.eval", ["aggregation", crowd / "labels.csv", "--gold", crowd / "truth.csv",
                                     "--method", "mv", *flags], timeout=60)
    one_error_line(r, 2, needle)
    assert r.stdout == ""


def test_kd_aggregate_and_kd_eval_agree_on_chunk_size_zero(crowd, agg, keval):
    # the same rule for both commands: a chunk holds at least one task; 0 is not "offline"
    one_error_line(agg(crowd / "labels.csv", "--method", "mv", "--chunk-size", 0), 2, "--chunk-size must be >= 1")
    one_error_line(keval(crowd / "labels.csv", "--gold", crowd / "truth.csv", "--method", "mv", "--chunk-size", 0),
                   2, "--chunk-size must be >= 1")


@contextmanager
def at_most(seconds):
    """Fail (not hang) if the body runs longer than ``seconds``."""
    def stop(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("chunk_size, first_size", [(0, None), (-3, None), (2, -5), (2, 0), (1.5, None)])
def test_splitters_refuse_sizes_below_one(chunk_size, first_size):
    groups = crowdio.group_by_task([(t, "w", "x") for t in "abcde"])
    rows = [g[0] for g in groups]
    with at_most(2):
        with pytest.raises(ValueError, match="must be a whole number of tasks >= 1"):
            crowdio.split_groups(groups, chunk_size, first_size)
        with pytest.raises(ValueError, match="must be a whole number of tasks >= 1"):
            crowdio.stream_chunks(rows, chunk_size, first_size)  # at the call, before any chunk
    # None is still "one chunk", positive sizes still cut
    assert crowdio.split_groups(groups, None) == [rows]
    assert [len(c) for c in crowdio.split_groups(groups, 2, 3)] == [3, 2]
    assert [len(c) for c in crowdio.stream_chunks(rows, 2, 3)] == [3, 2]


# ------------------------------------------------------------------------------------------------
# 2. --classes on a state that learned its classes


def test_classes_are_honoured_on_a_state_made_without_them(crowd, tmp_path, agg):
    state = tmp_path / "s.state"
    r = agg(crowd / "labels.csv", "--state", state, "--method", "mv", "-o", tmp_path / "first.csv")
    assert r.returncode == 0, r.stderr
    before = state.read_bytes()
    extra = write_csv(tmp_path / "extra.csv", [("n1", "w0", "purple"), ("n1", "w1", "red")])
    # the state learned red, green, blue (in that order of sorting: blue, green, red); --classes with the same
    # list declares them: a label outside them is an error, the state and -o are untouched
    classes = ",".join(crowdio.natural_order(["red", "green", "blue"]))
    out = tmp_path / "o.csv"
    out.write_text("keep\n")
    r = agg(extra, "--state", state, "--method", "mv", "--classes", classes, "-o", out)
    one_error_line(r, 1, "label 'purple'", "not one of the fixed classes")
    assert state.read_bytes() == before and out.read_text() == "keep\n"
    # other classes than the state learned: refused, saying the state's were learned, not declared
    r = agg(extra, "--state", state, "--method", "mv", "--classes", "0,1,2,3")
    one_error_line(r, 1, f"was made for classes {classes} (learned from its labels, not declared), not 0,1,2,3")
    assert state.read_bytes() == before
    # a successful run with --classes records them as declared: later runs without --classes keep them
    ok = write_csv(tmp_path / "ok.csv", [("n2", "w0", "red"), ("n2", "w1", "red")])
    r = agg(ok, "--state", state, "--method", "mv", "--classes", classes, "-o", tmp_path / "ok-out.csv")
    assert r.returncode == 0, r.stderr
    after = state.read_bytes()
    r = agg(extra, "--state", state, "--method", "mv")
    one_error_line(r, 1, "label 'purple'", "fixed by --classes")
    assert state.read_bytes() == after


# ------------------------------------------------------------------------------------------------
# 3. side files: checked up front, and written before -o is committed


def test_bad_plot_format_is_a_usage_error_before_any_work(crowd, tmp_path, agg, keval):
    out = tmp_path / "keep.csv"
    out.write_text("keep\n")
    state = tmp_path / "r.state"
    r = agg(crowd / "labels.csv", "--state", state, "--gold", crowd / "truth.csv", "--plot", tmp_path / "bad.txt",
            "-o", out)
    one_error_line(r, 2, "--plot", "bad.txt", "'txt'")
    assert out.read_text() == "keep\n" and not state.exists() and not (tmp_path / "bad.txt").exists()
    r = keval(crowd / "labels.csv", "--gold", crowd / "truth.csv", "--method", "mv", "--plot", tmp_path / "bad.txt")
    one_error_line(r, 2, "--plot", "'txt'")
    assert r.stdout == "" and not (tmp_path / "bad.txt").exists()


def test_unwritable_side_file_paths_are_usage_errors(crowd, tmp_path, agg):
    out = tmp_path / "keep.csv"
    out.write_text("keep\n")
    (tmp_path / "adir").mkdir()
    r = agg(crowd / "labels.csv", "--method", "mv", "--confusion", tmp_path / "adir", "-o", out)
    one_error_line(r, 2, "--confusion", "is a directory")
    r = agg(crowd / "labels.csv", "--method", "mv", "--confusion", out / "sub" / "c.h5", "-o", out)
    one_error_line(r, 2, "--confusion", "is not a directory")
    r = agg(crowd / "labels.csv", "--method", "mv", "--confusion", out, "-o", out)
    one_error_line(r, 2, "-o and --confusion name the same file")
    assert out.read_text() == "keep\n"


def test_a_failing_side_file_leaves_output_and_state_intact(crowd, tmp_path, agg, monkeypatch):
    import kdtools.aggregate.plot as plot_mod

    state = tmp_path / "s.state"
    out = tmp_path / "keep.csv"
    assert agg(crowd / "labels.csv", "--method", "mv", "--state", state, "-o", out).returncode == 0
    before_state, before_out = state.read_bytes(), out.read_bytes()

    def broken(*a, **k):
        raise KdError("disk full")

    monkeypatch.setattr(plot_mod, "plot_error_curves", broken)
    # a second chunk (other labels, so a replaced -o would show)
    rows = list(csv.reader((crowd / "labels.csv").read_text().splitlines()))[1:31]
    second = write_csv(tmp_path / "second.csv", [(t, w, "red") for t, w, _ in rows])
    r = agg(second, "--method", "mv", "--state", state, "--gold", crowd / "truth.csv",
            "--plot", tmp_path / "e.png", "-o", out)
    one_error_line(r, 1, "disk full")
    assert out.read_bytes() == before_out and state.read_bytes() == before_state
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    monkeypatch.undo()  # the same run without the failure does replace -o: the check above is not vacuous
    assert agg(second, "--method", "mv", "--state", state, "-o", out).returncode == 0
    assert out.read_bytes() != before_out


# ------------------------------------------------------------------------------------------------
# 4. CSV quoting errors at the line where the bad record starts


@pytest.mark.parametrize("text, line", [
    ('task,worker,label\na,w1,x\nb,w2,y\nc,"w3,z\nd,w4,x\n', 4),  # unclosed quote: noticed only at the end
    ('task,worker,label\na,w1,x\nb,w2,y\nc,w3,z\nd,"w4,x\n', 5),
    ('task,worker,label\na,"w\n1",x\nb,w2,y\nc,"w3"z,x\n', 5),  # a good quoted newline before the bad line
    ('task,worker,label\na,w1,x\n\nc,"w3,z\n', 4),  # a blank line before it
])
def test_quoting_errors_name_the_line_where_the_record_starts(tmp_path, agg, text, line):
    with pytest.raises(KdError, match=f"^x.csv:{line}: malformed line"):
        list(crowdio.read_long(io.StringIO(text), "x.csv"))
    bad = tmp_path / "quote.csv"
    bad.write_text(text)
    one_error_line(agg(bad, "--method", "mv"), 1, f"quote.csv:{line}: malformed line")
    one_error_line(agg("-", "--method", "mv", stdin=text), 1, f"<stdin>:{line}: malformed line")


def test_gold_and_dense_errors_name_their_line(tmp_path):
    gold = tmp_path / "g.csv"
    gold.write_text('task,truth\na,x\nb,"y\nc,z\n')
    with pytest.raises(KdError, match="g.csv:3: malformed line"):
        crowdio.read_gold(gold)
    gold.write_text('task,truth\na,x\n"b\nc",y\nd,z,extra\n')
    with pytest.raises(KdError, match="g.csv:5: malformed line: expected 2 fields"):
        crowdio.read_gold(gold)
    with pytest.raises(KdError, match="m.csv:2: malformed line"):
        list(crowdio.read_dense(io.StringIO('1,0\n"1"x,0\n'), "m.csv", delimiter=","))


# ------------------------------------------------------------------------------------------------
# 5. kd-eval aggregation reads '-' from stdin


def test_kd_eval_aggregation_reads_labels_from_stdin(crowd, keval):
    args = ["--gold", crowd / "truth.csv", "--method", "mv,ds", "--chunk-size", 20, "--initial-size", 20]
    from_file = keval(crowd / "labels.csv", *args)
    assert from_file.returncode == 0, from_file.stderr
    from_stdin = keval("-", *args, stdin=(crowd / "labels.csv").read_text())
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout == from_file.stdout
    assert [r["tasks"] for r in csv.DictReader(from_stdin.stdout.splitlines()) if r["method"] == "mv"] == ["20", "40", "60"]
    one_error_line(keval("-", *args, stdin=""), 1, "<stdin>: empty input")


# ------------------------------------------------------------------------------------------------
# 6. --gold that matches no aggregated task


def test_gold_without_overlap_warns_and_writes_no_plot(crowd, tmp_path):
    out, plot = tmp_path / "o.csv", tmp_path / "e.png"
    r = run_sub("kdtools.cli.aggregate", [crowd / "labels.csv", "--method", "mv,ds", "--gold", crowd / "other-truth.csv",
                                          "--plot", plot, "-o", out, "--chunk-size", 20])
    assert r.returncode == 0, r.stderr
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1, r.stderr
    assert "no task of" in warnings[0] and "other-truth.csv was aggregated" in warnings[0]
    assert f"{plot} not written" in warnings[0]
    assert "UserWarning" not in r.stderr and "No artists" not in r.stderr
    assert not plot.exists()
    assert len(out.read_text().splitlines()) == 61  # the labels themselves are fine
    assert "mv: error n/a (no gold task aggregated)" in r.stderr
    # an existing plot is left as it was; -q keeps the warning
    plot.write_bytes(b"old")
    r = run_sub("kdtools.cli.aggregate", [crowd / "labels.csv", "--method", "mv", "--gold", crowd / "other-truth.csv",
                                          "--plot", plot, "-q"])
    assert r.returncode == 0 and plot.read_bytes() == b"old"
    assert r.stderr.count("warning:") == 1 and "no task of" in r.stderr


def test_kd_eval_aggregation_gold_without_overlap_is_an_error(crowd, tmp_path, keval):
    r = keval(crowd / "labels.csv", "--gold", crowd / "other-truth.csv", "--method", "mv", "--plot", tmp_path / "e.png")
    one_error_line(r, 1, "no task of", "has a gold label in", "nothing to score")
    assert r.stdout == "" and not (tmp_path / "e.png").exists()


def test_plot_error_curves_refuses_an_empty_plot(tmp_path):
    from kdtools.aggregate.plot import plot_error_curves

    with pytest.raises(KdError, match="no error-rate point to draw"):
        plot_error_curves({"mv": [], "ds": []}, tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()
    plot_error_curves({"mv": [(10, 0.1), (20, 0.05)], "ds": []}, tmp_path / "e.png")
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_a_gold_file_that_is_not_utf8_is_one_clear_error_even_when_small(tmp_path):
    # the decoder reads ahead, so a bad byte in a small file surfaces while reading the header line
    gold = tmp_path / "g.csv"
    gold.write_bytes(b"task,truth\nt1,\xff\n")
    with pytest.raises(KdError, match=r"g.csv: not a UTF-8 text file \(byte 0xff"):
        crowdio.read_gold(gold)
