"""kd-serve: a real server process on a free loopback port, queried by kd-query as a user would.

Covers: answers over HTTP equal the model file's, keys and quotas (429 when exhausted, the log keeps
what was answered), the entropy defence (noise rejected, digits pass), the API key never written
anywhere, and the defence's entropy measure on hand-computed images.
"""

import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager

import pytest
import torch

from conftest import ROOT, kd, kd_cmd
from kdtools.data import load_dataset
from kdtools.errors import KdError
from kdtools.h5store import log_info
from kdtools.oracle import HttpOracle, ModelOracle, RemoteOptions
from kdtools.serve import EntropyDefense, Quotas, ServeError, VictimService, image_entropy, read_keys_file
from kdtools.sources import read_all
from kdtools.weights import load_model

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SECRET = "kd-secret-5ab1e-0f-k3y"


@contextmanager
def kd_serve(tmp_path, *args, name="serve"):
    """Start kd-serve on a free 127.0.0.1 port; yield (url, stderr path); stop it with SIGTERM."""
    port_file, err = tmp_path / f"{name}.port", tmp_path / f"{name}.err"
    with open(err, "wb") as errf:
        p = subprocess.Popen(kd_cmd("kd-serve") + [*map(str, args), "--port", "0", "--port-file", str(port_file)],
                             stdout=subprocess.DEVNULL, stderr=errf, env=ENV)
    try:
        deadline = time.monotonic() + 120  # bounded: torch import on a busy 2-core machine is slow
        while not port_file.exists():
            if p.poll() is not None:
                raise AssertionError(f"kd-serve exited {p.returncode}: {err.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError("kd-serve did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{int(port_file.read_text())}", err
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            assert p.wait(timeout=20) == 0, err.read_text()
        finally:
            if p.poll() is None:
                p.kill()


def test_entropy_of_hand_made_images():
    x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    x[1, 0, 0] = 255  # two levels, half each: 1 bit
    x[2] = torch.tensor([[0, 85], [170, 255]], dtype=torch.uint8)  # four levels, equally often: 2 bits
    x[3] = torch.tensor([[0, 0], [0, 255]], dtype=torch.uint8)  # 3/4, 1/4: 0.811 bits
    h = image_entropy(x)
    assert torch.allclose(h, torch.tensor([0.0, 1.0, 2.0, 0.8112781244591328], dtype=torch.float64), atol=1e-12)
    # float images bin as round(255 v); RGB goes through luma: pure white and black give 1 bit
    rgb = torch.zeros(1, 3, 1, 2)
    rgb[0, :, 0, 1] = 1.0
    assert image_entropy(rgb).item() == pytest.approx(1.0)
    assert image_entropy(x.float() / 255).tolist() == h.tolist()


def test_entropy_defense_rejects_noise_and_passes_digits(tmp_path):
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    d = EntropyDefense.fit(train.x, 0.01)
    assert d.low < d.high
    assert d.passes(test.x).float().mean() > 0.9  # unseen digits pass
    g = torch.Generator().manual_seed(0)
    assert d.passes(torch.rand(200, 1, 28, 28, generator=g)).sum() == 0  # uniform noise: about 7.7 bits, too high
    assert d.passes(torch.zeros(5, 1, 28, 28)).sum() == 0  # blank images: 0 bits, too low
    d.save(tmp_path / "d.json", {"data": "digits"})
    again = EntropyDefense.load(tmp_path / "d.json")
    assert (again.low, again.high, again.sides) == (d.low, d.high, "both")
    assert json.loads((tmp_path / "d.json").read_text())["kdtools.version"]
    low_only = EntropyDefense(d.low, d.high, sides="low")
    assert low_only.passes(torch.rand(20, 1, 28, 28, generator=g)).all()  # the literal one-sided rule lets noise through


def test_quotas_are_all_or_nothing_and_keys_are_checked(victim_path, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# key [quota]\n{SECRET} 10\nother-key\n")
    table = read_keys_file(keys)
    assert table == {SECRET: 10, "other-key": None}
    svc = VictimService(ModelOracle(load_model(victim_path)), ["label"], Quotas(table, default_quota=3))
    body = lambda n: json.dumps({"mode": "label", "inputs": torch.zeros(n, 1, 28, 28).tolist()}).encode()
    for key, status in ((None, 401), ("wrong", 401)):
        with pytest.raises(ServeError) as e:
            svc.query(body(1), "application/json", key)
        assert e.value.status == status and SECRET not in e.value.message
    status, _, data = svc.query(body(6), "application/json", SECRET)
    assert status == 200 and json.loads(data)["quota_left"] == 4 and len(json.loads(data)["answers"]["label"]) == 6
    with pytest.raises(ServeError, match="4 of 10 queries left, the request has 5") as e:
        svc.query(body(5), "application/json", SECRET)
    assert e.value.status == 429 and svc.quotas.used[0] == 6  # a refused request charges nothing
    assert json.loads(svc.query(body(3), "application/json", "other-key")[2])["quota_left"] == 0  # the default quota
    for bad, status in ((b"{nope", 400), (json.dumps({"mode": "probs", "inputs": []}).encode(), 400)):
        with pytest.raises(ServeError) as e:
            svc.query(bad, "application/json", SECRET)
        assert e.value.status == status
    with pytest.raises(ServeError, match="within \\[0, 1\\]"):
        svc.query(json.dumps({"mode": "label", "inputs": (torch.ones(1, 1, 28, 28) * 2).tolist()}).encode(), "application/json", SECRET)


def write_queries(path, x):
    from kdtools.sources import SampleSink
    from kdtools.stream import StreamHeader, fields_of

    sink = SampleSink(StreamHeader("queries", fields_of({"x": x})), path=path)
    sink.write({"x": x})
    sink.close()


def test_kd_query_over_http_equals_the_model_file(victim_path, queries_path, tmp_path):
    local = ModelOracle(load_model(victim_path))
    _, q = read_all(queries_path)
    want = local.answer(q["x"].float() / 255, "probs")["probs"]
    with kd_serve(tmp_path, victim_path, "--mode", "probs,label") as (url, err):
        out, log = tmp_path / "http.kds", tmp_path / "http.h5"
        kd("kd-query", url, queries_path, "--mode", "probs", "--log", log, "-o", out, check=True)
        _, got = read_all(out)
        assert torch.equal(got["x"], q["x"])
        assert torch.allclose(got["probs"], want, atol=1e-6) and torch.equal(got["probs"].argmax(1), want.argmax(1))
        facts = log_info(log)
        assert facts["rows"] == facts["spent"] == 600 and facts["oracle"] == url
        # the binary wire (a kdtools stream as the body) gives the same answers
        orc = HttpOracle(url, RemoteOptions(wire="stream", max_batch=256))
        assert torch.allclose(orc.answer(q["x"].float() / 255, "probs")["probs"], want, atol=1e-6)
        assert torch.equal(orc.answer(q["x"][:7].float() / 255, "label")["label"], want[:7].argmax(1))
        with pytest.raises(KdError, match="not 'logits'"):
            orc.answer(q["x"][:1].float() / 255, "logits")
        assert orc.requests == 5  # 600 rows in requests of at most 256, then one label request, one refused


def test_quota_exhaustion_keeps_the_log_and_never_writes_the_key(victim_path, queries_path, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{SECRET} 250\n")
    log = tmp_path / "q.h5"
    with kd_serve(tmp_path, victim_path, "--mode", "label", "--keys-file", keys, "--access-log") as (url, err):
        with pytest.raises(KdError, match="wants a valid API key"):  # no key
            HttpOracle(url).answer(torch.zeros(1, 1, 28, 28), "label")
        # the query stream holds batches of 100: two are answered, the third exceeds the quota of 250
        p = kd("kd-query", url, queries_path, "--api-key-env", "MY_KEY", "--log", log, "-o", tmp_path / "a.kds",
               env={"MY_KEY": SECRET})
        assert p.returncode == 1 and b"quota for this key is exhausted" in p.stderr and b"Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
        facts = log_info(log)
        assert facts["rows"] == 200 and facts["spent"] == 300  # the refused batch was reserved before the call
        # rerunning replays the 200 from the log without asking the server again; the budget stops before it
        p = kd("kd-query", url, queries_path, "--api-key-env", "MY_KEY", "--log", log, "--budget", "300",
               "-o", tmp_path / "b.kds", env={"MY_KEY": SECRET})
        assert p.returncode == 1 and b"200 from the log" in p.stderr
        assert b"a larger --budget with the same --log goes on without paying twice" in p.stderr
        # the 50 queries the quota has left are less than one request of 100: smaller requests spend them
        p = kd("kd-query", url, queries_path, "--api-key-env", "MY_KEY", "--log", log, "--budget", "400", "--max-batch", "50",
               "-o", tmp_path / "c.kds", env={"MY_KEY": SECRET})
        assert p.returncode == 1 and b"exhausted" in p.stderr and b"--max-batch N" in p.stderr, p.stderr
        assert log_info(log)["rows"] == 250
    assert b"key #1: 100 queries (label), 0 rejected, quota left 50" in err.read_bytes()
    assert b"key #1: 50 queries (label), 0 rejected, quota left 0" in err.read_bytes()
    for path in (log, tmp_path / "a.kds", tmp_path / "b.kds", err):
        if path.exists():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET.encode() not in p.stderr


def test_entropy_defence_over_http(victim_path, tmp_path):
    write_queries(tmp_path / "noise.kds", (torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 255).round().to(torch.uint8))
    digits = load_dataset("digits", "test").x[:200]
    with kd_serve(tmp_path, victim_path, "--defense", "entropy", "--defense-data", "digits",
                  "--defense-save", tmp_path / "defense.json") as (url, err):
        p = kd("kd-query", url, tmp_path / "noise.kds", "--log", tmp_path / "n.h5", "-o", tmp_path / "n.kds")
        assert p.returncode == 1 and b"defence rejected 40 of 40" in p.stderr
        assert log_info(tmp_path / "n.h5")["rows"] == 0
        orc = HttpOracle(url, RemoteOptions(on_rejected="flag"))
        assert (orc.answer(torch.rand(8, 1, 28, 28), "label")["label"] == -1).all()
        labels = orc.answer(digits.float() / 255, "label")["label"]
        assert (labels >= 0).float().mean() > 0.9 and orc.rejected_total == 8 + int((labels < 0).sum())
        # a mixed stream with --on-rejected flag: the refused rows are logged as placeholders (label -1)...
        noise = (torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 255).round().to(torch.uint8)
        write_queries(tmp_path / "mixed.kds", torch.cat([digits[:100], noise]))
        p = kd("kd-query", url, tmp_path / "mixed.kds", "--mode", "label", "--on-rejected", "flag",
               "--log", tmp_path / "m.h5", "-o", tmp_path / "m.kds")
        assert p.returncode == 0, p.stderr
    import h5py

    with h5py.File(tmp_path / "m.h5") as f:
        refused = int((f["label"][:] < 0).sum())
    assert 20 <= refused < 30
    # ... and kd-distill learns from the answered rows only, saying how many it skipped (file and online)
    p = kd("kd-distill", tmp_path / "m.h5", "--arch", "lenet5-half", "--epochs", 1, "-o", tmp_path / "s.safetensors")
    assert p.returncode == 0, p.stderr
    assert f"skipped {refused} rows whose query the oracle refused".encode() in p.stderr
    assert f"training on the {120 - refused} answered ones".encode() in p.stderr
    p = kd("kd-distill", tmp_path / "m.kds", "--arch", "lenet5-half", "--save-every", 1, "-o", tmp_path / "o.safetensors")
    assert p.returncode == 0, p.stderr
    assert f"online on {120 - refused} samples".encode() in p.stderr and f"skipped {refused} rows".encode() in p.stderr
    assert json.loads((tmp_path / "defense.json").read_text())["kind"] == "entropy"
    assert b"entropy defence: pass" in err.read_bytes()


def test_kd_serve_usage_errors():
    p = kd("kd-serve", "x.safetensors", "--defense", "entropy")
    assert p.returncode == 2 and b"--defense-data" in p.stderr
    with pytest.raises(KdError):
        read_keys_file("/nonexistent/keys")
