"""Benchmark of kd-diffstep: SFDDM against DDIM step skipping, progressive distillation and a from-scratch
model, all on the same teacher.

  swissroll   2-D Swiss roll (section 6.3.5): a 500-step teacher, students at 50 and 10 steps; sliced
              Wasserstein distance (SW) of 10 000 samples to 10 000 held-out points; teacher/student
              consistency (DDIM from the same noises); distillation wall time.

  nice -n 10 .venv/bin/python benchmarks/diffstep.py swissroll [--quick] [--json out.json]
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


METHODS = ("SFDDM", "DDIM skipping", "progressive", "from scratch")


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
        runs = [("SFDDM", lambda: distill_sfddm(teacher, train, phi, dcfg, cpu, "teacher")),
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
            samplers = [None] + {"SFDDM": ["ddim"], "DDIM skipping": ["ddpm"]}.get(name, [])
            for sampler in samplers:
                value, sample_s = sw(student, sampler)
                cons = consistency(teacher, student, 1000, seed=7)["distance"]
                used = sampler or student.info["default_sampler"]
                rows.append({"method": name, "steps": student.steps, "sampler": used, "sw": value, "train_s": train_s,
                             "sample_s": sample_s, "consistency": cons,
                             "folds": student.info.get("folds")})
                log(f"{name}-{steps} ({used}): SW {value:.4f}, consistency {cons:.4f}, train {train_s:.0f} s")
    return {"benchmark": "swissroll", "teacher_steps": T, "data_floor_sw": floor, "rows": rows, "args": vars(args)}


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
    p.add_argument("benchmark", choices=["swissroll"])
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
    args = p.parse_args()
    if args.quick:
        args.n, args.train_points, args.teacher_iters, args.distill_iters, args.hidden = 1000, 2000, 200, 100, 32
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = swissroll(args)
    result["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)"
    result["seconds"] = time.perf_counter() - t0
    print(table(result))
    print(f"\ntotal {result['seconds']:.0f} s; {result['machine']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
