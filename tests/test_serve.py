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
        # the log names the model that answered (the server's identity, its file's hash), not the address
        assert facts["rows"] == facts["spent"] == 600 and facts["oracle"] == load_model(victim_path).identity
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
        # the message names the variable the key was looked for in, and whether it held one (never the key)
        with pytest.raises(KdError, match=r"HTTP 401.*no key was sent: the environment variable MY_KEY \(--api-key-env\) is not set"):
            HttpOracle(url, RemoteOptions(api_key_env="MY_KEY")).answer(torch.zeros(1, 1, 28, 28), "label")
        with pytest.raises(KdError, match=r"HTTP 401.*the key sent came from the environment variable MY_KEY") as info:
            HttpOracle(url, RemoteOptions(api_key="notthekey9", api_key_env="MY_KEY")).answer(torch.zeros(1, 1, 28, 28), "label")
        assert "notthekey9" not in str(info.value)
        # a key pasted where the variable's name belongs (the CLI lets names of letters, digits and '_' through)
        # is not printed back
        with pytest.raises(KdError, match=r"no key was sent: the environment variable named by \(--api-key-env\)") as info:
            HttpOracle(url, RemoteOptions(api_key_env="sk_live_4eC39Hq")).answer(torch.zeros(1, 1, 28, 28), "label")
        assert "sk_live" not in str(info.value)
        p = kd("kd-query", url, queries_path, "--api-key-env", "MY_KEY", "-o", tmp_path / "nokey.kds", env={"MY_KEY": ""})
        assert p.returncode == 1 and b"MY_KEY (--api-key-env) is not set or empty" in p.stderr, p.stderr
        with pytest.raises(KdError, match="HTTP 415"):  # refused requests are in the access log too
            HttpOracle(url, RemoteOptions(api_key=SECRET))._request("POST", "/v1/query", b"x", "text/plain")
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
    assert b"kd-serve: no key: POST /v1/query: HTTP 401: this server needs an API key" in err.read_bytes()
    assert b"kd-serve: key #1: POST /v1/query: HTTP 415: unsupported content type" in err.read_bytes()
    assert b"kd-serve: key #1: POST /v1/query: HTTP 429: query quota exhausted" in err.read_bytes()
    for path in (log, tmp_path / "a.kds", tmp_path / "b.kds", err):
        if path.exists():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET.encode() not in p.stderr


def test_same_answers_benchmark_finds_every_answer_of_an_http_log_in_the_model_file(victim_path, queries_path, tmp_path):
    # benchmarks/same_answers.py is the check behind "the run through kd-serve is the file's run": it asks a log's
    # queries again from the file, in the log's batches, and counts the answers that differ in any bit
    import sys

    from kdtools.weights import save_model

    log = tmp_path / "http.h5"
    with kd_serve(tmp_path, victim_path, "--mode", "probs") as (url, err):
        kd("kd-query", url, queries_path, "--mode", "probs", "--log", log, "-o", tmp_path / "http.kds", check=True)

    def check(model_file, code: int) -> list[str]:
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "same_answers.py"), str(log), str(model_file)],
                           capture_output=True, text=True, env=ENV)
        assert r.returncode == code, r.stderr
        return [c.strip() for c in r.stdout.splitlines()[-1].strip("|").split("|")]

    # rows in the log, rows asked again, batches (the query file's 100 each), answers different
    row = check(victim_path, 0)
    assert row[3:7] == ["600", "600", "6", "0"]
    # it can fail: a victim whose class-0 output bias moved by 0.01 gives other probabilities for every row
    loaded = load_model(victim_path)
    with torch.no_grad():
        list(loaded.module.parameters())[-1][0] += 0.01
    other = tmp_path / "other.safetensors"
    save_model(loaded.module, other, {"made_by": "tests"})
    row = check(other, 1)
    assert row[4] == "600" and row[6] == "600" and 0 < float(row[7]) < 0.01


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
        # the warning says where the placeholders went: the log and the output here, the output alone without a log
        assert f"(written as label -1 / empty scores to the log {tmp_path / 'm.h5'} and {tmp_path / 'm.kds'})".encode() in p.stderr, p.stderr
        p = kd("kd-query", url, tmp_path / "mixed.kds", "--on-rejected", "flag", "-o", tmp_path / "m2.kds")
        assert p.returncode == 0 and f"(written as label -1 / empty scores to {tmp_path / 'm2.kds'})".encode() in p.stderr, p.stderr
        warning = next(line for line in p.stderr.decode().splitlines() if "defence rejected" in line)
        assert "log" not in warning, warning
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


def test_refused_rows_stay_refused_when_replayed_and_paid_answers_stay_in_the_output(victim_path, tmp_path):
    digits = load_dataset("digits", "test").x[:200]
    noise = (torch.rand(30, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 255).round().to(torch.uint8)
    with kd_serve(tmp_path, victim_path, "--mode", "probs,label", "--defense", "entropy", "--defense-data", "digits",
                  "--defense-save", tmp_path / "defense.json") as (url, err):
        passing = digits[EntropyDefense.load(tmp_path / "defense.json").passes(digits)][:50]
        write_queries(tmp_path / "q.kds", torch.cat([passing, noise]))
        # default --on-rejected, -o and no --log: the 50 answered before the first rejection were paid for and
        # are kept in the output (a valid, shorter stream), as the message says
        p = kd("kd-query", url, tmp_path / "q.kds", "--mode", "probs", "-o", tmp_path / "kept.kds")
        err_text = p.stderr.decode()
        assert p.returncode == 1 and "rejected 30 of 80 queries" in err_text and "the 50 answered before the first rejection are kept" in err_text
        assert f"the 50 queries answered in this run are kept in {tmp_path / 'kept.kds'}" in err_text, err_text
        _, kept = read_all(tmp_path / "kept.kds")
        assert torch.equal(kept["x"], passing) and kept["probs"].shape == (50, 10)
        # --on-rejected flag in probs mode: refused rows are all-zero probabilities in the log ...
        p = kd("kd-query", url, tmp_path / "q.kds", "--mode", "probs", "--on-rejected", "flag", "--log", tmp_path / "dlp.h5",
               "-o", tmp_path / "dlp.kds")
        assert p.returncode == 0, p.stderr
    # ... and a replay in label mode answers them as refused (label -1), never as class 0
    p = kd("kd-query", f"replay:{tmp_path / 'dlp.h5'}", tmp_path / "q.kds", "--mode", "label", "-o", tmp_path / "r.kds")
    assert p.returncode == 0, p.stderr
    labels = read_all(tmp_path / "r.kds")[1]["label"]
    assert (labels[50:] == -1).all() and (labels[:50] >= 0).all()
    assert torch.equal(labels[:50], kept["probs"].argmax(1))
    assert b"30 of the replayed queries were refused" in p.stderr


class _Failing:
    """An oracle for VictimService: labels 0, except for queries holding any non-zero pixel, where the model
    behind the server "fails" (a KdError: HTTP 502)."""

    identity, kind, input_shape, num_classes = "test", "test", (1, 2, 2), 3

    def answer(self, x, mode):
        if bool((x > 0).any()):
            raise KdError("the proxied oracle is down")
        return {"label": torch.zeros(x.shape[0], dtype=torch.long)}

    def close(self):
        pass


def test_access_log_has_one_event_per_request_whatever_its_status(tmp_path):
    import http.client
    import threading

    from kdtools.serve import make_server

    events = []
    svc = VictimService(_Failing(), ["label"], Quotas({SECRET: 5}), max_batch=8, on_request=events.append)
    server = make_server(svc)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    auth = {"Authorization": f"Bearer {SECRET}"}
    body = lambda n, v=0.0: json.dumps({"mode": "label", "inputs": torch.full((n, 1, 2, 2), v).tolist()}).encode()
    requests = [("GET", "/v1/info", None, {}, 200), ("GET", "/nope", None, {}, 404),
                ("POST", "/v1/query", body(1), {"Content-Type": "application/json"}, 401),
                ("POST", "/v1/query", body(1), {"Content-Type": "application/json", "Authorization": "Bearer wrong"}, 401),
                ("POST", "/v1/query", b"{nope", {"Content-Type": "application/json", **auth}, 400),
                ("POST", "/v1/query", body(1), {"Content-Type": "text/plain", **auth}, 415),
                ("POST", "/v1/query", body(9), {"Content-Type": "application/json", **auth}, 413),
                ("POST", "/v1/query", body(2), {"Content-Type": "application/json", **auth}, 200),
                ("POST", "/v1/query", body(4), {"Content-Type": "application/json", **auth}, 429),
                ("POST", "/v1/query", body(1, 0.5), {"Content-Type": "application/json", **auth}, 502),
                ("POST", "/v2/other", body(1), {"Content-Type": "application/json", **auth}, 404),
                ("PUT", "/v1/query", b"", auth, 501)]
    try:
        for method, path, data, headers, want in requests:
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            resp.read()
            conn.close()
            assert resp.status == want, (method, path, resp.status)
    finally:
        server.shutdown()
        server.server_close()
    assert [e["status"] for e in events] == [want for *_, want in requests]
    assert [e["account"] for e in events] == ["no key", "no key", "no key", "unknown key"] + ["key #1"] * 8
    assert events[7]["rows"] == 2 and events[7]["quota_left"] == 3
    assert "proxied oracle is down" in events[9]["error"] and "quota exhausted" in events[8]["error"]
    assert all(e["error"] for e in events if e["status"] != 200)
    assert SECRET not in json.dumps(events)


def test_a_local_oracle_that_cannot_answer_is_422_and_not_retried(tmp_path):
    # a served model file or replay: log fails the same way every time (a query the log does not hold): it answered
    # 502, which clients retried (with backoff) for the same answer; now 422, asked once, and the quota refunded
    import threading

    from kdtools.serve import make_server

    class FailingLocal(_Failing):
        free_on_failure = True

    events = []
    svc = VictimService(FailingLocal(), ["label"], Quotas({SECRET: 5}), max_batch=8, on_request=events.append)
    server = make_server(svc)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        orc = HttpOracle(url, RemoteOptions(api_key=SECRET, retries=3), sleep=lambda d: None)
        with pytest.raises(KdError, match=r"cannot answer these queries \(HTTP 422: the proxied oracle is down\); asking again"):
            orc.answer(torch.full((2, 1, 2, 2), 0.5), "label")
    finally:
        server.shutdown()
        server.server_close()
    assert [e["status"] for e in events if e["path"] == "/v1/query"] == [422]  # one request, no retry
    assert svc.quotas.left(svc.quotas.account(SECRET)) == 5


def test_a_proxy_passes_its_upstreams_422_on_and_the_client_does_not_retry():
    # kd-serve in front of another server (an http:// oracle) whose model cannot answer: the upstream says 422
    # ("asking again would give the same"); the proxy answered 502, which its own clients retried with backoff
    import threading

    from kdtools.serve import make_server

    class FailingLocal(_Failing):
        free_on_failure = True

    servers, events = [], []
    try:
        upstream = make_server(VictimService(FailingLocal(), ["label"], Quotas({SECRET: 50}), max_batch=8))
        servers.append(upstream)
        threading.Thread(target=upstream.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        inner = HttpOracle(f"http://127.0.0.1:{upstream.server_address[1]}", RemoteOptions(api_key=SECRET, retries=3),
                           sleep=lambda d: None)
        proxy = make_server(VictimService(inner, ["label"], Quotas({SECRET: 50}), max_batch=8, on_request=events.append))
        servers.append(proxy)
        threading.Thread(target=proxy.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        client = HttpOracle(f"http://127.0.0.1:{proxy.server_address[1]}", RemoteOptions(api_key=SECRET, retries=3),
                            sleep=lambda d: None)
        with pytest.raises(KdError, match=r"cannot answer these queries \(HTTP 422: .*HTTP 422: the proxied oracle is down"):
            client.answer(torch.full((2, 1, 2, 2), 0.5), "label")
        assert client.answer(torch.zeros(2, 1, 2, 2), "label")["label"].tolist() == [0, 0]  # the proxy still serves
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert [e["status"] for e in events if e["path"] == "/v1/query"] == [422, 200]  # one request, no retry


def test_access_log_never_names_the_previous_requests_account_on_a_kept_alive_connection():
    # one socket, three requests: a keyed query, then one whose header line is too long (431) and one whose
    # request line is too long (414); http.server refuses both before their headers parse, so the log must
    # not name the account (or path) of the request before them
    import socket
    import threading

    from kdtools.serve import make_server

    events = []
    svc = VictimService(_Failing(), ["label"], Quotas({SECRET: 5}), max_batch=8, on_request=events.append)
    server = make_server(svc)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    body = json.dumps({"mode": "label", "inputs": torch.zeros(1, 1, 2, 2).tolist()}).encode()
    first = (f"POST /v1/query HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}\r\n"
             f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    try:
        for second, want in ((b"GET /v1/info HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", 431),
                             (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414)):
            with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as sock:
                sock.sendall(first)
                reply = b""
                while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                    reply += sock.recv(65536)
                assert reply.startswith(b"HTTP/1.1 200")
                sock.sendall(second)
                assert sock.recv(65536).startswith(f"HTTP/1.1 {want}".encode())
    finally:
        server.shutdown()
        server.server_close()
    assert [(e["status"], e["account"]) for e in events] == [(200, "key #1"), (431, "-"), (200, "key #1"), (414, "-")]
    assert events[3]["path"] == "-" and events[3]["method"] == "-"
    assert SECRET not in json.dumps(events)


def test_a_served_replay_flags_the_refused_rows_it_recorded(tmp_path):
    from kdtools.h5store import SampleWriter
    from kdtools.oracle import ReplayOracle
    from kdtools.stream import StreamHeader

    x = torch.arange(3 * 16, dtype=torch.uint8).reshape(3, 1, 4, 4)
    probs = torch.tensor([[0.2, 0.8], [0.0, 0.0], [0.6, 0.4]])  # row 1: a query the recorded defence refused
    header = StreamHeader("samples", {"x": {"dtype": "uint8", "shape": [1, 4, 4]}, "probs": {"dtype": "float32", "shape": [2]}}, 2, mode="probs")
    with SampleWriter(tmp_path / "log.h5", header, "sha256:test") as log:
        log.append({"x": x, "probs": probs})
    svc = VictimService(ReplayOracle(str(tmp_path / "log.h5")), ["label"])
    reply = json.loads(svc.query(json.dumps({"mode": "label", "inputs": (x.float() / 255).tolist()}).encode(), "application/json", None)[2])
    assert reply["rejected"] == [False, True, False] and reply["answers"]["label"] == [1, -1, 0]


def test_kd_serve_usage_errors():
    p = kd("kd-serve", "x.safetensors", "--defense", "entropy")
    assert p.returncode == 2 and b"--defense-data" in p.stderr
    with pytest.raises(KdError):
        read_keys_file("/nonexistent/keys")


def test_a_second_sigterm_during_shutdown_is_quiet(victim_path, tmp_path):
    # `timeout` signals kd-serve and its process group: the second SIGTERM arrived during the shutdown and printed
    # an "Exception ignored in atexit callback" traceback
    port_file, err = tmp_path / "p", tmp_path / "err"
    with open(err, "wb") as errf:
        p = subprocess.Popen(kd_cmd("kd-serve") + [str(victim_path), "--port", "0", "--port-file", str(port_file)],
                             stdout=subprocess.DEVNULL, stderr=errf, env=ENV)
    deadline = time.monotonic() + 120
    while not port_file.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        while p.poll() is None:  # keep signalling until it has exited
            p.send_signal(signal.SIGTERM)
            time.sleep(0.002)
    except ProcessLookupError:
        pass
    assert p.wait(timeout=20) == 0, err.read_text()
    assert "Traceback" not in err.read_text() and "stopped after answering" in err.read_text()


def test_an_http_log_follows_the_served_model_not_the_address(victim_path, queries_path, tmp_path):
    # the same model on another port (kd-serve --port 0 after a restart) continues the log; another model at an
    # address the log knows is refused (it was accepted, mixing two victims' answers in one log)
    other = tmp_path / "other.safetensors"
    kd("kd-distill", "--data", "digits", "--arch", "mlp", "--epochs", 1, "-q", "-o", other, check=True)
    log = tmp_path / "q.h5"
    with kd_serve(tmp_path, victim_path, name="a") as (url, _):
        p = kd("kd-query", url, queries_path, "--budget", 200, "--log", log, "-o", tmp_path / "a.kds")
        assert p.returncode == 1 and log_info(log)["spent"] == 200  # stopped at its budget
    with kd_serve(tmp_path, victim_path, name="b") as (url, _):
        kd("kd-query", url, queries_path, "--budget", 600, "--log", log, "-o", tmp_path / "b.kds", check=True)
        assert log_info(log)["rows"] == log_info(log)["spent"] == 600
    with kd_serve(tmp_path, other, name="c") as (url, _):
        p = kd("kd-query", url, queries_path, "--budget", 700, "--log", log, "-o", tmp_path / "c.kds")
        assert p.returncode == 1 and b"recorded from another oracle" in p.stderr
    assert log_info(log)["spent"] == 600
