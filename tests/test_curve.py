"""kd-eval curve: accuracy against queries from the checkpoints an attack run saved."""

import json

import pytest
import torch

from conftest import kd, one_error_line
from kdtools.curve import evaluate_curve, find_checkpoints, plot_curve, queries_of, query_tick, title_lines
from kdtools.data import load_dataset
from kdtools.errors import KdError
from kdtools.evaluate import evaluate_accuracy
from kdtools.models import ImageClassifier
from kdtools.weights import load_model, save_model


@pytest.fixture
def run_dir(victim_path, tmp_path):
    """A run directory as an attack saves it: an untrained substitute at 100 queries, the victim's
    weights standing in for a good one at 5000, and one named only by its file name (2000)."""
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    torch.manual_seed(0)
    save_model(ImageClassifier("lenet5", (1, 28, 28), 10), ck / "substitute-100.safetensors", {}, {"queries_spent": 100})
    good = load_model(victim_path).module
    save_model(good, ck / "substitute-5000.safetensors", {}, {"queries_spent": 5000})
    save_model(good, ck / "substitute-2000.safetensors")  # no metadata: the name says 2000
    return tmp_path / "run"


def test_checkpoints_are_found_and_sorted_by_queries(run_dir, tmp_path):
    found = find_checkpoints([str(run_dir)])
    assert [q for q, _ in found] == [100, 2000, 5000]
    assert find_checkpoints([str(run_dir / "checkpoints")]) == found
    # a query log finds the checkpoints/ beside it
    from kdtools.h5store import SampleWriter
    from kdtools.stream import StreamHeader

    header = StreamHeader("samples", {"x": {"dtype": "uint8", "shape": [1, 28, 28]}, "label": {"dtype": "int64", "shape": []}}, 10, mode="label")
    SampleWriter(run_dir / "q.h5", header, "test").close()
    assert find_checkpoints([str(run_dir / "q.h5")]) == found
    bad = tmp_path / "nameless.safetensors"
    save_model(ImageClassifier("mlp", (1, 28, 28), 10), bad)
    with pytest.raises(KdError, match="without queries_spent"):
        queries_of(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdError, match="no checkpoints"):
        find_checkpoints([str(tmp_path / "empty")])


def test_curve_values_equal_kd_eval_accuracy(run_dir, victim_path, tmp_path):
    ds = load_dataset("digits", "test")
    victim = load_model(victim_path)
    points, ref_acc = evaluate_curve(find_checkpoints([str(run_dir)]), ds, torch.device("cpu"), victim.module, victim.input_shape)
    for p in points:
        m = load_model(p.path)
        r = evaluate_accuracy(m.module, p.path, m.input_shape, ds, torch.device("cpu"), victim.module, "victim")
        assert p.accuracy == pytest.approx(r.accuracy) and p.fidelity == pytest.approx(r.fidelity)
    assert points[-1].fidelity == 1.0 and points[-1].accuracy == pytest.approx(ref_acc)
    assert points[0].accuracy < 0.5  # untrained
    plot_curve(points, tmp_path / "c.png", "test", ref_acc, {"x": 1})
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kd_eval_curve_command(run_dir, victim_path, tmp_path):
    png = tmp_path / "curve.png"
    p = kd("kd-eval", "curve", run_dir, "--data", "digits", "--reference", victim_path, "--plot", png, "--json", check=True)
    doc = json.loads(p.stdout)
    assert [pt["queries"] for pt in doc["points"]] == [100, 2000, 5000]
    assert doc["points"][2]["fidelity"] == 1.0 and doc["kdtools.version"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    p = kd("kd-eval", "curve", tmp_path / "nowhere", "--data", "digits")
    assert p.returncode == 1 and b"no such file or directory" in p.stderr and b"Traceback" not in p.stderr


def test_several_runs_are_compared_one_series_each(run_dir, victim_path, tmp_path):
    other = tmp_path / "other" / "checkpoints"
    other.mkdir(parents=True)
    save_model(load_model(victim_path).module, other / "substitute-300.safetensors", {}, {"queries_spent": 300})
    png = tmp_path / "both.png"
    p = kd("kd-eval", "curve", run_dir, tmp_path / "other", "--data", "digits", "--plot", png, "--json", check=True)
    doc = json.loads(p.stdout)
    assert [s["run"] for s in doc["series"]] == ["run", "other"]
    assert [pt["queries"] for pt in doc["series"][0]["points"]] == [100, 2000, 5000]
    assert [pt["queries"] for pt in doc["series"][1]["points"]] == [300] and doc["series"][1]["points"][0]["accuracy"] > 0.9
    assert png.read_bytes()[:4] == b"\x89PNG"
    # single weights files still make one series, sorted by queries
    p = kd("kd-eval", "curve", other / "substitute-300.safetensors", run_dir / "checkpoints" / "substitute-100.safetensors",
           "--data", "digits", "--json", check=True)
    assert [pt["queries"] for pt in json.loads(p.stdout)["points"]] == [100, 300]


def test_curve_json_always_has_series_and_counts_a_file_once(run_dir, tmp_path):
    # one run: "series" too (one unnamed entry), with "points" the same list
    p = kd("kd-eval", "curve", run_dir, "--data", "digits", "--json", check=True)
    doc = json.loads(p.stdout)
    assert [s["run"] for s in doc["series"]] == [""] and doc["series"][0]["points"] == doc["points"]
    # a checkpoint named beside the run directory that holds it is one point, not two
    ckpt = run_dir / "checkpoints" / "substitute-100.safetensors"
    p = kd("kd-eval", "curve", run_dir, ckpt, "--data", "digits", "--json", check=True)
    assert [pt["queries"] for pt in json.loads(p.stdout)["points"]] == [100, 2000, 5000]


def test_a_plot_name_that_cannot_be_written_is_refused_before_any_work(run_dir, tmp_path):
    p = kd("kd-eval", "curve", run_dir, "--data", "digits", "--plot", tmp_path / "c.txt")
    assert p.returncode == 2 and b"cannot draw a plot as 'txt'" in p.stderr and not (tmp_path / "c.txt").exists()
    # '-' is not stdout here (stdout carries the table), a directory is no file, and a checkpoint is an input
    ckpt = run_dir / "checkpoints" / "substitute-100.safetensors"
    before = ckpt.read_bytes()
    for plot, needle in (("-", "--plot -"), (tmp_path, "is a directory"), (ckpt, "overwrite the input")):
        p = kd("kd-eval", "curve", run_dir, ckpt, "--data", "digits", "--plot", plot, text=True, cwd=tmp_path)
        one_error_line(p, 2, needle)
    assert ckpt.read_bytes() == before and not (tmp_path / "-").exists()


def test_svg_and_pdf_plots_record_who_made_them(run_dir, tmp_path):
    # the format follows the suffix, as in kd-aggregate --plot; the options are in the file's own metadata
    for name, magic in (("c.svg", b"<?xml"), ("c.pdf", b"%PDF")):
        kd("kd-eval", "curve", run_dir, "--data", "digits", "--plot", tmp_path / name, check=True)
        data = (tmp_path / name).read_bytes()
        assert data.startswith(magic)
        assert b"kdtools " in data and str(run_dir).encode() in data
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # written atomically, nothing left beside


def test_a_long_plot_title_is_broken_into_lines_that_fit():
    long = "MNIST victim: AEDM (20 000) vs TandemGAN and DFME (200 000), online substitutes"
    lines = title_lines(long).split("\n")
    assert len(lines) == 2 and all(len(line) <= 60 for line in lines) and " ".join(lines) == long
    assert title_lines("accuracy vs queries") == "accuracy vs queries"


def test_query_ticks_read_as_counts():
    # golden values: the labels of the queries axis
    assert [query_tick(v) for v in (0, -0.0, 500, 999.5, 1000, 20_000, 19_250, 197_500, 200_000, 999_500, 1_000_000,
                                    1_002_500, 1_500_000)] == [
        "0", "0", "500", "999.5", "1k", "20k", "19.25k", "197.5k", "200k", "999.5k", "1M", "1.0025M", "1.5M"]
    # the ticks matplotlib puts around a single checkpoint at 200 000 stay distinct
    ticks = [192_500, 197_500, 202_500, 207_500]
    assert len({query_tick(t) for t in ticks}) == len(ticks)
