"""Benchmark of CAKE (kd-gen-queries cake): a LeNet-5-half student mimics a LeNet-5 teacher without data.

The poster's setting (../shared/papers/cake-classifier-mimicry-poster.txt, "CAKE vs. Others"): LeNet-5
teacher, LeNet-5-half student, MNIST 98.4 +- 0.18 % and Fashion-MNIST 76.5 +- 1.01 %. Each data set runs,
in the same benchmark and with the same student training:

  cake     kd-gen-queries cake (the authors' defaults: 256 sets of 100, 500 SGD steps, eta 0.1 -> 1e-5,
           weights 1e3 / 1e1 / 1e5) with the data set's public normalisation constants
  noise    as many uniform-noise images (kd-gen-queries noise), the floor any synthesis must beat

Every query is answered by the teacher through kd-query --mode probs (logged), and the student is trained on
the log by kd-distill with the benchmarks' post-training settings (Adam 1e-3, 30 epochs, batch 128: a LeNet
without batch norm, see benchmarks/extraction.py; the authors train with SGD 0.1 and a one-cycle schedule).
Teachers: the extraction benchmark's victims (trained by kd-distill when missing). Finished steps are kept,
so a stopped run continues where it was (CAKE's finished sets too: kd-gen-queries cake --resume).

  KD_DATA=../shared/data python benchmarks/cake.py --datasets mnist fashion-mnist

Another student recipe on the same logs (no new teacher call), kept beside the first under its own name:

  KD_DATA=../shared/data python benchmarks/cake.py --methods cake --student-name sgd01 \
      --train-args "--epochs 30 --optimizer sgd --lr 0.1 --schedule cosine --weight-decay 5e-4 --batch-size 128"
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extraction import PIXELS, POST_TRAIN_ARGS, finished, resumable, sh, test_accuracy, tool, victim  # noqa: E402

PAPER = {"mnist": "98.4 +- 0.18", "fashion-mnist": "76.5 +- 1.01"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="*", default=["mnist", "fashion-mnist"], choices=list(PAPER))
    ap.add_argument("--methods", nargs="*", default=["cake", "noise"], choices=["cake", "noise"])
    ap.add_argument("-n", type=int, default=25_600, help="Queries per method (the paper: 256 sets of 100).")
    ap.add_argument("--cake-args", default="", help="Extra kd-gen-queries cake flags, e.g. '--steps 200'.")
    ap.add_argument("--student", default="lenet5-half")
    ap.add_argument("--train-args", default=shlex.join(POST_TRAIN_ARGS), help="kd-distill's training flags for the student.")
    ap.add_argument("--student-name", default="student", help="File name of the student (another recipe: another name).")
    ap.add_argument("--mnist-victim")
    ap.add_argument("--fmnist-victim")
    ap.add_argument("--victim-epochs", type=int, default=4)
    ap.add_argument("--work", default="runs/bench-cake")
    ap.add_argument("--victims-work", default="runs/bench-extraction", help="Where missing victims are trained.")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = work / "results.jsonl"
    rows = []
    for ds in args.datasets:
        given = args.mnist_victim if ds == "mnist" else args.fmnist_victim
        teacher = victim(ds, given, Path(args.victims_work), args.victim_epochs)
        teacher_acc = test_accuracy(teacher, ds)
        for method in args.methods:
            tag = f"{ds}-{method}-{args.n}"
            out, log = work / tag, work / f"{tag}.log"
            out.mkdir(exist_ok=True)
            queries, answers, student = out / "queries.kds", out / "queries.h5", out / f"{args.student_name}.safetensors"
            t_gen = t_dist = 0.0
            # a resumed synthesis times only the sets it made: the row says so, the time is not the whole run's
            resumed = Path(str(queries) + ".partial.h5").exists() and not queries.exists()
            if not queries.exists():  # written atomically: present means complete
                if method == "cake":
                    # --resume: the sets a stopped run finished are kept beside the output and not made again
                    cmd = [*tool("kd-gen-queries"), "cake", "--teacher", str(teacher), "-n", str(args.n), *PIXELS[ds],
                           *args.cake_args.split(), "--device", args.device, "-o", str(queries), "--resume"]
                else:
                    cmd = [*tool("kd-gen-queries"), "noise", "--like", str(teacher), "-n", str(args.n), "-o", str(queries)]
                t_gen = sh(cmd, log)
            if not finished(student):  # a log stopped part-way resumes: kd-query pays only for what it lacks
                sh(["sh", "-c", f"{shlex.join(tool('kd-query'))} {shlex.quote(str(teacher))} --mode probs --log "
                                f"{shlex.quote(str(answers))} -q < {shlex.quote(str(queries))} > /dev/null"], log)
            if not finished(student):
                cmd = [*tool("kd-distill"), str(answers), "--arch", args.student, *shlex.split(args.train_args), "--device", args.device,
                       "-q", "-o", str(student)]
                t_dist = sh(cmd + (["--resume", str(student) + ".ckpt"] if resumable(student) else []), log)
            acc = test_accuracy(student, ds)
            row = {"dataset": ds, "method": method, "n": args.n, "student": args.student, "accuracy": acc,
                   "teacher": str(teacher), "teacher_accuracy": teacher_acc, "seconds_synthesis": t_gen, "synthesis_resumed": resumed,
                   "seconds_student": t_dist, "cake_args": args.cake_args, "train_args": args.train_args, "date": time.strftime("%Y-%m-%d %H:%M")}
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            print(f"{ds} {method}: student {100 * acc:.2f} % (teacher {100 * teacher_acc:.2f} %)", flush=True)
    print()
    print(f"student training: kd-distill {args.train_args}")
    print("| data set | queries | method | teacher (LeNet-5) | student | paper (CAKE) | synthesis s | student s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        fmt = lambda s, resumed=False: (f"{s:.0f}" + (" (resumed: the rest only)" if resumed else "")) if s else "(kept)"  # noqa: E731
        print(f"| {r['dataset']} | {r['n']} | {r['method']} | {100 * r['teacher_accuracy']:.2f} | {100 * r['accuracy']:.2f} | "
              f"{PAPER[r['dataset']] if r['method'] == 'cake' else ''} | {fmt(r['seconds_synthesis'], r['synthesis_resumed'])} | {fmt(r['seconds_student'])} |")


if __name__ == "__main__":
    main()
