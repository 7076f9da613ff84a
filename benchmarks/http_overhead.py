"""HTTP overhead: the same victim answering the same queries from a local file vs through kd-serve over loopback.

Two measurements, printed as one table:
  * steady state: ``oracle.answer`` in-process on batches of --batch-size (ModelOracle vs HttpOracle with
    the JSON and the binary stream wire), median of --repeats passes over all queries;
  * end to end: the kd-query command on a query file (process start, model load, log writing included).
It also checks that every answer over HTTP equals the local one (same argmax; probabilities within 1e-6).

    KD_DATA=/work/shared/data .venv/bin/python benchmarks/http_overhead.py [--queries 20000] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdtools.data import load_dataset  # noqa: E402
from kdtools.models import ImageClassifier  # noqa: E402
from kdtools.oracle import HttpOracle, ModelOracle, RemoteOptions  # noqa: E402
from kdtools.sources import SampleSink  # noqa: E402
from kdtools.stream import StreamHeader, fields_of  # noqa: E402
from kdtools.weights import load_model, save_model  # noqa: E402


def start_server(victim: Path, tmp: Path, env: dict, port: int = 0) -> tuple:
    port_file = tmp / "port"
    p = subprocess.Popen([sys.executable, "-m", "kdtools.cli.serve", str(victim), "--mode", "label,probs", "--port", str(port),
                          "--port-file", str(port_file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            raise SystemExit("kd-serve did not start")
        time.sleep(0.1)
    return p, f"http://127.0.0.1:{int(port_file.read_text())}"


def steady(oracle, x: torch.Tensor, mode: str, batch: int, repeats: int) -> tuple:
    times, answers = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        parts = [oracle.answer(x[i:i + batch], mode) for i in range(0, x.shape[0], batch)]
        times.append(time.perf_counter() - t0)
        answers = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return statistics.median(times), answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the client and the server")
    ap.add_argument("--victim", help="a weights file (default: LeNet-5 trained 2 epochs on digits)")
    ap.add_argument("--attack-budget", type=int, default=2500,
                    help="also run an IDEAL attack with this budget against the file and through kd-serve (0: skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        victim = Path(args.victim) if args.victim else tmp / "victim.safetensors"
        if not args.victim:
            from kdtools.train import TrainConfig, data_normalization, targets_from, train

            ds = load_dataset("digits", "train")
            mean, std = data_normalization(ds.x)
            model = ImageClassifier("lenet5", ds.shape, 10, {}, mean, std)
            train(model, ds.x, targets_from({"label": ds.y}, 10), TrainConfig(epochs=2, optimizer="adam", lr=0.003), torch.device("cpu"))
            save_model(model, victim, {"made_by": "benchmarks/http_overhead.py"})
        # queries: the digits public split repeated, 8-bit images as an attacker would send them
        pub = load_dataset("digits", "public").x
        xq = pub.repeat((args.queries + len(pub) - 1) // len(pub), 1, 1, 1)[:args.queries]
        x = xq.float() / 255
        qfile = tmp / "q.kds"
        sink = SampleSink(StreamHeader("queries", fields_of({"x": xq[:1]})), path=qfile)
        for i in range(0, xq.shape[0], args.batch_size):
            sink.write({"x": xq[i:i + args.batch_size]})
        sink.close()

        local = ModelOracle(load_model(victim))
        server, url = start_server(victim, tmp, env)
        rows = []
        try:
            for mode in ("label", "probs"):
                base, want = steady(local, x, mode, args.batch_size, args.repeats)
                rows.append(("file (in-process)", "-", mode, base, base, True))
                for wire in ("json", "stream"):
                    orc = HttpOracle(url, RemoteOptions(wire=wire))
                    t, got = steady(orc, x, mode, args.batch_size, args.repeats)
                    k = "label" if mode == "label" else "probs"
                    same = torch.equal(got[k], want[k]) if mode == "label" else bool(torch.allclose(got[k], want[k], atol=1e-6))
                    rows.append(("kd-serve (in-process client)", wire, mode, t, base, same))
                    orc.close()
            # end to end: the kd-query command, once per oracle
            e2e = []
            for label, spec, extra in (("kd-query FILE", str(victim), []), ("kd-query http:// json", url, ["--wire", "json"]),
                                       ("kd-query http:// stream", url, ["--wire", "stream"])):
                out = tmp / "out.kds"
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "kdtools.cli.query", spec, str(qfile), "--mode", "probs", "-q",
                                "-o", str(out), *extra], check=True, env=env, stderr=subprocess.DEVNULL)
                e2e.append((label, time.perf_counter() - t0))
            # a whole attack, same seed, against the file and through kd-serve: the substitutes must be identical
            attacks = []
            for label, spec in (("IDEAL vs FILE", str(victim)), ("IDEAL vs http:// stream", url)):
                out = tmp / label.split()[-1].replace(":", "").replace("/", "")
                t0 = time.perf_counter()
                if args.attack_budget > 0:
                    subprocess.run([sys.executable, "-m", "kdtools.cli.gen_queries", "ideal", "--oracle", spec, "--mode", "label",
                                    "--budget", str(args.attack_budget), "--substitute", "lenet5", "--seed", "0", "--s-optimizer", "adam",
                                    "--lr-s", "0.001", "--pool-epochs", "2", "--eval-data",
                                    "digits", "-q", "-o", str(out)], check=True, env=env, stderr=subprocess.DEVNULL)
                    sub = load_model(out / "substitute.safetensors")
                    acc = float(sub.metadata.get("eval_accuracy", "nan"))
                    attacks.append((label, time.perf_counter() - t0, acc, sub.module.state_dict()))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)

    n = args.queries
    print(f"queries {n}, batch {args.batch_size}, torch threads {args.threads}, median of {args.repeats}")
    print(f"{'oracle':<30} {'wire':<7} {'mode':<6} {'seconds':>8} {'queries/s':>10} {'overhead':>9} {'same answers':>13}")
    for name, wire, mode, t, base, same in rows:
        over = f"{t / base:.2f}x" if t is not base else "1.00x"
        print(f"{name:<30} {wire:<7} {mode:<6} {t:8.2f} {n / t:10.0f} {over:>9} {str(same):>13}")
    print()
    print(f"{'end to end (probs, incl. start-up)':<40} {'seconds':>8} {'queries/s':>10}")
    for label, t in e2e:
        print(f"{label:<40} {t:8.2f} {n / t:10.0f}")
    if attacks:
        print()
        ref = attacks[0][3]
        print(f"{'attack (label mode, ' + str(args.attack_budget) + ' queries, seed 0)':<40} {'seconds':>8} {'digits test acc.':>17} "
              f"{'substitute identical to FILE run':>33}")
        for label, t, acc, state in attacks:
            same = all(torch.equal(state[k], ref[k]) for k in ref)
            print(f"{label:<40} {t:8.2f} {100 * acc:16.2f}% {str(same):>33}")


if __name__ == "__main__":
    main()
