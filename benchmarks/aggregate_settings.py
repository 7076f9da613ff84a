"""Can BiLA-CM's free settings close the online gaps to crowd-kit's Dawid-Skene? (issue 3,
docs/aggregate-benchmarks.md, "Session 23")

    KD_DATA=../shared/data .venv/bin/python benchmarks/aggregate_settings.py [--sets rte,product]
        [--lr 0.001,0.003,0.03,0.1] [--batch 32,512] [--zeta 0.25,0.5,2,4]

Chapter 2 fixes neither the step size mu (BilaConfig.lr), the mini-batch size M nor zeta, the weight of the KL
term of eq. 2.11; the library uses mu 0.01, M 128, zeta 1. Each value given here is run on its own, the other two
at the default, on the benchmark's small online chunks (25 after 500 tasks, or 200 after 1 000), seed 0. Printed
per set and setting:

* the error of the labels emitted chunk by chunk (what benchmarks/aggregate.py reports as online error);
* the eq. 2.11 objective with zeta = 1 (the negative evidence lower bound, whatever zeta trained the model) on all
  tasks after the last chunk: the chapter's own, unsupervised, measure of a solution, lower is better.

Then crowd-kit's offline DawidSkene on the same labels (when crowd-kit is installed), and, as a diagnostic with no
decision attached, the lowest online error over all settings tried on each set, picked with the gold labels: a
bound on what these settings, one at a time, can give. Gold labels are used only to score. Prints tables; asserts
nothing. One thread.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregate import crowdkit_reference  # noqa: E402  (benchmarks/aggregate.py: the same crowd-kit run)
from aggregate_solver import ALL_SETS, all_tasks, crowd_root, load  # noqa: E402

from kdtools.aggregate.bila import BilaConfig, bila_loss  # noqa: E402
from kdtools.aggregate.online import Aggregator  # noqa: E402


def negative_elbo(agg: Aggregator) -> float:
    """Eq. 2.11 with zeta = 1 on every task the aggregator holds (the same terms as BilaModel.loss)."""
    model = agg.model
    data, _ = all_tasks(agg)
    with torch.no_grad():
        P = model._views(model.theta)
        log_q = model._q_forward(P, data)[3]
        loglik = model._loglik(P["omega"], data)
        return float(bila_loss(log_q, model.log_prior(), loglik, 1.0))


def run_online(chunks, gold: dict, config: BilaConfig) -> tuple[float, float]:
    """(online error % of the emitted labels, negative ELBO after the last chunk)."""
    agg = Aggregator("bila", config=config, seed=0)
    for ch in chunks:
        agg.process(ch)
    return 100 * agg.error_rate(gold)[0], negative_elbo(agg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=ALL_SETS, help="crowd sets (comma list)")
    ap.add_argument("--lr", default="0.001,0.003,0.03,0.1", help="mu values besides the default 0.01")
    ap.add_argument("--batch", default="32,512", help="mini-batch sizes besides the default 128")
    ap.add_argument("--zeta", default="0.25,0.5,2,4", help="zeta values besides the default 1")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = crowd_root()
    default = BilaConfig(seed=0)
    settings = [("default", default)]
    settings += [(f"mu {v:g}", BilaConfig(lr=v, seed=0)) for v in map(float, filter(None, args.lr.split(",")))]
    settings += [(f"M {v}", BilaConfig(batch_size=v, seed=0)) for v in map(int, filter(None, args.batch.split(",")))]
    settings += [(f"zeta {v:g}", BilaConfig(zeta=v, seed=0)) for v in map(float, filter(None, args.zeta.split(",")))]
    sets = [s for s in args.sets.split(",") if s]
    try:
        import crowdkit
        ck_version = getattr(crowdkit, "__version__", "?")
    except ImportError:
        ck_version = None
    print(f"# aggregate_settings: {time.strftime('%Y-%m-%d %H:%M')} UTC, {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, torch {torch.__version__}, crowd-kit {ck_version or 'not installed'}")
    print(f"# defaults: mu {default.lr:g}, M {default.batch_size}, zeta {default.zeta:g}; each row changes one of them\n")
    results: dict[str, dict[str, tuple[float, float]]] = {}
    ds: dict[str, float] = {}
    for name in sets:
        gold, chunks = load(root, name)
        t0 = time.perf_counter()
        results[name] = {label: run_online(chunks["online"], gold, cfg) for label, cfg in settings}
        ck = crowdkit_reference(root / name / "label.csv", gold)
        if ck:
            ds[name] = ck["ck-DS"][0]
        print(f"# {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    print("## online error % (small chunks) / negative ELBO (eq. 2.11, zeta = 1, all tasks)\n")
    print("| setting | " + " | ".join(sets) + " |")
    print("|---|" + "---|" * len(sets))
    for label, _ in settings:
        print(f"| {label} | " + " | ".join(f"{results[s][label][0]:.2f} / {results[s][label][1]:.3f}" for s in sets) + " |")
    if ds:
        print("| crowd-kit DS (offline) | " + " | ".join(f"{ds[s]:.2f}" if s in ds else "-" for s in sets) + " |")

    print("\n## per set: the default, the setting with the lowest negative ELBO, and (gold-picked, diagnostic) the lowest error\n")
    print("| set | default error | lowest ELBO: setting, error | lowest error (gold-picked): setting, error | crowd-kit DS | gap of the gold-picked |")
    print("|---|---:|---|---|---:|---:|")
    for s in sets:
        r = results[s]
        by_elbo = min(r, key=lambda k: r[k][1])
        by_err = min(r, key=lambda k: r[k][0])
        gap = f"{r[by_err][0] - ds[s]:+.2f}" if s in ds else "-"
        print(f"| {s} | {r['default'][0]:.2f} | {by_elbo}, {r[by_elbo][0]:.2f} | {by_err}, {r[by_err][0]:.2f} | "
              f"{ds[s]:.2f} | {gap} |" if s in ds else
              f"| {s} | {r['default'][0]:.2f} | {by_elbo}, {r[by_elbo][0]:.2f} | {by_err}, {r[by_err][0]:.2f} | - | - |")


if __name__ == "__main__":
    main()
