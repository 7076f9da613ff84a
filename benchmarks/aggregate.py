"""kd-aggregate benchmark: every method on every crowd set, offline and online, next to crowd-kit.

    KD_DATA=../shared/data .venv/bin/python benchmarks/aggregate.py [--sets rte,web] [--no-mnist]
        [--step-count global|per-parameter|sparse] [--bila-only]

For each set in $KD_DATA/crowd/<name>/{label.csv,truth.csv}:
* offline: every method on all labels at once;
* online: chunks of 25 and 50 tasks after an initial set of 500 (sets under 2 000 tasks), or 200 and
  500 after 1 000 (larger sets); tasks in order of first appearance in label.csv, each with all its
  labels. BiLA-CM learns across chunks; the baselines run on each chunk alone (the paper's sliding
  window). The error is that of the label each task received when its chunk was aggregated;
* crowd-kit's MajorityVote and DawidSkene (offline, pandas, repeated pairs dropped keeping the last)
  in the same run, as the reference.
Then the synthetic crowd of the paper's Table 2.2 on MNIST's 60 000 training labels (10 workers,
noise 0.6, missing 0.1, the paper-literal noise draw; online chunks of 200 after 1 000), and the
speed ratio on `relevance`. For BiLA-CM online runs the error after re-inferring every task with the
final model (`relabel_all`, untimed) is reported next to the error of the labels emitted chunk by chunk.

``--step-count`` picks BiLA-CM's optimiser step count (default: the library default); ``--bila-only``
skips the baselines and crowd-kit (their numbers do not depend on it).

Prints tables; asserts nothing. crowd-kit is a benchmark-only dependency (pip install crowd-kit).
Hyperparameters are the library defaults (BilaConfig), fixed once; gold labels are only scored.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdtools.aggregate import crowdio  # noqa: E402
from kdtools.aggregate.bila import BilaConfig  # noqa: E402
from kdtools.aggregate.online import Aggregator  # noqa: E402

ALL_METHODS = ("bila", "ds", "mace", "mv")  # the table columns
METHODS = list(ALL_METHODS)  # the methods run (--bila-only: BiLA-CM alone)
BILA_CONFIG = BilaConfig()  # replaced in main() when --step-count is given


def run_method(method: str, chunks, gold: dict, config: BilaConfig | None = None, seed: int = 0):
    agg = Aggregator(method, config=config or BilaConfig(**{**BILA_CONFIG.to_dict(), "seed": seed}), seed=seed)
    t0 = time.perf_counter()
    for ch in chunks:
        agg.process(ch)
    seconds = time.perf_counter() - t0
    err, n = agg.error_rate(gold)
    final = float("nan")
    if method == "bila":
        # the other reading of "online error": every task re-inferred by the final model (not timed)
        agg.relabel_all()
        final = 100 * agg.error_rate(gold)[0]
    return 100 * err, seconds, agg.labels_seen, final


def crowdkit_reference(label_csv: Path, gold: dict):
    try:
        import pandas as pd
        from crowdkit.aggregation import DawidSkene, MajorityVote
    except ImportError:
        return None
    df = pd.read_csv(label_csv, dtype=str, keep_default_na=False).drop_duplicates(["task", "worker"], keep="last")
    out = {}
    for name, algo in (("ck-MV", MajorityVote()), ("ck-DS", DawidSkene(n_iter=100))):
        t0 = time.perf_counter()
        pred = algo.fit_predict(df)
        seconds = time.perf_counter() - t0
        common = [t for t in gold if t in pred.index]
        err = 100 * np.mean([pred[t] != gold[t] for t in common])
        out[name] = (err, seconds, len(df))
    return out


def fmt_speed(labels: int, seconds: float) -> str:
    return f"{labels / seconds:,.0f}" if seconds > 0 else "-"


def bench_set(root: Path, name: str, results: dict, speed: dict) -> None:
    rows = crowdio.read_all([root / name / "label.csv"])
    gold = crowdio.read_gold(root / name / "truth.csv")
    groups = crowdio.group_by_task(rows)
    n_tasks = len(groups)
    if n_tasks < 2000:
        sizes, initial = (25, 50), 500
    else:
        sizes, initial = (200, 500), 1000
    modes = [("offline", crowdio.split_groups(groups, None))]
    modes += [(f"online {s} (init {initial})", crowdio.split_groups(groups, s, initial)) for s in sizes]
    ck = crowdkit_reference(root / name / "label.csv", gold) if len(METHODS) > 1 else None
    table = {}
    for mode, chunks in modes:
        for m in METHODS:
            err, sec, nl, final = run_method(m, chunks, gold)
            table[(mode, m)] = (err, sec, nl)
            if m == "bila":
                table[(mode, "bila-final")] = (final,)
            print(f"  {name:10s} {mode:22s} {m:5s} error {err:6.2f} %  {fmt_speed(nl, sec):>10s} labels/s"
                  + (f"  (final re-inference {final:6.2f} %)" if final == final else ""), flush=True)
    if ck:
        for k, (err, sec, nl) in ck.items():
            table[("offline", k)] = (err, sec, nl)
            print(f"  {name:10s} {'offline':22s} {k:5s} error {err:6.2f} %  {fmt_speed(nl, sec):>10s} labels/s", flush=True)
    results[name] = (n_tasks, len(rows), sizes, initial, table)
    if name == "relevance" and ck:
        online = f"online {sizes[0]} (init {initial})"
        speed["relevance"] = (table[(online, "bila")][1], ck["ck-DS"][1], len(rows))


def bench_mnist(vision_root: Path, results: dict) -> None:
    from kdtools.aggregate.simulate import load_mnist_labels, simulate_crowd

    y = load_mnist_labels(str(vision_root), train=True)
    crowd = simulate_crowd(y, 10, n_workers=10, noise=0.6, missing=0.1, seed=0, draw="pmf")
    tasks = [str(i) for i in range(len(y))]
    rows = [(tasks[i], f"w{w}", str(c)) for i, w, c in zip(crowd.items.tolist(), crowd.workers.tolist(), crowd.labels.tolist())]
    gold = {t: str(c) for t, c in zip(tasks, y.tolist())}
    groups = crowdio.group_by_task(rows)
    table = {}
    for mode, chunks in (("offline", crowdio.split_groups(groups, None)),
                         ("online 200 (init 1000)", crowdio.split_groups(groups, 200, 1000)),
                         ("online 500 (init 1000)", crowdio.split_groups(groups, 500, 1000))):
        for m in METHODS:
            err, sec, nl, final = run_method(m, chunks, gold)
            table[(mode, m)] = (err, sec, nl)
            if m == "bila":
                table[(mode, "bila-final")] = (final,)
            print(f"  {'mnist-sim':10s} {mode:22s} {m:5s} error {err:6.2f} %  {fmt_speed(nl, sec):>10s} labels/s"
                  + (f"  (final re-inference {final:6.2f} %)" if final == final else ""), flush=True)
    results["mnist-sim"] = (len(y), len(rows), (200, 500), 1000, table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("KD_DATA"), help="data root (default $KD_DATA)")
    ap.add_argument("--sets", default=None, help="comma list of crowd sets (default: all)")
    ap.add_argument("--no-mnist", action="store_true", help="skip the synthetic MNIST crowd")
    ap.add_argument("--step-count", default=None, help="BiLA-CM optimiser step count (global, per-parameter, sparse)")
    ap.add_argument("--bila-only", action="store_true", help="run BiLA-CM only (no baselines, no crowd-kit)")
    args = ap.parse_args()
    global BILA_CONFIG
    if args.step_count:
        BILA_CONFIG = BilaConfig(step_count=args.step_count)
    if args.bila_only:
        del METHODS[1:]
    if not args.data:
        sys.exit("set KD_DATA or --data (the folder holding crowd/ and vision/)")
    root = Path(args.data) / "crowd"
    names = args.sets.split(",") if args.sets else sorted(p.name for p in root.iterdir() if (p / "label.csv").exists())
    print(f"# kd-aggregate benchmark  {time.strftime('%Y-%m-%d')}  python {platform.python_version()}  "
          f"{os.cpu_count()} CPU cores  {platform.processor() or platform.machine()}")
    print(f"# BiLA-CM config: {BILA_CONFIG.to_dict()}")
    try:
        import crowdkit
        print(f"# crowd-kit {getattr(crowdkit, '__version__', '?')}")
    except ImportError:
        print("# crowd-kit not installed: reference columns omitted")
    results: dict = {}
    speed: dict = {}
    for name in names:
        bench_set(root, name, results, speed)
    if not args.no_mnist and (Path(args.data) / "vision" / "MNIST" / "raw").exists():
        bench_mnist(Path(args.data) / "vision", results)

    # summary tables
    print("\n## Error rates (%)  [online: error of the labels emitted chunk by chunk; BiLA final: every task "
          "re-inferred by the model after the last chunk]\n")
    print("| set | tasks | labels | mode | BiLA-CM | BiLA final | DS | MACE | MV | crowd-kit MV | crowd-kit DS | BiLA - ck-DS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (n_tasks, n_labels, sizes, initial, table) in results.items():
        ckmv = table.get(("offline", "ck-MV"), (float("nan"),))[0]
        ckds = table.get(("offline", "ck-DS"), (float("nan"),))[0]
        modes = ["offline"] + [f"online {s} (init {initial})" for s in sizes]
        for mode in modes:
            vals = [table.get((mode, m), (float("nan"),))[0] for m in ALL_METHODS]
            final = (table.get((mode, "bila-final")) or (float("nan"),))[0]
            cells = [f"{vals[0]:.2f}", "" if final != final else f"{final:.2f}"] + [f"{v:.2f}" for v in vals[1:]]
            gap = vals[0] - ckds
            print(f"| {name} | {n_tasks} | {n_labels} | {mode} | " + " | ".join(cells)
                  + f" | {ckmv:.2f} | {ckds:.2f} | {gap:+.2f} |")
    print("\n## Speed (labels/s, this machine)\n")
    print("| set | mode | BiLA-CM | DS | MACE | MV | crowd-kit MV | crowd-kit DS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (n_tasks, n_labels, sizes, initial, table) in results.items():
        for mode in ["offline"] + [f"online {s} (init {initial})" for s in sizes]:
            cells = [fmt_speed(table[(mode, m)][2], table[(mode, m)][1]) if (mode, m) in table else "" for m in ALL_METHODS]
            ck = [fmt_speed(table[(mode, k)][2], table[(mode, k)][1]) if (mode, k) in table else "" for k in ("ck-MV", "ck-DS")]
            print(f"| {name} | {mode} | " + " | ".join(cells + ck) + " |")
    if "relevance" in speed:
        bila_s, ck_s, n = speed["relevance"]
        print(f"\nrelevance ({n} labels): online BiLA-CM (chunks of 200) {bila_s:.2f} s vs crowd-kit DawidSkene offline "
              f"{ck_s:.2f} s -> BiLA-CM is {ck_s / bila_s:.2f}x the speed of crowd-kit DS")
    # targets
    print("\n## Targets\n")
    if "rte" in results:
        t = results["rte"][4]
        print(f"- RTE offline BiLA-CM {t[('offline', 'bila')][0]:.2f} % (target <= 6.88): "
              f"{'met' if t[('offline', 'bila')][0] <= 6.88 else 'MISSED'}")
        e = t[("online 25 (init 500)", "bila")][0]
        print(f"- RTE online chunks of 25: {e:.2f} % (target <= 7.75): {'met' if e <= 7.75 else 'MISSED'}")
    for name, (_, _, sizes, initial, table) in results.items():
        if ("offline", "ck-DS") not in table:
            continue
        ckds = table[("offline", "ck-DS")][0]
        for s in sizes:
            e = table[(f"online {s} (init {initial})", "bila")][0]
            f = table[(f"online {s} (init {initial})", "bila-final")][0]
            print(f"- {name}: online BiLA-CM (chunks {s}) {e:.2f} % vs crowd-kit DS offline {ckds:.2f} %: gap {e - ckds:+.2f} "
                  f"-> {'met' if e <= ckds else 'MISSED'}  [final re-inference {f:.2f} %, gap {f - ckds:+.2f}]")
    if "mnist-sim" in results:
        t = results["mnist-sim"][4]
        for mode in ("online 200 (init 1000)", "online 500 (init 1000)"):
            b, mv = t[(mode, "bila")][0], t.get((mode, "mv"), (float("nan"),))[0]
            print(f"- MNIST synthetic crowd, {mode}: BiLA-CM {b:.2f} % vs MV {mv:.2f} %: {mv - b:.2f} points below "
                  f"(target >= 10): {'met' if mv - b >= 10 else 'MISSED'}")
    if "relevance" in speed:
        bila_s, ck_s, _ = speed["relevance"]
        print(f"- relevance speed: online BiLA-CM {bila_s:.2f} s vs crowd-kit DS {ck_s:.2f} s (ratio {ck_s / bila_s:.2f}): "
              f"{'met' if bila_s < ck_s else 'MISSED'}")


if __name__ == "__main__":
    main()
