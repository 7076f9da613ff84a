"""Does BiLA-CM get better labels when eq. 2.11 is optimised harder? (issue 3, docs/aggregate-benchmarks.md, "Session 19")

    KD_DATA=../shared/data .venv/bin/python benchmarks/aggregate_solver.py [--sets rte,product]
        [--final-lrs 0.1,1,10] [--adam-sets product,rte,dog,web] [--adam-steps 300,3000]

Three tables, gold labels used only to score:
* bounds, offline: BiLA-CM trained by Algorithm 2.1 with the clip bounds closing on each ``--final-lrs`` value
  (the library default is 0.1), on all tasks at once. Printed: the eq. 2.11 objective on all tasks after training
  (the quantity the chapter minimises; lower is a better solution of it) and the error of the labels;
* bounds, online: the same settings on the benchmark's small chunks (25 after 500, or 200 after 1 000), the error
  of the labels emitted chunk by chunk (what benchmarks/aggregate.py reports);
* solver: from kd-aggregate's offline solution, full-batch Adam (lr 0.01) on eq. 2.11 over all tasks, a
  diagnostic of what the objective's optimum gives, not a proposed solver. Printed at each of ``--adam-steps``:
  the objective and the error with the likelihood rule (the chapter's), the posterior rule (x the counted prior)
  and q's own argmax.

Prints tables; asserts nothing. Everything else is the library default (BilaConfig), seed 0, one thread.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdtools.aggregate import crowdio  # noqa: E402
from kdtools.aggregate.bila import BilaConfig, Triples  # noqa: E402
from kdtools.aggregate.online import Aggregator  # noqa: E402

ALL_SETS = "rte,sentiment,temp,dog,web,product,trec,relevance"


def all_tasks(agg: Aggregator) -> tuple[Triples, list[int]]:
    """Every task in the aggregator's store as one batch, and the task ids in its row order."""
    tasks = sorted(agg.store)
    items, workers, labels = [], [], []
    for i, t in enumerate(tasks):
        for w, c in agg.store[t].items():
            items.append(i); workers.append(w); labels.append(c)
    return Triples.build(np.asarray(items), np.asarray(workers), np.asarray(labels), len(tasks)), tasks


def crowd_root() -> Path:
    """$KD_DATA/crowd (the benchmarks find shared data only through KD_DATA)."""
    data_root = os.environ.get("KD_DATA")
    if not data_root:
        sys.exit("set KD_DATA to the directory holding crowd/<set>/{label.csv,truth.csv}")
    return Path(data_root) / "crowd"


def load(root: Path, name: str):
    rows = crowdio.read_all([root / name / "label.csv"])
    gold = crowdio.read_gold(root / name / "truth.csv")
    groups = crowdio.group_by_task(rows)
    chunk, initial = (25, 500) if len(groups) < 2000 else (200, 1000)
    return gold, {"offline": crowdio.split_groups(groups, None),
                  "online": crowdio.split_groups(groups, chunk, initial)}


def run_bounds(chunks, gold: dict, final_lr: float) -> tuple[float, float]:
    """(eq. 2.11 objective on all tasks, error % of the emitted labels) with clip bounds closing on final_lr."""
    agg = Aggregator("bila", config=BilaConfig(final_lr=final_lr, seed=0), seed=0)
    for ch in chunks:
        agg.process(ch)
    data, _ = all_tasks(agg)
    with torch.no_grad():
        objective = float(agg.model.loss(data))
    return objective, 100 * agg.error_rate(gold)[0]


def run_solver(chunks, gold: dict, steps: list[int]) -> list[tuple[str, float, float, float, float]]:
    """Rows (label, objective, error likelihood, error posterior, error q) from kd-aggregate's solution on."""
    agg = Aggregator("bila", seed=0)
    for ch in chunks:
        agg.process(ch)
    model = agg.model
    data, tasks = all_tasks(agg)
    scored = [(i, agg.classes.index[gold[agg.tasks.items[t]]]) for i, t in enumerate(tasks)
              if agg.tasks.items[t] in gold and gold[agg.tasks.items[t]] in agg.classes.index]
    rows_with_gold = torch.tensor([i for i, _ in scored])
    truth = torch.tensor([c for _, c in scored])

    def score(label: str, theta: torch.Tensor):
        with torch.no_grad():
            params = model._views(theta)
            loglik = model._loglik(params["omega"], data)
            log_q = model._q_forward(params, data)[3]

            def err(score_matrix):
                return 100 * float((score_matrix.argmax(1)[rows_with_gold] != truth).float().mean())
            return (label, float(model.loss(data, theta)), err(loglik), err(loglik + model.log_prior()), err(log_q))

    out = [score("kd-aggregate", model.theta)]
    theta = model.theta.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.01)
    for step in range(1, max(steps) + 1):
        opt.zero_grad()
        model.loss(data, theta).backward()
        opt.step()
        if step in steps:
            out.append(score(f"Adam {step}", theta.detach()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=ALL_SETS, help="crowd sets for the bounds tables (comma list)")
    ap.add_argument("--final-lrs", default="0.1,1,10", help="clip-bound limits to compare (comma list)")
    ap.add_argument("--adam-sets", default="product,rte,dog,web", help="crowd sets for the solver table ('' to skip)")
    ap.add_argument("--adam-steps", default="300,3000", help="Adam steps at which to score (comma list)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = crowd_root()
    final_lrs = [float(x) for x in args.final_lrs.split(",")]
    sets = [s for s in args.sets.split(",") if s]
    adam_sets = [s for s in args.adam_sets.split(",") if s]
    steps = sorted(int(x) for x in args.adam_steps.split(","))
    print(f"# aggregate_solver: {time.strftime('%Y-%m-%d %H:%M')} UTC, {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, torch {torch.__version__}")
    loaded = {}
    for mode in ("offline", "online"):
        print(f"\n## bounds, {mode}: objective (eq. 2.11, all tasks) / error % "
              f"({'all tasks at once' if mode == 'offline' else 'labels emitted chunk by chunk'})\n")
        print("| set | " + " | ".join(f"final_lr {f:g}" for f in final_lrs) + " |")
        print("|---|" + "---|" * len(final_lrs))
        for name in sets:
            if name not in loaded:
                loaded[name] = load(root, name)
            gold, chunks = loaded[name]
            cells = [run_bounds(chunks[mode], gold, f) for f in final_lrs]
            print(f"| {name} | " + " | ".join(f"{o:.3f} / {e:.2f}" for o, e in cells) + " |", flush=True)
    if adam_sets:
        print("\n## solver: full-batch Adam (lr 0.01) on eq. 2.11 from kd-aggregate's offline solution\n")
        print("| set | from | objective | error, likelihood rule | error, posterior rule | error, q's argmax |")
        print("|---|---|---:|---:|---:|---:|")
        for name in adam_sets:
            gold, chunks = loaded.get(name) or load(root, name)
            for label, obj, e_l, e_p, e_q in run_solver(chunks["offline"], gold, steps):
                print(f"| {name} | {label} | {obj:.3f} | {e_l:.2f} | {e_p:.2f} | {e_q:.2f} |", flush=True)


if __name__ == "__main__":
    main()
