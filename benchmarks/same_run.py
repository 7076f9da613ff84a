"""Are two attack runs the same run? Compares two run directories (e.g. one against the victim file, one
through kd-serve) array by array: the query logs over the rows both have, and the checkpoints both saved.

Prints one table. Runs still in progress can be compared: only the common prefix of the two logs is read,
with HDF5 file locking off so a log held open by its writer can be read.

    .venv/bin/python benchmarks/same_run.py runs/bench-extraction/fmnist-probs-ideal-1000000 \
        runs/bench-extraction/fmnist-probs-ideal-1000000-http
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")  # before h5py is imported: the writer may hold the log

import h5py  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdtools.weights import read_metadata  # noqa: E402

CHUNK = 50_000  # rows read at a time: a million 28x28 float32 queries do not have to fit in memory at once


def same_rows(a: h5py.Dataset, b: h5py.Dataset, n: int) -> bool:
    return all(np.array_equal(a[i:min(n, i + CHUNK)], b[i:min(n, i + CHUNK)]) for i in range(0, n, CHUNK))


def compare(run_a: Path, run_b: Path) -> list[tuple[str, str, str, str]]:
    rows = []
    with h5py.File(run_a / "queries.h5", "r") as fa, h5py.File(run_b / "queries.h5", "r") as fb:
        na, nb = fa["x"].shape[0], fb["x"].shape[0]
        n = min(na, nb)
        rows.append(("rows answered", str(na), str(nb), f"common prefix {n}"))
        rows.append(("oracle calls spent", str(fa.attrs.get("spent")), str(fb.attrs.get("spent")), ""))
        oa, ob = str(fa.attrs.get("oracle")), str(fb.attrs.get("oracle"))
        # a log records the model the server names (its hash); older HTTP logs recorded the URL
        rows.append(("oracle", oa, ob, "the same model" if oa == ob else "different (an older HTTP log records the URL)"))
        for key in sorted(set(fa.keys()) & set(fb.keys())):
            if key == "batch_time":  # wall-clock times: never equal
                continue
            m = min(fa[key].shape[0], fb[key].shape[0]) if key.startswith("batch_") else n
            equal = same_rows(fa[key], fb[key], m)
            rows.append((f"log /{key}", str(fa[key].dtype), str(fb[key].dtype),
                         f"{'identical' if equal else 'DIFFERENT'} over {m} rows"))
    for ck in sorted((run_a / "checkpoints").glob("*.safetensors")):
        other = run_b / "checkpoints" / ck.name
        if not other.exists():
            continue
        ta, tb = load_file(str(ck)), load_file(str(other))
        equal = ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
        acc_a, acc_b = (read_metadata(p).get("eval_accuracy", "-") for p in (ck, other))
        rows.append((f"checkpoint {ck.name}", f"accuracy {acc_a}", f"accuracy {acc_b}",
                     "bit-identical weights" if equal else "DIFFERENT weights"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    args = ap.parse_args()
    print(f"| | {args.run_a} | {args.run_b} | comparison |")
    print("|---|---|---|---|")
    for row in compare(args.run_a, args.run_b):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
