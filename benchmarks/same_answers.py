"""Did an oracle answer as a model file does? Asks every query of an attack's log again, this time from a
victim file, in the log's own batches, and compares each answer with the logged one bit for bit.

For a log made through kd-serve this checks the HTTP path itself: a query that went over the wire (uint8
images, JSON or binary answers) must come back with the bits the file gives. An attack's next step depends on
the oracle only through these answers, so when every answer is the same the HTTP run and a run against the file
(same seed, same code, same thread count) are the same run; benchmarks/same_run.py compares two such runs
directly. Logs still being written can be read (HDF5 file locking off); a batch not yet whole is left out, and the
table says how many of the log's rows were asked again. Exits 1 when an answer differs or nothing was checked.
The answers are computed on the CPU: run it with the thread count the attack ran with (OMP_NUM_THREADS), as a
model's float results can depend on it; a run whose victim answered on a GPU may differ in the last bits.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/same_answers.py \
        runs/bench-extraction/fmnist-probs-ideal-1000000-gsteps10-sel4-http/queries.h5 \
        runs/bench-extraction/fashion-mnist-victim.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")  # before h5py is imported: the writer may hold the log

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdtools.oracle import open_oracle, response_fields  # noqa: E402


def bits(a: np.ndarray) -> np.ndarray:
    """The array's raw bits: floats compared this way tell -0.0 from 0.0 and match a NaN with the same NaN."""
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.kind == "f" else a


def compare(log_path: Path, victim: str, limit: int | None = None) -> dict:
    oracle = open_oracle(victim, torch.device("cpu"))
    with h5py.File(log_path, "r") as f:
        mode = str(f.attrs["mode"])
        fields = list(response_fields(mode, oracle.num_classes))
        missing = [k for k in fields if k not in f]
        if missing:
            raise SystemExit(f"{log_path}: a {mode} log without {', '.join(missing)}")
        committed = min([f["x"].shape[0], *(f[k].shape[0] for k in fields)])
        rows = committed if limit is None else min(committed, limit)
        starts, sizes = f["batch_start"][:], f["batch_rows"][:]
        checked, different, batches, worst = 0, 0, 0, 0.0
        for start, size in zip(starts.tolist(), sizes.tolist()):
            if start + size > rows:  # a batch the writer has not finished, or past --rows
                break
            if size == 0:  # an answer cut short by the budget before its first row
                continue
            x = torch.from_numpy(f["x"][start:start + size])
            # the log keeps what was asked: uint8 grey levels v stand for v/255, as the attack's queries were
            xf = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            again = oracle.answer(xf, mode)
            differs = np.zeros(size, dtype=bool)  # one answer = every field of one row
            for k in fields:
                logged, fresh = f[k][start:start + size], again[k].numpy()
                same = bits(logged) == bits(fresh.astype(logged.dtype))
                differs |= ~same.reshape(size, -1).all(1)
                if logged.dtype.kind == "f":
                    worst = max(worst, float(np.nanmax(np.abs(logged.astype(np.float64) - fresh))))
            different += int(differs.sum())
            checked += size
            batches += 1
    return {"mode": mode, "fields": fields, "identity": oracle.identity, "committed": committed, "rows": checked,
            "batches": batches, "different": different, "max_abs_difference": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", type=Path, help="an attack's query log (queries.h5)")
    ap.add_argument("victim", help="the model file to ask again")
    ap.add_argument("--rows", type=int, help="only the batches within the first ROWS rows")
    args = ap.parse_args()
    t0 = time.time()
    r = compare(args.log, args.victim, args.rows)
    print(f"victim file {args.victim}: {r['identity']}", file=sys.stderr)
    print("| log | victim file | mode (fields) | rows in the log | rows asked again | batches | answers different | "
          "largest difference | threads | time |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.log} | {args.victim} | {r['mode']} ({', '.join(r['fields'])}) | {r['committed']:,} | {r['rows']:,} | "
          f"{r['batches']:,} | {r['different']:,} | {r['max_abs_difference']:.3g} | {torch.get_num_threads()} | "
          f"{time.time() - t0:.0f} s |")
    # a check that found a difference, or that read nothing, is not a pass
    if r["different"] or r["rows"] == 0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
