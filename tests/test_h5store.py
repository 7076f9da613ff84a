import h5py
import pytest
import torch

from kdtools.errors import KdError
from kdtools.h5store import SampleWriter, iter_batches, log_info, read_header, write_samples
from kdtools.sources import open_samples, read_all
from kdtools.stream import StreamHeader, fields_of


def header(mode="probs"):
    b = {"x": torch.zeros(1, 1, 4, 4, dtype=torch.uint8), "probs": torch.zeros(1, 3)}
    return StreamHeader("samples", fields_of(b), num_classes=3, mode=mode, extra={"options": {"k": 1}})


def batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g),
            "probs": torch.softmax(torch.randn(n, 3, generator=g), 1)}


def test_round_trip_and_layout(tmp_path):
    p = tmp_path / "log.h5"
    with SampleWriter(p, header(), oracle="sha256:abc", budget=100) as w:
        w.reserve(5)
        w.append(batch(5, 1))
        w.reserve(3)
        w.append(batch(3, 2))
    got = list(iter_batches(p, batch_size=4))
    assert [g["x"].shape[0] for g in got] == [4, 4]
    x = torch.cat([g["x"] for g in got])
    assert torch.equal(x, torch.cat([batch(5, 1)["x"], batch(3, 2)["x"]]))
    with h5py.File(p) as f:
        assert f["x"].dtype == "uint8" and f["probs"].dtype == "float32"
        assert list(f["batch_start"]) == [0, 5] and list(f["batch_rows"]) == [5, 3]
        assert f.attrs["kdtools.version"] and f.attrs["oracle"] == "sha256:abc"
    info = log_info(p)
    assert info == {**info, "rows": 8, "spent": 8, "budget": 100, "batches": 2}
    assert read_header(p).extra == {"options": {"k": 1}}


def test_reopening_resumes_the_accounting(tmp_path):
    p = tmp_path / "log.h5"
    with SampleWriter(p, header(), budget=10) as w:
        w.reserve(4)
        w.append(batch(4))
    with SampleWriter(p, header(), budget=10) as w:
        assert w.rows == 4 and w.spent == 4
        w.reserve(2)
        w.append(batch(2))
    assert log_info(p)["rows"] == 6


def test_budget_below_spent_and_other_mode_are_refused(tmp_path):
    p = tmp_path / "log.h5"
    with SampleWriter(p, header(), budget=10) as w:
        w.reserve(6)
    with pytest.raises(KdError, match="smaller than the 6 queries"):
        SampleWriter(p, header(), budget=5)
    with pytest.raises(KdError, match="mode"):
        SampleWriter(p, StreamHeader("samples", header().fields, 3, mode="label"))


def test_not_hdf5_and_foreign_hdf5(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(KdError, match="not an HDF5"):
        read_header(bad)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = [1, 2, 3]
    with pytest.raises(KdError, match="not a kdtools sample set"):
        open_samples(foreign)
    with pytest.raises(KdError, match="not an HDF5"):
        SampleWriter(bad, header())
    assert bad.read_bytes() == b"not an hdf5 file at all"


def test_truncated_hdf5_is_a_clear_error(tmp_path):
    p = tmp_path / "log.h5"
    write_samples(p, header(), [batch(50)])
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(KdError, match="truncated HDF5 file .*move it aside"):
        read_all(p)
    cut = p.read_bytes()
    with pytest.raises(KdError, match="truncated HDF5 file"):  # appending to it: refused, and the file is left alone
        SampleWriter(p, header())
    assert p.read_bytes() == cut


def test_stream_file_and_hdf5_read_the_same(tmp_path):
    from kdtools.sources import SampleSink

    h = header()
    for name in ("a.h5", "a.kds"):
        sink = SampleSink(h, path=tmp_path / name)
        sink.write(batch(7, 3))
        sink.close()
    ha, a = read_all(tmp_path / "a.h5")
    hb, b = read_all(tmp_path / "a.kds")
    assert ha.fields == hb.fields and ha.num_classes == hb.num_classes == 3
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["probs"], b["probs"])


def test_an_hdf5_output_that_stopped_early_says_so_like_a_streams_end_record(tmp_path):
    from kdtools.sources import SampleSink

    for name in ("a.h5", "a.kds"):
        sink = SampleSink(header(), path=tmp_path / name)
        sink.write(batch(4, 1))
        # a server's error text may hold NUL, which an HDF5 string cannot: the rows must be kept all the same
        sink.close("error", "bad\x00row")
        src = open_samples(tmp_path / name)
        assert sum(b["x"].shape[0] for b in src) == 4
        assert src.end["status"] == "error" and src.end["message"] in ("bad\\0row", "bad\x00row")
    assert log_info(tmp_path / "a.h5")["stopped_early"] == "error: bad\\0row"  # kd-eval log shows it
    sink = SampleSink(header(), path=tmp_path / "whole.h5")
    sink.write(batch(2))
    sink.close()
    assert open_samples(tmp_path / "whole.h5").end == {"status": "complete", "message": ""}
    assert "stopped_early" not in log_info(tmp_path / "whole.h5")


def test_answer_counts_by_class_and_refused_rows(tmp_path):
    from kdtools.h5store import answer_counts

    p = tmp_path / "log.h5"
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    with SampleWriter(p, header()) as w:
        w.reserve(5)
        w.append({"x": torch.zeros(5, 1, 4, 4, dtype=torch.uint8), "probs": probs})
    # argmax classes 0, 2, (refused: all-zero placeholder), 1, 0; read in chunks of 2 to cross a boundary
    assert answer_counts(p, chunk=2) == {"by_class": [2, 1, 1], "rejected": 1}
    q = tmp_path / "labels.h5"
    hl = StreamHeader("samples", {"x": {"dtype": "uint8", "shape": [1, 4, 4]}, "label": {"dtype": "int64", "shape": []}}, 3, mode="label")
    with SampleWriter(q, hl) as w:
        w.reserve(4)
        w.append({"x": torch.zeros(4, 1, 4, 4, dtype=torch.uint8), "label": torch.tensor([2, -1, 2, 1])})
    assert answer_counts(q) == {"by_class": [0, 1, 2], "rejected": 1}
    # a label past the class count is left out of the counts (and is not a refused row)
    r = tmp_path / "past.h5"
    with SampleWriter(r, hl) as w:
        w.reserve(5)
        w.append({"x": torch.zeros(5, 1, 4, 4, dtype=torch.uint8), "label": torch.tensor([0, 7, 2, 2, -1])})
    assert answer_counts(r, chunk=3) == {"by_class": [1, 0, 2], "rejected": 1}
    # a file of queries without answers has nothing to count
    hq = StreamHeader("queries", {"x": {"dtype": "uint8", "shape": [1, 4, 4]}})
    write_samples(tmp_path / "q.h5", hq, [{"x": torch.zeros(2, 1, 4, 4, dtype=torch.uint8)}])
    assert answer_counts(tmp_path / "q.h5") is None


def test_per_class_accuracy_by_hand():
    from kdtools.evaluate import per_class

    y = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 0, 1, 1, 0])
    ref = torch.tensor([0, 1, 1, 1, 0, 2])
    rows = per_class(pred, y, 4, ["a", "b", "c"], ref)
    assert [r["samples"] for r in rows] == [3, 2, 1, 0]
    assert [r["accuracy"] for r in rows[:3]] == pytest.approx([2 / 3, 1.0, 0.0])
    assert [r["reference_accuracy"] for r in rows[:3]] == pytest.approx([1 / 3, 0.5, 1.0])
    assert [r["fidelity"] for r in rows[:3]] == pytest.approx([2 / 3, 0.5, 0.0])
    assert rows[3]["name"] == "3" and rows[3]["accuracy"] is None and rows[3]["fidelity"] is None  # no sample: null


def test_a_batch_cut_off_mid_write_is_dropped_on_reopen(tmp_path):
    # a writer killed between writing a batch's fields and its batch index leaves uncommitted tail rows
    p = tmp_path / "log.h5"
    with SampleWriter(p, header(), budget=100) as w:
        w.reserve(5)
        w.append(batch(5, 1))
        w.reserve(4)
    with h5py.File(p, "a") as f:  # the next batch got as far as x (4 rows) and half of probs
        f["x"].resize(9, axis=0)
        f["x"][5:9] = 7
        f["probs"].resize(7, axis=0)
    # readers see the committed rows only; spent keeps the 4 reserved calls (paid, answer lost)
    assert log_info(p)["rows"] == 5 and log_info(p)["spent"] == 9
    assert sum(b["x"].shape[0] for b in iter_batches(p)) == 5
    with SampleWriter(p, header(), budget=100) as w:
        assert w.rows == 5
        w.reserve(3)
        w.append(batch(3, 2))
    got = list(iter_batches(p))
    x = torch.cat([g["x"] for g in got])
    assert torch.equal(x, torch.cat([batch(5, 1)["x"], batch(3, 2)["x"]]))
    with h5py.File(p) as f:
        assert f["x"].shape[0] == f["probs"].shape[0] == 8 and list(f["batch_rows"]) == [5, 3]
    assert log_info(p) == {**log_info(p), "rows": 8, "spent": 12}


def test_atomic_output_onto_a_pipe_writes_through_it_and_leaves_the_pipe(tmp_path):
    # `-o /dev/null` or a FIFO: renaming a temporary file over it would replace the device itself
    # (as root, /dev/null for the whole machine)
    import os
    import stat
    import threading

    from kdtools.fileio import atomic_path

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    with atomic_path(fifo) as p:
        assert p == fifo
        p.write_bytes(b"label\n")
    reader.join(timeout=10)
    assert got == [b"label\n"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert [f.name for f in tmp_path.iterdir()] == ["pipe"]  # no temporary file left beside it


def test_answer_examples_spread_evenly_over_each_answered_class(tmp_path):
    from kdtools.h5store import answer_examples

    p = tmp_path / "labels.h5"
    hl = StreamHeader("samples", {"x": {"dtype": "uint8", "shape": [1, 2, 2]}, "label": {"dtype": "int64", "shape": []}}, 4,
                      mode="label")
    labels = torch.tensor([2, -1, 0, 2, 2, 0, 1, 2])  # row 1 refused; class 3 never answered
    x = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 1, 2, 2).contiguous()  # row i is all i
    with SampleWriter(p, hl) as w:
        w.reserve(8)
        w.append({"x": x, "label": labels})
    got = answer_examples(p, per_class=2, chunk=3)  # chunks of 3 rows: the picks cross chunk boundaries
    assert sorted(got) == [0, 1, 2]
    drawn = {c: v[:, 0, 0, 0].tolist() for c, v in got.items()}
    # class 2 was answered at rows 0, 3, 4, 7: two picks are its first and last, not its first two
    assert drawn == {0: [2, 5], 1: [6], 2: [0, 7]}
    # three of class 2's four rows: positions 0, 1.5, 3 round (half to even) to 0, 2, 3 -> rows 0, 4, 7
    assert answer_examples(p, per_class=3, chunk=3)[2][:, 0, 0, 0].tolist() == [0, 4, 7]
    assert answer_examples(p, per_class=1)[2][:, 0, 0, 0].tolist() == [0]
    assert got[2].shape == (2, 1, 2, 2) and got[2].dtype == torch.uint8
    # probabilities: the argmax decides; an all-zero placeholder row is never drawn
    q = tmp_path / "probs.h5"
    probs = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]])
    with SampleWriter(q, header()) as w:
        w.reserve(3)
        w.append({"x": torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 4, 4).contiguous(), "probs": probs})
    assert {c: v[:, 0, 0, 0].tolist() for c, v in answer_examples(q, 5).items()} == {0: [2], 2: [1]}
    hq = StreamHeader("queries", {"x": {"dtype": "uint8", "shape": [1, 4, 4]}})
    write_samples(tmp_path / "q.h5", hq, [{"x": torch.zeros(2, 1, 4, 4, dtype=torch.uint8)}])
    assert answer_examples(tmp_path / "q.h5", 3) is None


def test_answers_past_the_committed_rows_are_not_counted_or_drawn(tmp_path):
    # a writer killed mid-batch: the labels of the next batch were written, its batch index was not
    from kdtools.h5store import answer_counts, answer_examples

    p = tmp_path / "labels.h5"
    hl = StreamHeader("samples", {"x": {"dtype": "uint8", "shape": [1, 2, 2]}, "label": {"dtype": "int64", "shape": []}}, 3,
                      mode="label")
    with SampleWriter(p, hl, budget=100) as w:
        w.reserve(3)
        w.append({"x": torch.zeros(3, 1, 2, 2, dtype=torch.uint8), "label": torch.tensor([0, 1, 0])})
        w.reserve(4)
    with h5py.File(p, "a") as f:
        f["label"].resize(7, axis=0)
        f["label"][3:7] = 2
    assert answer_counts(p, chunk=2) == {"by_class": [2, 1, 0], "rejected": 0}
    assert sorted(answer_examples(p, 4, chunk=2)) == [0, 1]
    # kd-eval log's one reading: the facts, the counts and the examples all stop at the same committed row
    from kdtools.h5store import log_overview

    seen = log_overview(p, per_class=4, chunk=2)
    assert seen["facts"]["rows"] == 3 == sum(seen["answers"]["by_class"]) + seen["answers"]["rejected"]
    assert seen["facts"]["spent"] == 7 and sorted(seen["examples"]) == [0, 1]
    assert log_overview(p)["examples"] is None  # no per_class: x is not read
    with pytest.raises(ValueError, match="per_class"):
        answer_examples(p, 0)


def test_a_log_open_for_writing_elsewhere_is_a_clear_error(tmp_path):
    # kd-query holds HDF5's file lock while it writes; kd-eval log from another process says so in one line
    from conftest import kd

    p = tmp_path / "live.h5"
    with SampleWriter(p, header()) as w:
        w.reserve(1)
        w.append({"x": torch.zeros(1, 1, 4, 4, dtype=torch.uint8), "probs": torch.tensor([[0.5, 0.3, 0.2]])})
        r = kd("kd-eval", "log", p)
    assert r.returncode == 1, r.stderr
    assert b"another process has it open for writing" in r.stderr and b"Traceback" not in r.stderr
    assert kd("kd-eval", "log", p).returncode == 0  # closed: readable again


def test_a_log_recorded_under_an_oracle_alias_still_resumes(tmp_path):
    # HTTP logs recorded the server's URL before they recorded the model the server names: they still continue
    from kdtools.h5store import SampleWriter
    from kdtools.stream import StreamHeader

    header = StreamHeader("samples", {"x": {"dtype": "uint8", "shape": [1, 2, 2]}, "label": {"dtype": "int64", "shape": []}},
                          num_classes=2, mode="label")
    with SampleWriter(tmp_path / "q.h5", header, oracle="http://127.0.0.1:8080") as w:
        w.reserve(1)
        w.append({"x": torch.zeros(1, 1, 2, 2, dtype=torch.uint8), "label": torch.tensor([1])})
    with SampleWriter(tmp_path / "q.h5", header, oracle="sha256:ab", oracle_aliases=("http://127.0.0.1:8080",)) as w:
        assert w.rows == 1
    with pytest.raises(KdError, match="recorded from another oracle"):
        SampleWriter(tmp_path / "q.h5", header, oracle="sha256:ab", oracle_aliases=("http://127.0.0.1:9999",))
