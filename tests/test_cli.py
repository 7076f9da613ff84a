"""The commands as a user runs them: real processes, real pipes, exit codes, files left intact."""

import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, counting_exec_oracle, kd, kd_cmd, rows_received, sha, torchrun_failure
from kdtools.h5store import SampleWriter, log_info
from kdtools.stream import StreamHeader

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_three_process_pipe_steals_the_victim(victim_path, tmp_path):
    log, student = tmp_path / "q.h5", tmp_path / "student.safetensors"
    gen = subprocess.Popen(kd_cmd("kd-gen-queries") + ["dataset", "--data", "digits", "--split", "public", "-n", "3000", "--augment"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    q = subprocess.Popen(kd_cmd("kd-query") + [str(victim_path), "--mode", "probs", "--budget", "3000", "--log", str(log)],
                         stdin=gen.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    gen.stdout.close()
    d = subprocess.run(kd_cmd("kd-distill") + ["--arch", "lenet5-half", "--epochs", "4", "--optimizer", "adam", "--lr", "0.003",
                                               "-o", str(student)], stdin=q.stdout, capture_output=True, env=ENV)
    q.stdout.close()
    assert gen.wait() == 0 and q.wait() == 0, q.stderr.read().decode()
    assert d.returncode == 0, d.stderr.decode()
    r = kd("kd-eval", "accuracy", student, "--data", "digits", "--reference", victim_path, "--json", check=True)
    report = json.loads(r.stdout)
    assert report["fidelity"] > 0.8 and report["accuracy"] > 0.8
    per = report["per_class"]  # the per-class rows add up to the overall figures
    assert [r["class"] for r in per] == list(range(10)) and sum(r["samples"] for r in per) == report["samples"]
    assert sum(r["accuracy"] * r["samples"] for r in per) / report["samples"] == pytest.approx(report["accuracy"], abs=1e-6)
    assert sum(r["fidelity"] * r["samples"] for r in per) / report["samples"] == pytest.approx(report["fidelity"], abs=1e-6)
    table = kd("kd-eval", "accuracy", student, "--data", "digits", "--per-class", check=True).stdout.decode()
    assert "per class" in table and "samples" in table
    facts = json.loads(kd("kd-eval", "log", log, "--json", check=True).stdout)
    assert facts["rows"] == facts["spent"] == 3000 and facts["mode"] == "probs"
    assert sum(facts["answers_by_class"]) == 3000 and facts["rejected"] == 0
    # --grid draws the queries by answered class, an image carrying who made it
    grid = tmp_path / "grid.png"
    drawn = kd("kd-eval", "log", log, "--grid", grid, "--per-class", "3", "--json", check=True)
    assert json.loads(drawn.stdout) == facts  # stdout still carries only the facts
    from PIL import Image
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.info["Software"].startswith("kdtools") and '"per_class": 3' in im.info["Description"]
    before = grid.read_bytes()
    for bad, why in ((["--grid", "-"], b"--grid -"), (["--grid", tmp_path / "g.txt"], b"cannot draw a plot as 'txt'"),
                     (["--grid", tmp_path], b"is a directory"), (["--grid", log], b"would overwrite the input")):
        p = kd("kd-eval", "log", log, *bad)
        assert p.returncode == 2 and why in p.stderr, p.stderr
    # a file of queries has no answers to sort by: refused, and an existing image is left as it was
    p = kd("kd-eval", "log", queries_h5(tmp_path), "--grid", grid)
    assert p.returncode == 2 and b"no class answers" in p.stderr and grid.read_bytes() == before
    # a log whose every query was refused has nothing to draw: a data error (exit 1), the image left as it was
    refused = tmp_path / "refused.h5"
    with SampleWriter(refused, StreamHeader("samples", {"x": {"dtype": "uint8", "shape": [1, 4, 4]},
                                                        "label": {"dtype": "int64", "shape": []}}, 10, mode="label")) as w:
        w.reserve(2)
        w.append({"x": torch.zeros(2, 1, 4, 4, dtype=torch.uint8), "label": torch.tensor([-1, -1])})
    p = kd("kd-eval", "log", refused, "--grid", grid)
    assert p.returncode == 1 and b"no answered query" in p.stderr and b"Traceback" not in p.stderr
    assert grid.read_bytes() == before
    # the log is itself a training set: the same student trains from it without the pipe
    kd("kd-distill", log, "--arch", "mlp", "--epochs", "1", "-o", tmp_path / "s2.safetensors", check=True)
    # and the stream on stdout is all data: messages went to stderr
    assert b"kd-distill" in d.stderr and d.stdout == b""


def queries_h5(tmp_path):
    """An HDF5 file of queries without answers."""
    path = tmp_path / "queries-only.h5"
    kd("kd-gen-queries", "noise", "--shape", "1x8x8", "-n", "4", "-o", path, check=True)
    return path


def test_budget_reached_keeps_answers_and_exits_1(victim_path, queries_path, tmp_path):
    log = tmp_path / "q.h5"
    out = tmp_path / "answers.kds"
    p = kd("kd-query", victim_path, queries_path, "--budget", "150", "--log", log, "-o", out)
    assert p.returncode == 1 and b"budget of 150 reached" in p.stderr
    assert b"Traceback" not in p.stderr
    facts = json.loads(kd("kd-eval", "log", log, "--json").stdout)
    assert facts["rows"] == 150 == facts["spent"]
    # what it answered before the budget ran out is a usable, complete stream
    from kdtools.sources import open_samples
    src = open_samples(out)
    assert sum(b["x"].shape[0] for b in src) == 150 and src.end["status"] == "budget_exhausted"
    # a budget below what the log already spent is refused, log untouched
    before = sha(log)
    p = kd("kd-query", victim_path, queries_path, "--budget", "100", "--log", log, "-o", tmp_path / "x.kds")
    assert p.returncode == 1 and b"smaller than the 150 queries" in p.stderr
    assert sha(log) == before and not (tmp_path / "x.kds").exists()
    # a budget stop never replaces an earlier output: the answers go beside it, each stopped run its own name
    keep = tmp_path / "keep.kds"
    keep.write_bytes(b"mine")
    for budget, name in ((200, "keep.partial.kds"), (250, "keep.partial-2.kds")):
        p = kd("kd-query", victim_path, queries_path, "--budget", budget, "--log", log, "-o", keep)
        assert p.returncode == 1 and f"kept in {tmp_path / name}".encode() in p.stderr, p.stderr
        assert sum(b["x"].shape[0] for b in open_samples(tmp_path / name)) == budget
    assert keep.read_bytes() == b"mine"
    # HDF5 has no end record to say it stopped early: a stopped run's HDF5 output is always named .partial
    p = kd("kd-query", victim_path, queries_path, "--budget", 300, "--log", log, "-o", tmp_path / "a.h5")
    assert p.returncode == 1 and (tmp_path / "a.partial.h5").is_file() and not (tmp_path / "a.h5").exists()
    assert open_samples(tmp_path / "a.partial.h5").end["status"] == "budget_exhausted"  # and its attributes say so


def test_bad_inputs_give_one_line_and_leave_outputs_intact(victim_path, queries_path, tmp_path):
    keep = tmp_path / "student.safetensors"
    shutil.copy(victim_path, keep)
    before = sha(keep)
    data = Path(queries_path).read_bytes()
    truncated = tmp_path / "trunc.kds"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = [1, 2, 3]
    nan = tmp_path / "nan.kds"
    kd("kd-gen-queries", "noise", "--shape", "1x28x28", "-n", "4", "-o", nan, check=True)
    raw = bytearray(nan.read_bytes())
    # overwrite the first float of the first batch with NaN (little-endian 0x7fc00000)
    n0 = int.from_bytes(raw[:8], "little") + 8
    h1 = int.from_bytes(raw[n0:n0 + 8], "little")
    raw[n0 + 8 + h1:n0 + 8 + h1 + 4] = bytes.fromhex("0000c07f")
    nan.write_bytes(bytes(raw))
    wrong_shape = tmp_path / "rgb.kds"
    kd("kd-gen-queries", "noise", "--shape", "3x32x32", "-n", "4", "-o", wrong_shape, check=True)

    cases = [
        (["kd-distill", truncated, "-o", keep], "truncated kdtools stream"),
        (["kd-distill", text, "-o", keep], "not an HDF5 file"),
        (["kd-distill", foreign, "-o", keep], "not a kdtools sample set"),
        (["kd-query", victim_path, truncated, "-o", keep], "truncated"),
        (["kd-query", victim_path, nan, "-o", keep], "NaN"),
        (["kd-query", victim_path, wrong_shape, "-o", keep], "queries are 3x32x32 but the oracle takes 1x28x28"),
    ]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # independent processes, mostly torch's import: two at a time
        results = list(pool.map(lambda case: kd(*case[0]), cases))
    for (args, message), p in zip(cases, results):
        err = p.stderr.decode()
        assert p.returncode == 1, (args, err)
        assert message in err, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert sha(keep) == before, args
    # the truncated input's first batches were answered (paid): they are kept beside the untouched output
    partial = tmp_path / "student.partial.safetensors"
    assert partial.is_file() and "kept in " + str(partial) in results[3].stderr.decode()


def test_pickled_victim_is_refused(tmp_path, queries_path):
    import torch
    from kdtools.models import ImageClassifier

    p = tmp_path / "victim.pth"
    torch.save(ImageClassifier("mlp", (1, 28, 28), 10), p)
    r = kd("kd-query", p, queries_path, "-o", tmp_path / "out.kds")
    assert r.returncode == 1 and b"--trust-pickle" in r.stderr and not (tmp_path / "out.kds").exists()
    r = kd("kd-query", p, queries_path, "--trust-pickle", "--input-shape", "1x28x28", "-o", tmp_path / "out.kds")
    assert r.returncode == 0, r.stderr
    # kd-distill's own training checkpoint is not a model: the message names the weights file beside it
    w = tmp_path / "s.safetensors"
    kd("kd-distill", "--data", "digits", "--arch", "mlp", "--epochs", "1", "-q", "-o", w, check=True)
    r = kd("kd-eval", "accuracy", f"{w}.ckpt", "--data", "digits")
    assert r.returncode == 1 and f"a kd-distill training checkpoint (for --resume), not a model: use {w}".encode() in r.stderr


def test_usage_errors_exit_2(victim_path):
    assert kd("kd-query", victim_path, "--mode", "soft").returncode == 2
    assert kd("kd-distill", "--epochs", "x", "-o", "y").returncode == 2
    not_object = kd("kd-distill", "--data", "digits", "--arch-args", "[1]", "-o", "y")  # was a TypeError traceback
    assert not_object.returncode == 2 and b"must be a JSON object" in not_object.stderr
    assert kd("kd-gen-queries", "noise", "-n", "5").returncode == 2  # no shape
    assert kd("kd-gen-queries", "aedm").returncode == 2  # no --diffusion
    assert kd("kd-gen-queries", "cake", "-n", "5").returncode == 2  # no --teacher
    zero = kd("kd-query", victim_path, "--budget", "0", input=b"")  # pays for nothing and has no log to replay
    assert zero.returncode == 2 and b"--budget 0 pays for no query" in zero.stderr
    assert kd("kd-query", victim_path, "--max-batch", "0", input=b"").returncode == 2


def test_a_batch_size_below_one_is_a_usage_error_not_a_hang(victim_path, tmp_path):
    # (a negative one used to loop for ever, zero to crash in range())
    for args in (["dataset", "--data", "digits", "-n", "10", "--batch-size", "-1", "-o", tmp_path / "q.kds"],
                 ["noise", "--shape", "1x8x8", "-n", "10", "--batch-size", "0", "-o", tmp_path / "q.kds"],
                 ["ideal", "--oracle", victim_path, "--budget", "100", "--batch-size", "-5", "-o", tmp_path / "att"]):
        p = kd("kd-gen-queries", *args, timeout=120)
        assert p.returncode == 2 and b"--batch-size" in p.stderr, (args, p.stderr)
    assert not (tmp_path / "att").exists() and not (tmp_path / "q.kds").exists()


def test_a_reader_that_goes_away_gets_one_line_not_silence(tmp_path):
    # `kd-gen-queries ... | head -c 1000`: the writer exits 1 and says why, in one line, no traceback
    err = tmp_path / "err"
    with open(err, "wb") as e:
        p = subprocess.Popen([*kd_cmd("kd-gen-queries"), "noise", "--shape", "1x28x28", "-n", "200000"],
                             stdout=subprocess.PIPE, stderr=e, env={**os.environ, "PYTHONPATH": str(ROOT)})
        p.stdout.read(1000)
        p.stdout.close()
        assert p.wait(120) == 1
    lines = err.read_bytes().decode().strip().splitlines()
    assert len(lines) == 1 and "broken pipe" in lines[0] and "Traceback" not in lines[0], lines


def test_messages_print_as_typed(victim_path):
    # ":abc:" in a flag value is not an emoji code
    p = kd("kd-query", victim_path, "--mode", "topk:abc:", input=b"")
    assert p.returncode == 2 and b"topk:abc:" in p.stderr, p.stderr


def test_a_run_that_paid_nothing_leaves_no_log_to_block_the_corrected_rerun(victim_path, tmp_path):
    log = tmp_path / "q.h5"
    wrong = kd("kd-gen-queries", "noise", "--shape", "1x16x16", "-n", "20", check=True).stdout
    p = kd("kd-query", victim_path, "--log", log, "-o", tmp_path / "a.kds", input=wrong)
    assert p.returncode == 1 and b"the oracle takes 1x28x28" in p.stderr and not log.exists()
    right = kd("kd-gen-queries", "noise", "--shape", "1x28x28", "-n", "20", check=True).stdout
    p = kd("kd-query", victim_path, "--log", log, "-o", tmp_path / "b.kds", input=right)
    assert p.returncode == 0, p.stderr.decode()
    assert log_info(log)["rows"] == 20


def test_http_only_options_are_not_silently_ignored(victim_path, queries_path, tmp_path):
    p = kd("kd-query", victim_path, queries_path, "--rate-limit", "5", "-o", tmp_path / "a.kds")
    assert p.returncode == 0 and b"--rate-limit only shapes requests to an HTTP oracle; ignored for this model oracle" in p.stderr


def test_binary_is_never_written_to_a_terminal(tmp_path):
    master, slave = pty.openpty()
    try:
        p = subprocess.run(kd_cmd("kd-gen-queries") + ["noise", "--shape", "1x4x4", "-n", "3"], stdout=slave,
                           stderr=subprocess.PIPE, env=ENV, timeout=120)
    finally:
        os.close(slave)
        os.close(master)
    assert p.returncode == 2 and b"refusing to write a binary stream to a terminal" in p.stderr
    # kd-diffstep sample refuses before loading (and sampling from) the model: the directory need not even exist
    master, slave = pty.openpty()
    try:
        p = subprocess.run(kd_cmd("kd-diffstep") + ["sample", str(tmp_path / "none"), "-n", "2", "-o", "-"], stdout=slave,
                           stderr=subprocess.PIPE, env=ENV, timeout=120)
    finally:
        os.close(slave)
        os.close(master)
    assert p.returncode == 2 and b"refusing to write a binary stream to a terminal" in p.stderr


def test_sigkill_loses_no_answered_batch_and_resume_respects_the_budget(victim_path, queries_path, tmp_path):
    """kd-query reads batches from a pipe we control; after it has streamed some answers on, kill -9 it."""
    log = tmp_path / "q.h5"
    # the victim behind an exec: oracle that counts every row it is sent: an account kept outside our log
    oracle, received = counting_exec_oracle(tmp_path, victim_path)
    data = Path(queries_path).read_bytes()  # header + 6 batches of 100 + end record
    q = subprocess.Popen(kd_cmd("kd-query") + [oracle, "--input-shape", "1x28x28", "--budget", "500", "--log", str(log), "-q"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    from kdtools.stream import read_record
    pos = 0
    # feed the header and the first three batches, then wait for three answered batches downstream
    offsets = []
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 8], "little")
        header = json.loads(data[pos + 8:pos + 8 + n])
        size = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] or [0])
        offsets.append((pos, pos + 8 + n + size))
        pos += 8 + n + size
    import threading
    # write from a thread: kd-query's answers fill its stdout pipe while we are still feeding its stdin
    feeder = threading.Thread(target=lambda: (q.stdin.write(data[:offsets[3][1]]), q.stdin.flush()), daemon=True)
    feeder.start()
    got = [read_record(q.stdout) for _ in range(4)]  # output header + 3 answered batches
    assert got[-1][0]["kdtools.record"] == "batch"
    q.send_signal(signal.SIGKILL)
    q.wait()
    with h5py.File(log) as f:
        rows, spent = f["x"].shape[0], int(f.attrs["spent"])
    assert rows >= 300 and spent >= rows
    sent_before = rows_received(received)
    assert rows <= sent_before <= spent  # at most the batch in flight was sent and never logged
    # rerun the whole query set with the same log: answered rows come from the log, the budget holds
    p = kd("kd-query", oracle, queries_path, "--input-shape", "1x28x28", "--budget", "500", "--log", log,
           "-o", tmp_path / "out.kds")
    assert p.returncode == 1 and b"budget of 500 reached" in p.stderr
    assert f"{rows} from the log".encode() in p.stderr
    facts = json.loads(kd("kd-eval", "log", log, "--json").stdout)
    assert facts["spent"] == 500 and facts["rows"] <= 500
    # by the oracle's own count: the rerun sent only rows that were not in the log, and never more in
    # total than the budget
    assert rows_received(received) - sent_before == facts["rows"] - rows
    assert rows_received(received) <= 500
    # and the log holds the query set's rows once each, in order: nothing logged (so paid) twice
    from kdtools.sources import open_samples
    source = np.concatenate([b["x"].numpy() for b in open_samples(queries_path)])
    with h5py.File(log) as f:
        x = f["x"][:]
    unit = lambda a: a.astype(np.float32) / 255 if a.dtype == np.uint8 else a.astype(np.float32)
    assert len(x) == facts["rows"] and np.array_equal(unit(x), unit(source[:len(x)]))


def test_torchrun_trains_with_two_gloo_processes(victim_path, queries_path, tmp_path):
    log = tmp_path / "q.h5"
    kd("kd-query", victim_path, queries_path, "--mode", "probs", "--log", log, "-o", tmp_path / "a.kds", check=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this Python")
    out = tmp_path / "ddp.safetensors"
    # TMPDIR: torchrun's torchelastic_* directory goes under the test's own directory, not the user's /tmp
    p = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "kdtools.cli.distill", str(log),
                        "--arch", "lenet5-half", "--epochs", "2", "--device", "cpu", "-q", "-o", str(out)],
                       capture_output=True, env={**ENV, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}, timeout=300)
    assert p.returncode == 0, torchrun_failure(p.stderr)
    from kdtools.weights import load_model, read_metadata
    assert json.loads(read_metadata(out)["options"])["world_size"] == 2
    assert load_model(out).num_classes == 10


def test_resume_flag_continues_training(tmp_path):
    out = tmp_path / "v.safetensors"
    kd("kd-distill", "--data", "digits", "--arch", "mlp", "--epochs", "2", "-q", "-o", out, check=True)
    assert Path(str(out) + ".ckpt").exists()
    kd("kd-distill", "--data", "digits", "--arch", "mlp", "--epochs", "3", "--resume", out, "-o", out, check=True)
    from kdtools.weights import read_metadata
    assert read_metadata(out)["epochs_done"] == "3"
    options = json.loads(read_metadata(out)["options"])  # "auto" as resolved: hard labels train with cross-entropy
    assert options["loss"] == "auto" and options["loss_used"] == "ce" and options["device"] == "cpu"


def _long_training_with_a_checkpoint(tmp_path):
    """A kd-distill run far from done whose first epoch is saved: (process, weights path, checkpoint path)."""
    out = tmp_path / "v.safetensors"
    cmd = [*kd_cmd("kd-distill"), "--data", "digits", "--arch", "mlp", "--epochs", "400", "-q", "-o", str(out)]
    proc = subprocess.Popen(cmd, env={**ENV, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # Ctrl-C reaches it
    ckpt = Path(str(out) + ".ckpt")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ckpt.exists():
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be stopped: " + proc.stderr.read().decode()
    return proc, out, ckpt


@pytest.mark.parametrize("sig, code, word", [
    (signal.SIGTERM, 143, "terminated (SIGTERM)"),  # a batch scheduler's time limit
    # Ctrl-C: typer hands it back as a returned 130, which used to end the command with exit 0 and no word
    (signal.SIGINT, 130, "interrupted"),
])
def test_a_stop_mid_training_names_the_checkpoint_and_resume_goes_on(tmp_path, sig, code, word):
    proc, out, ckpt = _long_training_with_a_checkpoint(tmp_path)
    proc.send_signal(sig)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == code
    assert err.strip().splitlines() == [f"error: {word}; every finished epoch is saved in {ckpt}; the same "
                                        f"command with --resume {out} continues from the last one"], err
    from kdtools.weights import read_metadata
    done = int(read_metadata(out)["epochs_done"])
    assert 1 <= done < 400
    p = kd("kd-distill", "--data", "digits", "--arch", "mlp", "--epochs", str(done + 1), "--resume", out, "-q", "-o", out)
    assert p.returncode == 0, p.stderr.decode()
    assert int(read_metadata(out)["epochs_done"]) == done + 1


def test_an_arch_that_disagrees_with_init_is_named_not_silently_dropped(tmp_path):
    first = tmp_path / "a.safetensors"
    kd("kd-distill", "--data", "digits", "--arch", "mlp", "--epochs", "1", "-q", "-o", first, check=True)
    p = kd("kd-distill", "--data", "digits", "--arch", "vgg11", "--init", first, "--epochs", "1", "-q", "-o", tmp_path / "b.safetensors")
    assert p.returncode == 0, p.stderr.decode()
    assert f"--arch vgg11 ignored: {first} holds 'mlp'".encode() in p.stderr
    same = kd("kd-distill", "--data", "digits", "--arch", "mlp", "--init", first, "--epochs", "1", "-q", "-o", tmp_path / "c.safetensors")
    assert same.returncode == 0 and b"ignored" not in same.stderr


def test_class_balance_is_recorded_and_refused_where_it_cannot_work(tmp_path):
    out = tmp_path / "b.safetensors"
    kd("kd-distill", "--data", "digits", "--arch", "mlp", "--epochs", "1", "--class-balance", "0.5", "-q", "-o", out, check=True)
    from kdtools.weights import read_metadata
    assert json.loads(read_metadata(out)["options"])["class_balance"] == 0.5
    bad = kd("kd-distill", "--data", "digits", "--class-balance", "2", "-o", tmp_path / "c.safetensors")
    assert bad.returncode == 2 and b"--class-balance 2.0" in bad.stderr and not (tmp_path / "c.safetensors").exists()
    neg = kd("kd-distill", "--data", "digits", "--lr", "-1", "-o", tmp_path / "c.safetensors")
    assert neg.returncode == 2 and b"--lr -1.0: must be > 0" in neg.stderr
    online = kd("kd-distill", "--save-every", "1", "--class-balance", "1", "-o", tmp_path / "d.safetensors", input=b"")
    assert online.returncode == 2 and b"not with --save-every" in online.stderr


@pytest.mark.parametrize("module", ["aggregate", "query", "serve", "gen_queries", "distill", "diffstep", "eval"])
def test_help_starts_with_what_the_command_does(module):
    import importlib

    from typer.testing import CliRunner

    app = importlib.import_module(f"kdtools.cli.{module}").app
    out = CliRunner().invoke(app, ["--help"], terminal_width=200).output
    squash = lambda t: " ".join(t.replace("│", " ").split())
    assert squash(app.info.help)[:60] in squash(out)


# ------------------------------------------------------------------------------------------------
# An output that is one of the inputs is a usage error before anything is paid (each of these ran, exit 0, and
# destroyed the input: the victim became a stream, a paid log was replaced by unpaid answers, -o and --log on one
# file lost the log's budget and accounting so a rerun overspent)


@pytest.fixture(scope="module")
def paid_log(victim_path, queries_path, tmp_path_factory):
    """A log that paid for 600 answers."""
    paid = tmp_path_factory.mktemp("paid") / "paid.h5"
    kd("kd-query", victim_path, queries_path, "--budget", 1000, "--log", paid, "-o", paid.with_suffix(".kds"), check=True)
    return paid


@pytest.mark.parametrize("case", ["o-victim", "o-queries", "o-log", "log-queries", "o-replayed", "o-member", "o-dir", "log-dir"])
def test_kd_query_refuses_an_output_that_is_an_input(victim_path, queries_path, paid_log, tmp_path, case):
    paid = tmp_path / "paid.h5"
    shutil.copy(paid_log, paid)
    queries = tmp_path / "q.kds"
    shutil.copy(queries_path, queries)
    victim = tmp_path / "victim.safetensors"
    shutil.copy(victim_path, victim)
    (tmp_path / "d").mkdir()
    new_log = tmp_path / "new.h5"
    args = {
        "o-victim": [victim, queries, "-o", victim],
        "o-queries": [victim, queries, "-o", queries],
        "o-log": [victim, queries, "--log", new_log, "-o", new_log],
        "log-queries": [victim, paid, "--log", paid, "-o", tmp_path / "b.kds"],
        "o-replayed": [f"replay:{paid}", queries, "-o", paid],
        "o-member": [f"ensemble:{victim},{victim_path}", paid, "--mode", "probs", "-o", victim],
        "o-dir": [victim, queries, "--log", new_log, "-o", tmp_path / "d"],
        "log-dir": [victim, queries, "--log", tmp_path / "d", "-o", tmp_path / "b.kds"],
    }[case]
    before = {p: sha(p) for p in (victim, queries, paid)}
    r = kd("kd-query", *args)
    assert r.returncode == 2, r.stderr.decode()
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and ("overwrite the input" in lines[0] or "same file" in lines[0] or "is a directory" in lines[0])
    assert {p: sha(p) for p in before} == before
    assert not new_log.exists()  # nothing was paid, no log was started
    assert log_info(paid)["spent"] == 600


def test_kd_query_makes_the_folder_of_a_new_log(victim_path, queries_path, tmp_path):
    log = tmp_path / "runs" / "a" / "q.h5"
    kd("kd-query", victim_path, queries_path, "--log", log, "-o", tmp_path / "a.kds", check=True)
    assert log_info(log)["spent"] == 600


def test_kd_serve_refuses_to_save_its_defence_over_the_model(victim_path, tmp_path):
    victim = tmp_path / "victim.safetensors"
    shutil.copy(victim_path, victim)
    before = sha(victim)
    r = kd("kd-serve", victim, "--defense", "entropy", "--defense-data", "digits", "--defense-save", victim, "--port", 0,
           timeout=120)
    assert r.returncode == 2 and "--defense-save" in r.stderr.decode() and "overwrite the input" in r.stderr.decode()
    assert sha(victim) == before


def test_kd_distill_checks_its_output_before_training_and_keeps_its_checkpoint_honest(victim_path, queries_path, tmp_path):
    def distill(*args):
        r = kd("kd-distill", "--data", "digits", "--epochs", 1, "-q", *args)
        return r.returncode, r.stderr.decode()

    log = tmp_path / "paid.h5"
    kd("kd-query", victim_path, queries_path, "--log", log, "-o", tmp_path / "answers.kds", check=True)
    before = sha(log)
    # the training data, '-', a directory, a path under a file: usage errors before any epoch
    r = kd("kd-distill", log, "--epochs", 1, "-o", log)
    assert r.returncode == 2 and "is the training file" in r.stderr.decode() and sha(log) == before
    (tmp_path / "d").mkdir()
    for out, why in ((tmp_path / "d", "is a directory"), (log / "x.safetensors", "is not a directory"), ("-", "not a stream")):
        rc, err = distill("-o", out)
        assert rc == 2 and why in err, err
    assert not (tmp_path / "-").exists()
    # a resume that has no epoch left to train still writes the -o it names, and says why nothing was trained
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert distill("-o", a)[0] == 0 and Path(str(a) + ".ckpt").exists()
    rc, err = distill("--resume", a, "-o", b)
    assert rc == 0 and b.is_file() and "none was trained" in err
    # another optimiser than the checkpoint's: one line saying which
    rc, err = distill("--epochs", 2, "--optimizer", "adam", "--resume", a, "-o", a)
    assert rc == 2 and "--optimizer sgd" in err and len(err.strip().splitlines()) == 1
    # a resume into another -o with no epoch left removes that -o's old checkpoint (it belonged to other weights)
    c = tmp_path / "c.safetensors"
    assert distill("--seed", 1, "-o", c)[0] == 0 and Path(str(c) + ".ckpt").exists()
    assert distill("--resume", a, "-o", c)[0] == 0 and not Path(str(c) + ".ckpt").exists()
    # new weights written without a checkpoint remove the old one, which a later --resume would have loaded
    assert distill("--epochs", 0, "--arch", "mlp", "-o", a)[0] == 0
    assert not Path(str(a) + ".ckpt").exists()
    # -o /dev/fd/1 redirected to a file: the weights arrive there, and no checkpoint is made beside the descriptor
    with open(tmp_path / "fd.safetensors", "wb") as f:
        r = subprocess.run(kd_cmd("kd-distill") + ["--data", "digits", "--epochs", "1", "-q", "-o", "/dev/fd/1"], stdout=f,
                           stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr.decode()
    from kdtools.weights import load_model
    assert load_model(tmp_path / "fd.safetensors").num_classes == 10


def test_kd_query_stopped_early_into_a_redirected_descriptor_keeps_its_rows(victim_path, queries_path, tmp_path):
    # the rows went to "/dev/fd/1.partial" (a path that cannot exist) and the redirected file stayed empty
    from kdtools.sources import open_samples

    out = tmp_path / "red.kds"
    with open(out, "wb") as f:
        r = subprocess.run(kd_cmd("kd-query") + [str(victim_path), str(queries_path), "--budget", "100", "-o", "/dev/fd/1"],
                           stdout=f, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1 and b"budget of 100 reached" in r.stderr
    src = open_samples(out)
    assert sum(b["x"].shape[0] for b in src) == 100 and src.end["status"] == "budget_exhausted"


def test_kd_gen_queries_refuses_an_output_that_is_an_input(victim_path, tmp_path):
    victim = tmp_path / "v.safetensors"
    shutil.copy(victim_path, victim)
    before = sha(victim)
    r = kd("kd-gen-queries", "noise", "-n", 10, "--like", victim, "-o", victim)
    assert r.returncode == 2 and b"overwrite the input" in r.stderr and sha(victim) == before
    (tmp_path / "d").mkdir()
    r = kd("kd-gen-queries", "noise", "-n", 10, "--shape", "1x4x4", "-o", tmp_path / "d")
    assert r.returncode == 2 and b"is a directory" in r.stderr


@pytest.mark.parametrize("suffix", [".kds", ".h5"])
def test_a_middle_kd_query_passes_an_early_stop_on(victim_path, queries_path, tmp_path, suffix):
    # the first stage stops at its budget; the second answered what it got and used to end its stream "complete",
    # so kd-distill at the end no longer warned that it trained on less than was asked for. An HDF5 output has no
    # end record: the stop is recorded in its attributes (it said nothing before)
    from kdtools.sources import open_samples

    out = tmp_path / f"out{suffix}"
    first = subprocess.Popen(kd_cmd("kd-query") + [str(victim_path), str(queries_path), "--budget", "100", "-q"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    second = subprocess.run(kd_cmd("kd-query") + [str(victim_path), "--mode", "probs", "-q", "-o", str(out)],
                            stdin=first.stdout, capture_output=True)
    first.stdout.close()
    assert first.wait() == 1 and second.returncode == 0
    assert "stopped early (budget_exhausted)" in second.stderr.decode()
    src = open_samples(out)
    assert sum(b["x"].shape[0] for b in src) == 100 and src.end["status"] == "budget_exhausted"
    assert "query budget of 100 reached" in src.end["message"]


def test_work_that_stops_at_step_boundaries_holds_signals_then_ignores_a_second_sigterm():
    import os
    import signal

    from kdtools.cli._common import StopsAtBoundaries, Terminated, _raise_terminated

    before = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with pytest.raises(Terminated):
            with StopsAtBoundaries() as stops:
                assert not stops.requested()
                os.kill(os.getpid(), signal.SIGTERM)  # noted, not raised: the step under way finishes
                assert stops.requested()
                stops.stop()
        # the first SIGTERM is being reported: a second one (a scheduler and torchrun both forwarding it) is ignored
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_work_that_stops_at_step_boundaries_reports_the_first_signal_and_stops_at_a_second_ctrl_c():
    import os
    import signal

    from kdtools.cli._common import StopsAtBoundaries, Terminated, _raise_terminated

    def outcome(*signals, step_ends=True):
        """What a step-boundary stop raises when these signals come during one step (a KeyboardInterrupt is
        caught here, so that a regression fails this test instead of ending the test run)."""
        signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            with StopsAtBoundaries() as stops:
                for s in signals:
                    os.kill(os.getpid(), s)
                if step_ends:
                    assert stops.requested()
                    stops.stop()
        except (Terminated, KeyboardInterrupt) as e:
            return type(e), signal.getsignal(signal.SIGTERM)
        return None, signal.getsignal(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    try:
        # SIGTERM (a scheduler) then one Ctrl-C: still a stop at the boundary, reported as the SIGTERM (exit 143),
        # not as the Ctrl-C that came while waiting (it exited 130); a repeated SIGTERM is ignored from then on
        assert outcome(signal.SIGTERM, signal.SIGINT) == (Terminated, signal.SIG_IGN)
        # Ctrl-C then SIGTERM: a Ctrl-C stop (130), and the SIGTERM that came is enough to ignore another
        assert outcome(signal.SIGINT, signal.SIGTERM) == (KeyboardInterrupt, signal.SIG_IGN)
        # a second Ctrl-C stops at once, inside the step, whatever came between the two
        assert outcome(signal.SIGINT, signal.SIGTERM, signal.SIGINT, step_ends=False)[0] is KeyboardInterrupt
        assert outcome(signal.SIGTERM, signal.SIGINT, signal.SIGINT, step_ends=False)[0] is KeyboardInterrupt
    finally:
        signal.signal(signal.SIGTERM, before)


def test_help_into_a_reader_that_stops_early_exits_quietly():
    # `kd-query --help | head -1` printed "stdout was closed by the reader" and exited 1
    p = subprocess.Popen(kd_cmd("kd-query") + ["--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(10)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait() == 0 and b"broken pipe" not in err


def test_option_values_are_checked_before_the_work(tmp_path):
    # (outputs in a temporary folder: a regressed writer must never meet the machine's /dev/null)
    r = kd("kd-distill", "--data", "digits", "--epochs", 1, "--image-size", 0, "-o", tmp_path / "w.safetensors")
    assert r.returncode == 2 and b"--image-size must be at least 1" in r.stderr
    # the sampler is checked before the model is even read (it was refused after the sampling)
    r = kd("kd-diffstep", "sample", "no-such-model", "-n", 4, "--sampler", "bogus", "-o", tmp_path / "s.h5")
    assert r.returncode == 2 and b"--sampler 'bogus'" in r.stderr
