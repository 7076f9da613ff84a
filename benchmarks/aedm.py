"""AEDM benchmark (issue #6): extraction with a diffusion prior trained on *other* public data.

    KD_DATA=../shared/data python benchmarks/aedm.py --work /tmp/aedm-bench [--only aedm,nosteer,strong,replay,replay-steer5,public,baselines,fed,fmnist,dpr,dpr-fmnist]

Every step runs the real commands (kd-diffstep train, kd-gen-queries, kd-distill, kd-serve, kd-query) and
is skipped when its output exists, so an interrupted benchmark continues where it stopped.

  priors   kd-diffstep train on Fashion-MNIST (the MNIST attack's public data) and on MNIST (the reverse);
  aedm, nosteer, public, baselines
           MNIST LeNet-5 victim, probabilities, --budget queries (20 000): AEDM, AEDM without steering, the
           public images themselves as queries, TandemGAN and DFME with the same budget, each substitute then post-trained on its own query log with the same kd-distill
           command (the paper's step 2: epochs over the saved queries with augmentation), again
           without augmentation (benchmarks/extraction.py's post-training settings), and without
           augmentation with the answers' classes drawn evenly (kd-distill --class-balance 1);
  replay   AEDM with 10 replay steps per round instead of --replay-steps (a kdtools variant);
  replay-steer5  the same with the paper's 5 steering steps (about 4x the steering cost);
  fed      AEDM federated with 5 and 10 simulated clients at the same total budget;
  fmnist   Fashion-MNIST victim, MNIST prior, 50 000 queries;
  dpr      defence pass rate: kd-serve --defense entropy (thresholds learned on the victim's training
           data), every query set sent through kd-query over HTTP, rejected rows counted;
  dpr-fmnist  the same for the Fashion-MNIST victim: AEDM's queries from the MNIST prior, the data-free
           attacks' queries from benchmarks/extraction.py's Fashion-MNIST runs (--extraction-runs).

The table reports the real oracle calls of every run (the log's count) and the CPU settings used
(sampler/steering steps); the paper's settings are the command's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from extraction import METHOD_ARGS, PIXELS, POST_TRAIN_ARGS, ROOT, finished, resumable, sh, test_accuracy, tool, victim  # noqa: E402

DATA_OF = {"mnist": "mnist", "fmnist": "fashion-mnist"}


def log_rows(path: Path) -> int:
    import h5py

    with h5py.File(path) as f:
        return int(f.attrs.get("spent", f["x"].shape[0]))


def prior(work: Path, dataset: str, iters: int, log: Path) -> Path:
    out = work / f"prior-{dataset}"
    if not (out / "unet" / "config.json").exists():
        sh([*tool("kd-diffstep"), "train", "--data", DATA_OF[dataset], "--image-size", "28", "--steps", "1000",
            "--unet-channels", "16,32,32", "--iters", str(iters), "--batch-size", "64", "--lr", "1e-3", "--ema", "0.995",
            "--force", "-o", str(out)], log)
    return out


def post_train(qlog: Path, dataset: str, epochs: int, out: Path, log: Path) -> dict:
    """The paper's second stage: a substitute trained again on every query it paid for, no further query.
    Three settings, all reported: the paper's (epochs with augmentation); benchmarks/extraction.py's plain one
    (POST_TRAIN_ARGS: no augmentation, which changes the answers of queries near the decision boundaries); and
    the plain one with classes drawn evenly (--class-balance 1: the victim answers most of these queries with
    a few classes). A file stopped part-way is resumed from its checkpoint."""
    plain = out.with_name(out.stem + "-plain.safetensors")
    balanced = out.with_name(out.stem + "-balanced.safetensors")
    # the paper's augmented setting last: it is the weakest on these logs and the first to drop when time is short
    settings = ((plain, POST_TRAIN_ARGS), (balanced, [*POST_TRAIN_ARGS, "--class-balance", "1"]),
                (out, ["--epochs", str(epochs), "--augment", "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "128"]))
    for weights, flags in settings:
        if not finished(weights):
            resume = ["--resume", str(weights)] if resumable(weights) else []
            sh([*tool("kd-distill"), str(qlog), "--arch", "lenet5", *flags, "-q", "-o", str(weights), *resume], log)
    return {"post": test_accuracy(out, DATA_OF[dataset]), "post_plain": test_accuracy(plain, DATA_OF[dataset]),
            "post_balanced": test_accuracy(balanced, DATA_OF[dataset])}


def public_data_run(work: Path, victim_path: Path, public: str, dataset: str, budget: int, args, log: Path) -> dict:
    """No prior, no steering: the public images themselves as queries (the paper's Table 4.2 motivation)."""
    out = work / f"public-{public}-{dataset}-{budget}"
    out.mkdir(exist_ok=True)
    qlog = out / "queries.h5"
    t = 0.0
    if not (out / "answers.kds").exists():
        qlog.unlink(missing_ok=True)
        t0 = time.time()
        sh(["bash", "-c", shlex.join([*tool("kd-gen-queries"), "dataset", "--data", public, "-n", str(budget)]) + " | "
            + shlex.join([*tool("kd-query"), str(victim_path), "--mode", "probs", "--budget", str(budget), "--log", str(qlog),
                          "-q", "-o", str(out / "answers.kds")])], log)
        t = time.time() - t0
    post = post_train(qlog, dataset, args.post_epochs, out / "post.safetensors", log)
    return {"run": out.name, "method": f"{public} images as queries", "target": dataset, "budget": budget,
            "calls": log_rows(qlog), "online": float("nan"), **post, "seconds": round(t)}


def aedm_run(name: str, work: Path, victim_path: Path, prior_dir: Path, dataset: str, budget: int, args, log: Path,
             clients: int = 1, steer_steps: int | None = None, lr_steer: float = 0.01, replay_steps: int | None = None) -> dict:
    out = work / name
    t = 0.0
    if not (out / "substitute.safetensors").exists():
        cmd = [*tool("kd-gen-queries"), "aedm", "--diffusion", str(prior_dir), "--oracle", str(victim_path), "--mode", "probs",
               "--budget", str(budget), "--substitute", "lenet5", "--batch-size", str(args.batch_size),
               "--sampler-steps", str(args.sampler_steps),
               "--steer-steps", str(args.steer_steps if steer_steps is None else steer_steps), "--lr-steer", str(lr_steer),
               "--s-optimizer", "adam", "--lr-s", "1e-3", "--s-loss", "kl", "--replay-steps", str(args.replay_steps if replay_steps is None else replay_steps),
               "--clients", str(clients), "--eval-data", DATA_OF[dataset], "-q", "-o", str(out)]
        if (out / "state.pt").exists():
            cmd.append("--resume")
        t = sh(cmd, log)
    online = test_accuracy(out / "substitute.safetensors", DATA_OF[dataset])
    post = post_train(out / "queries.h5", dataset, args.post_epochs, out / "post.safetensors", log)
    method = "aedm" + (f" x{clients} clients" if clients > 1 else "") + (" (no steering)" if steer_steps == 0 else "")
    if steer_steps and (lr_steer != 0.01 or steer_steps != args.steer_steps):
        method += f" ({steer_steps} steering steps, lr {lr_steer})"
    if replay_steps is not None:
        method += f" ({replay_steps} replay steps)"
    return {"run": name, "method": method, "target": dataset,
            "budget": budget, "calls": log_rows(out / "queries.h5"), "online": online, **post, "seconds": round(t)}


def baseline_run(method: str, work: Path, victim_path: Path, dataset: str, budget: int, args, log: Path) -> dict:
    out = work / f"{method}-{dataset}-{budget}"
    t = 0.0
    if not (out / "substitute.safetensors").exists():
        cmd = [*tool("kd-gen-queries"), method, "--oracle", str(victim_path), "--mode", "probs", "--budget", str(budget),
               "--substitute", "lenet5", *METHOD_ARGS[method], *PIXELS[DATA_OF[dataset]], "--eval-data", DATA_OF[dataset],
               "-q", "-o", str(out)]
        if (out / "state.pt").exists():
            cmd.append("--resume")
        t = sh(cmd, log)
    online = test_accuracy(out / "substitute.safetensors", DATA_OF[dataset])
    post = post_train(out / "queries.h5", dataset, args.post_epochs, out / "post.safetensors", log)
    return {"run": out.name, "method": method, "target": dataset, "budget": budget, "calls": log_rows(out / "queries.h5"),
            "online": online, **post, "seconds": round(t)}


def pass_rates(work: Path, victim_path: Path, sets: dict, log: Path, sides: str = "both", defense_data: str = "mnist",
               tag: str = "") -> list[dict]:
    """Each query set through kd-serve --defense entropy (thresholds learned on ``defense_data``'s training split)
    over loopback HTTP; rejected rows counted from kd-query's log. ``tag`` keeps the files of two victims apart."""
    import h5py
    import torch

    port_file = work / "dpr.port"
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen([*tool("kd-serve"), str(victim_path), "--mode", "probs", "--port", "0", "--port-file", str(port_file),
                               "--defense", "entropy", "--defense-data", defense_data, "--defense-sides", sides,
                               "--defense-save", str(work / f"defense{tag}-{sides}.json")],
                              stdout=subprocess.DEVNULL, stderr=open(log, "ab"), env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        for _ in range(600):
            if port_file.exists() and port_file.read_text().strip():
                break
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        rows = []
        for name, path in sets.items():
            slug = "".join(c if c.isalnum() else "-" for c in name)
            qlog = work / f"dpr{tag}-answers-{sides}-{slug}.h5"
            qlog.unlink(missing_ok=True)
            sh([*tool("kd-query"), url, str(path), "--mode", "probs", "--on-rejected", "flag", "--log", str(qlog), "-q",
                "-o", str(work / f"dpr{tag}-answers-{sides}-{slug}.kds")], log)
            with h5py.File(qlog) as f:
                probs = torch.from_numpy(f["probs"][:])
            rejected = int((probs.sum(1) == 0).sum())
            rows.append({"queries": name, "n": probs.shape[0], "passed": 1 - rejected / probs.shape[0], "sides": sides,
                         "victim": defense_data})
        return rows
    finally:
        server.terminate()
        server.wait()


def first_rows(src: Path, n: int, dst: Path) -> Path:
    """The first n queries of a log (x only) as a sample file for kd-query."""
    import h5py
    import torch

    if not dst.exists():
        from kdtools.h5store import write_samples
        from kdtools.stream import StreamHeader, fields_of

        with h5py.File(src) as f:
            x = torch.from_numpy(f["x"][:n])
        batch = {"x": x}
        write_samples(dst, StreamHeader("queries", fields_of(batch), extra={"from": str(src)}), [batch])
    return dst


def pct(v: float) -> str:
    return "-" if v != v else f"{100 * v:.2f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/aedm-bench")
    ap.add_argument("--only", default="aedm,nosteer,strong,replay,replay-steer5,public,baselines,fed,fmnist,dpr,dpr-fmnist")
    ap.add_argument("--mnist-victim")
    ap.add_argument("--fmnist-victim")
    ap.add_argument("--fmnist-prior", help="a prior trained on Fashion-MNIST (default: trained here)")
    ap.add_argument("--mnist-prior", help="a prior trained on MNIST (default: trained here)")
    ap.add_argument("--prior-iters", type=int, default=3000)
    ap.add_argument("--budget", type=int, default=20_000)
    ap.add_argument("--fmnist-budget", type=int, default=50_000)
    ap.add_argument("--baselines", default="tandemgan,dfme")
    ap.add_argument("--baseline-budgets", default="20000,200000",
                    help="budgets of the data-free baselines (issue #6: 20 000 and 200 000), comma-separated")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--sampler-steps", type=int, default=4, help="CPU setting (paper: 8)")
    ap.add_argument("--steer-steps", type=int, default=1, help="CPU setting (paper: 5)")
    ap.add_argument("--replay-steps", type=int, default=2)
    ap.add_argument("--post-epochs", type=int, default=20)
    ap.add_argument("--dpr-n", type=int, default=2000)
    ap.add_argument("--extraction-runs", default=str(ROOT / "runs" / "bench-extraction"),
                    help="benchmarks/extraction.py's work directory (dpr-fmnist reads its Fashion-MNIST query logs)")
    args = ap.parse_args()
    if not os.environ.get("KD_DATA"):
        raise SystemExit("set KD_DATA (e.g. ../shared/data)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    only = set(args.only.split(","))
    results, dpr = [], []
    mnist_v = victim("mnist", args.mnist_victim, work, 4)
    if only & {"aedm", "nosteer", "strong", "replay", "replay-steer5", "fed", "dpr"}:
        fprior = Path(args.fmnist_prior) if args.fmnist_prior else prior(work, "fmnist", args.prior_iters, log)
    if "aedm" in only:
        results.append(aedm_run(f"aedm-mnist-{args.budget}", work, mnist_v, fprior, "mnist", args.budget, args, log))
    if "nosteer" in only:
        results.append(aedm_run(f"aedm-mnist-{args.budget}-nosteer", work, mnist_v, fprior, "mnist", args.budget, args, log,
                                steer_steps=0))
    if "strong" in only:  # kdtools variant: ten times the paper's steering step, two steps
        results.append(aedm_run(f"aedm-mnist-{args.budget}-strong", work, mnist_v, fprior, "mnist", args.budget, args, log,
                                steer_steps=2, lr_steer=0.1))
    if "replay" in only:  # kdtools variant (session 7): more substitute steps on paid answers between rounds
        results.append(aedm_run(f"aedm-mnist-{args.budget}-replay10", work, mnist_v, fprior, "mnist", args.budget, args, log,
                                replay_steps=10))
    if "replay-steer5" in only:  # the paper's 5 steering steps, with a substitute that learns (10 replay steps)
        results.append(aedm_run(f"aedm-mnist-{args.budget}-replay10-steer5", work, mnist_v, fprior, "mnist", args.budget, args,
                                log, steer_steps=5, replay_steps=10))
    if "public" in only:
        results.append(public_data_run(work, mnist_v, "fashion-mnist", "mnist", args.budget, args, log))
    if "baselines" in only:
        for m in filter(None, args.baselines.split(",")):
            for budget in (int(b) for b in args.baseline_budgets.split(",") if b):
                results.append(baseline_run(m, work, mnist_v, "mnist", budget, args, log))
    if "fed" in only:
        for k in (5, 10):
            results.append(aedm_run(f"aedm-mnist-{args.budget}-fed{k}", work, mnist_v, fprior, "mnist", args.budget, args, log, k))
    if "fmnist" in only:
        fmnist_v = victim("fashion-mnist", args.fmnist_victim, work, 4)
        mprior = Path(args.mnist_prior) if args.mnist_prior else prior(work, "mnist", args.prior_iters, log)
        results.append(aedm_run(f"aedm-fmnist-{args.fmnist_budget}", work, fmnist_v, mprior, "fmnist", args.fmnist_budget, args, log))
    if "dpr" in only:
        sets = {}
        for run, label in ((f"aedm-mnist-{args.budget}", "aedm"), (f"aedm-mnist-{args.budget}-strong", "aedm (strong steering)"),
                           (f"aedm-mnist-{args.budget}-nosteer", "aedm (no steering)")):
            a = work / run / "queries.h5"
            if a.exists():
                sets[label] = first_rows(a, args.dpr_n, work / f"dpr-{run}-queries.h5")
        for m in filter(None, args.baselines.split(",")):
            q = work / f"{m}-mnist-{args.budget}" / "queries.h5"
            if q.exists():
                sets[m] = first_rows(q, args.dpr_n, work / f"dpr-{m}-queries.h5")
        for dist in ("uniform", "gaussian"):
            p = work / f"dpr-noise-{dist}.h5"
            if not p.exists():
                sh([*tool("kd-gen-queries"), "noise", "-n", str(args.dpr_n), "--shape", "1x28x28", "--dist", dist, "-o", str(p)], log)
            sets[f"noise ({dist})"] = p
        p = work / "dpr-mnist-test.h5"
        if not p.exists():
            sh([*tool("kd-gen-queries"), "dataset", "--data", "mnist", "--split", "test", "-n", str(args.dpr_n), "-o", str(p)], log)
        sets["MNIST test images (legitimate)"] = p
        p = work / "dpr-fmnist-test.h5"
        if not p.exists():
            sh([*tool("kd-gen-queries"), "dataset", "--data", "fashion-mnist", "--split", "test", "-n", str(args.dpr_n), "-o", str(p)], log)
        sets["Fashion-MNIST test images (the prior's public data)"] = p
        dpr += pass_rates(work, mnist_v, sets, log, "both") + pass_rates(work, mnist_v, sets, log, "low")
    if "dpr-fmnist" in only:
        # The reverse setting: the Fashion-MNIST victim behind the defence (thresholds learned on its own
        # training images), AEDM's queries from the MNIST prior, the data-free attacks' queries from issue
        # #4's Fashion-MNIST runs (their images do not depend on the answer mode).
        fmnist_v = victim("fashion-mnist", args.fmnist_victim, work, 4)
        sets = {}
        a = work / f"aedm-fmnist-{args.fmnist_budget}" / "queries.h5"
        if a.exists():
            sets["aedm"] = first_rows(a, args.dpr_n, work / f"dpr-aedm-fmnist-{args.fmnist_budget}-queries.h5")
        for m in ("tandemgan", "dfme", "ideal"):
            q = Path(args.extraction_runs) / f"fmnist-label-{m}-100000" / "queries.h5"
            if q.exists():
                sets[m] = first_rows(q, args.dpr_n, work / f"dpr-fmnist-{m}-queries.h5")
        for dist in ("uniform", "gaussian"):
            sets[f"noise ({dist})"] = work / f"dpr-noise-{dist}.h5"
            if not sets[f"noise ({dist})"].exists():
                sh([*tool("kd-gen-queries"), "noise", "-n", str(args.dpr_n), "--shape", "1x28x28", "--dist", dist, "-o",
                    str(sets[f"noise ({dist})"])], log)
        for data, label in (("fashion-mnist", "Fashion-MNIST test images (legitimate)"),
                            ("mnist", "MNIST test images (the prior's public data)")):
            p = work / f"dpr-{'fmnist' if data == 'fashion-mnist' else data}-test.h5"
            if not p.exists():
                sh([*tool("kd-gen-queries"), "dataset", "--data", data, "--split", "test", "-n", str(args.dpr_n), "-o", str(p)], log)
            sets[label] = p
        dpr += (pass_rates(work, fmnist_v, sets, log, "both", "fashion-mnist", "-fmnist")
                + pass_rates(work, fmnist_v, sets, log, "low", "fashion-mnist", "-fmnist"))

    settings = (f"substitute lenet5, batch {args.batch_size}, AEDM sampler {args.sampler_steps} DDIM steps, steering "
                f"{args.steer_steps} Adam steps (lr 0.01), online Adam 1e-3 + {args.replay_steps} replay steps; post-training "
                f"{args.post_epochs} epochs (kd-distill --augment) on each run's own log, and plain post-training "
                f"(kd-distill {' '.join(POST_TRAIN_ARGS)}, no augmentation), and the same with --class-balance 1; "
                f"baselines {args.baselines} at {args.baseline_budgets} queries")
    print(f"# AEDM benchmark ({settings})\n")
    if results:
        print("| target | method | budget | real oracle calls | substitute acc. (online) | after post-training (paper: "
              "augmented) | after plain post-training (no augmentation) | after balanced plain post-training "
              "(--class-balance 1) | attack time |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['target']} | {r['method']} | {r['budget']:,} | {r['calls']:,} | {pct(r['online'])} | "
                  f"{pct(r['post'])} | {pct(r['post_plain'])} | {pct(r['post_balanced'])} | {r['seconds']} s |")
    for victim_data in dict.fromkeys(r.get("victim", "mnist") for r in dpr):
        both = {r["queries"]: r for r in dpr if r["sides"] == "both" and r.get("victim", "mnist") == victim_data}
        low = {r["queries"]: r for r in dpr if r["sides"] == "low" and r.get("victim", "mnist") == victim_data}
        print(f"\n{victim_data} victim, thresholds learned on its training images:\n")
        print("| queries (first N of each run's log) | N | pass rate, entropy outside [q01, q99] rejected | "
              "pass rate, entropy below q01 rejected |")
        print("|---|---|---|---|")
        for name, r in both.items():
            print(f"| {name} | {r['n']} | {r['passed']:.3f} | {low[name]['passed']:.3f} |")
    # a partial run (--only) keeps its own file, so it never overwrites the full run's results
    out = "results.json" if only == set(ap.get_default("only").split(",")) else f"results-{'-'.join(sorted(only))}.json"
    # one process per baseline (or per budget) must not overwrite the other's file
    for opt in ("baselines", "baseline_budgets"):
        if getattr(args, opt) != ap.get_default(opt):
            out = out.replace(".json", f"-{getattr(args, opt).replace(',', '-')}.json")
    (work / out).write_text(json.dumps({"results": results, "dpr": dpr, "settings": settings}, indent=1))


if __name__ == "__main__":
    main()
