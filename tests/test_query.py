import pytest
import torch

from kdtools.errors import BudgetExhausted, KdError, counted
from kdtools.h5store import SampleWriter, iter_batches, log_info
from kdtools.oracle import ModelOracle, format_logits, parse_mode, response_fields
from kdtools.query import output_header, run_queries
from kdtools.sources import open_samples
from kdtools.weights import load_model


def oracle(victim_path):
    return ModelOracle(load_model(victim_path))


def test_response_modes():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert format_logits(logits, "label")["label"].tolist() == [1]
    assert torch.allclose(format_logits(logits, "probs")["probs"], torch.softmax(logits, 1))
    top = format_logits(logits, "topk:2")
    assert top["topk_index"].tolist() == [[1, 2]]
    assert torch.allclose(top["topk_value"], torch.softmax(logits, 1)[:, [1, 2]])
    assert set(response_fields("topk:2", 3)) == {"topk_index", "topk_value"}
    with pytest.raises(Exception, match="label, probs"):
        parse_mode("soft")


def test_budget_answers_what_fits_and_logs_it(victim_path, queries_path, tmp_path):
    orc = oracle(victim_path)
    src = open_samples(queries_path)
    log = SampleWriter(tmp_path / "q.h5", output_header(src.header, orc, "label", {}), orc.identity, budget=250)
    emitted = []
    with pytest.raises(BudgetExhausted, match="budget of 250"):
        run_queries(src, orc, "label", 250, log, emitted.append)
    log.close()
    assert sum(b["x"].shape[0] for b in emitted) == 250
    info = log_info(tmp_path / "q.h5")
    assert info["rows"] == 250 and info["spent"] == 250
    # the logged answers are the oracle's answers to the logged queries
    b = next(iter_batches(tmp_path / "q.h5"))
    assert torch.equal(orc.answer(b["x"].float() / 255, "label")["label"], b["label"])


def test_rerun_replays_the_log_and_pays_only_new_queries(victim_path, queries_path, tmp_path):
    orc = oracle(victim_path)
    header = output_header(open_samples(queries_path).header, orc, "probs", {})
    with SampleWriter(tmp_path / "q.h5", header, orc.identity, budget=600) as log:
        with pytest.raises(BudgetExhausted):
            run_queries(open_samples(queries_path), orc, "probs", 350, log)
    with SampleWriter(tmp_path / "q.h5", header, orc.identity, budget=600) as log:
        stats = run_queries(open_samples(queries_path), orc, "probs", 600, log)
    assert stats.replayed == 350 and stats.paid == 250 and stats.answered == 600
    assert log_info(tmp_path / "q.h5")["spent"] == 600


def test_rerun_on_input_that_changes_mid_batch_emits_whole_rows(victim_path, queries_path, tmp_path):
    # the log answered the first 60 rows; the rerun's input differs from row 40 on (inside a logged batch):
    # rows 0-39 come from the log, the rest are asked, and every emitted batch has as many answers as queries
    orc = oracle(victim_path)
    src_batches = list(open_samples(queries_path))
    header = output_header(open_samples(queries_path).header, orc, "label", {})
    with SampleWriter(tmp_path / "q.h5", header, orc.identity) as log:
        with pytest.raises(BudgetExhausted):
            run_queries(iter_like(src_batches[:1], header), orc, "label", 60, log)
    changed = {k: v.clone() for k, v in src_batches[0].items()}
    changed["x"][40:] = 255 - changed["x"][40:]
    emitted = []
    with SampleWriter(tmp_path / "q.h5", header, orc.identity) as log:
        stats = run_queries(iter_like([changed], header), orc, "label", None, log, emitted.append)
    assert stats.replayed == 40 and stats.paid == 60
    assert [b["x"].shape[0] for b in emitted] == [b["label"].shape[0] for b in emitted] == [100]
    want = orc.answer(changed["x"].float() / 255, "label")["label"]
    assert torch.equal(emitted[0]["label"], want)


class iter_like:
    """A sample source over given batches (the header of the file they came from)."""

    def __init__(self, batches, header):
        self.batches, self.header, self.where = batches, header, "test input"

    def __iter__(self):
        return iter(self.batches)


def test_nan_and_wrong_shape_queries_are_refused(victim_path, tmp_path):
    from kdtools.sources import SampleSink
    from kdtools.stream import StreamHeader, fields_of

    orc = oracle(victim_path)
    one_nan = torch.rand(3, 1, 28, 28)
    one_nan[1, 0, 5, 5] = float("nan")
    for x, msg in ((torch.full((2, 1, 28, 28), float("nan")), r"NaN or infinite values \(2 rows\)"),
                   (one_nan, r"NaN or infinite values \(1 row\)"), (torch.rand(2, 3, 32, 32), "oracle takes 1x28x28")):
        p = tmp_path / "bad.kds"
        sink = SampleSink(StreamHeader("queries", fields_of({"x": x})), path=p)
        sink.write({"x": x})
        sink.close()
        with pytest.raises(KdError, match=msg):
            run_queries(open_samples(p), orc, "label")


def test_a_recorded_budget_holds_when_no_budget_is_given(victim_path, queries_path, tmp_path):
    # a log made with --budget 250; a rerun that omits --budget keeps to it instead of paying for the rest
    from conftest import kd

    orc = oracle(victim_path)
    header = output_header(open_samples(queries_path).header, orc, "label", {})
    with SampleWriter(tmp_path / "q.h5", header, orc.identity, budget=250) as log:
        with pytest.raises(BudgetExhausted):
            run_queries(open_samples(queries_path), orc, "label", 250, log)
    with SampleWriter(tmp_path / "q.h5", header, orc.identity) as log:  # no budget given
        assert log.budget == 250
        with pytest.raises(BudgetExhausted, match=r"budget of 250 \(recorded in .*q.h5; --budget N sets a new one\)"):
            run_queries(open_samples(queries_path), orc, "label", None, log)
    assert log_info(tmp_path / "q.h5")["spent"] == 250
    # the same through kd-query; an explicit --budget replaces the recorded one
    p = kd("kd-query", victim_path, queries_path, "--log", tmp_path / "q.h5", "-o", tmp_path / "out.kds")
    assert p.returncode == 1 and b"budget of 250 (recorded in" in p.stderr, p.stderr
    assert log_info(tmp_path / "q.h5")["spent"] == 250
    p = kd("kd-query", victim_path, queries_path, "--log", tmp_path / "q.h5", "--budget", "600", "-o", tmp_path / "all.kds")
    assert p.returncode == 0, p.stderr
    facts = log_info(tmp_path / "q.h5")
    assert facts["spent"] == facts["rows"] == 600 and facts["budget"] == 600


def test_budget_0_answers_from_the_log_alone_and_pays_nothing(victim_path, queries_path, tmp_path):
    from conftest import kd

    from kdtools.sources import SampleSink, read_all

    log = tmp_path / "lb.h5"
    p = kd("kd-query", victim_path, queries_path, "--budget", "250", "--log", log, "-o", tmp_path / "first.kds")
    assert p.returncode == 1 and log_info(log)["spent"] == 250
    # all 600 queries: the 250 in the log are answered from it, the rest refused by the budget, nothing paid
    p = kd("kd-query", victim_path, queries_path, "--budget", "0", "--log", log, "-o", tmp_path / "out.kds")
    assert p.returncode == 1 and b"--budget 0 pays for nothing: answered 250 queries from the log" in p.stderr, p.stderr
    assert b"smaller than" not in p.stderr and b"Traceback" not in p.stderr
    facts = log_info(log)
    assert facts["spent"] == facts["rows"] == 250 and facts["budget"] == 250  # the recorded budget is untouched
    src = open_samples(tmp_path / "out.kds")
    got = torch.cat([b["label"] for b in src])
    assert got.shape[0] == 250 and src.end["status"] == "budget_exhausted"
    _, first = read_all(tmp_path / "first.kds")
    assert torch.equal(got, first["label"])
    # queries the log holds entirely: a complete run, exit 0, still nothing paid
    header, q = read_all(queries_path)
    sink = SampleSink(header, path=tmp_path / "q200.kds")
    sink.write({"x": q["x"][:200]})
    sink.close()
    p = kd("kd-query", victim_path, tmp_path / "q200.kds", "--budget", "0", "--log", log, "-o", tmp_path / "o200.kds")
    assert p.returncode == 0, p.stderr
    assert log_info(log)["spent"] == 250 and read_all(tmp_path / "o200.kds")[1]["label"].shape[0] == 200
    # --budget 0 with a log that does not exist is a usage error, and creates nothing
    p = kd("kd-query", victim_path, queries_path, "--budget", "0", "--log", tmp_path / "new.h5", "-o", tmp_path / "n.kds")
    assert p.returncode == 2 and b"does not exist" in p.stderr and not (tmp_path / "new.h5").exists()


def test_a_replay_miss_is_not_charged(victim_path, queries_path, tmp_path):
    # a replayed log that lacks a query answers nothing and costs nothing: the reservation made before the call is
    # given back (the log charged 256 queries for 0 rows, and a --budget lost them)
    from kdtools.oracle import ReplayOracle

    orc = oracle(victim_path)
    src = open_samples(queries_path)
    header = output_header(src.header, orc, "label", {})
    with SampleWriter(tmp_path / "recorded.h5", header, orc.identity) as log:
        with pytest.raises(BudgetExhausted):
            run_queries(open_samples(queries_path), orc, "label", 100, log)
    replay = ReplayOracle(str(tmp_path / "recorded.h5"))
    with SampleWriter(tmp_path / "new.h5", header, replay.identity, budget=1000) as log:
        with pytest.raises(KdError, match="not in the log"):
            run_queries(open_samples(queries_path), replay, "label", 1000, log)
    info = log_info(tmp_path / "new.h5")
    assert info["rows"] == info["spent"] == 100  # the first batch was recorded; the second is not charged


def test_counted_puts_the_noun_in_the_number_it_takes():
    assert [counted(n, "row") for n in (0, 1, 2)] == ["0 rows", "1 row", "2 rows"]
    assert [counted(n, "query", "queries") for n in (1, 250)] == ["1 query", "250 queries"]
