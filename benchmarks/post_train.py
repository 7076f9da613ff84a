"""Post-training variants on query logs that attacks already paid for: no oracle call, one table.

Each log is post-trained by `kd-distill LOG --arch ARCH` with the benchmarks' post-training settings
(POST_TRAIN_ARGS of benchmarks/extraction.py) plus each variant's extra flags, then scored on the
test split of the log's data set. Finished outputs are scored again, not retrained, and one stopped part-way
is resumed from its checkpoint, so a stopped run continues where it was.

    KD_DATA=../shared/data python benchmarks/post_train.py --out /tmp/post \
        --log ideal-fmnist-label=runs/bench-extraction/fmnist-label-ideal-100000/queries.h5:fashion-mnist \
        --variant plain= --variant cb0.5="--class-balance 0.5" --variant cb1="--class-balance 1"
"""

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extraction import POST_TRAIN_ARGS, finished, resumable, sh, tool  # noqa: E402


def scores(weights: Path, dataset: str) -> tuple[float, list]:
    """Test accuracy, and that of each true class (None for a class without test images), from one pass."""
    from kdtools.data import load_dataset
    from kdtools.evaluate import evaluate_accuracy
    from kdtools.weights import load_model
    import torch

    loaded = load_model(weights)
    ds = load_dataset(dataset, "test", Path(os.environ["KD_DATA"]) / "vision")
    report = evaluate_accuracy(loaded.module, str(weights), loaded.input_shape, ds, torch.device("cpu"))
    return report.accuracy, [row["accuracy"] for row in report.per_class]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", action="append", required=True, help="NAME=PATH:DATASET (repeatable)")
    ap.add_argument("--variant", action="append", required=True, help='TAG="extra kd-distill flags" (repeatable; TAG= for none)')
    ap.add_argument("--arch", default="lenet5")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not os.environ.get("KD_DATA"):
        raise SystemExit("set KD_DATA (the test splits are read from $KD_DATA/vision)")
    args.out.mkdir(parents=True, exist_ok=True)
    logs = []
    for spec in args.log:
        name, rest = spec.split("=", 1)
        path, dataset = rest.rsplit(":", 1)
        logs.append((name, Path(path), dataset))
    variants = [(v.split("=", 1)[0], shlex.split(v.split("=", 1)[1])) for v in args.variant]

    rows = []
    results = args.out / "results.jsonl"
    for tag, extra in variants:  # variant by variant: the first variant's column is complete first
        for name, log, dataset in logs:
            weights = args.out / f"{name}-{tag}.safetensors"
            cmd = [*tool("kd-distill"), str(log), "--arch", args.arch, *POST_TRAIN_ARGS, *extra, "-q", "-o", str(weights)]
            seconds, resumed = None, False
            if not finished(weights):
                resumed = resumable(weights)  # stopped part-way: kd-distill continues from its checkpoint
                seconds = sh(cmd + (["--resume", str(weights)] if resumed else []), args.out / f"{name}-{tag}.log")
            acc, classes = scores(weights, dataset)
            row = {"log": name, "path": str(log), "variant": tag, "extra": extra, "accuracy": acc, "per_class": classes,
                   "seconds": seconds, "resumed": resumed, "command": shlex.join(["kd-distill", *cmd[3:]]), "date": time.strftime("%Y-%m-%d %H:%M")}
            rows.append(row)
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name} {tag}: {100 * acc:.2f} %" + (f" ({seconds:.0f} s)" if seconds else " (existing file)"), file=sys.stderr)

    tags = [t for t, _ in variants]
    print(f"\npost-training on each log ({args.arch}, {' '.join(POST_TRAIN_ARGS)} + the variant's flags), test accuracy %\n")
    print("| log | " + " | ".join(f"{t} ({' '.join(e) or 'no extra flag'})" for t, e in variants) + " |")
    print("|---" * (len(tags) + 1) + "|")
    for name, _, _ in logs:
        cells = [next((f"{100 * r['accuracy']:.2f}" for r in rows if r["log"] == name and r["variant"] == t), "-") for t in tags]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nper class (test accuracy %, classes 0-9)\n")
    for r in rows:
        print(f"{r['log']:<24} {r['variant']:<8} " + " ".join("  -  " if a is None else f"{100 * a:5.1f}" for a in r["per_class"]))


if __name__ == "__main__":
    main()
