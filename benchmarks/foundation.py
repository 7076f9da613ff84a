"""Foundation benchmarks (issue #2). Prints tables; asserts nothing.

  1. kd-query throughput with a local LeNet-5 oracle and HDF5 logging, next to the bare model's
     inference rate measured in the same run (target: logging + streaming cost under 20 %).
  2. The same 20 000-query steal through the three-process pipe and in one process (target: wall-time
     ratio under 1.15).
  3. An MNIST LeNet-5 victim trained by kd-distill on $KD_DATA/vision: test accuracy (expect ~99 %).

Usage:  KD_DATA=../shared/data python benchmarks/foundation.py [--only throughput,pipe,victim] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdtools.data import to_float  # noqa: E402
from kdtools.h5store import SampleWriter  # noqa: E402
from kdtools.oracle import ModelOracle  # noqa: E402
from kdtools.query import output_header, run_queries  # noqa: E402
from kdtools.sources import SampleSink, open_samples  # noqa: E402
from kdtools.weights import load_model  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
BIN = Path(sys.executable).parent


def tool(name: str) -> list[str]:
    exe = BIN / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kdtools.cli." + name[3:].replace("-", "_")]


def run(cmd, **kw):
    p = subprocess.run(cmd, env=ENV, capture_output=True, **kw)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{p.stderr.decode()[-2000:]}")
    return p


def table(title: str, header: list[str], rows: list[list]) -> None:
    cols = [header] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cols) for i in range(len(header))]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(header)) + " |")
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in cols[1:]:
        print("| " + " | ".join(c.rjust(w[i]) for i, c in enumerate(r)) + " |")


def ensure_victim(work: Path, data_root: Path, epochs: int) -> tuple[Path, float, float]:
    victim = work / "mnist-lenet5.safetensors"
    t0 = time.perf_counter()
    from kdtools.weights import read_metadata

    # kd-distill rewrites the weights after every epoch: reuse a file only if its run finished
    if not victim.exists() or int(read_metadata(victim).get("epochs_done", 0)) < epochs:
        run(tool("kd-distill") + ["--data", "mnist", "--data-root", str(data_root), "--arch", "lenet5", "--epochs", str(epochs),
                                  "--optimizer", "adam", "--lr", "0.001", "--batch-size", "128", "--augment", "-q", "-o", str(victim)])
    secs = time.perf_counter() - t0
    p = run(tool("kd-eval") + ["accuracy", str(victim), "--data", "mnist", "--data-root", str(data_root), "--json"])
    return victim, json.loads(p.stdout)["accuracy"], secs


def bench_throughput(victim: Path, queries: Path, n: int, repeats: int) -> None:
    oracle = ModelOracle(load_model(victim), batch_size=256)
    x = torch.cat([b["x"] for b in open_samples(queries)])
    bare, lib, cli = [], [], []
    for r in range(repeats):  # interleaved, so machine load hits every variant alike
        t0 = time.perf_counter()
        for i in range(0, n, 256):
            oracle.logits(to_float(x[i:i + 256]))
        bare.append(n / (time.perf_counter() - t0))

        with tempfile.TemporaryDirectory() as d:
            src = open_samples(queries)
            header = output_header(src.header, oracle, "probs", {})
            log = SampleWriter(Path(d) / "q.h5", header, oracle.identity, budget=n)
            sink = SampleSink(header, out=open(os.devnull, "wb"))
            t0 = time.perf_counter()
            run_queries(src, oracle, "probs", n, log, sink.write)
            lib.append(n / (time.perf_counter() - t0))
            log.close()

            t0 = time.perf_counter()
            run(tool("kd-query") + [str(victim), str(queries), "--mode", "probs", "--budget", str(n), "--log", str(Path(d) / "c.h5"),
                                    "-q", "-o", str(Path(d) / "out.kds")])
            cli.append(n / (time.perf_counter() - t0))
    b, l, c = statistics.median(bare), statistics.median(lib), statistics.median(cli)
    table(f"1. kd-query throughput, LeNet-5 oracle, {n} queries (1x28x28 uint8), mode probs, batch 256, median of {repeats}",
          ["what", "queries/s", "cost vs bare model"],
          [["bare model inference (no I/O)", f"{b:,.0f}", "-"],
           ["run_queries: stream in + HDF5 log + stream out", f"{l:,.0f}", f"{100 * (1 - l / b):.1f} %"],
           ["kd-query process (incl. start-up, file in/out)", f"{c:,.0f}", f"{100 * (1 - c / b):.1f} %"]])


def bench_pipe(victim: Path, data_root: Path, work: Path, n: int, epochs: int, repeats: int) -> None:
    distill_args = ["--arch", "lenet5-half", "--epochs", str(epochs), "--optimizer", "adam", "--lr", "0.002", "--seed", "0", "-q"]
    pipe_t, one_t, accs = [], [], {}
    for r in range(repeats):
        log = work / "pipe.h5"
        log.unlink(missing_ok=True)
        t0 = time.perf_counter()
        cmd = (f"{' '.join(tool('kd-gen-queries'))} dataset --data fashion-mnist --data-root {data_root} -n {n} "
               f"| {' '.join(tool('kd-query'))} {victim} --mode label --budget {n} --log {log} -q "
               f"| {' '.join(tool('kd-distill'))} {' '.join(distill_args)} -o {work / 'pipe-student.safetensors'}")
        p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], env=ENV, capture_output=True)
        if p.returncode != 0:
            raise SystemExit(p.stderr.decode()[-2000:])
        pipe_t.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        one = work / "one-process.py"
        one.write_text(ONE_PROCESS)
        run([sys.executable, str(one), str(victim), str(data_root), str(n), str(epochs), str(work / "one.h5"), str(work / "one-student.safetensors")])
        one_t.append(time.perf_counter() - t0)
    for name in ("pipe-student", "one-student"):
        p = run(tool("kd-eval") + ["accuracy", str(work / f"{name}.safetensors"), "--data", "mnist", "--data-root", str(data_root),
                                   "--reference", str(victim), "--json"])
        accs[name] = json.loads(p.stdout)
    mp, mo = statistics.median(pipe_t), statistics.median(one_t)
    table(f"2. steal MNIST LeNet-5 with {n} Fashion-MNIST label queries, student LeNet-5-half {epochs} epochs (median of {repeats})",
          ["how", "wall s", "student MNIST acc", "fidelity"],
          [["three processes: kd-gen-queries | kd-query | kd-distill", f"{mp:.1f}", f"{100 * accs['pipe-student']['accuracy']:.2f} %",
            f"{100 * accs['pipe-student']['fidelity']:.2f} %"],
           ["one Python process, same library calls", f"{mo:.1f}", f"{100 * accs['one-student']['accuracy']:.2f} %",
            f"{100 * accs['one-student']['fidelity']:.2f} %"],
           ["ratio pipe / one process", f"{mp / mo:.3f}", "", ""]])


# The one-process steal: the same library calls the three commands make, without pipes or start-ups.
ONE_PROCESS = r'''
import sys, torch
from pathlib import Path
from kdtools.data import load_dataset
from kdtools.h5store import SampleWriter
from kdtools.models import ImageClassifier
from kdtools.oracle import ModelOracle
from kdtools.query import output_header, run_queries
from kdtools.queries import dataset_batches
from kdtools.sources import SampleSource
from kdtools.stream import StreamHeader
from kdtools.train import TrainConfig, data_normalization, targets_from, train
from kdtools.weights import load_model, save_model
victim, root, n, epochs, log_path, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]), sys.argv[6]
log_path.unlink(missing_ok=True)
ds = load_dataset("fashion-mnist", "train", root)
oracle = ModelOracle(load_model(victim))
src = SampleSource(StreamHeader("queries", {"x": {"dtype": "uint8", "shape": [1, 28, 28]}}), dataset_batches(ds, n, 256, True, False, 0), "memory")
header = output_header(src.header, oracle, "label", {})
log = SampleWriter(log_path, header, oracle.identity, budget=n)
got = []
run_queries(src, oracle, "label", n, log, got.append)
log.close()
x = torch.cat([b["x"] for b in got]); y = torch.cat([b["label"] for b in got])
mean, std = data_normalization(x)
torch.manual_seed(0)  # as kd-distill --seed 0 does before building the model
model = ImageClassifier("lenet5-half", (1, 28, 28), 10, {}, mean, std)
train(model, x, targets_from({"label": y}, 10), TrainConfig(epochs=epochs, optimizer="adam", lr=0.002, seed=0), torch.device("cpu"))
save_model(model, out)
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="victim,throughput,pipe")
    ap.add_argument("--work", default=None, help="Keep the victim and outputs here (default: a temporary directory).")
    ap.add_argument("--victim-epochs", type=int, default=10)
    ap.add_argument("--queries", type=int, default=20000)
    ap.add_argument("--student-epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    kd_data = os.environ.get("KD_DATA")
    if not kd_data:
        raise SystemExit("set KD_DATA (e.g. KD_DATA=../shared/data): the benchmarks use MNIST and Fashion-MNIST")
    data_root = Path(kd_data) / "vision"
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"cuda {'yes' if torch.cuda.is_available() else 'no'}, threads {torch.get_num_threads()}; {time.strftime('%Y-%m-%d %H:%M')}")
    victim, acc, secs = ensure_victim(work, data_root, args.victim_epochs)
    if "victim" in only:
        table("3. MNIST victim trained by kd-distill", ["model", "epochs", "train wall s", "MNIST test accuracy"],
              [["LeNet-5 (adam 1e-3, augment)", args.victim_epochs, f"{secs:.0f}" if secs > 5 else "(reused)", f"{100 * acc:.2f} %"]])
    if "throughput" in only:
        q = work / "fmnist-queries.kds"
        if not q.exists():
            run(tool("kd-gen-queries") + ["dataset", "--data", "fashion-mnist", "--data-root", str(data_root), "-n", str(args.queries), "-o", str(q)])
        bench_throughput(victim, q, args.queries, args.repeats)
    if "pipe" in only:
        bench_pipe(victim, data_root, work, args.queries, args.student_epochs, args.repeats)


if __name__ == "__main__":
    main()
