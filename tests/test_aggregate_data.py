"""kd-aggregate on the shared real crowd data (RTE) and MNIST labels: found through KD_DATA, skipped
when it is not set. The dissertation's RTE numbers are the bar: offline <= 6.88 %, online (chunks of
25 after an initial set of 500) <= 7.75 %."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kdtools.aggregate import crowdio
from kdtools.aggregate.online import Aggregator

DATA = os.environ.get("KD_DATA")
RTE = Path(DATA) / "crowd" / "rte" if DATA else None
pytestmark = pytest.mark.skipif(not (RTE and (RTE / "label.csv").exists()), reason="KD_DATA with crowd/rte not available")


def _run(method, chunk_size=None, initial=None):
    rows = crowdio.read_all([RTE / "label.csv"])
    gold = crowdio.read_gold(RTE / "truth.csv")
    agg = Aggregator(method)
    for chunk in crowdio.split_groups(crowdio.group_by_task(rows), chunk_size, initial):
        agg.process(chunk)
    err, n = agg.error_rate(gold)
    assert n == 800
    return 100 * err


def test_rte_offline_matches_dissertation():
    assert _run("bila") <= 6.88


def test_rte_online_small_chunks_matches_dissertation():
    assert _run("bila", 25, 500) <= 7.75


def test_rte_baselines_sane():
    assert _run("ds") < _run("mv") < 12.0


def test_mnist_synthetic_crowd_majority_vote_matches_dissertation():
    # the paper's Table 2.2 (10 workers, noise 0.6, missing 0.1): MV 24.74 % (CIFAR-10), 25.27 % (Pendigits);
    # our paper-literal noise draw gives 25.1 % on MNIST's first 20 000 labels (seed 0)
    from kdtools.aggregate.baselines import majority_vote
    from kdtools.aggregate.simulate import load_mnist_labels, simulate_crowd

    y = load_mnist_labels(str(Path(DATA) / "vision"), train=True)[:20000]
    crowd = simulate_crowd(y, 10, n_workers=10, noise=0.6, missing=0.1, seed=0)
    label, _, _ = majority_vote(crowd.items, crowd.workers, crowd.labels, len(y), 10, 10, rng=np.random.default_rng(0))
    assert 24.0 < 100 * (label != y).mean() < 26.5


@pytest.mark.slow
def test_mnist_synthetic_crowd_ten_points_below_majority_vote():
    from kdtools.aggregate.simulate import load_mnist_labels, simulate_crowd

    y = load_mnist_labels(str(Path(DATA) / "vision"), train=True)[:20000]
    crowd = simulate_crowd(y, 10, n_workers=10, noise=0.6, missing=0.1, seed=0)
    rows = [(str(i), str(w), str(c)) for i, w, c in zip(crowd.items.tolist(), crowd.workers.tolist(), crowd.labels.tolist())]
    gold = {str(i): str(c) for i, c in enumerate(y.tolist())}
    errs = {}
    for m in ("bila", "mv"):
        agg = Aggregator(m)
        for chunk in crowdio.split_groups(crowdio.group_by_task(rows), 200, 1000):
            agg.process(chunk)
        errs[m] = agg.error_rate(gold)[0]
    assert errs["mv"] - errs["bila"] >= 0.10
