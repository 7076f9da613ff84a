"""Oracles beyond the model file: HTTP (against a scripted fake server on 127.0.0.1), exec: and replay:.

Every fault the issue names is here: timeouts, 500s, malformed JSON, the wrong number of answers, a
subprocess that dies, a budget reached mid-batch; each gives one clear KdError, retries stay bounded,
and whatever was answered before the fault is in the log.
"""

import json
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conftest import ROOT
from kdtools.errors import BudgetExhausted, KdError, KdUsageError
from kdtools.h5store import SampleWriter, iter_batches, log_info
from kdtools.oracle import (BudgetedOracle, ExecOracle, HttpOracle, ModelOracle, QueryRejected, RateLimiter, RemoteOptions,
                            ReplayOracle, decode_array, encode_array, open_oracle, wire_images)
from kdtools.query import output_header, run_queries
from kdtools.sources import open_samples
from kdtools.stream import StreamHeader
from kdtools.weights import load_model

SECRET = "sk-test-9f8e7d6c5b4a"


class FakeServer:
    """A scripted kdtools oracle server: each POST takes the next behaviour from ``script`` (the last
    one repeats). Answers are label = (sum of the row's uint8 pixels) mod 10, so they are checkable."""

    def __init__(self, script, delay=0.0):
        self.script = list(script)
        self.delay = delay
        self.posts = 0
        self.rows = []  # rows received per POST: what the server was really sent
        self.auth = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def reply(self, status, body: bytes, ctype="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self.reply(200, json.dumps({"protocol": 1, "input_shape": [1, 4, 4], "num_classes": 10,
                                            "modes": ["label"], "max_batch": 1000}).encode())

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                fake.auth.append(self.headers.get("Authorization"))
                what = fake.script[min(fake.posts, len(fake.script) - 1)]
                fake.posts += 1
                req = json.loads(body)
                x = decode_array(req["inputs"], torch.float32, "test")
                labels = (x.flatten(1).long().sum(1) % 10).tolist()
                n = len(labels)
                fake.rows.append(n)
                if what == "ok":
                    self.reply(200, json.dumps({"answers": {"label": labels}, "n": n}).encode())
                elif what == "500":
                    self.reply(500, json.dumps({"error": f"backend down (key {SECRET})"}).encode())
                elif what == "slow":
                    time.sleep(fake.delay)
                    self.reply(200, json.dumps({"answers": {"label": labels}}).encode())
                elif what == "badjson":
                    self.reply(200, b'{"answers": {"label": [1, 2,', "application/json")
                elif what == "short":
                    self.reply(200, json.dumps({"answers": {"label": labels[:-1]}}).encode())
                elif what == "long":
                    self.reply(200, json.dumps({"answers": {"label": labels + [0]}}).encode())
                elif what == "badlabel":
                    self.reply(200, json.dumps({"answers": {"label": [11] * n}}).encode())
                elif what == "quota":
                    self.reply(429, json.dumps({"error": "query quota exhausted"}).encode())
                elif what == "reject-odd":  # a defence refusing every odd row
                    self.reply(200, json.dumps({"answers": {"label": labels}, "rejected": [i % 2 == 1 for i in range(n)]}).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    servers = []

    def start(script, delay=0.0):
        s = FakeServer(script, delay)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def queries(n):
    """n distinct 1x4x4 uint8-valued images as floats in [0, 1], and their expected fake labels."""
    x = torch.arange(n * 16).reshape(n, 1, 4, 4) % 256
    return x.float() / 255, (x.flatten(1).sum(1) % 10)


def opts(**kw):
    base = dict(retries=2, backoff=0.01, timeout=5.0)
    return RemoteOptions(**{**base, **kw})


def test_http_answers_and_sends_the_key_in_a_header(fake):
    s = fake(["ok"])
    orc = HttpOracle(s.url, opts(api_key=SECRET))
    x, want = queries(5)
    assert orc.input_shape == (1, 4, 4) and orc.num_classes == 10 and orc.identity == s.url
    assert torch.equal(orc.answer(x, "label")["label"], want)
    assert s.auth == [f"Bearer {SECRET}"]
    with pytest.raises(KdError, match="answers in mode label, not 'probs'"):
        orc.answer(x, "probs")


def test_http_500_is_retried_with_backoff_then_answers(fake):
    s = fake(["500", "500", "ok"])
    delays = []
    orc = HttpOracle(s.url, opts(retries=3, backoff=0.5), sleep=delays.append)
    x, want = queries(4)
    assert torch.equal(orc.answer(x, "label")["label"], want)
    assert delays == [0.5, 1.0]  # exponential backoff
    assert s.posts == 3 and orc.retried_rows == 8


def test_http_500_forever_gives_up_after_bounded_attempts_without_leaking_the_key(fake):
    s = fake(["500"])
    orc = HttpOracle(s.url, opts(retries=2, api_key=SECRET), sleep=lambda d: None)
    with pytest.raises(KdError, match=r"server error \(HTTP 500.*gave up after 3 attempts") as e:
        orc.answer(queries(2)[0], "label")
    assert s.posts == 3
    assert SECRET not in str(e.value) and "***" in str(e.value)  # the server echoed the key; we scrub it


def test_http_timeout_is_retried_then_a_clear_error(fake):
    s = fake(["slow"], delay=4.0)
    orc = HttpOracle(s.url, opts(timeout=0.3, retries=1))
    t0 = time.monotonic()
    with pytest.raises(KdError, match=r"no answer within 0.3 s \(gave up after 2 attempts\)"):
        orc.answer(queries(2)[0], "label")
    # two 0.3 s attempts and a 0.5 s backoff, not one 4 s wait for the answer (margin for a loaded CI machine)
    assert time.monotonic() - t0 < 3.0 and s.posts == 2


@pytest.mark.parametrize("what, message", [("badjson", "not valid JSON"), ("short", "answered 2 rows for 3 queries"),
                                           ("long", "answered 4 rows for 3 queries"),
                                           ("badlabel", "class index outside 0..9"), ("quota", "quota for this key is exhausted")])
def test_http_bad_answers_fail_at_once_without_retrying(fake, what, message):
    s = fake([what])
    orc = HttpOracle(s.url, opts(retries=5), sleep=lambda d: None)
    with pytest.raises(KdError, match=message):
        orc.answer(queries(3)[0], "label")
    assert s.posts == 1


@pytest.mark.parametrize("third, message", [("badjson", "not valid JSON"), ("slow", "no answer within 0.3 s"),
                                            ("500", "HTTP 500")])
def test_a_failure_part_way_keeps_what_was_answered_in_the_log(fake, tmp_path, third, message):
    """max_batch 2: six queries go out as three requests; the third fails (malformed JSON, a timeout, a
    500 that outlasts the retries)."""
    s = fake(["ok", "ok", third], delay=1.5)
    orc = HttpOracle(s.url, opts(max_batch=2, timeout=0.3, retries=1), sleep=lambda d: None)
    x, want = queries(6)
    header = StreamHeader("samples", {"x": {"dtype": "float32", "shape": [1, 4, 4]}, "label": {"dtype": "int64", "shape": []}}, 10, mode="label")
    log = SampleWriter(tmp_path / "q.h5", header, orc.identity)
    bo = BudgetedOracle(orc, "label", budget=100, log=log)
    with pytest.raises(KdError, match=message):
        bo.query(x)
    log.close()
    facts = log_info(tmp_path / "q.h5")
    assert facts["spent"] == 6 and facts["rows"] == 4  # reserved before the call; the 4 answers kept
    assert torch.equal(next(iter_batches(tmp_path / "q.h5"))["label"], want[:4])


def test_an_attacks_local_oracle_that_fails_gives_its_rows_back_to_the_budget(tmp_path):
    """A model file that fails (out of memory, a bad batch) cost nothing: the attack's budget gets the rows back,
    as kd-query's does, so a --resume can still ask them; a remote oracle's failed rows stay spent (above)."""

    class Failing(ModelOracle):
        def __init__(self):
            self.identity, self.input_shape, self.num_classes = "sha256:x", (1, 4, 4), 10

        def answer(self, x, mode):
            raise KdError("out of memory")

    header = StreamHeader("samples", {"x": {"dtype": "float32", "shape": [1, 4, 4]}, "label": {"dtype": "int64", "shape": []}}, 10, mode="label")
    with SampleWriter(tmp_path / "q.h5", header, "sha256:x", budget=10) as log:
        bo = BudgetedOracle(Failing(), "label", budget=10, log=log)
        with pytest.raises(KdError, match="out of memory"):
            bo.query(queries(6)[0])
        assert bo.spent == 0 and bo.remaining == 10
    facts = log_info(tmp_path / "q.h5")
    assert facts["rows"] == facts["spent"] == 0


def test_budget_reached_mid_batch_answers_and_logs_what_fits(fake, tmp_path):
    s = fake(["ok"])
    orc = HttpOracle(s.url, opts())
    x, want = queries(8)
    header = StreamHeader("samples", {"x": {"dtype": "float32", "shape": [1, 4, 4]}, "label": {"dtype": "int64", "shape": []}}, 10, mode="label")
    with SampleWriter(tmp_path / "q.h5", header, orc.identity, budget=5) as log:
        bo = BudgetedOracle(orc, "label", budget=5, log=log)
        with pytest.raises(BudgetExhausted) as e:
            bo.query(x)
    assert torch.equal(e.value.partial["label"], want[:5])
    facts = log_info(tmp_path / "q.h5")
    assert facts["rows"] == facts["spent"] == 5 and s.posts == 1
    assert s.rows == [5]  # the 3 rows over the budget were never sent


def test_rejected_rows_error_keeps_the_prefix_or_flag_marks_them(fake, tmp_path):
    s = fake(["reject-odd"])
    x, want = queries(4)
    orc = HttpOracle(s.url, opts())
    with pytest.raises(QueryRejected, match="rejected 2 of 4 queries") as e:
        orc.answer(x, "label")
    assert torch.equal(e.value.partial["label"], want[:1])  # rows before the first rejected one
    orc = HttpOracle(s.url, opts(on_rejected="flag"))
    got = orc.answer(x, "label")["label"]
    assert got.tolist() == [want[0].item(), -1, want[2].item(), -1] and orc.rejected_total == 2


def test_rate_limiter_spaces_requests():
    now = [0.0]
    slept = []

    def sleep(d):
        slept.append(round(d, 6))
        now[0] += d

    rl = RateLimiter(100.0, clock=lambda: now[0], sleep=sleep)
    rl.wait(50)  # first request goes at once
    rl.wait(50)  # 50 queries at 100/s: the next may go 0.5 s later
    now[0] += 2.0  # idle time is not banked beyond the next slot
    rl.wait(10)
    assert slept == [0.5]


def test_wire_encoding_round_trips_and_picks_uint8_only_when_lossless():
    x = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    assert wire_images(x.float() / 255).dtype == torch.uint8
    assert torch.equal(decode_array(encode_array(x), torch.uint8, "t"), x)
    f = torch.rand(2, 3)
    assert wire_images(f.view(2, 1, 1, 3)).dtype == torch.float32
    assert torch.equal(decode_array(encode_array(f), torch.float32, "t"), f)
    with pytest.raises(KdError, match="holds 4 bytes"):
        decode_array({"dtype": "float32", "shape": [2], "data": "AAAAAA=="}, torch.float32, "t")


def test_open_oracle_refuses_keys_in_urls_and_shapeless_exec():
    with pytest.raises(KdUsageError, match="credentials"):
        open_oracle(f"http://user:{SECRET}@127.0.0.1:9/", torch.device("cpu"))
    with pytest.raises(KdUsageError, match="--input-shape"):
        open_oracle("exec:cat", torch.device("cpu"))
    with pytest.raises(KdError, match="connection failed.*gave up after 1 attempt"):
        open_oracle("http://127.0.0.1:9", torch.device("cpu"), remote=RemoteOptions(retries=0, timeout=2))


def test_an_input_shape_the_oracle_does_not_take_is_named_not_ignored(victim_path):
    # the victim file records 1x28x28: another --input-shape was silently ignored before
    with pytest.raises(KdUsageError, match=r"--input-shape 3x32x32: .*victim.* \(the shape its file records\) takes 1x28x28"):
        open_oracle(str(victim_path), torch.device("cpu"), input_shape=(3, 32, 32))
    assert open_oracle(str(victim_path), torch.device("cpu"), input_shape=(1, 28, 28)).input_shape == (1, 28, 28)


CHILD = textwrap.dedent("""
    # A stand-in victim speaking kdtools streams: label = 3 for every row. It dies (exit 7) on batch DIE.
    import sys, torch
    sys.path.insert(0, {root!r})
    from kdtools.stream import StreamHeader, StreamReader, StreamWriter
    reader = StreamReader(sys.stdin.buffer, "stdin")
    out = StreamWriter(sys.stdout.buffer, StreamHeader("samples", {{"label": {{"dtype": "int64", "shape": []}}}}, 10, mode="label"))
    for i, batch in enumerate(reader):
        if i == {die}:
            print("victim: out of memory", file=sys.stderr, flush=True)
            sys.exit(7)
        out.write({{"label": torch.full((batch["x"].shape[0],), 3, dtype=torch.long)}})
    out.close()
""")


def test_exec_oracle_that_dies_mid_run_is_a_clear_error(tmp_path):
    script = tmp_path / "victim.py"
    script.write_text(CHILD.format(root=str(ROOT), die=1))
    orc = ExecOracle(f"{sys.executable} {script}", (1, 4, 4), RemoteOptions(timeout=60))
    assert orc.num_classes == 10 and orc.mode == "label"
    assert orc.answer(queries(3)[0], "label")["label"].tolist() == [3, 3, 3]
    with pytest.raises(KdError, match=r"died while answering \(it exited with code 7\); its last message: victim: out of memory"):
        orc.answer(queries(2)[0], "label")
    with pytest.raises(KdError, match="died before this batch"):
        orc.answer(queries(2)[0], "label")
    orc.close()


def test_kd_query_through_an_exec_oracle_that_dies_keeps_what_was_answered(queries_path, tmp_path):
    # the child answers two batches of 100 and dies on the third: kd-query stops with one line and exit 1,
    # the log keeps the 200 answered rows and counts the 300 paid (the third batch was sent, so it is spent)
    from conftest import kd

    script = tmp_path / "victim.py"
    script.write_text(CHILD.format(root=str(ROOT), die=2))
    log = tmp_path / "q.h5"
    p = kd("kd-query", f"exec:{sys.executable} {script}", queries_path, "--input-shape", "1x28x28", "--log", log,
           "-o", tmp_path / "out.kds")
    err = p.stderr.decode()
    assert p.returncode == 1 and "exited with code 7" in err and "out of memory" in err
    assert "Traceback" not in err and len([l for l in err.splitlines() if l.startswith("error")]) == 1
    facts = log_info(log)
    assert facts["rows"] == 200 and facts["spent"] == 300
    assert [int(v) for b in iter_batches(log) for v in b["label"]] == [3] * 200


def test_exec_oracle_that_hangs_times_out(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import time\ntime.sleep(30)\n")
    t0 = time.monotonic()
    with pytest.raises(KdError, match="no answer within 0.5 s"):
        ExecOracle(f"{sys.executable} {script}", (1, 4, 4), RemoteOptions(timeout=0.5))
    assert time.monotonic() - t0 < 15


def test_exec_kd_query_child_equals_the_model_file(victim_path, queries_path):
    local = ModelOracle(load_model(victim_path))
    x = next(iter(open_samples(queries_path)))["x"][:50].float() / 255
    orc = open_oracle(f"exec:{sys.executable} -m kdtools.cli.query {victim_path} --mode probs -q", torch.device("cpu"),
                      input_shape=(1, 28, 28))
    try:
        got = orc.answer(x, "probs")["probs"]
        assert torch.allclose(got, local.answer(x, "probs")["probs"], atol=1e-6)
        # label and topk are derived from the child's probabilities
        assert torch.equal(orc.answer(x, "label")["label"], local.answer(x, "label")["label"])
        assert torch.equal(orc.answer(x, "topk:3")["topk_index"], local.answer(x, "topk:3")["topk_index"])
    finally:
        orc.close()
    assert orc.proc.returncode == 0


def test_an_exec_child_that_reaches_its_own_budget_mid_batch_is_an_early_stop_with_its_answers(victim_path, queries_path):
    # the child answers the 30 rows its budget allows, then ends its stream: that used to be reported as "answered 30
    # rows for 50 queries"; now it says why, and hands the 30 paid answers on (logged by kd-query or an attack)
    local = ModelOracle(load_model(victim_path))
    x = next(iter(open_samples(queries_path)))["x"][:50].float() / 255
    orc = open_oracle(f"exec:{sys.executable} -m kdtools.cli.query {victim_path} --mode probs --budget 30 -q",
                      torch.device("cpu"), input_shape=(1, 28, 28))
    try:
        with pytest.raises(KdError, match=r"ended its answers early after 30 of the 50 queries of this batch "
                                          r"\(budget_exhausted: query budget of 30 reached") as info:
            orc.answer(x, "label")
    finally:
        orc.close()
    assert torch.equal(info.value.partial["label"], local.answer(x[:30], "label")["label"])


def test_an_exec_child_that_answers_too_few_rows_and_stays_is_reported_without_waiting_out_the_timeout(tmp_path):
    # looking for an end record after a short batch must not wait the whole --timeout (60 s by default)
    script = tmp_path / "short.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        from kdtools.stream import StreamHeader, StreamReader, StreamWriter
        w = StreamWriter(sys.stdout.buffer, StreamHeader("samples", {{"label": {{"dtype": "int64", "shape": []}}}}, 10, mode="label"))
        sys.stdout.buffer.flush()
        for batch in StreamReader(sys.stdin.buffer, "in"):
            w.write({{"label": torch.zeros(batch["x"].shape[0] - 1, dtype=torch.long)}})  # one row short, stream open
            sys.stdout.buffer.flush()
    """))
    orc = ExecOracle(f"{sys.executable} {script}", (1, 2, 2), RemoteOptions(timeout=60))
    try:
        t0 = time.monotonic()
        with pytest.raises(KdError, match="3 rows for 4 queries"):
            orc.answer(torch.rand(4, 1, 2, 2), "label")
        assert time.monotonic() - t0 < 15
    finally:
        orc.proc.kill()
        orc.close()


def test_replay_round_trip_and_unknown_queries(victim_path, queries_path, tmp_path):
    local = ModelOracle(load_model(victim_path))
    src = open_samples(queries_path)
    with SampleWriter(tmp_path / "q.h5", output_header(src.header, local, "probs", {}), local.identity) as log:
        run_queries(src, local, "probs", None, log)
    rep = ReplayOracle(str(tmp_path / "q.h5"))
    assert rep.identity == local.identity and rep.rows == 600
    batch = next(iter(open_samples(queries_path)))
    x = batch["x"].float() / 255
    idx = torch.tensor([5, 0, 99, 5])  # any order, repeats allowed
    logged = torch.cat([b["probs"] for b in open_samples(tmp_path / "q.h5")])
    # replay gives back exactly the paid rows; the model itself agrees only to rounding, since a batch of 4
    # and the log's batch of 600 may take different CPU kernels (seen once: equal to 4 digits, not bitwise)
    assert torch.equal(rep.answer(x[idx], "probs")["probs"], logged[idx])
    assert torch.allclose(rep.answer(x[idx], "probs")["probs"], local.answer(x[idx], "probs")["probs"], atol=1e-6)
    assert torch.equal(rep.answer(x[idx], "label")["label"], logged[idx].argmax(1))
    with pytest.raises(KdError, match=r"1 of 2 queries are not in the log \(first: row 1"):
        rep.answer(torch.cat([x[:1], torch.rand(1, 1, 28, 28)]), "probs")
    with pytest.raises(KdError, match="does not give 'logits'"):
        rep.answer(x[:1], "logits")


@pytest.mark.parametrize("mode", ["label", "probs", "logits", "topk:3"])
def test_rejected_rows_finds_exactly_the_placeholder_rows(victim_path, mode):
    from kdtools.oracle import rejected_placeholders, rejected_rows, without_rejected

    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    answer = ModelOracle(load_model(victim_path)).answer(x, mode)
    assert not rejected_rows(answer).any()  # real answers are never taken for placeholders
    refused = torch.tensor([False, True, False, False, True, True])
    flagged = rejected_placeholders(answer, refused)
    assert torch.equal(rejected_rows(flagged), refused)
    kept, dropped = without_rejected({"x": x, **flagged})
    assert dropped == 3 and torch.equal(kept["x"], x[~refused])
    assert all(torch.equal(kept[k], answer[k][~refused]) for k in answer)


def flagged_log(path, victim_path, queries_path, mode, refused):
    """A query log in ``mode`` over the first 100 queries whose ``refused`` rows hold the placeholders of
    queries a defence rejected (as ``kd-query --on-rejected flag`` records them)."""
    from kdtools.oracle import rejected_placeholders

    local = ModelOracle(load_model(victim_path))
    src = open_samples(queries_path)
    batch = next(iter(src))
    answer = rejected_placeholders(local.answer(batch["x"].float() / 255, mode), refused)
    with SampleWriter(path, output_header(src.header, local, mode, {}), local.identity) as log:
        log.reserve(100)
        log.append({"x": batch["x"], **answer})
    return batch["x"], local


@pytest.mark.parametrize("have", ["probs", "logits"])
def test_replay_answers_refused_queries_as_refused_in_every_mode(victim_path, queries_path, tmp_path, have):
    refused = torch.zeros(100, dtype=torch.bool)
    refused[[3, 10, 57]] = True
    x, local = flagged_log(tmp_path / "q.h5", victim_path, queries_path, have, refused)
    rep = ReplayOracle(str(tmp_path / "q.h5"))
    xf = x.float() / 255
    label = rep.answer(xf, "label")["label"]
    assert (label[refused] == -1).all()  # not the argmax of all-zero probabilities (class 0)
    assert torch.equal(label[~refused], local.answer(xf, "label")["label"][~refused])
    top = rep.answer(xf, "topk:3")
    assert (top["topk_index"][refused] == -1).all() and (top["topk_value"][refused] == 0).all()
    assert (top["topk_index"][~refused] >= 0).all()
    if have == "logits":
        probs = rep.answer(xf, "probs")["probs"]
        assert (probs[refused] == 0).all() and torch.allclose(probs[~refused].sum(1), torch.ones(97))
    assert rep.replayed_rejected == 3 * (3 if have == "logits" else 2)


def test_kd_query_replay_keeps_refused_rows_refused(victim_path, queries_path, tmp_path):
    # a probs log recorded with --on-rejected flag, replayed in label mode: the refused rows stay label -1,
    # so kd-distill skips them instead of training on label 0
    from conftest import kd

    refused = torch.zeros(100, dtype=torch.bool)
    refused[::4] = True
    flagged_log(tmp_path / "dlp.h5", victim_path, queries_path, "probs", refused)
    src = open_samples(queries_path)
    first = next(iter(src))
    sink_path = tmp_path / "q100.kds"
    from kdtools.sources import SampleSink

    sink = SampleSink(src.header, path=sink_path)
    sink.write({"x": first["x"]})
    sink.close()
    p = kd("kd-query", f"replay:{tmp_path / 'dlp.h5'}", sink_path, "--mode", "label", "-o", tmp_path / "r.kds")
    assert p.returncode == 0, p.stderr
    assert b"25 of the replayed queries were refused by the recorded server's defence" in p.stderr, p.stderr
    from kdtools.sources import read_all

    labels = read_all(tmp_path / "r.kds")[1]["label"]
    assert (labels[refused] == -1).all() and (labels[~refused] >= 0).all()


def test_wire_and_on_rejected_values_are_checked_whatever_the_oracle(victim_path, queries_path, tmp_path):
    from conftest import kd

    flagged_log(tmp_path / "q.h5", victim_path, queries_path, "label", torch.zeros(100, dtype=torch.bool))
    for spec in (str(victim_path), f"replay:{tmp_path / 'q.h5'}"):
        for flag, value in (("--wire", "xml"), ("--on-rejected", "ignore")):
            p = kd("kd-query", spec, queries_path, flag, value, "-o", tmp_path / "x.kds")
            assert p.returncode == 2 and f"{flag} '{value}': expected".encode() in p.stderr, (spec, p.stderr)
            assert not (tmp_path / "x.kds").exists()
    p = kd("kd-query", f"exec:{sys.executable} -c pass", queries_path, "--input-shape", "1x28x28", "--wire", "xml")
    assert p.returncode == 2 and b"--wire 'xml': expected json or stream" in p.stderr
    # valid values that do not apply to this oracle are named as ignored, like --rate-limit
    p = kd("kd-query", victim_path, queries_path, "--wire", "stream", "--on-rejected", "flag", "-o", tmp_path / "a.kds")
    assert p.returncode == 0, p.stderr
    assert b"--wire stream and --on-rejected flag only apply to an HTTP oracle; ignored for this model oracle" in p.stderr


def test_an_output_file_keeps_what_was_answered_when_the_oracle_dies(queries_path, tmp_path):
    # no --log: the -o file is the only place the 200 paid answers live; it must be kept (a valid, shorter
    # stream whose end record says why), and the error says where they are
    from conftest import kd

    script = tmp_path / "victim.py"
    script.write_text(CHILD.format(root=str(ROOT), die=2))
    out = tmp_path / "out.kds"
    p = kd("kd-query", f"exec:{sys.executable} {script}", queries_path, "--input-shape", "1x28x28", "-o", out)
    err = p.stderr.decode()
    assert p.returncode == 1 and "exited with code 7" in err and len(err.strip().splitlines()) == 1, err
    assert f"the 200 queries answered in this run are kept in {out}" in err
    src = open_samples(out)
    labels = [int(v) for b in src for v in b["label"]]
    assert labels == [3] * 200 and src.end["status"] == "error" and "exited with code 7" in src.end["message"]
    # a failure before any answer leaves no file (and no temporary file) behind
    script.write_text(CHILD.format(root=str(ROOT), die=0))
    p = kd("kd-query", f"exec:{sys.executable} {script}", queries_path, "--input-shape", "1x28x28", "-o", tmp_path / "none.kds")
    assert p.returncode == 1 and b"kept in" not in p.stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out.kds", "victim.py"]


STALLING_CHILD = textwrap.dedent("""
    # answers label 3 for two batches; on the third it touches a marker file and waits for the end of its input
    import sys, torch
    sys.path.insert(0, {root!r})
    from kdtools.stream import StreamHeader, StreamReader, StreamWriter
    reader = StreamReader(sys.stdin.buffer, "stdin")
    out = StreamWriter(sys.stdout.buffer, StreamHeader("samples", {{"label": {{"dtype": "int64", "shape": []}}}}, 10, mode="label"))
    for i, batch in enumerate(reader):
        if i == 2:
            open({marker!r}, "w").close()
            sys.stdin.buffer.read()
            sys.exit(0)
        out.write({{"label": torch.full((batch["x"].shape[0],), 3, dtype=torch.long)}})
    out.close()
""")


def test_sigterm_keeps_what_was_answered_in_the_output_file(queries_path, tmp_path):
    import os
    import signal
    import subprocess

    from conftest import kd_cmd

    script, marker, out = tmp_path / "victim.py", tmp_path / "asked", tmp_path / "out.kds"
    script.write_text(STALLING_CHILD.format(root=str(ROOT), marker=str(marker)))
    p = subprocess.Popen(kd_cmd("kd-query") + [f"exec:{sys.executable} {script}", str(queries_path), "--input-shape", "1x28x28",
                                               "-o", str(out)], stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=60)[1].decode()
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143 and "terminated (SIGTERM)" in err and f"the 200 queries answered in this run are kept in {out}" in err, err
    src = open_samples(out)
    assert sum(b["label"].shape[0] for b in src) == 200 and src.end["status"] == "error"


def test_exec_oracle_relaying_refusals_keeps_them_refused(tmp_path):
    script = tmp_path / "victim.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from kdtools.stream import StreamHeader, StreamReader, StreamWriter
        reader = StreamReader(sys.stdin.buffer, "stdin")
        out = StreamWriter(sys.stdout.buffer, StreamHeader("samples", {{"probs": {{"dtype": "float32", "shape": [10]}}}}, 10, mode="probs"))
        for batch in reader:
            p = torch.full((batch["x"].shape[0], 10), 0.1)
            p[1::2] = 0  # rows a defence refused, as kd-query --on-rejected flag writes them
            out.write({{"probs": p}})
        out.close()
    """))
    orc = ExecOracle(f"{sys.executable} {script}", (1, 4, 4), RemoteOptions(timeout=60))
    try:
        assert orc.answer(queries(4)[0], "label")["label"].tolist() == [0, -1, 0, -1]
        assert orc.relayed_rejected == 2  # counted, so kd-query says so
    finally:
        orc.close()


def test_exec_oracle_answers_that_only_look_refused_are_errors(tmp_path):
    # a label of -5 is a bug in the child, not a refusal (those are exactly -1)
    script = tmp_path / "victim.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from kdtools.stream import StreamHeader, StreamReader, StreamWriter
        reader = StreamReader(sys.stdin.buffer, "stdin")
        out = StreamWriter(sys.stdout.buffer, StreamHeader("samples", {{"label": {{"dtype": "int64", "shape": []}}}}, 10, mode="label"))
        for batch in reader:
            out.write({{"label": torch.full((batch["x"].shape[0],), -5, dtype=torch.int64)}})
        out.close()
    """))
    orc = ExecOracle(f"{sys.executable} {script}", (1, 4, 4), RemoteOptions(timeout=60))
    try:
        with pytest.raises(KdError, match="outside"):
            orc.answer(queries(4)[0], "label")
    finally:
        orc.close()
