import io
import json
import os

import pytest
import torch
from safetensors.torch import save as st_save

from kdtools.errors import KdError
from kdtools.stream import StreamHeader, StreamReader, StreamWriter, fields_of


def make_stream(n_batches=3, rows=4, end=True):
    buf = io.BytesIO()
    batches = [{"x": torch.randint(0, 256, (rows, 1, 5, 5), dtype=torch.uint8), "label": torch.arange(rows) + i}
               for i in range(n_batches)]
    w = StreamWriter(buf, StreamHeader("samples", fields_of(batches[0]), num_classes=10, mode="label", extra={"a": 1}))
    for b in batches:
        w.write(b)
    if end:
        w.close()
    return buf.getvalue(), batches


def test_round_trip_keeps_every_tensor_and_header_field():
    data, batches = make_stream()
    r = StreamReader(io.BytesIO(data))
    assert r.header.kind == "samples" and r.header.num_classes == 10 and r.header.mode == "label"
    assert r.header.extra == {"a": 1} and r.header.x_shape == (1, 5, 5)
    got = list(r)
    assert len(got) == 3
    for a, b in zip(got, batches):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["label"], b["label"])
    assert r.end["status"] == "complete" and r.end["rows"] == "12"


def test_every_record_is_a_standalone_safetensors_blob():
    from safetensors.torch import load

    data, batches = make_stream(n_batches=1)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    assert header["__metadata__"]["kdtools.stream"] == "1"
    second = data[8 + n:]
    m = int.from_bytes(second[:8], "little")
    size = max(v["data_offsets"][1] for k, v in json.loads(second[8:8 + m]).items() if k != "__metadata__")
    tensors = load(second[:8 + m + size])
    assert torch.equal(tensors["x"], batches[0]["x"])


@pytest.mark.parametrize("cut", [3, 20, -1, -5, -200])
def test_truncated_stream_is_reported(cut):
    data, _ = make_stream()
    with pytest.raises(KdError, match="truncated|not a kdtools|empty"):
        list(StreamReader(io.BytesIO(data[:cut])))


def test_stream_without_end_record_is_truncated():
    data, _ = make_stream(end=False)
    r = StreamReader(io.BytesIO(data))
    with pytest.raises(KdError, match="truncated.*after 12 rows"):
        list(r)


@pytest.mark.parametrize("blob", [b"hello world, this is text\n" * 4, b"\x89HDF\r\n\x1a\n" + b"\0" * 40,
                                  st_save({"w": torch.zeros(2)}), b""])
def test_foreign_input_is_refused(blob):
    with pytest.raises(KdError, match="not a kdtools stream|HDF5|empty"):
        list(StreamReader(io.BytesIO(blob)))


def test_newer_schema_is_refused():
    h = StreamHeader("queries", {"x": {"dtype": "float32", "shape": [1]}}).metadata()
    h["kdtools.stream"] = "99"
    with pytest.raises(KdError, match="schema 99"):
        StreamReader(io.BytesIO(st_save({}, metadata=h)))


def test_writer_refuses_batches_that_do_not_match_the_header():
    w = StreamWriter(io.BytesIO(), StreamHeader("queries", {"x": {"dtype": "uint8", "shape": [1, 2, 2]}}))
    with pytest.raises(KdError, match="header says"):
        w.write({"x": torch.zeros(3, 1, 3, 3, dtype=torch.uint8)})


# ------------------------------------------------------------------------------------------------
# SampleSink's file outputs (kd-query -o, kd-gen-queries -o, kd-diffstep sample -o) go through the shared atomic
# writer: a FIFO or a device is written as it is, never renamed over (as root, -o /dev/null replaced the machine's
# /dev/null with a regular file); a symbolic link is written through; a failed write keeps the previous file


def _sink_batches():
    return [{"x": torch.full((2, 1, 3, 3), float(i))} for i in range(3)]


def _write_sink(path, fail=False):
    from kdtools.sources import SampleSink

    batches = _sink_batches()
    sink = SampleSink(StreamHeader("queries", fields_of(batches[0])), path=path)
    for b in batches:
        sink.write(b)
    if fail:
        sink.abort("stopped")
    else:
        sink.close()


@pytest.mark.parametrize("name", ["out.kds", "out.h5"])
def test_sample_sink_writes_through_a_symlink(tmp_path, name):
    from kdtools.sources import read_all

    (tmp_path / "real").mkdir()
    link = tmp_path / name
    link.symlink_to(tmp_path / "real" / name)
    _write_sink(link)
    assert link.is_symlink()
    assert read_all(link)[1]["x"].shape == (6, 1, 3, 3)
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == [name]  # no temporary file left


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_sample_sink_writes_into_a_fifo_and_leaves_it_a_fifo(tmp_path):
    from conftest import through_fifo

    received = through_fifo(tmp_path / "q.kds", _write_sink)  # the old writer renamed a regular file over it
    assert StreamReader(io.BytesIO(received)).header.kind == "queries"
    assert [p.name for p in tmp_path.iterdir()] == ["q.kds"]


@pytest.mark.parametrize("name", ["out.kds", "out.h5"])
def test_sample_sink_abort_keeps_the_previous_file(tmp_path, name):
    out = tmp_path / name
    out.write_bytes(b"previous")
    _write_sink(out, fail=True)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_write_through_partial_writes_an_h5_output_through_a_symlink(tmp_path):
    from kdtools.sources import partial_path, read_all, write_through_partial

    (tmp_path / "store").mkdir()
    link = tmp_path / "q.h5"
    link.symlink_to(tmp_path / "store" / "q.h5")
    assert write_through_partial(iter(_sink_batches()), link, {"method": "test"}, "v", 4) == 6
    assert link.is_symlink() and read_all(link)[1]["x"].shape == (6, 1, 3, 3)
    assert not partial_path(link).exists()


@pytest.mark.parametrize("name", ["out.kds", "out.h5"])
def test_a_retargeted_sink_keeps_the_earlier_file_and_writes_beside_it(tmp_path, name):
    from kdtools.sources import SampleSink, read_all

    out = tmp_path / name
    out.write_bytes(b"earlier run")
    batches = _sink_batches()
    sink = SampleSink(StreamHeader("queries", fields_of(batches[0])), path=out)
    sink.write(batches[0])
    assert not sink.in_place()
    partial = tmp_path / f"out.partial{out.suffix}"
    sink.retarget(partial)
    sink.close("error", "stopped")
    assert out.read_bytes() == b"earlier run"
    assert read_all(partial)[1]["x"].shape == (2, 1, 3, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, partial.name])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_write_through_partial_into_a_fifo_named_h5(tmp_path):
    from conftest import through_fifo
    from kdtools.sources import partial_path, write_through_partial

    fifo = tmp_path / "q.h5"
    rows = []
    received = through_fifo(fifo, lambda p: rows.append(write_through_partial(iter(_sink_batches()), p, {"method": "test"}, "v", 4)))
    assert rows == [6] and received[:8] == b"\x89HDF\r\n\x1a\n" and not partial_path(fifo).exists()
