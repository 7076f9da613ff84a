"""Problems a fresh-eyes walkthrough of kd-aggregate and kd-eval aggregation found, one test (or a few) each:
--proba with a class that appears late, outputs that are inputs, dense files (row-number task ids, a header
not named `task`), numeric options, gold files, kd-eval's input options, '-' for side files, the default
initial set, majority-vote ties, interrupts, delimiters, column roles, line numbers, the state's method and
the summary line. Each asserts the exit code, the one line on stderr and what happened to the files."""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path

import pytest
from conftest import one_error_line, sha, write_csv

from kdtools.aggregate import crowdio
from kdtools.errors import KdError

ROOT = Path(__file__).resolve().parents[1]


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _run(call, capsys, monkeypatch, stdin=None):
    from kdtools.cli import _common

    _common.DEBUG["on"] = False
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((stdin or "").encode()), encoding="utf-8"))
    capsys.readouterr()
    code = 0
    try:
        call()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return Result(code, out.out, out.err)


@pytest.fixture()
def agg(capsys, monkeypatch):
    from kdtools.cli.aggregate import main

    monkeypatch.setattr(sys, "argv", ["kd-aggregate"])
    return lambda *args, stdin=None: _run(lambda: main([str(a) for a in args]), capsys, monkeypatch, stdin)


@pytest.fixture()
def keval(capsys, monkeypatch):
    from kdtools.cli.eval import main

    def call(*args, stdin=None):
        monkeypatch.setattr(sys, "argv", ["kd-eval", "aggregation", *map(str, args)])
        return _run(main, capsys, monkeypatch, stdin)

    return call


def warnings(r):
    return [l for l in r.stderr.splitlines() if l.startswith("warning:")]


def rows_of(text):
    return list(csv.reader(text.splitlines()))


@pytest.fixture(scope="module")
def crowd(tmp_path_factory):
    """40 tasks t0..t39, 5 workers, classes 0..2 (integers), gold; and two chunks where class 3 appears late."""
    d = tmp_path_factory.mktemp("walk")
    rows, truth = [], {}
    for i in range(40):
        y = i % 3
        truth[f"t{i}"] = str(y)
        for w in range(5):
            rows.append((f"t{i}", f"w{w}", str(y if (i + w) % 4 else (y + 1) % 3)))
    write_csv(d / "labels.csv", rows)
    write_csv(d / "truth.csv", list(truth.items()), header=("task", "truth"))
    write_csv(d / "c1.csv", [("a", "w1", "0"), ("a", "w2", "1"), ("b", "w1", "2"), ("b", "w2", "2")])
    write_csv(d / "c2.csv", [("c", "w1", "3"), ("c", "w2", "3"), ("d", "w1", "0")])
    return d


# ------------------------------------------------------------------------------------------------
# 1. --proba and a class that first appears in a later chunk


def test_proba_file_gets_one_header_with_every_class(crowd, tmp_path, agg):
    out = tmp_path / "p.csv"
    r = agg(crowd / "c1.csv", crowd / "c2.csv", "--method", "mv", "--proba", "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    table = rows_of(out.read_text())
    assert table[0] == ["task", "label", "confidence", "p_0", "p_1", "p_2", "p_3"]
    assert {len(row) for row in table} == {7}  # never ragged
    a = dict(zip(table[0], table[1]))
    assert a["task"] == "a" and float(a["p_3"]) == 0.0  # class 3 did not exist yet when chunk 1 was aggregated
    assert float(a["p_0"]) + float(a["p_1"]) == pytest.approx(1.0)


def test_proba_on_stdout_refuses_a_class_after_the_header(crowd, tmp_path, agg):
    state = tmp_path / "s.state"
    r = agg(crowd / "c1.csv", crowd / "c2.csv", "--method", "mv", "--proba", "--state", state)
    one_error_line_or_warning = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 1 and len(one_error_line_or_warning) == 1, r.stderr
    assert "new class(es) 3" in one_error_line_or_warning[0] and "--classes" in one_error_line_or_warning[0]
    assert {len(row) for row in rows_of(r.stdout)} == {6}  # only the rows that fit the header went out
    assert not state.exists()
    ok = agg(crowd / "c1.csv", crowd / "c2.csv", "--method", "mv", "--proba", "--classes", "0,1,2,3")
    assert ok.returncode == 0 and {len(row) for row in rows_of(ok.stdout)} == {7}


# ------------------------------------------------------------------------------------------------
# 2. an output path that is an input, or another output


def test_outputs_that_are_inputs_are_refused(crowd, tmp_path, agg, keval):
    labels = tmp_path / "label.csv"
    labels.write_bytes((crowd / "labels.csv").read_bytes())
    before = sha(labels)
    one_error_line(agg(labels, "--method", "mv", "--confusion", labels, "-o", tmp_path / "z.csv"), 2,
                   "--confusion", "overwrite the input")
    one_error_line(agg(labels, "--method", "mv", "-o", labels), 2, "-o", "label file")
    (tmp_path / "sub").mkdir()
    one_error_line(agg(labels, "--method", "mv", "-o", tmp_path / "sub" / ".." / "label.csv"), 2, "label file")
    gold = tmp_path / "gold.png"
    gold.write_bytes((crowd / "truth.csv").read_bytes())
    one_error_line(agg(labels, "--method", "mv", "--gold", gold, "--plot", gold), 2, "--plot", "--gold file")
    one_error_line(keval(labels, "--gold", gold, "--method", "mv", "--plot", gold), 2, "--plot", "--gold file")
    one_error_line(agg("simulate", "--truth", crowd / "truth.csv", "-o", tmp_path / "same.csv", "--truth-out",
                       tmp_path / "same.csv"), 2, "same file")
    truth = tmp_path / "truth.csv"
    truth.write_bytes((crowd / "truth.csv").read_bytes())
    one_error_line(agg("simulate", "--truth", truth, "--truth-out", truth), 2, "--truth-out", "--truth file")
    assert sha(labels) == before and not (tmp_path / "z.csv").exists() and not (tmp_path / "same.csv").exists()
    assert truth.read_bytes() == (crowd / "truth.csv").read_bytes()
    # a label file given as the state, too
    one_error_line(agg(labels, "--state", labels), 2, "--state", "label file")
    assert sha(labels) == before


# ------------------------------------------------------------------------------------------------
# 3. and 4. dense files


def test_dense_without_header_into_a_state_holding_those_row_numbers_warns(tmp_path, agg):
    m = tmp_path / "m.csv"
    m.write_text("2,-1,2,1\n0,0,-1,0\n1,1,1,-1\n2,2,0,2\n")
    state = tmp_path / "s.state"
    first = agg(m, "--format", "dense", "--method", "mv", "--state", state)
    assert first.returncode == 0 and not warnings(first), first.stderr
    again = agg(m, "--format", "dense", "--method", "mv", "--state", state)
    assert again.returncode == 0, again.stderr
    w = warnings(again)
    assert len(w) == 1 and "row numbers" in w[0] and "task,<worker ids>" in w[0] and str(state) in w[0], again.stderr
    # two headerless files in one run: the second one's tasks are the first one's
    m2 = tmp_path / "m2.csv"  # another file (the same file twice gets a warning of its own)
    m2.write_text(m.read_text())
    two = agg(m, m2, "--format", "dense", "--method", "mv")
    assert len(warnings(two)) == 1 and "an earlier file" in warnings(two)[0]
    # with real task ids there is nothing to warn about
    h = tmp_path / "h.csv"
    h.write_text("task,a,b,c,d\nx,2,-1,2,1\ny,0,0,-1,0\n")
    assert not warnings(agg(h, "--format", "dense", "--method", "mv", "--state", state))


def _dense_header_file(path, first_cell):
    workers = [f"{j}" for j in range(12)]
    lines = [",".join(([first_cell] if first_cell is not None else []) + workers)]
    for i in range(30):
        lines.append(",".join(([f"{100 + i}"] if first_cell is not None else []) + [str((i + j) % 3) for j in range(12)]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("first_cell", ["item", None])
def test_dense_header_not_named_task_is_refused_not_read_as_labels(tmp_path, agg, first_cell):
    path = _dense_header_file(tmp_path / "d.csv", first_cell)
    r = agg(path, "--format", "dense", "--method", "mv")
    line = one_error_line(r, 1, "d.csv:1:", "looks like a header", "task,<worker ids>")
    assert ("--task-col item" in line) == (first_cell == "item")
    assert r.stdout == ""
    if first_cell == "item":
        ok = agg(path, "--format", "dense", "--method", "mv", "--task-col", "item")
        assert ok.returncode == 0 and len(ok.stdout.splitlines()) == 31, ok.stderr
        assert {row["task"] for row in csv.DictReader(ok.stdout.splitlines())} == {str(100 + i) for i in range(30)}


def test_dense_rows_of_labels_are_not_taken_for_a_header():
    # a first row with distinct labels that the other rows use too is a row
    rows = list(crowdio.read_dense(io.StringIO("0,1,2\n2,1,0\n1,1,2\n"), "m.csv"))
    assert rows[:3] == [("0", "0", "0"), ("0", "1", "1"), ("0", "2", "2")]


# ------------------------------------------------------------------------------------------------
# 5. and 6. numbers and seeds


@pytest.mark.parametrize("args,needle", [
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--zeta", "-1"], "--zeta must be a finite number >= 0"),
    (["--zeta", "nan"], "--zeta must be a finite number >= 0"),
    (["--seed", "-1"], "--seed must be a whole number from 0"),
])
def test_bad_numbers_are_usage_errors_in_kd_aggregate(crowd, tmp_path, agg, args, needle):
    state = tmp_path / "s.state"
    one_error_line(agg(crowd / "labels.csv", "--state", state, *args), 2, needle)
    assert not state.exists()


@pytest.mark.parametrize("args,needle", [
    (["--noise", "nan"], "--noise must be a finite number >= 0 and <= 1"),
    (["--missing", "1"], "--missing must be a finite number >= 0 and < 1"),
    (["--seed", "-1"], "--seed must be a whole number from 0"),
])
def test_bad_numbers_are_usage_errors_in_simulate(crowd, tmp_path, agg, args, needle):
    one_error_line(agg("simulate", "--truth", crowd / "truth.csv", *args), 2, needle)


def test_negative_seed_is_a_usage_error_in_kd_eval_aggregation(crowd, keval):
    r = keval(crowd / "labels.csv", "--gold", crowd / "truth.csv", "--method", "mv", "--seed", "-1")
    one_error_line(r, 2, "--seed must be a whole number from 0")
    assert r.stdout == ""


def test_bila_config_refuses_bad_numbers():
    from kdtools.aggregate.bila import BilaConfig

    for bad in ({"lr": math.nan}, {"lr": 0.0}, {"zeta": -1.0}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            BilaConfig(**bad)


# ------------------------------------------------------------------------------------------------
# 7. gold files and how labels are read


def test_gold_truth_that_is_no_class_is_named_in_a_warning(crowd, tmp_path, agg):
    gold = tmp_path / "g.csv"
    gold.write_text("task,truth\nt0,zero\nt1,1.0\nt2,2\n")  # 1.0 is read as 1, like a label
    r = agg(crowd / "labels.csv", "--method", "mv", "--gold", gold)
    assert r.returncode == 0, r.stderr
    w = warnings(r)
    assert len(w) == 1 and "1 gold task(s)" in w[0] and "'zero'" in w[0] and "the classes are 0, 1, 2" in w[0], r.stderr


def test_gold_file_errors_name_the_line(crowd, tmp_path, agg):
    dup = tmp_path / "dup.csv"
    dup.write_text("task,truth\nt0,0\nt1,1\nt0,2\n")
    one_error_line(agg(crowd / "labels.csv", "--method", "mv", "--gold", dup), 1, "dup.csv:4:", "'t0'", "line 2")
    dup.write_text("task,truth\nt0,0\nt0,0.0\n")  # the same truth twice is no conflict
    assert crowdio.read_gold(dup) == {"t0": "0"}
    empty = tmp_path / "empty.csv"
    empty.write_text("task,truth\nt0,0\nt1,\n")
    one_error_line(agg(crowd / "labels.csv", "--method", "mv", "--gold", empty), 1, "empty.csv:3:", "missing")


def test_long_and_dense_read_whole_number_labels_alike():
    long_rows = list(crowdio.read_long(io.StringIO("task,worker,label\n0,0,1.0\n0,1,1\n0,2,01\n0,3,cat\n0,4,1.5\n"), "l.csv"))
    dense_rows = list(crowdio.read_dense(io.StringIO("1.0,1,01,cat,1.5\n"), "d.csv"))
    assert [r[2] for r in long_rows] == [r[2] for r in dense_rows] == ["1", "1", "1", "cat", "1.5"]
    assert crowdio.normalise_label(" -0 ") == "0" and crowdio.normalise_label("007") == "7"


# ------------------------------------------------------------------------------------------------
# 8. kd-eval aggregation has kd-aggregate's input options


def test_kd_eval_aggregation_reads_what_kd_aggregate_reads(crowd, tmp_path, keval):
    text = (crowd / "labels.csv").read_text().replace("task,worker,label", "item;annotator;answer").replace(",", ";")
    semi = tmp_path / "semi.txt"
    semi.write_text(text)
    args = ["--gold", crowd / "truth.csv", "--method", "mv", "--chunk-size", 10, "--initial-size", 10]
    base = keval(crowd / "labels.csv", *args)
    assert base.returncode == 0, base.stderr
    r = keval(semi, *args, "--delimiter", ";", "--task-col", "item", "--worker-col", "annotator", "--label-col", "answer")
    assert r.returncode == 0, r.stderr
    assert r.stdout == base.stdout
    dense = tmp_path / "d.csv"
    by_task: dict = {}
    for t, w, l in crowdio.read_all([crowd / "labels.csv"]):
        by_task.setdefault(t, {})[w] = l
    dense.write_text("task,w0,w1,w2,w3,w4\n" + "".join(f"{t}," + ",".join(v.get(f"w{j}", "-1") for j in range(5)) + "\n"
                                                   for t, v in by_task.items()))
    d = keval(dense, *args, "--format", "dense")
    assert d.returncode == 0 and d.stdout == base.stdout, d.stderr
    # the error message's advice exists now: an unknown column names the flags it recommends
    line = one_error_line(keval(semi, *args, "--delimiter", ";"), 1, "set --task-col/--worker-col/--label-col")
    assert "item" in line


# ------------------------------------------------------------------------------------------------
# 9. '-' is stdout for the labels only


@pytest.mark.parametrize("flag", ["--confusion", "--plot", "--state"])
def test_dash_for_a_side_file_is_a_usage_error(crowd, tmp_path, agg, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    extra = ["--gold", crowd / "truth.csv"] if flag == "--plot" else []
    one_error_line(agg(crowd / "labels.csv", "--method", "mv", flag, "-", *extra), 2, f"{flag} -", "file name")
    assert not (tmp_path / "-").exists()


def test_dash_for_truth_out_and_kd_eval_plot_is_a_usage_error(crowd, tmp_path, agg, keval, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_error_line(agg("simulate", "--truth", crowd / "truth.csv", "--truth-out", "-"), 2, "--truth-out -")
    one_error_line(keval(crowd / "labels.csv", "--gold", crowd / "truth.csv", "--plot", "-"), 2, "--plot -")
    assert not (tmp_path / "-").exists()


# ------------------------------------------------------------------------------------------------
# 10. and 11. the initial set


def test_default_initial_set_is_the_documented_one(crowd, keval):
    # 40 tasks, chunks of 25 by default: the initial set (500 > 40) holds them all, one point
    r = keval(crowd / "labels.csv", "--gold", crowd / "truth.csv", "--method", "mv")
    assert r.returncode == 0, r.stderr
    assert [row["tasks"] for row in csv.DictReader(r.stdout.splitlines())] == ["40"]
    small = keval(crowd / "labels.csv", "--gold", crowd / "truth.csv", "--method", "mv", "--initial-size", 25)
    assert [row["tasks"] for row in csv.DictReader(small.stdout.splitlines())] == ["25", "40"]
    from kdtools.cli.aggregate import INITIAL_HELP

    assert crowdio.DEFAULT_INITIAL_SIZE == 500 and f"Default: {crowdio.DEFAULT_INITIAL_SIZE}" in INITIAL_HELP
    assert crowdio.default_initial_size(25) == 500 and crowdio.default_initial_size(800) == 800
    assert crowdio.default_initial_size(None) is None


def test_default_initial_set_in_kd_aggregate(crowd, agg):
    r = agg("-", "--method", "mv", "--chunk-size", 10, "-v", stdin=(crowd / "labels.csv").read_text())
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("<stdin> chunk") == 1  # 40 tasks < the initial set of 500
    r = agg("-", "--method", "mv", "--chunk-size", 10, "--initial-size", 10, "-v", stdin=(crowd / "labels.csv").read_text())
    assert r.stderr.count("<stdin> chunk") == 4


def test_initial_size_without_chunk_size_is_a_usage_error(crowd, agg):
    one_error_line(agg(crowd / "labels.csv", "--method", "mv", "--initial-size", 10), 2, "--initial-size", "--chunk-size")


def test_initial_size_for_a_state_that_has_one_warns(crowd, tmp_path, agg):
    state = tmp_path / "s.state"
    assert agg(crowd / "labels.csv", "--method", "mv", "--state", state).returncode == 0
    r = agg(crowd / "labels.csv", "--state", state, "--chunk-size", 10, "--initial-size", 20)
    assert r.returncode == 0 and len(warnings(r)) == 1 and "--initial-size 20 is not used" in warnings(r)[0]


# ------------------------------------------------------------------------------------------------
# 12. majority vote offline and online: the same votes; only ties may differ (documented)


def test_majority_vote_offline_and_online_differ_only_on_ties(crowd):
    from kdtools.aggregate.online import Aggregator

    rows = crowdio.read_all([crowd / "labels.csv"])
    rows += [("tie1", "w0", "0"), ("tie1", "w1", "1"), ("tie2", "w0", "2"), ("tie2", "w1", "1")]
    offline = Aggregator("mv").process(rows)
    off = dict(zip(offline.tasks, zip(offline.labels, offline.confidence)))
    on = {}
    online = Aggregator("mv")
    for chunk in crowdio.split_groups(crowdio.group_by_task(rows), 7):
        res = online.process(chunk)
        on.update(zip(res.tasks, zip(res.labels, res.confidence)))
    for task, (label, conf) in off.items():
        assert on[task][1] == pytest.approx(conf)
        if conf > 0.5:  # no tie: the same label
            assert on[task][0] == label, task
    doc = (ROOT / "docs" / "kd-aggregate.md").read_text()
    mv_row = [l for l in doc.splitlines() if l.startswith("| `mv` |")][0]
    assert "identical offline and online" not in mv_row and "ties" in mv_row


# ------------------------------------------------------------------------------------------------
# 13. interrupts say what is kept and how to go on


@pytest.mark.parametrize("how,code,word", [("int", 130, "interrupted"), ("term", 143, "terminated (SIGTERM)")])
def test_interrupt_says_what_is_kept(crowd, tmp_path, agg, monkeypatch, how, code, word):
    from kdtools.aggregate import online
    from kdtools.cli import _common

    state, out = tmp_path / "s.state", tmp_path / "o.csv"
    assert agg(crowd / "labels.csv", "--method", "mv", "--state", state, "-o", out).returncode == 0
    before = (sha(state), sha(out))

    def stop(self, *a, **k):
        raise KeyboardInterrupt() if how == "int" else _common.Terminated()

    monkeypatch.setattr(online.Aggregator, "process", stop)
    r = agg(crowd / "labels.csv", "--state", state, "-o", out)
    line = one_error_line(r, code, word, f"{out} is as it was", f"the state {state} is as it was",
                          "run the same command again")
    assert "redoes all of its input" in line
    assert (sha(state), sha(out)) == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_kd_eval_aggregation_interrupt_says_nothing_was_written(crowd, keval, monkeypatch):
    from kdtools.aggregate import online

    def stop(*a, **k):
        raise KeyboardInterrupt()

    monkeypatch.setattr(online, "error_curves", stop)
    r = keval(crowd / "labels.csv", "--gold", crowd / "truth.csv", "--method", "mv")
    one_error_line(r, 130, "interrupted", "nothing was written", "run the same command again")


# ------------------------------------------------------------------------------------------------
# 14. - 18.


def test_semicolon_header_suggests_delimiter(crowd, tmp_path, agg):
    semi = tmp_path / "semi.csv"
    semi.write_text("task;worker;label\na;w1;0\n")
    one_error_line(agg(semi, "--method", "mv"), 1, "--delimiter ';'")
    gold = tmp_path / "g.csv"
    gold.write_text("task;truth\nt0;0\n")
    one_error_line(agg(crowd / "labels.csv", "--method", "mv", "--gold", gold), 1, "--delimiter ';'")
    dense = tmp_path / "d.csv"
    dense.write_text("0;1;-1\n1;1;0\n")
    one_error_line(agg(dense, "--format", "dense", "--method", "mv"), 1, "--delimiter ';'")
    assert agg(semi, "--method", "mv", "--delimiter", ";").returncode == 0


def test_comma_separated_tsv_suggests_delimiter(crowd, tmp_path, agg):
    # a .tsv name means tabs; a comma-separated file saved under that name is told which --delimiter to give
    tsv = tmp_path / "labels.tsv"
    tsv.write_text((crowd / "labels.csv").read_text())
    one_error_line(agg(tsv, "--method", "mv"), 1, "--delimiter ','")
    assert agg(tsv, "--method", "mv", "--delimiter", ",").returncode == 0


@pytest.mark.parametrize("args", [["--worker-col", "task"], ["--label-col", "worker"], ["--task-col", ""]])
def test_one_column_for_two_roles_is_a_usage_error(crowd, agg, keval, args):
    one_error_line(agg(crowd / "labels.csv", "--method", "mv", *args), 2, args[0])
    one_error_line(keval(crowd / "labels.csv", "--gold", crowd / "truth.csv", *args), 2, args[0])


def test_label_outside_classes_names_file_and_line(crowd, tmp_path, agg):
    bad = tmp_path / "bad.csv"
    write_csv(bad, [("a", "w1", "0"), ("a", "w2", "1"), ("b", "w1", "7")])
    one_error_line(agg(bad, "--method", "mv", "--classes", "0,1,2"), 1, "bad.csv:4:", "'7'")
    one_error_line(agg("-", "--method", "mv", "--classes", "0,1,2", stdin=bad.read_text()), 1, "<stdin>:4:")
    dense = tmp_path / "d.csv"
    dense.write_text("task,w1,w2\na,0,1\nb,9,1\n")
    one_error_line(agg(dense, "--format", "dense", "--method", "mv", "--classes", "0,1"), 1, "d.csv:3:", "'9'")
    # a state that declared its classes checks them at the line too
    state = tmp_path / "s.state"
    assert agg(crowd / "labels.csv", "--method", "mv", "--classes", "0,1,2", "--state", state).returncode == 0
    one_error_line(agg(bad, "--state", state), 1, "bad.csv:4:")


def test_state_method_is_used_when_method_is_not_given(crowd, tmp_path, agg):
    state = tmp_path / "s.state"
    assert agg(crowd / "labels.csv", "--method", "ds", "--state", state).returncode == 0
    r = agg(crowd / "labels.csv", "--state", state)
    assert r.returncode == 0, r.stderr
    one_error_line(agg(crowd / "labels.csv", "--state", state, "--method", "bila"), 1, "holds a ds state")


def test_summary_counts_task_labels_and_crowd_labels(crowd, agg, tmp_path):
    r = agg(crowd / "labels.csv", "--method", "mv")
    assert r.returncode == 0
    assert "kd-aggregate: 1 chunk, 40 task labels written from 200 crowd labels" in r.stderr, r.stderr
    # the counts take the number they need: one chunk in the state, not "1 chunks"
    r = agg(crowd / "labels.csv", "--method", "mv", "--state", tmp_path / "s.state")
    assert r.returncode == 0 and "; state: 1 chunk, 40 tasks, " in r.stderr, r.stderr


def test_a_bad_input_error_is_raised_as_kderror():
    with pytest.raises(KdError, match="m.csv:3"):
        list(crowdio.read_dense(io.StringIO("task,a\nx,0\ny,5\n"), "m.csv", classes=["0", "1"]))


def test_a_state_with_classes_written_as_1_0_keeps_them_one_class(agg, tmp_path):
    # a state written before labels were read as numbers holds classes "1.0", "2.0": a later chunk's 1.0 (read as 1)
    # must be the same class, not a new one
    from kdtools.aggregate import Aggregator
    from kdtools.aggregate.state import load_state, save_state

    old = Aggregator("mv", seed=0)
    old.process([("a", "w1", "1.0"), ("a", "w2", "2.0"), ("b", "w1", "2.0")])
    assert old.classes.items == ["1.0", "2.0"]
    save_state(tmp_path / "old.state", old)
    labels = write_csv(tmp_path / "c2.csv", [("c", "w1", "1.0"), ("c", "w2", "1.0"), ("d", "w1", "2.0")])
    r = agg(labels, "--method", "mv", "--state", tmp_path / "old.state", "--proba", "-o", tmp_path / "out.csv")
    assert r.returncode == 0, r.stderr
    assert "new class" not in r.stderr
    assert load_state(tmp_path / "old.state").classes.items == ["1", "2"]
    assert (tmp_path / "out.csv").read_text().splitlines()[0] == "task,label,confidence,p_1,p_2"


def test_classes_written_as_1_0_fix_the_classes_a_file_reads_as_1(agg, tmp_path):
    labels = write_csv(tmp_path / "a.csv", [("a", "w1", "1.0"), ("a", "w2", "2.0"), ("b", "w1", "2.0")])
    r = agg(labels, "--method", "mv", "--classes", "1.0,2.0", "-o", tmp_path / "out.csv")
    assert r.returncode == 0, r.stderr
    one_error_line(agg(labels, "--method", "mv", "--classes", "1,1.0"), 2, "distinct")


def test_a_dense_stream_of_label_rows_is_not_held_back_by_the_header_check():
    # a first line whose labels after the first repeat cannot be a header: the first chunk comes out while stdin is still open
    import subprocess
    import threading

    from conftest import kd_cmd

    p = subprocess.Popen([*kd_cmd("kd-aggregate"), "-", "--format", "dense", "--method", "mv", "--chunk-size", "2",
                          "--initial-size", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    timer = threading.Timer(60, p.kill)  # a reader held back until EOF would block here: fail, not hang
    timer.start()
    try:
        p.stdin.write(b"0,1,1,-1\n1,1,1,0\n0,0,0,0\n")
        p.stdin.flush()
        first = p.stdout.readline()
        assert first.startswith(b"task,label"), (first, p.poll())
        p.stdin.close()
        p.wait()
    finally:
        timer.cancel()
    assert p.returncode == 0, p.stderr.read()
