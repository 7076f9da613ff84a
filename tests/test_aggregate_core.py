"""kd-aggregate library: BiLA-CM loss and optimiser against hand-computed values, growth, baselines,
parsing rules, state round trip, simulator."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from kdtools.aggregate import crowdio
from kdtools.aggregate.baselines import dawid_skene, mace, majority_vote
from kdtools.aggregate.bila import BilaConfig, BilaModel, Triples, bila_loss, clip_bounds, rmsclip_step
from kdtools.aggregate.online import Aggregator
from kdtools.aggregate.simulate import bimodal_pmf, bimodal_wrong_labels, simulate_crowd
from kdtools.errors import KdError


# ------------------------------------------------------------------------------------------------
# loss (eq. 2.11)


def test_loss_matches_hand_computation():
    # one item, q = (0.75, 0.25), prior p = (0.5, 0.5), log p(l|c) = (log 0.8, log 0.3), zeta = 0.5
    log_q = torch.log(torch.tensor([[0.75, 0.25]]))
    log_prior = torch.log(torch.tensor([0.5, 0.5]))
    loglik = torch.log(torch.tensor([[0.8, 0.3]]))
    # by hand: sum_c q log(p/q) = 0.75 ln(0.5/0.75) + 0.25 ln(0.5/0.25) = -0.3040988 + 0.1732868 = -0.1308120
    #          sum_c q log p(l|c) = 0.75 ln 0.8 + 0.25 ln 0.3 = -0.1673580 - 0.3009932 = -0.4683512
    #          f = -(0.5 * -0.1308120 + -0.4683512) = 0.5337572
    assert float(bila_loss(log_q, log_prior, loglik, zeta=0.5)) == pytest.approx(0.5337572, abs=1e-6)
    # mean over items: a second, identical item leaves the value unchanged
    f2 = bila_loss(log_q.repeat(2, 1), log_prior, loglik.repeat(2, 1), zeta=0.5)
    assert float(f2) == pytest.approx(0.5337572, abs=1e-6)


def test_model_loss_uses_confusion_matrices_and_counted_prior():
    # K = 2 workers, C = 2; q is made constant (all weights 0, b3 = log(0.75, 0.25))
    m = BilaModel(2, 2, BilaConfig(zeta=0.5))
    m.theta.zero_()
    m.params["b3"].copy_(torch.log(torch.tensor([0.75, 0.25])))
    m.params["omega"][0].copy_(torch.log(torch.tensor([[0.8, 0.2], [0.3, 0.7]])))
    m.prior_counts = torch.tensor([2.0, 2.0], dtype=torch.float64)  # eq. 2.10 -> (0.5, 0.5)
    batch = Triples.from_matrix(torch.tensor([[0, -1]]))  # worker 0 said class 0, worker 1 nothing
    assert float(m.loss(batch)) == pytest.approx(0.5337572, abs=1e-6)
    grad = torch.zeros_like(m.theta)
    assert m.loss_and_grad(batch, m.log_prior(), grad) == pytest.approx(0.5337572, abs=1e-6)


def test_closed_form_gradient_equals_autograd():
    torch.manual_seed(1)
    m = BilaModel(6, 3, BilaConfig(zeta=0.7))
    m.theta.normal_(0, 0.5)
    m.prior_counts = torch.tensor([3.0, 5.0, 2.0], dtype=torch.float64)
    L = torch.tensor([[0, -1, 2, 1, -1, 0], [-1, -1, 1, -1, -1, -1], [2, 2, 2, -1, 0, -1], [1, 0, -1, -1, -1, 2]])
    batch = Triples.from_matrix(L)
    theta = m.theta.clone().requires_grad_(True)
    m.loss(batch, theta).backward()
    grad = torch.zeros_like(m.theta)
    m.loss_and_grad(batch, m.log_prior(), grad)
    assert torch.allclose(grad, theta.grad, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# optimiser (Algorithm 2.1 lines 24-29)


def test_optimiser_two_steps_by_hand():
    cfg = BilaConfig(lr=0.01, gamma=0.9, final_lr=0.1, bound_gamma=1e-3, eps=0.0)
    theta = torch.tensor([1.0, -2.0], dtype=torch.float64)
    v = torch.zeros(2, dtype=torch.float64)
    g = torch.tensor([0.5, -0.1], dtype=torch.float64)
    # t = 1: v = 0.1 g^2 = (0.025, 0.001); mu_1 = 0.01 sqrt(0.1) = 0.00316228
    #        mu_1 / sqrt(v) = (0.02, 0.1), inside the bounds (9.99e-5, 100.1); eta = (0.02, 0.1) / sqrt(1)
    eta = rmsclip_step(theta, g, v, 1, cfg)
    assert torch.allclose(v, torch.tensor([0.025, 0.001], dtype=torch.float64))
    assert torch.allclose(eta, torch.tensor([0.02, 0.1], dtype=torch.float64))
    assert torch.allclose(theta, torch.tensor([0.99, -1.99], dtype=torch.float64))
    # t = 2: v = 0.9 v + 0.1 g^2 = (0.0475, 0.0019); mu_2 = 0.01 sqrt(0.19); ratio again (0.02, 0.1)
    #        eta = (0.02, 0.1) / sqrt(2) = (0.01414214, 0.07071068)
    eta = rmsclip_step(theta, g, v, 2, cfg)
    assert torch.allclose(v, torch.tensor([0.0475, 0.0019], dtype=torch.float64))
    assert torch.allclose(eta, torch.tensor([0.01414214, 0.07071068], dtype=torch.float64), atol=1e-8)
    assert torch.allclose(theta, torch.tensor([0.98292893, -1.98292893], dtype=torch.float64), atol=1e-8)


def test_optimiser_clips_to_lower_bound_and_decays():
    cfg = BilaConfig(lr=0.01, gamma=0.9, final_lr=0.1, bound_gamma=1e-3, eps=0.0)
    t = 10_000
    lower, upper = clip_bounds(t, 0.1, 1e-3)
    assert lower == pytest.approx(0.1 * (1 - 1 / 11))  # 0.0909091
    assert upper == pytest.approx(0.11)
    theta = torch.tensor([1.0], dtype=torch.float64)
    v = torch.zeros(1, dtype=torch.float64)
    # v = 0.025, mu_t ~ 0.01, ratio 0.0632456 < lower -> clipped to 0.0909091, then / sqrt(10000)
    eta = rmsclip_step(theta, torch.tensor([0.5], dtype=torch.float64), v, t, cfg)
    assert float(eta) == pytest.approx(0.0909091 / 100, rel=1e-5)
    assert float(theta) == pytest.approx(1 - 0.5 * 0.0909091 / 100, rel=1e-7)


def test_zero_gradient_leaves_parameter_and_decays_moment():
    cfg = BilaConfig()
    theta = torch.tensor([3.0])
    v = torch.tensor([0.5])
    rmsclip_step(theta, torch.zeros(1), v, 5, cfg)
    assert float(theta) == 3.0 and float(v) == pytest.approx(0.45)


@pytest.mark.parametrize("step_count", ["global", "per-parameter"])
def test_training_only_present_workers_matches_full_update(step_count):
    """train_chunk skips absent workers' confusion matrices; that must equal the full-vector update
    (with per-parameter counts too: every element existed from the start, so t_i = t)."""
    torch.manual_seed(0)
    cfg = BilaConfig(max_epochs=3, min_epochs=3, batch_size=4, step_count=step_count)
    m = BilaModel(5, 2, cfg)
    m.prior_counts = torch.tensor([4.0, 3.0], dtype=torch.float64)
    m.v.uniform_(0, 0.01)
    L = torch.tensor([[0, 1, -1, -1, -1], [1, 1, -1, -1, -1], [0, -1, -1, -1, -1]])
    ref = BilaModel.from_tensors(m.tensors(), cfg)
    m.train_chunk(Triples.from_matrix(L), seed=3)
    # reference: plain loop over the whole parameter vector, same batches (n <= batch: whole chunk)
    batch = Triples.from_matrix(L)
    grad = torch.zeros_like(ref.theta)
    for _ in range(3):
        ref.loss_and_grad(batch, ref.log_prior(), grad)
        ref.t += 1
        rmsclip_step(ref.theta, grad, ref.v, ref.t, cfg)
    assert m.t == ref.t == 3
    if step_count != "global":
        assert torch.equal(m.steps, torch.full_like(m.steps, 3.0))  # absent workers' counts advance too
    assert torch.allclose(m.theta, ref.theta, atol=1e-6)
    assert torch.allclose(m.v, ref.v, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# growth


def test_grow_keeps_what_was_learned():
    torch.manual_seed(0)
    m = BilaModel(3, 2)
    m.theta.normal_(0, 0.3)
    m.prior_counts = torch.tensor([5.0, 5.0], dtype=torch.float64)
    L = torch.tensor([[0, 1, -1], [1, -1, 1]])
    before_conf = m.confusion().clone()
    before_lab, before_p = m.infer(Triples.from_matrix(L))
    m.grow(5, 2)  # two new workers
    assert m.K == 5 and m.params["W1"].shape == (64, 5)
    assert torch.allclose(m.confusion()[:3], before_conf)
    lab, p = m.infer(Triples.from_matrix(torch.cat([L, torch.full((2, 2), -1)], dim=1)))
    assert (lab == before_lab).all() and np.allclose(p, before_p)
    # a new worker starts as the average worker
    assert torch.allclose(m.confusion()[4], before_conf.mean(0), atol=1e-5)
    m.grow(5, 3)  # a new class
    assert m.C == 3 and m.params["omega"].shape == (5, 3, 3) and m.params["W3"].shape == (3, 32)
    conf = m.confusion()
    assert torch.allclose(conf.sum(2), torch.ones(5, 3))
    # the old 2x2 block keeps its shape (rows renormalised with the new column)
    old = conf[:3, :2, :2] / conf[:3, :2, :2].sum(2, keepdim=True)
    assert torch.allclose(old, before_conf, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# baselines


def test_majority_vote_ties_are_random_but_seeded():
    items = np.array([0, 0, 1, 1, 1])
    workers = np.array([0, 1, 0, 1, 2])
    labels = np.array([0, 1, 1, 1, 0])
    picks = {int(majority_vote(items, workers, labels, 2, 3, 2, rng=np.random.default_rng(s))[0][0]) for s in range(30)}
    assert picks == {0, 1}  # item 0 is a 1-1 tie: both answers occur over seeds
    a = majority_vote(items, workers, labels, 2, 3, 2, rng=np.random.default_rng(7))[0]
    b = majority_vote(items, workers, labels, 2, 3, 2, rng=np.random.default_rng(7))[0]
    assert (a == b).all() and a[1] == 1
    proba = majority_vote(items, workers, labels, 2, 3, 2)[1]
    assert np.allclose(proba[1], [1 / 3, 2 / 3])


def _two_good_one_adversary(n=200, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n)
    items, workers, labels = [], [], []
    for i, y in enumerate(truth):
        for w, acc in enumerate((0.9, 0.85, 0.1, 0.55)):  # worker 2 is an adversary
            items.append(i); workers.append(w)
            labels.append(y if rng.random() < acc else 1 - y)
    return truth, np.array(items), np.array(workers), np.array(labels)


@pytest.mark.parametrize("fn", [dawid_skene, mace])
def test_em_baselines_beat_majority_vote(fn):
    truth, items, workers, labels = _two_good_one_adversary()
    mv = majority_vote(items, workers, labels, len(truth), 4, 2)[0]
    lab, proba, conf = fn(items, workers, labels, len(truth), 4, 2)
    assert (lab != truth).mean() < (mv != truth).mean()
    assert np.allclose(proba.sum(1), 1) and conf.shape == (4, 2, 2)


def test_dawid_skene_recovers_confusion():
    truth, items, workers, labels = _two_good_one_adversary(n=600)
    _, _, conf = dawid_skene(items, workers, labels, len(truth), 4, 2)
    assert conf[0, 0, 0] > 0.8 and conf[2, 0, 1] > 0.8  # worker 2 flips labels


# ------------------------------------------------------------------------------------------------
# parsing


def test_long_csv_tsv_and_custom_columns():
    rows = list(crowdio.read_long(io.StringIO("item,annotator,answer,extra\na,w1,cat,x\nb,w2,dog,y\n"), "x.csv",
                                  crowdio.Columns("item", "annotator", "answer")))
    assert rows == [("a", "w1", "cat"), ("b", "w2", "dog")]
    rows = list(crowdio.read_long(io.StringIO("task\tworker\tlabel\n1\t2\t3\n"), "x.tsv"))
    assert rows == [("1", "2", "3")]


@pytest.mark.parametrize("text, needle", [
    ("task,worker,label\na,w1,1\nb,w2\n", "x.csv:3: malformed line"),
    ("task,worker,label\na,w1,NaN\n", "missing"),
    ("task,worker,label\na,w1,\n", "missing"),
    ("task,worker\na,w1\n", "must name the columns"),
    ("", "empty input"),
    ("task,worker,label\na,,1\n", "empty worker"),
])
def test_long_csv_errors(text, needle):
    with pytest.raises(KdError, match=needle):
        list(crowdio.read_long(io.StringIO(text), "x.csv"))


def test_dense_matrix_with_and_without_header():
    rows = list(crowdio.read_dense(io.StringIO("1,-1,0\n-1,2,2\n"), "m.csv"))
    assert rows == [("0", "0", "1"), ("0", "2", "0"), ("1", "1", "2"), ("1", "2", "2")]
    rows = list(crowdio.read_dense(io.StringIO("task,ann1,ann2\nt7,1.0,\nt8,-1,0\n"), "m.csv"))
    assert rows == [("t7", "ann1", "1"), ("t8", "ann2", "0")]
    with pytest.raises(KdError, match="write -1"):
        list(crowdio.read_dense(io.StringIO("1,nan\n"), "m.csv"))


def test_repeat_rule_last_label_wins():
    rows, replaced = crowdio.dedupe([("a", "w", "1"), ("b", "w", "0"), ("a", "w", "2")])
    assert rows == [("a", "w", "2"), ("b", "w", "0")] and replaced == 1


def test_stream_chunks_count_tasks():
    rows = [(t, w, "1") for t in "aabbccdde" for w in ("x",)]
    chunks = list(crowdio.stream_chunks(rows, chunk_size=2, first_size=3))
    assert [sorted({r[0] for r in c}) for c in chunks] == [["a", "b", "c"], ["d", "e"]]
    groups = crowdio.group_by_task([("a", "1", "x"), ("b", "1", "x"), ("a", "2", "y")])
    assert groups == [[("a", "1", "x"), ("a", "2", "y")], [("b", "1", "x")]]


# ------------------------------------------------------------------------------------------------
# the aggregator and its state


def _crowd_rows(n_tasks=120, seed=0, prefix="t", workers=("ann", "bob", "cy", "dee", "eve"), classes=("no", "yes")):
    rng = np.random.default_rng(seed)
    rows, truth = [], {}
    acc = rng.uniform(0.6, 0.95, len(workers))
    for i in range(n_tasks):
        y = int(rng.integers(0, len(classes)))
        truth[f"{prefix}{i}"] = classes[y]
        for w, a in zip(workers, acc):
            if rng.random() < 0.8:
                lab = y if rng.random() < a else int(rng.integers(0, len(classes)))
                rows.append((f"{prefix}{i}", w, classes[lab]))
    return rows, truth


def test_aggregator_online_handles_real_data_quirks():
    rows, truth = _crowd_rows(150)
    agg = Aggregator("bila")
    r1 = agg.process(rows[:300])
    assert set(r1.labels) <= {"no", "yes"} and len(r1.tasks) == len({r[0] for r in rows[:300]})
    # a later chunk: a new worker, a new class, a repeated pair (last wins), a task seen again,
    # an item with a single label
    extra = [("t0", "zed", "maybe"), ("t0", "zed", "yes"), ("solo", "ann", "maybe")]
    r2 = agg.process(rows[300:] + extra)
    assert r2.new_workers == 1 and r2.new_classes == ["maybe"]
    assert r2.replaced >= 1
    assert "t0" in r2.tasks and "solo" in r2.tasks
    assert agg.store[agg.tasks.index["t0"]][agg.workers.index["zed"]] == agg.classes.index["yes"]
    assert agg.model.K == len(agg.workers) and agg.model.C == 3
    err, n = agg.error_rate(truth)
    assert n == 150 and err < 0.2


@pytest.mark.parametrize("method", ["bila", "mv", "ds"])
def test_labels_across_chunks_merge_and_a_relabelled_pair_counts_once(method, tmp_path):
    """A task seen again keeps its earlier labels and gains the new ones; a (task, worker) pair labelled
    again in a later chunk replaces the old label (documented rule: the last label wins), and the class
    counts behind BiLA-CM's prior count it once; a lone label on an item with a known class still gives
    a proper posterior. The state file round-trips after a class first seen late."""
    from kdtools.aggregate.state import load_state, save_state

    agg = Aggregator(method, seed=0)
    agg.process([("a", "w1", "x"), ("a", "w2", "x"), ("a", "w3", "y"), ("b", "w1", "y"), ("b", "w2", "y")])
    counts_before = agg.class_counts.copy()
    x = agg.classes.index["x"]
    assert counts_before.tolist() == [2, 3]
    # chunk 2: w3 relabels task a (y -> x), w4 (new) labels a, c gets one label of a known class,
    # d brings a class never seen before
    r2 = agg.process([("a", "w3", "x"), ("a", "w4", "x"), ("c", "w2", "y"), ("d", "w1", "z")])
    assert r2.replaced == 1 and r2.new_workers == 1 and r2.new_classes == ["z"]
    a, w = agg.tasks.index["a"], agg.workers.index
    # merged: chunk 1's w1, w2 kept, w3 replaced, w4 added
    assert agg.store[a] == {w["w1"]: x, w["w2"]: x, w["w3"]: x, w["w4"]: x}
    assert r2.tasks == ["a", "c", "d"]  # each task once, in order of first appearance
    # 4 labels of x (a: w1 w2 w3 w4), 3 of y (b: w1 w2; c: w2), 1 of z; the replaced y is gone
    assert agg.class_counts.tolist() == [4, 3, 1]
    assert agg.labels_seen == 9
    i = r2.tasks.index("c")
    assert np.isfinite(r2.proba[i]).all() and abs(r2.proba[i].sum() - 1) < 1e-5
    assert 0 <= r2.confidence[i] <= 1
    if method == "mv":
        assert r2.labels[i] == "y"
    # round trip after the late class: continuing from the file equals continuing in memory
    path = tmp_path / "s.state"
    save_state(path, agg, {})
    back = load_state(path)
    assert back.classes.items == ["x", "y", "z"] and back.class_counts.tolist() == [4, 3, 1]
    assert back.store == agg.store
    more = [("e", "w1", "z"), ("e", "w4", "z"), ("a", "w5", "y")]
    ra, rb = agg.process(more), back.process(more)
    assert ra.labels == rb.labels and np.allclose(ra.proba, rb.proba)


def test_declared_classes_reject_unknown_label():
    agg = Aggregator("mv", classes=["a", "b"])
    with pytest.raises(KdError, match="not one of"):
        agg.process([("t", "w", "c")])
    with pytest.raises(KdError, match="empty chunk"):
        agg.process([])


def test_state_round_trip(tmp_path):
    from kdtools.aggregate.state import load_state, save_state

    rows, truth = _crowd_rows(80)
    agg = Aggregator("bila", seed=3)
    agg.process(rows[:200])
    path = tmp_path / "s.state"
    save_state(path, agg, {"x": 1})
    back = load_state(path)
    assert back.tasks.items == agg.tasks.items and back.workers.items == agg.workers.items
    assert back.classes.items == agg.classes.items and back.chunks == 1 and back.seed == 3
    assert torch.equal(back.model.theta, agg.model.theta) and torch.equal(back.model.v, agg.model.v)
    assert back.model.t == agg.model.t and back.store == agg.store
    assert (back.emitted == agg.emitted).all()
    # continuing from the loaded state gives exactly what continuing in memory gives
    a = agg.process(rows[200:])
    b = back.process(rows[200:])
    assert a.labels == b.labels and np.allclose(a.proba, b.proba)
    import json
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["kdtools_version"] and json.loads(meta["options"]) == {"x": 1}


# ------------------------------------------------------------------------------------------------
# simulator


def test_bimodal_wrong_labels():
    rng = np.random.default_rng(0)
    truth = np.zeros(20000, dtype=int)
    wrong = bimodal_wrong_labels(truth, 10, rng)
    assert (wrong != 0).all() and wrong.min() >= 0 and wrong.max() <= 9
    counts = np.bincount(wrong, minlength=10) / len(wrong)
    assert counts[7] > 0.3 and counts[3] > 0.15 and counts[5] < 0.05  # two modes, at 3 and 7
    wrong7 = bimodal_wrong_labels(np.full(5000, 7), 10, rng)
    assert (wrong7 != 7).all()


def test_bimodal_pmf_hand_computed():
    # C = 2: classes sit at 0 and 9 on the paper's axis; density 0.5 N(x; 3, 1) + 0.5 N(x; 7, 0.5)
    # (without the common 1/sqrt(2 pi)): at 0: 0.5 e^-4.5 + e^-98 = 0.0055545; at 9: 0.5 e^-18 + e^-8 = 0.00033546
    d0, d9 = 0.5 * math.exp(-4.5) + math.exp(-98), 0.5 * math.exp(-18) + math.exp(-8)
    assert bimodal_pmf(2) == pytest.approx([d0 / (d0 + d9), d9 / (d0 + d9)], rel=1e-9)
    p = bimodal_pmf(10)
    assert p.sum() == pytest.approx(1.0)
    # class 7: 0.5 e^-8 + e^0 (mode of the narrow component); class 3: 0.5 + e^-32
    assert p[7] / p[3] == pytest.approx((0.5 * math.exp(-8) + 1.0) / (0.5 + math.exp(-32)), rel=1e-9)
    assert p.argmax() == 7 and p[9] < 1e-3


def test_simulate_crowd_rates():
    truth = np.repeat(np.arange(10), 300)  # exactly uniform classes
    for draw, wrong_rate in (("rounded", 0.6), ("pmf", 0.6 * (1 - 0.1))):
        # pmf: a noisy label hits the truth with probability pmf[truth], 1/10 on average over uniform classes
        crowd = simulate_crowd(truth, 10, n_workers=10, noise=0.6, missing=0.1, seed=0, draw=draw)
        assert len(crowd.labels) / (3000 * 10) == pytest.approx(0.9, abs=0.01)
        wrong = (crowd.labels != truth[crowd.items]).mean()
        assert wrong == pytest.approx(wrong_rate, abs=0.01), draw
    # pmf: the noisy labels of items whose truth is 0 follow the pmf (class 7 the most frequent)
    crowd = simulate_crowd(np.zeros(5000, dtype=int), 10, n_workers=4, noise=1.0, missing=0.0, seed=2)
    freq = np.bincount(crowd.labels, minlength=10) / len(crowd.labels)
    assert np.abs(freq - bimodal_pmf(10)).max() < 0.01
    with pytest.raises(KdError):
        simulate_crowd(truth, 10, draw="uniform")


def test_error_curves_hand_computed():
    from kdtools.aggregate.online import error_curves

    # chunk 1: t1 (a, a, b -> a, right), t2 (b, b -> b, wrong); chunk 2: t3 (c -> c, right), t4 has no gold
    chunks = [[("t1", "w1", "a"), ("t1", "w2", "a"), ("t1", "w3", "b"), ("t2", "w1", "b"), ("t2", "w2", "b")],
              [("t3", "w1", "c"), ("t4", "w2", "a")]]
    gold = {"t1": "a", "t2": "a", "t3": "c"}
    curves = error_curves(chunks, gold, methods=("mv",))
    assert curves == {"mv": [(2, pytest.approx(1 / 2)), (4, pytest.approx(1 / 3))]}
