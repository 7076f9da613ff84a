import pytest
import torch

from kdtools.errors import BudgetExhausted, KdError
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
    for x, msg in ((torch.full((2, 1, 28, 28), float("nan")), "NaN"), (torch.rand(2, 3, 32, 32), "oracle takes 1x28x28")):
        p = tmp_path / "bad.kds"
        sink = SampleSink(StreamHeader("queries", fields_of({"x": x})), path=p)
        sink.write({"x": x})
        sink.close()
        with pytest.raises(KdError, match=msg):
            run_queries(open_samples(p), orc, "label")
