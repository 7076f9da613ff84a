"""Benchmark of kd-diffstep: SFDDM against DDIM step skipping, progressive distillation and a from-scratch
model, all on the same teacher.

  swissroll   2-D Swiss roll (section 6.3.5): a 500-step teacher, students at 50 and 10 steps; sliced
              Wasserstein distance (SW) of 10 000 samples to 10 000 held-out points; teacher/student
              consistency (DDIM from the same noises); distillation wall time.

  mnist       MNIST images (section 6.3): a 1000-step image teacher (kd-diffstep train --data mnist), students
              at 16 and 100 steps; FID in LeNet-5 feature space against the MNIST test split; teacher/student
              consistency; distillation wall time. The work is split into tasks (teacher sample parts,
              distillations, student samples) claimed through files in --work, so two or more processes
              started with the same arguments share it (one per core) and a killed run resumes.

  nice -n 10 .venv/bin/python benchmarks/diffstep.py swissroll [--quick] [--json out.json]
  KD_DATA=../shared/data .venv/bin/python benchmarks/diffstep.py mnist --teacher DIR --lenet VICTIM --work DIR
      [--teacher DIR] [--work DIR] [--steps 50 10] [--methods SFDDM "DDIM skipping" progressive "from scratch"]

--teacher DIR loads the teacher saved there by an earlier run (or trains it and saves it there), so the
step counts / methods can run as separate processes on one teacher; --work DIR keeps every student.

Prints a markdown table; numbers go to docs/kd-diffstep.md by hand (never hard-coded).
Training budgets: teacher and from-scratch models get --teacher-iters optimiser steps; SFDDM gets
--distill-iters; progressive distillation gets --distill-iters per fold (so more in total).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdtools.diffusion.baselines import ddim_skipping, from_scratch, progressive_distillation  # noqa: E402
from kdtools.diffusion.sampling import consistency, sample  # noqa: E402
from kdtools.diffusion.schedules import Chain, alphas_cumprod_from_betas, make_betas, make_subsequence  # noqa: E402
from kdtools.diffusion.sfddm import distill_sfddm  # noqa: E402
from kdtools.diffusion.swissroll import sliced_wasserstein, swiss_roll  # noqa: E402
from kdtools.diffusion.teachers import DiffusionModel, MLPDenoiser, load_diffusion, save_diffusion  # noqa: E402
from kdtools.diffusion.training import FitConfig, denoising_loss, fit  # noqa: E402


# "SFDDM" is the student network called with its own step index (--student-timesteps own), as every figure before
# 2026-11-21 was measured; "SFDDM aligned" is kd-diffstep's default since then (the teacher's timesteps on phi)
METHODS = ("SFDDM", "SFDDM aligned", "DDIM skipping", "progressive", "from scratch")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def swissroll(args) -> dict:
    cpu = torch.device("cpu")
    T = 500
    train = swiss_roll(args.train_points, "train")
    test = swiss_roll(args.n, "test")
    floor = sliced_wasserstein(swiss_roll(args.n, "train"), test)  # two independent data samples
    acp = alphas_cumprod_from_betas(make_betas(T, "linear", 1e-4 * 1000 / T, 0.02 * 1000 / T))
    chain = Chain(list(range(T)), acp)
    clip = round(float(train.abs().max()) * 1.05 + 0.05, 1)
    info = {"kind": "teacher", "method": "ddpm", "data": {"name": "swissroll", "kind": "tabular", "dim": 2},
            "clip_sample": True, "clip_sample_range": clip, "default_sampler": "ddpm"}
    t0 = time.perf_counter()
    teacher_dir = Path(args.teacher) if args.teacher else None
    if teacher_dir is not None and (teacher_dir / "kdtools.json").exists():
        # reuse a teacher trained by an earlier run of this script (same data, chain and clipping)
        teacher = load_diffusion(teacher_dir)
        log(f"teacher loaded from {teacher_dir}")
        teacher_s = None
    else:
        torch.manual_seed(0)
        net = MLPDenoiser(hidden_dim=args.hidden, num_blocks=3)
        tcfg = FitConfig(iters=args.teacher_iters, batch_size=512, lr=2e-3, ema=0.999)
        net, _ = fit(net, denoising_loss(chain), train, tcfg, cpu)
        teacher = DiffusionModel(net, chain, {**info, "fit": tcfg.to_json()})
        teacher_s = time.perf_counter() - t0
        log(f"teacher trained in {teacher_s:.0f} s")
        if teacher_dir is not None:
            save_diffusion(teacher, teacher_dir)
    if teacher.steps != T or teacher.clip != clip:
        raise SystemExit(f"{teacher_dir}: not a teacher of this benchmark ({teacher.steps} steps, clip {teacher.clip})")

    def sw(model, sampler=None):
        t1 = time.perf_counter()
        x = sample(model, args.n, seed=123, sampler=sampler, batch_size=args.n)
        return sliced_wasserstein(x, test), time.perf_counter() - t1

    rows = []
    t_sw, t_time = sw(teacher)
    rows.append({"method": "teacher (DDPM)", "steps": T, "sampler": "ddpm", "sw": t_sw, "train_s": teacher_s, "sample_s": t_time,
                 "consistency": None})
    log(f"teacher SW {t_sw:.4f} (data floor {floor:.4f})")
    dcfg = FitConfig(iters=args.distill_iters, batch_size=512, lr=1e-3, ema=0.999, hidden_weight=args.hidden_weight)
    for steps in args.steps:
        phi = make_subsequence(T, steps, "uniform")
        runs = [("SFDDM", lambda: distill_sfddm(teacher, train, phi, dcfg, cpu, "teacher", timesteps="own")),
                ("SFDDM aligned", lambda: distill_sfddm(teacher, train, phi, dcfg, cpu, "teacher", timesteps="aligned")),
                ("DDIM skipping", lambda: ddim_skipping(teacher, phi)),
                ("progressive", lambda: progressive_distillation(teacher, train, steps, dcfg, cpu)),
                ("from scratch", lambda: from_scratch(teacher, train, phi, FitConfig(iters=args.teacher_iters, batch_size=512,
                                                                                       lr=2e-3, ema=0.999), cpu))]
        for name, make in runs:
            if name not in args.methods:
                continue
            t1 = time.perf_counter()
            student = make()
            train_s = time.perf_counter() - t1 if name != "DDIM skipping" else 0.0
            if args.work:  # keep every student, so it can be sampled again without retraining
                save_diffusion(student, Path(args.work) / f"{name.replace(' ', '-')}-{steps}")
            # SFDDM with its own posterior sampler and with DDIM; the teacher's network on the same sub-chain
            # also with the posterior sampler, to separate what the sampler costs from what distillation costs
            samplers = [None] + {"SFDDM": ["ddim"], "SFDDM aligned": ["ddim"], "DDIM skipping": ["ddpm"]}.get(name, [])
            for sampler in samplers:
                value, sample_s = sw(student, sampler)
                cons = consistency(teacher, student, 1000, seed=7)["distance"]
                used = sampler or student.info["default_sampler"]
                rows.append({"method": name, "steps": student.steps, "sampler": used, "sw": value, "train_s": train_s,
                             "sample_s": sample_s, "consistency": cons,
                             "folds": student.info.get("folds")})
                log(f"{name}-{steps} ({used}): SW {value:.4f}, consistency {cons:.4f}, train {train_s:.0f} s")
    return {"benchmark": "swissroll", "teacher_steps": T, "data_floor_sw": floor, "rows": rows, "args": vars(args)}


# ---------------------------------------------------------------------------------------------- MNIST

MNIST_STEPS = (16, 100)
T_MNIST = 1000  # the image teacher's steps (the issue's)


def mnist_tasks(args) -> list[dict]:
    """Every unit of work, in the order idle processes take them (so two processes stay busy: one
    samples the teacher while the other distils). A task writes exactly one file (``out``) and needs
    the files in ``needs``."""
    w = Path(args.work)
    parts = [args.part] * (args.teacher_n // args.part) + ([args.teacher_n % args.part] if args.teacher_n % args.part else [])
    teacher_parts = [{"name": f"teacher ddpm part {k}", "kind": "teacher_part", "part": k, "n": n,
                      "out": w / "samples" / f"teacher-{T_MNIST}-ddpm-part{k}.pt", "needs": []} for k, n in enumerate(parts)]
    students = []
    for steps in args.steps:
        for method in args.methods:
            if method == "progressive" and steps != min(args.steps):
                continue  # the issue compares progressive distillation at the smallest step count only
            students.append({"name": f"{method} {steps}", "kind": "student", "method": method, "steps": steps,
                             "out": w / "models" / f"{method.replace(' ', '-')}-{steps}", "needs": []})
    samples = []
    for st in students:
        # DDIM skipping with the posterior sampler (ddpm) is the teacher's network sampled exactly as an SFDDM
        # student is: the row that tells what SFDDM's training changed and what its sampler alone does
        samplers = {"SFDDM": ["ddpm", "ddim"], "SFDDM aligned": ["ddpm", "ddim"], "DDIM skipping": ["ddim", "ddpm"],
                    "progressive": ["ddim"]}[st["method"]]
        for sampler in samplers:
            for n in sorted({args.n, args.teacher_n}):
                if n > args.teacher_n and st["steps"] > min(args.steps):
                    continue  # 10 000 samples at 100 steps cost ~2 h of CPU; compare those at teacher_n
                if n > args.teacher_n and st["method"] == "DDIM skipping" and sampler == "ddpm":
                    continue  # a diagnostic row: teacher_n samples are enough
                samples.append({"name": f"{st['name']} {sampler} n={n}", "kind": "samples", "model": st["out"],
                                "sampler": sampler, "n": n, "steps": st["steps"], "method": st["method"],
                                "out": w / "samples" / f"{st['out'].name}-{sampler}-{n}.pt", "needs": [st["out"]]})
        samples.append({"name": f"{st['name']} consistency", "kind": "student_consistency", "model": st["out"],
                        "out": w / "samples" / f"{st['out'].name}-ddim-consistency.pt",
                        "needs": [st["out"], w / "samples" / "teacher-ddim-consistency.pt"]})
    cons = [{"name": "teacher ddim consistency", "kind": "teacher_consistency", "n": args.consistency_n,
             "out": w / "samples" / "teacher-ddim-consistency.pt", "needs": []}]
    # interleave: the slow teacher parts alternate with the distillations, then the rest
    head = []
    for i in range(max(len(teacher_parts), len(students))):
        head += students[i:i + 1] + teacher_parts[i:i + 1]
    # the 10 000-sample runs last: they only add precision, and can be left out when CPU time runs short
    samples.sort(key=lambda t: t.get("n", 0) > args.teacher_n)
    return head + cons + samples


def _claim(task: dict) -> bool:
    """Take a task through an O_EXCL claim file next to its output; a claim whose process is gone is taken over."""
    claim = Path(str(task["out"]) + ".claim")
    claim.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        except FileExistsError:
            try:
                pid = int(claim.read_text() or "0")
                os.kill(pid, 0)
                return False  # alive: someone else is on it
            except (ValueError, ProcessLookupError):
                claim.unlink(missing_ok=True)  # its process died: take it over
            except PermissionError:
                return False
    return False


def _save_tensor(x: torch.Tensor, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(x, tmp)
    os.replace(tmp, path)


def _run_mnist_task(task: dict, args, teacher, x_train) -> None:
    from kdtools.diffusion.sampling import to_uint8_images

    device = args.torch_device
    kind = task["kind"]
    t0 = time.perf_counter()
    if kind == "teacher_part":
        x = sample(teacher, task["n"], seed=1000 + task["part"], sampler="ddpm", batch_size=args.batch, device=device)
        _save_tensor({"x": to_uint8_images(x.cpu()), "seconds": time.perf_counter() - t0}, task["out"])
    elif kind == "teacher_consistency":
        x_T = torch.randn((task["n"], *teacher.sample_shape), generator=torch.Generator().manual_seed(7))
        x = sample(teacher, task["n"], 7, "ddim", 0.0, args.batch, device, x_T=x_T).cpu()
        _save_tensor({"x": x, "x_T": x_T, "seconds": time.perf_counter() - t0}, task["out"])
    elif kind == "student":
        steps, method = task["steps"], task["method"]
        iters = args.progressive_iters if method == "progressive" and args.progressive_iters else args.distill_iters
        dcfg = FitConfig(iters=iters, batch_size=args.distill_batch, lr=args.distill_lr, ema=0.999,
                         hidden_weight=args.hidden_weight)
        if method.startswith("SFDDM"):
            student = distill_sfddm(teacher, x_train, make_subsequence(T_MNIST, steps, "uniform"), dcfg, device, "teacher",
                                    timesteps="aligned" if method == "SFDDM aligned" else "own")
        elif method == "DDIM skipping":
            student = ddim_skipping(teacher, make_subsequence(T_MNIST, steps, "uniform"))
        else:
            student = progressive_distillation(teacher, x_train, steps, dcfg, device)
        student.info.setdefault("stats", {})["wall_seconds"] = time.perf_counter() - t0
        save_diffusion(student, task["out"])  # built under a temporary name and renamed
    elif kind == "samples":
        student = load_diffusion(task["model"])
        x = sample(student, task["n"], seed=123, sampler=task["sampler"], batch_size=args.batch, device=device)
        _save_tensor({"x": to_uint8_images(x.cpu()), "seconds": time.perf_counter() - t0}, task["out"])
    elif kind == "student_consistency":
        student = load_diffusion(task["model"])
        ref = torch.load(Path(args.work) / "samples" / "teacher-ddim-consistency.pt", weights_only=True)
        x = sample(student, ref["x_T"].shape[0], 7, "ddim", 0.0, args.batch, device, x_T=ref["x_T"]).cpu()
        dist = ((ref["x"].clamp(-1, 1) - x.clamp(-1, 1)).abs() / 2).mean().item()
        _save_tensor({"distance": torch.tensor(dist), "n": torch.tensor(ref["x_T"].shape[0])}, task["out"])
    log(f"[{os.getpid()}] done: {task['name']} ({time.perf_counter() - t0:.0f} s)")


def mnist(args) -> dict:
    from kdtools.data import load_dataset

    if not (args.teacher and args.work and args.lenet):
        raise SystemExit("mnist needs --teacher DIR (a kd-diffstep train --data mnist directory), --lenet WEIGHTS and --work DIR")
    root = Path(os.environ.get("KD_DATA", "")) / "vision"
    teacher = load_diffusion(args.teacher)
    if teacher.steps != T_MNIST or teacher.data.get("kind") != "image":
        raise SystemExit(f"{args.teacher}: expected a {T_MNIST}-step image teacher, got {teacher.steps} steps")
    size = int(teacher.data["image_size"])
    x_train = load_dataset("mnist", "train", root, image_size=size, channels=1).x
    x_train = x_train if x_train.dtype == torch.uint8 else (x_train.clamp(0, 1) * 255).round().to(torch.uint8)
    tasks = mnist_tasks(args)
    if not args.report_only:
        pending = [t for t in tasks if not t["out"].exists()]
        while pending:
            ready = [t for t in pending if all(Path(n).exists() for n in t["needs"])]
            took = next((t for t in ready if _claim(t)), None)
            if took is None:
                if not any(Path(str(t["out"]) + ".claim").exists() for t in pending):
                    raise SystemExit("tasks are waiting for files no process is making")
                time.sleep(10)  # everything left is being done by, or waits for, another process
            else:
                try:
                    if not took["out"].exists():
                        _run_mnist_task(took, args, teacher, x_train)
                finally:
                    Path(str(took["out"]) + ".claim").unlink(missing_ok=True)
            pending = [t for t in tasks if not t["out"].exists()]
    return mnist_report(args, teacher, tasks, size)


def mnist_report(args, teacher, tasks, size) -> dict:
    from kdtools.data import load_dataset
    from kdtools.fid import ClassifierFeatures, fid

    root = Path(os.environ.get("KD_DATA", "")) / "vision"
    ref = load_dataset("mnist", "test", root, image_size=size, channels=1).x
    ref = ref if ref.dtype == torch.uint8 else (ref.clamp(0, 1) * 255).round().to(torch.uint8)
    features = ClassifierFeatures(args.lenet, args.torch_device)
    w = Path(args.work)
    parts = [torch.load(t["out"], weights_only=True) for t in tasks if t["kind"] == "teacher_part"]
    x_teacher = torch.cat([p["x"] for p in parts])
    rows = [{"method": "teacher", "steps": T_MNIST, "sampler": "ddpm", "n": int(x_teacher.shape[0]),
             "fid": fid(x_teacher, ref, features)["fid"], "train_s": (teacher.info.get("stats") or {}).get("seconds"),
             "sample_s": sum(p["seconds"] for p in parts), "consistency": None}]
    floor = fid(ref[:x_teacher.shape[0]], load_dataset("mnist", "train", root, image_size=size, channels=1).x[:10000], features)["fid"]
    for t in tasks:
        if t["kind"] != "samples" or not t["out"].exists():
            continue  # --report-only before every task is done: report what is there
        s = torch.load(t["out"], weights_only=True)
        student = load_diffusion(t["model"])
        cons_file = w / "samples" / f"{t['model'].name}-ddim-consistency.pt"
        cons = torch.load(cons_file, weights_only=True) if cons_file.exists() else None
        stats = student.info.get("stats") or {}
        rows.append({"method": t["method"], "steps": t["steps"], "sampler": t["sampler"], "n": t["n"],
                     "fid": fid(s["x"], ref, features)["fid"], "train_s": stats.get("seconds", 0.0) if t["method"] != "DDIM skipping" else 0.0,
                     "sample_s": s["seconds"], "consistency": None if cons is None else float(cons["distance"]),
                     "folds": student.info.get("folds")})
    if args.figure:
        strips = [("teacher, 1000 DDPM steps", x_teacher)] + [
            (f"{t['method']}, {t['steps']} steps ({t['sampler']})", torch.load(t["out"], weights_only=True)["x"])
            for t in tasks if t["kind"] == "samples" and t["n"] == args.teacher_n and t["out"].exists()]
        sample_rows_figure(strips, args.figure)
    return {"benchmark": "mnist", "teacher_steps": T_MNIST, "image_size": size, "teacher": str(args.teacher),
            "features": features.name, "reference": int(ref.shape[0]), "data_floor_fid": floor, "rows": rows, "args": vars(args)}


def sample_rows_figure(strips: list, path: str, per_row: int = 12) -> None:
    """One labelled row of the first samples of each model (the same noise seeds for every student)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(strips), 1, figsize=(per_row * 0.6 + 3.6, len(strips) * 0.75))
    for ax, (name, x) in zip(axes, strips):
        row = torch.cat([img[0] for img in x[:per_row]], dim=1)  # (H, per_row * W), uint8
        ax.imshow(row.numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mnist_table(result: dict) -> str:
    t_fid = result["rows"][0]["fid"]
    lines = [f"FID in LeNet-5 feature space ({result['features']}) against the {result['reference']} MNIST test images; "
             f"data floor ({result['rows'][0]['n']} test images vs 10 000 training images): {result['data_floor_fid']:.2f}", "",
             "| method | steps | sampler | samples | FID | vs teacher | teacher/student DDIM distance | distill time (s) | sampling (s) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(result["rows"], key=lambda r: (-r["steps"] if r["method"] == "teacher" else 0, r["n"], r["steps"], r["method"])):
        cons = "" if r["consistency"] is None else f"{r['consistency']:.4f}"
        train_s = "" if r["train_s"] is None else f"{r['train_s']:.0f}"
        name = r["method"] + (f" ({r['folds']} folds)" if r.get("folds") else "")
        same_n = r["n"] == result["rows"][0]["n"]
        vs = f"{r['fid'] / t_fid:.2f}x" if same_n else "(other n)"
        lines.append(f"| {name} | {r['steps']} | {r['sampler']} | {r['n']} | {r['fid']:.2f} | {vs} | {cons} | {train_s} | {r['sample_s']:.0f} |")
    return "\n".join(lines)


def table(result: dict) -> str:
    t_sw = result["rows"][0]["sw"]
    lines = [f"data floor (train vs held-out sample): SW {result['data_floor_sw']:.4f}", "",
             "| method | steps | sampler | SW to held-out | vs teacher | teacher/student DDIM distance | distill time (s) | sampling 10k (s) |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        cons = "" if r["consistency"] is None else f"{r['consistency']:.4f}"
        train_s = "" if r["train_s"] is None else f"{r['train_s']:.0f}"
        name = r["method"] + (f" ({r['folds']} folds)" if r.get("folds") else "")
        lines.append(f"| {name} | {r['steps']} | {r['sampler']} | {r['sw']:.4f} | {r['sw'] / t_sw:.2f}x | {cons} | {train_s} | {r['sample_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benchmark", choices=["swissroll", "mnist"])
    p.add_argument("--quick", action="store_true", help="tiny budgets, to check the script runs")
    p.add_argument("--n", type=int, default=10000, help="samples and held-out points")
    p.add_argument("--train-points", type=int, default=20000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--teacher-iters", type=int, default=6000)
    p.add_argument("--distill-iters", type=int, default=2000)
    p.add_argument("--hidden-weight", type=float, default=0.1)
    p.add_argument("--steps", type=int, nargs="+", default=[50, 10])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="which students to build")
    p.add_argument("--teacher", help="teacher directory: loaded if it holds one, else the trained teacher is saved there")
    p.add_argument("--work", help="save every student under this directory")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the raw results here")
    g = p.add_argument_group("mnist")
    g.add_argument("--lenet", help="MNIST classifier weights whose penultimate layer gives the FID features")
    g.add_argument("--teacher-n", type=int, default=1000, help="teacher samples (1000 DDPM steps each); students are also "
                   "scored at this count, the only FID comparable with the teacher's")
    g.add_argument("--part", type=int, default=250, help="teacher samples per task")
    g.add_argument("--batch", type=int, default=250, help="sampling batch")
    g.add_argument("--consistency-n", type=int, default=100)
    g.add_argument("--distill-batch", type=int, default=64)
    g.add_argument("--distill-lr", type=float, default=2e-4)
    g.add_argument("--progressive-iters", type=int, help="steps per progressive fold (default: --distill-iters)")
    g.add_argument("--report-only", action="store_true", help="print the table from the finished tasks in --work")
    g.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N: where sampling, distillation and the FID "
                   "features run (the noises are drawn on the CPU, so every device starts from the same ones)")
    g.add_argument("--figure", help="also write a PNG: the first samples of the teacher and of every student")
    args = p.parse_args()
    if args.benchmark == "mnist":
        if "--steps" not in sys.argv:
            args.steps = list(MNIST_STEPS)
        args.methods = [m for m in args.methods if m != "from scratch"]
    if args.quick and args.benchmark == "mnist":
        args.n, args.teacher_n, args.part, args.batch, args.consistency_n, args.distill_iters, args.distill_batch = 8, 8, 4, 8, 4, 3, 8
    elif args.quick:
        args.n, args.train_points, args.teacher_iters, args.distill_iters, args.hidden = 1000, 2000, 200, 100, 32
    torch.set_num_threads(args.threads)
    from kdtools.device import resolve_device

    args.torch_device = resolve_device(args.device)
    t0 = time.perf_counter()
    result = swissroll(args) if args.benchmark == "swissroll" else mnist(args)
    result["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)"
    if args.torch_device.type == "cuda":
        result["machine"] += f", {torch.cuda.get_device_name(args.torch_device)}"
    result["seconds"] = time.perf_counter() - t0
    print(table(result) if args.benchmark == "swissroll" else mnist_table(result))
    print(f"\ntotal {result['seconds']:.0f} s; {result['machine']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
