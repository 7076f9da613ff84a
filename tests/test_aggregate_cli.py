"""kd-aggregate end to end through real subprocesses: chunks with a state file, a stdin pipe, outputs,
the simulator, and every bad input giving exit 1, one clear line on stderr and an untouched state."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_csv

ROOT = Path(__file__).resolve().parents[1]


def run(args, stdin=None, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "kdtools.cli.aggregate", *map(str, args)], input=stdin,
                          capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=300)


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_here(args, stdin=None, capsys=None, monkeypatch=None):
    """The same command in this process (``main(argv)``): the exit code and stderr contract of the
    subprocess runs, without paying the interpreter start-up for every bad-input case."""
    import io

    from kdtools.cli import _common
    from kdtools.cli.aggregate import main

    _common.DEBUG["on"] = False
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((stdin or "").encode()), encoding="utf-8"))
    monkeypatch.setattr(sys, "argv", ["kd-aggregate"])
    capsys.readouterr()
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return Result(code, out.out, out.err)


def make_crowd(n_tasks=200, seed=0, n_workers=8):
    rng = np.random.default_rng(seed)
    acc = rng.uniform(0.55, 0.95, n_workers)
    acc[0] = 0.15  # one adversarial worker
    rows, truth = [], {}
    for i in range(n_tasks):
        y = int(rng.integers(0, 3))
        truth[f"q{i}"] = ["red", "green", "blue"][y]
        for w in range(n_workers):
            if rng.random() < 0.6:
                lab = y if rng.random() < acc[w] else int(rng.integers(0, 3))
                rows.append((f"q{i}", f"worker-{w}", ["red", "green", "blue"][lab]))
    return rows, truth


def read_out(path_or_text):
    text = Path(path_or_text).read_text() if isinstance(path_or_text, Path) else path_or_text
    return list(csv.DictReader(text.splitlines()))


@pytest.fixture(scope="module")
def crowd(tmp_path_factory):
    d = tmp_path_factory.mktemp("crowd")
    rows, truth = make_crowd()
    tasks = list(dict.fromkeys(r[0] for r in rows))
    first = set(tasks[:120])
    write_csv(d / "chunk-001.csv", [r for r in rows if r[0] in first])
    write_csv(d / "chunk-002.csv", [r for r in rows if r[0] not in first])
    write_csv(d / "labels.csv", rows)
    write_csv(d / "truth.csv", list(truth.items()), header=("task", "truth"))
    return d


def test_chunks_with_state_then_pipe(crowd, tmp_path):
    state = tmp_path / "crowd.state"
    r1 = run([crowd / "chunk-001.csv", "--state", state, "-o", tmp_path / "clean-001.csv"])
    assert r1.returncode == 0, r1.stderr
    out1 = read_out(tmp_path / "clean-001.csv")
    assert len(out1) == 120 and set(out1[0]) == {"task", "label", "confidence"}
    assert {r["label"] for r in out1} <= {"red", "green", "blue"}
    assert all(0 <= float(r["confidence"]) <= 1 for r in out1)
    r2 = run([crowd / "chunk-002.csv", "--state", state, "-o", tmp_path / "clean-002.csv", "--gold", crowd / "truth.csv",
              "--confusion", tmp_path / "conf.h5", "--proba"])
    assert r2.returncode == 0, r2.stderr
    out2 = read_out(tmp_path / "clean-002.csv")
    assert len(out2) == 80 and {"p_red", "p_green", "p_blue"} <= set(out2[0])
    assert "error" in r2.stderr and "state: 2 chunks" in r2.stderr
    import h5py
    with h5py.File(tmp_path / "conf.h5") as f:
        assert f["confusion"].shape == (8, 3, 3)
        assert json.loads(f.attrs["options"])["state"] == str(state) and f.attrs["kdtools_version"]
        conf = f["confusion"][:]
    assert np.allclose(conf.sum(2), 1, atol=1e-5)
    # every task seen so far, relabelled from the state alone (no inputs); the state learns nothing new
    r4 = run(["--relabel-all", "--state", state])
    assert r4.returncode == 0, r4.stderr
    assert len({r["task"] for r in read_out(r4.stdout)}) == 200 and "state: 2 chunks, 200 tasks" in r4.stderr
    # the same labels through a pipe, in chunks of 25 tasks, with the initial set of 100 tasks
    labels = (crowd / "labels.csv").read_text()
    r3 = run(["-", "--state", tmp_path / "pipe.state", "--chunk-size", 25, "--initial-size", 100,
              "--gold", crowd / "truth.csv", "-v"], stdin=labels)
    assert r3.returncode == 0, r3.stderr
    out3 = read_out(r3.stdout)
    assert len(out3) == 200 and len({r["task"] for r in out3}) == 200
    assert r3.stderr.count("<stdin> chunk") == 5  # 100 + 4 x 25
    err_line = [l for l in r3.stderr.splitlines() if "bila: error" in l][0]
    assert float(err_line.split("error")[1].split("%")[0]) < 25.0


def test_offline_baselines_side_by_side_and_plot(crowd, tmp_path, capsys, monkeypatch):
    r = run([crowd / "labels.csv", "--method", "ds,mv,mace,bila", "--gold", crowd / "truth.csv", "--chunk-size", 50,
             "--plot", tmp_path / "err.png", "--seed", 3])
    assert r.returncode == 0, r.stderr
    out = read_out(r.stdout)
    assert len(out) == 200
    for m in ("ds", "mv", "mace", "bila"):
        assert f"{m}: error" in r.stderr
    assert (tmp_path / "err.png").read_bytes()[:4] == b"\x89PNG"
    # majority-vote ties are broken with the seed: the same seed gives the same labels
    a = run_here([crowd / "labels.csv", "--method", "mv", "--seed", 5], capsys=capsys, monkeypatch=monkeypatch).stdout
    b = run_here([crowd / "labels.csv", "--method", "mv", "--seed", 5], capsys=capsys, monkeypatch=monkeypatch).stdout
    assert a == b and len(a.splitlines()) == 201


def test_kd_eval_aggregation_writes_the_curves_as_csv_and_a_plot(crowd, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "kdtools.cli.eval", "aggregation", str(crowd / "labels.csv"), "--gold",
                        str(crowd / "truth.csv"), "--method", "mv,ds", "--chunk-size", "50", "--initial-size", "100",
                        "--plot", str(tmp_path / "curve.png")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(r.stdout.splitlines()))
    for m in ("mv", "ds"):
        tasks = [int(row["tasks"]) for row in rows if row["method"] == m]
        # the initial set of 100 tasks, then chunks of 50: 100, 150, 200 tasks aggregated so far
        assert tasks == [100, 150, 200], tasks
        final = [float(row["error"]) for row in rows if row["method"] == m][-1]
        assert 0.0 <= final < 0.4  # far below chance (2/3) on this crowd
        assert f"{m}: final error {100 * final:.2f} % after 200 tasks" in r.stderr
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_dense_input(tmp_path, capsys, monkeypatch):
    (tmp_path / "m.csv").write_text("2,-1,2,1\n0,0,-1,0\n1,1,1,-1\n2,2,0,2\n")
    r = run_here([tmp_path / "m.csv", "--format", "dense", "--method", "mv"], capsys=capsys, monkeypatch=monkeypatch)
    assert r.returncode == 0, r.stderr
    assert [(x["task"], x["label"]) for x in read_out(r.stdout)] == [("0", "2"), ("1", "0"), ("2", "1"), ("3", "2")]


def test_simulate_then_aggregate(tmp_path):
    truth = tmp_path / "truth.csv"
    truth.write_text("task,truth\n" + "".join(f"i{i},{i % 10}\n" for i in range(300)))
    r = run(["simulate", "--truth", truth, "--workers", 6, "--noise", 0.4, "--missing", 0.1, "--seed", 1,
             "-o", tmp_path / "labels.csv", "--truth-out", tmp_path / "gold.csv"])
    assert r.returncode == 0, r.stderr
    rows = read_out(tmp_path / "labels.csv")
    assert set(rows[0]) == {"task", "worker", "label"}
    assert 0.85 * 1800 < len(rows) < 0.95 * 1800
    assert (tmp_path / "gold.csv").read_text() == truth.read_text()
    r = run([tmp_path / "labels.csv", "--method", "mv,bila", "--gold", tmp_path / "gold.csv"])
    assert r.returncode == 0, r.stderr
    # the earlier (always-wrong, rounded) noise draw is still available; an unknown one is a usage error
    r = run(["simulate", "--truth", truth, "--workers", 3, "--noise", 1.0, "--missing", 0, "--draw", "rounded"])
    assert r.returncode == 0, r.stderr
    gold = {f"i{i}": str(i % 10) for i in range(300)}
    assert all(row["label"] != gold[row["task"]] for row in read_out(r.stdout))
    r = run(["simulate", "--truth", truth, "--draw", "uniform"])
    assert r.returncode == 2 and "--draw" in r.stderr


# ------------------------------------------------------------------------------------------------
# bad input: exit 1, one line on stderr, previous state byte-identical


@pytest.fixture()
def state_file(crowd, tmp_path, capsys, monkeypatch):
    state = tmp_path / "crowd.state"
    r = run_here([crowd / "chunk-001.csv", "--state", state, "-o", tmp_path / "o.csv", "--classes", "red,green,blue"],
                 capsys=capsys, monkeypatch=monkeypatch)
    assert r.returncode == 0, r.stderr
    return state


def assert_fails_cleanly(r, state, before, needle):
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert state.read_bytes() == before


def test_bad_malformed_line(state_file, tmp_path, capsys, monkeypatch):
    before = state_file.read_bytes()
    bad = tmp_path / "bad.csv"
    bad.write_text("task,worker,label\nq500,worker-1,red\nq501,worker-2\n")
    r = run_here([bad, "--state", state_file, "-o", tmp_path / "x.csv"], capsys=capsys, monkeypatch=monkeypatch)
    assert_fails_cleanly(r, state_file, before, "bad.csv:3: malformed line")
    assert not (tmp_path / "x.csv").exists()


def test_bad_malformed_line_midstream_keeps_state(state_file, crowd, capsys, monkeypatch):
    before = state_file.read_bytes()
    text = (crowd / "chunk-002.csv").read_text() + 'q999,"unclosed,red\n'
    r = run_here(["-", "--state", state_file, "--chunk-size", 10], stdin=text, capsys=capsys, monkeypatch=monkeypatch)
    assert r.stdout.count("\n") > 40  # the chunks before the bad line were aggregated and written
    assert_fails_cleanly(r, state_file, before, "malformed")


def test_bad_empty_chunk(state_file, tmp_path, capsys, monkeypatch):
    before = state_file.read_bytes()
    empty = tmp_path / "empty.csv"
    empty.write_text("task,worker,label\n")
    kw = dict(capsys=capsys, monkeypatch=monkeypatch)
    assert_fails_cleanly(run_here([empty, "--state", state_file], **kw), state_file, before, "empty chunk")
    assert_fails_cleanly(run_here(["-", "--state", state_file], stdin="task,worker,label\n", **kw), state_file, before,
                         "empty")


def test_bad_nan_label(state_file, tmp_path, capsys, monkeypatch):
    before = state_file.read_bytes()
    bad = tmp_path / "nan.csv"
    bad.write_text("task,worker,label\nq700,worker-1,red\nq700,worker-2,NaN\n")
    r = run_here([bad, "--state", state_file], capsys=capsys, monkeypatch=monkeypatch)
    assert_fails_cleanly(r, state_file, before, "missing")


def test_bad_state_from_other_class_set(state_file, crowd, tmp_path, capsys, monkeypatch):
    before = state_file.read_bytes()
    kw = dict(capsys=capsys, monkeypatch=monkeypatch)
    r = run_here([crowd / "chunk-002.csv", "--state", state_file, "--classes", "cat,dog"], **kw)
    assert_fails_cleanly(r, state_file, before, "was made for classes red,green,blue")
    other = tmp_path / "other.csv"
    other.write_text("task,worker,label\nz1,w1,cat\nz1,w2,dog\n")
    assert_fails_cleanly(run_here([other, "--state", state_file], **kw), state_file, before,
                         "other.csv:2: label 'cat' (task 'z1', worker 'w1') is not one of the fixed classes")


def test_bad_binary_file_is_one_clear_error(state_file, tmp_path, capsys, monkeypatch):
    # an HDF5 query log given by mistake: a codec error used to surface without the file's name
    before = state_file.read_bytes()
    h5 = tmp_path / "q.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8)
    for fmt in ("long", "dense"):
        r = run_here([h5, "--state", state_file, "--format", fmt], capsys=capsys, monkeypatch=monkeypatch)
        assert_fails_cleanly(r, state_file, before, "q.h5: not a UTF-8 text file")


def test_bad_newer_schema(state_file, capsys, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(state_file), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["schema_version"] = "99"
    save_file(tensors, str(state_file), metadata=meta)
    before = state_file.read_bytes()
    r = run_here([Path(__file__).parent / "nonexistent.csv", "--state", state_file], capsys=capsys,
                 monkeypatch=monkeypatch)
    assert_fails_cleanly(r, state_file, before, "newer")


def test_bad_truncated_state(state_file, crowd, capsys, monkeypatch):
    data = state_file.read_bytes()
    state_file.write_bytes(data[: len(data) // 2])
    before = state_file.read_bytes()
    r = run([crowd / "chunk-002.csv", "--state", state_file])  # a real process: the real exit code
    assert_fails_cleanly(r, state_file, before, "truncated or corrupt")
    state_file.write_bytes(b"garbage")
    r = run_here([crowd / "chunk-002.csv", "--state", state_file], capsys=capsys, monkeypatch=monkeypatch)
    assert_fails_cleanly(r, state_file, b"garbage", "state")


def test_usage_errors_exit_2(crowd, tmp_path, capsys, monkeypatch):
    assert run([crowd / "labels.csv", "--method", "nope"]).returncode == 2
    kw = dict(capsys=capsys, monkeypatch=monkeypatch)
    assert run_here([crowd / "labels.csv", "--plot", "x.png"], **kw).returncode == 2
    assert run_here([crowd / "labels.csv", "--chunk-size", 0], **kw).returncode == 2
    mv = run_here(["--relabel-all", "--method", "mv"], **kw)
    assert mv.returncode == 2 and "not with --method mv" in mv.stderr
    assert "give --state FILE" in run_here(["--relabel-all"], **kw).stderr
    missing = run_here(["--relabel-all", "--state", "no-such.state"], **kw)
    assert missing.returncode == 1 and "no-such.state: no such state file" in missing.stderr
    no_state = run_here([crowd / "chunk-001.csv", "-o", tmp_path / "o.csv"], **kw)
    assert no_state.returncode == 0 and "state:" not in no_state.stderr
