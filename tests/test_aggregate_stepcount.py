"""BiLA-CM's optimiser step count: global (Algorithm 2.1 as written) vs per-parameter / sparse counters.

Hand-computed steps with per-element counters, equivalence with the global count while no parameter
is added, fresh optimiser state for a worker that arrives later, and the counters in the state file
(round trip, migration of schema-1 files, bad files, CLI options)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kdtools.aggregate.bila import BilaConfig, BilaModel, Triples, rmsclip_step
from kdtools.aggregate.online import Aggregator
from kdtools.errors import KdError


# ------------------------------------------------------------------------------------------------
# the step with per-element counters, by hand


def test_per_element_step_by_hand():
    cfg = BilaConfig(lr=0.01, gamma=0.9, final_lr=0.1, bound_gamma=1e-3, eps=0.0)
    theta = torch.tensor([1.0, -2.0], dtype=torch.float64)
    v = torch.zeros(2, dtype=torch.float64)
    g = torch.tensor([0.5, -0.1], dtype=torch.float64)
    t = torch.tensor([1.0, 2.0], dtype=torch.float64)  # element 0 takes its 1st step, element 1 its 2nd
    eta = rmsclip_step(theta, g, v, t, cfg)
    # element 0, t = 1: v = 0.1 * 0.25 = 0.025; mu_1 = 0.01 sqrt(0.1); mu_1 / sqrt(v) = 0.02 (in bounds)
    #   eta = 0.02 / sqrt(1) = 0.02; theta = 1 - 0.02 * 0.5 = 0.99
    # element 1, t = 2 (v was 0): v = 0.1 * 0.01 = 0.001; mu_2 = 0.01 sqrt(1 - 0.81) = 0.00435890
    #   mu_2 / sqrt(v) = 0.00435890 / 0.03162278 = 0.13784049, bounds at t = 2: (1.996e-4, 50.1)
    #   eta = 0.13784049 / sqrt(2) = 0.09746794; theta = -2 + 0.09746794 * 0.1 = -1.99025321
    assert torch.allclose(v, torch.tensor([0.025, 0.001], dtype=torch.float64))
    assert torch.allclose(eta, torch.tensor([0.02, 0.09746794], dtype=torch.float64), atol=1e-8)
    assert torch.allclose(theta, torch.tensor([0.99, -1.99025321], dtype=torch.float64), atol=1e-8)
    # the same tensor of equal counts is the global step
    a, va = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    b, vb = a.clone(), va.clone()
    for step in (1, 2, 3):
        rmsclip_step(a, g, va, step, cfg)
        rmsclip_step(b, g, vb, torch.full((2,), float(step), dtype=torch.float64), cfg)
    assert torch.allclose(a, b, atol=1e-12) and torch.allclose(va, vb, atol=1e-15)


def test_inactive_elements_keep_their_state():
    cfg = BilaConfig(eps=0.0)
    theta = torch.tensor([1.0, 3.0], dtype=torch.float64)
    v = torch.tensor([0.0, 0.5], dtype=torch.float64)
    t = torch.tensor([1.0, 0.0], dtype=torch.float64)  # element 1 never stepped (t = 0) and is inactive
    eta = rmsclip_step(theta, torch.tensor([0.5, 0.0], dtype=torch.float64), v, t, cfg,
                       active=torch.tensor([True, False]))
    assert float(theta[0]) == pytest.approx(0.99) and float(theta[1]) == 3.0
    assert float(v[1]) == 0.5 and float(eta[1]) == 0.0  # no decay of the second moment, no rate


# ------------------------------------------------------------------------------------------------
# equivalence with the global count while no parameter is added


def _dense_crowd(n_items, n_workers=4, n_classes=3, seed=0):
    """Every worker labels every item: a dense (items x workers) matrix of class indices."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, n_classes, n_items)
    acc = np.linspace(0.9, 0.5, n_workers)
    L = np.where(rng.random((n_items, n_workers)) < acc, truth[:, None], rng.integers(0, n_classes, (n_items, n_workers)))
    return torch.as_tensor(L)


@pytest.mark.parametrize("mode", ["per-parameter", "sparse"])
def test_dense_fixed_workers_equal_global_in_train_chunk(mode):
    # every worker in every batch: each element's own count equals the global t at every step
    L = _dense_crowd(24)
    models = {}
    for m in ("global", mode):
        cfg = BilaConfig(step_count=m, batch_size=8, max_epochs=4, min_epochs=4)
        model = BilaModel(4, 3, cfg)
        model.prior_counts = torch.tensor([30.0, 35.0, 31.0], dtype=torch.float64)
        for chunk in range(2):  # two chunks of 12 items, batches of 8 + 4, 4 epochs: 16 steps in all
            model.train_chunk(Triples.from_matrix(L[chunk * 12:(chunk + 1) * 12]), seed=chunk)
        models[m] = model
    g, p = models["global"], models[mode]
    assert g.t == p.t == 16
    assert torch.equal(p.steps, torch.full_like(p.steps, 16.0))
    assert torch.allclose(g.theta, p.theta, atol=1e-6, rtol=0) and torch.allclose(g.v, p.v, atol=1e-9, rtol=1e-5)


def _dense_rows(n_items, prefix="t", seed=0):
    L = _dense_crowd(n_items, seed=seed).numpy()
    return [(f"{prefix}{i}", f"w{k}", "abc"[L[i, k]]) for i in range(n_items) for k in range(L.shape[1])]


def test_per_parameter_equals_global_through_the_aggregator():
    # fixed workers all in the first chunk (initial fit of q included): identical labels and model
    rows = _dense_rows(60)
    out = {}
    for mode in ("global", "per-parameter"):
        agg = Aggregator("bila", config=BilaConfig(step_count=mode, batch_size=8, max_epochs=5, init_epochs=3))
        res = [agg.process(rows[i:i + 80]) for i in range(0, len(rows), 80)]  # 20 items per chunk
        out[mode] = (agg, res)
    (g, rg), (p, rp) = out["global"], out["per-parameter"]
    assert [r.labels for r in rg] == [r.labels for r in rp]
    assert np.allclose(np.concatenate([r.proba for r in rg]), np.concatenate([r.proba for r in rp]), atol=1e-5)
    assert torch.equal(p.model.steps, torch.full_like(p.model.steps, float(g.model.t)))
    assert torch.allclose(g.model.theta, p.model.theta, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# a worker that arrives later starts with fresh optimiser state


def _trained_then_grown(mode):
    cfg = BilaConfig(step_count=mode, batch_size=4, max_epochs=3, min_epochs=3)
    model = BilaModel(3, 2, cfg)
    model.prior_counts = torch.tensor([6.0, 6.0], dtype=torch.float64)
    L = torch.tensor([[0, 0, 1], [1, 1, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 1], [0, 0, 1], [1, 1, 1]])
    model.train_chunk(Triples.from_matrix(L), seed=0)  # 3 epochs x 2 batches = 6 steps
    model.grow(4, 2)
    return model


@pytest.mark.parametrize("mode", ["per-parameter", "sparse"])
def test_new_worker_takes_a_first_step(mode):
    model = _trained_then_grown(mode)
    S = model.steps_params
    assert model.t == 6 and float(S["omega"][:3].min()) == 6.0 and float(S["W1"][:, :3].min()) == 6.0
    assert float(S["omega"][3].abs().max()) == 0.0 and float(S["W1"][:, 3].abs().max()) == 0.0
    assert float(model.v_params["omega"][3].abs().max()) == 0.0
    # one step on a batch of two items that worker 3 (new) labelled; workers 0 and 1 label too, 2 not
    batch = Triples.from_matrix(torch.tensor([[0, 1, -1, 1], [1, 1, -1, 0]]))
    grad = torch.zeros_like(model.theta)
    model.loss_and_grad(batch, model.log_prior(), grad)
    g_new = model._views(grad)["omega"][3].clone()
    before = model.params["omega"].clone()
    model.cfg.max_epochs = model.cfg.min_epochs = 1
    model.train_chunk(batch, seed=1)
    # the new worker's first step, by hand: v = 0.1 g^2, mu_1 / sqrt(v) = 0.01 sqrt(0.1) / (sqrt(0.1) |g|)
    # = 0.01 / |g| (inside the bounds (1e-4, 100.1) when |g| > 1e-4), so every entry moves by 0.01 sign(g)
    assert float(g_new.abs().min()) > 1e-3
    assert torch.allclose(model.params["omega"][3] - before[3], -0.01 * g_new.sign(), atol=1e-6)
    assert float(S["omega"][3].min()) == float(S["omega"][3].max()) == 1.0
    assert float(S["W1"][:, 3].max()) == 1.0 and float(S["W1"][:, :3].min()) == 7.0
    # worker 2 had no label in the chunk: "per-parameter" counts the step, "sparse" does not
    assert float(S["omega"][2].max()) == (7.0 if mode == "per-parameter" else 6.0)


def test_global_count_gives_a_new_worker_the_stream_step():
    # the same first step of a new worker under the global count, late in a stream (t = 901)
    model = _trained_then_grown("global")
    model.t = 900
    batch = Triples.from_matrix(torch.tensor([[0, 1, -1, 1], [1, 1, -1, 0]]))
    grad = torch.zeros_like(model.theta)
    model.loss_and_grad(batch, model.log_prior(), grad)
    g = model._views(grad)["omega"][3].double()
    before = model.params["omega"][3].clone()
    model.cfg.max_epochs = model.cfg.min_epochs = 1
    model.train_chunk(batch, seed=1)
    # by hand: v = 0.1 g^2, ratio = mu_901 / sqrt(v) = 0.01 sqrt(1 - 0.9^901) / (sqrt(0.1) |g|),
    # clipped to [0.1 (1 - 1/1.901), 0.1 (1 + 1/0.901)] = [0.0473961, 0.2109878], then / sqrt(901)
    ratio = 0.01 * math.sqrt(1 - 0.9 ** 901) / (math.sqrt(0.1) * g.abs())
    eta = ratio.clamp(0.1 * (1 - 1 / 1.901), 0.1 * (1 + 1 / 0.901)) / math.sqrt(901)
    moved = (model.params["omega"][3] - before).double()
    assert torch.allclose(moved, -eta * g, rtol=0, atol=2e-7)  # float32 omega ~ 1: resolution ~1e-7
    assert float(moved.abs().max()) < 0.01 / 10  # against 0.01 per entry with its own, fresh count


def test_new_class_entries_start_fresh():
    model = _trained_then_grown("per-parameter")
    model.grow(4, 3)
    S = model.steps_params
    assert float(S["omega"][:3, :2, :2].min()) == 6.0
    assert float(S["omega"][:, 2, :].abs().max()) == 0.0 and float(S["omega"][:, :, 2].abs().max()) == 0.0
    assert float(S["W3"][2].abs().max()) == 0.0 and float(S["b3"][2]) == 0.0 and float(S["b3"][:2].min()) == 6.0


# ------------------------------------------------------------------------------------------------
# the counters in the state file


def _rows_with_late_worker():
    rows = _dense_rows(40)
    late = [(f"u{i}", w, "abc"[i % 3]) for i in range(10) for w in ("w0", "w1", "late")]
    return rows[:100], rows[100:] + late


def test_state_round_trip_of_counters(tmp_path):
    from kdtools.aggregate.state import load_state, save_state

    first, second = _rows_with_late_worker()
    agg = Aggregator("bila", config=BilaConfig(step_count="sparse", batch_size=8))
    agg.process(first)
    agg.process(second)
    path = tmp_path / "s.state"
    save_state(path, agg)
    back = load_state(path)
    assert back.config.step_count == "sparse"
    assert torch.equal(back.model.steps, agg.model.steps) and back.model.t == agg.model.t
    late = agg.workers.index["late"]
    assert 0 < float(agg.model.steps_params["omega"][late].max()) < agg.model.t  # counted from its creation
    more = [(f"v{i}", w, "abc"[(i + 1) % 3]) for i in range(12) for w in ("w2", "late")]
    a, b = agg.process(more), back.process(more)
    assert a.labels == b.labels and np.allclose(a.proba, b.proba)
    assert torch.equal(back.model.steps, agg.model.steps)


def _rewrite(path, meta_update=None, drop_prefix=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if not (drop_prefix and k.startswith(drop_prefix))}
    meta.update(meta_update or {})
    save_file(tensors, str(path), metadata=meta)


def test_schema_1_state_is_migrated_to_global(tmp_path):
    from kdtools.aggregate.state import SCHEMA_VERSION, load_state, save_state

    first, second = _rows_with_late_worker()
    agg = Aggregator("bila", config=BilaConfig(step_count="global", batch_size=8))
    agg.process(first)
    path = tmp_path / "old.state"
    save_state(path, agg)
    # make it a version-1 file: no step_count in the configuration, no counters
    cfg = agg.config.to_dict()
    del cfg["step_count"]
    _rewrite(path, {"schema_version": "1", "bila_config": json.dumps(cfg)}, drop_prefix="bila.steps.")
    back = load_state(path)
    assert back.config.step_count == "global"  # what every version-1 state was trained with
    assert back.process(second).labels == agg.process(second).labels
    save_state(path, back)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["schema_version"] == str(SCHEMA_VERSION) == "2"


def test_state_without_counters_is_refused(tmp_path):
    from kdtools.aggregate.state import load_state, save_state

    agg = Aggregator("bila", config=BilaConfig(step_count="per-parameter", batch_size=8))
    agg.process(_rows_with_late_worker()[0])
    path = tmp_path / "s.state"
    save_state(path, agg)
    _rewrite(path, drop_prefix="bila.steps.")
    with pytest.raises(KdError, match="inconsistent state file .*bila.steps.W1 is missing"):
        load_state(path)


def test_unknown_step_count_is_an_error():
    with pytest.raises(ValueError, match="unknown step count"):
        BilaConfig(step_count="local")


def test_cli_step_count_option(tmp_path, capsys, monkeypatch):
    from test_aggregate_cli import run_here, write_csv

    first, second = _rows_with_late_worker()
    a, b = write_csv(tmp_path / "a.csv", first), write_csv(tmp_path / "b.csv", second)
    state = tmp_path / "s.state"
    kw = dict(capsys=capsys, monkeypatch=monkeypatch)
    r = run_here([a, "--state", state, "--step-count", "sparse", "-o", tmp_path / "o.csv"], **kw)
    assert r.returncode == 0, r.stderr
    assert json.loads(_meta(state)["bila_config"])["step_count"] == "sparse"
    before = state.read_bytes()
    r = run_here([b, "--state", state, "--step-count", "global"], **kw)
    assert r.returncode == 2 and "step-count 'sparse'" in r.stderr and state.read_bytes() == before
    assert run_here([b, "--state", state], **kw).returncode == 0  # the state's own setting is kept
    r = run_here([a, "--step-count", "local"], **kw)
    assert r.returncode == 2 and "--step-count must be one of global, per-parameter, sparse" in r.stderr


def _meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()
