"""CAKE (kd-gen-queries cake): the loss terms and step-size schedule against hand-computed values, the
synthesis loop on a small teacher, and the command through a real pipe into kd-query and kd-distill."""

import math
import os
import pty
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from kdtools.errors import KdError, KdUsageError
from kdtools.extract.cake import (CakeConfig, cake_losses, recorded_normalization, row_targets, step_size, synthesise,
                                  total_variation)
from kdtools.h5store import log_info, read_header
from kdtools.models import ImageClassifier
from kdtools.sources import open_samples, partial_path, partial_rows, write_through_partial
from kdtools.weights import Ensemble, load_model
from kdtools.stream import StreamReader

from conftest import kd, kd_cmd


def test_step_size_falls_by_the_decades_in_log10():
    # linear in log10(eta): 0.1, 0.01, 0.001, 0.0001 over 4 sets with 4 decades (the end value 1e-5 is one past the last)
    assert [step_size(m, 4, 0.1, 4.0) for m in range(4)] == pytest.approx([0.1, 1e-2, 1e-3, 1e-4])
    # cosine: log10 eta = -1 - 4 + 2 (1 + cos(pi m / 4)) -> -1, -1.5858, -3, -4.4142
    assert [math.log10(step_size(m, 4, 0.1, 4.0, "cosine")) for m in range(4)] == pytest.approx(
        [-1.0, -5 + 2 * (1 + math.cos(math.pi / 4)), -3.0, -5 + 2 * (1 + math.cos(3 * math.pi / 4))])
    assert step_size(7, 10, 0.3, 0.0) == pytest.approx(0.3)  # no decay
    with pytest.raises(KdUsageError):
        step_size(0, 4, 0.1, 4.0, "exponential")


def test_total_variation_by_hand():
    z = torch.tensor([[[[0.0, 1.0], [3.0, 3.0]]]])  # one sample, one channel, 2 x 2
    # vertical |3-0|, |3-1| -> mean 2.5; horizontal |1-0|, |3-3| -> mean 0.5
    assert total_variation(z).item() == pytest.approx(3.0)
    two = torch.stack([z[0], torch.zeros(1, 2, 2)])  # a flat second sample halves the mean
    assert total_variation(two).item() == pytest.approx(1.5)
    # one row of pixels: only the horizontal direction exists (mean |1-0|, |5-1| = 2.5), no NaN from the other
    assert total_variation(torch.tensor([[[[0.0, 1.0, 5.0]]]])).item() == pytest.approx(2.5)


def test_cake_losses_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])  # one row of two groups, two classes
    targets = torch.tensor([[0, 1]])
    terms = cake_losses(logits, targets, torch.zeros(1, 2, 1, 3, 3))
    # CE: -log(1/2) and -log(1 / (e^2 + 1)); their mean, times 2 groups
    assert terms["cls"].item() == pytest.approx(math.log(2) + math.log(math.e ** 2 + 1))
    # ordered pairs of the row: (1,2) and (2,1) each |(-2, 0)|^2 = 4, (1,1) and (2,2) 0: mean over 2x2x2 = 1,
    # times 0.5 x groups^2 = 2
    assert terms["contr"].item() == pytest.approx(2.0)
    assert terms["tv"].item() == 0.0


def test_the_contrastive_term_pairs_only_samples_of_the_same_row():
    # random logits of 3 rows x 4 groups x 5 classes against an explicit loop over the pairs inside each row
    logits = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    by_loop = sum(float((logits[r, i] - logits[r, j]).pow(2).sum()) for r in range(3) for i in range(4) for j in range(4))
    expected = by_loop / (3 * 4 * 4 * 5) * 0.5 * 4 ** 2
    got = cake_losses(logits, torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, 1, 2, 2))["contr"].item()
    assert got == pytest.approx(expected, rel=1e-6)
    # pairing groups across rows instead (a swapped layout) gives another value
    swapped = cake_losses(logits.transpose(0, 1).contiguous(), torch.zeros(4, 3, dtype=torch.long),
                          torch.zeros(4, 3, 1, 2, 2))["contr"].item()
    assert abs(swapped - expected) > 1e-3


def test_row_targets_are_different_classes_along_each_row():
    y = row_targets(50, 4, 6, torch.Generator().manual_seed(0))
    assert y.shape == (50, 4) and int(y.min()) >= 0 and int(y.max()) <= 5
    assert all(len(set(row.tolist())) == 4 for row in y)
    assert len(set(y[:, 0].tolist())) == 6  # every class is drawn somewhere


class Linear(nn.Module):
    """A linear teacher on 1x4x4 images that remembers the range of every input it was shown."""

    def __init__(self, classes=3):
        super().__init__()
        torch.manual_seed(1)
        self.fc = nn.Linear(16, classes)
        self.seen = [math.inf, -math.inf]

    def forward(self, x):
        self.seen = [min(self.seen[0], float(x.detach().min())), max(self.seen[1], float(x.detach().max()))]
        return self.fc(x.flatten(1))


def test_synthesise_reaches_the_targets_keeps_pixels_in_range_and_is_reproducible():
    teacher = Linear()
    before = [p.detach().clone() for p in teacher.parameters()]
    # mean 0.2 / std 0.3: N(0, 1) noise alone would put the teacher's inputs far outside [0, 1]
    cfg = CakeConfig(batch_size=12, groups=3, steps=60, lr=0.1, decay_decades=1.0, w_tv=10.0, pixel_mean=(0.2,),
                     pixel_std=(0.3,))
    seen = []
    out = list(synthesise(teacher, (1, 4, 4), 3, 30, cfg, progress=seen.append))
    x = torch.cat([b["x"] for b in out])
    assert x.shape == (30, 1, 4, 4) and [b["x"].shape[0] for b in out] == [12, 12, 6]  # the last set trimmed
    # every input the teacher was shown while the samples were optimised lies in [0, 1] (the projection)
    assert teacher.seen[0] >= -1e-6 and teacher.seen[1] <= 1 + 1e-6
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # and the box is used to its edges
    assert [e.completed for e in seen] == [1, 2, 3] and seen[-1].done and seen[-1].total == 3
    assert [e.info["eta"] for e in seen] == pytest.approx([step_size(m, 3, 0.1, 1.0) for m in range(3)])
    assert all(e.info["on target"] > 0.9 for e in seen)  # a linear teacher: every sample lands on its class's side
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))  # the teacher is never trained
    again = torch.cat([b["x"] for b in synthesise(teacher, (1, 4, 4), 3, 30, cfg)])
    assert torch.equal(x, again)
    other = torch.cat([b["x"] for b in synthesise(teacher, (1, 4, 4), 3, 30, CakeConfig(**{**cfg.__dict__, "seed": 1}))])
    assert not torch.equal(x, other)


@pytest.mark.parametrize("variant", [dict(langevin=True), dict(optimizer="adam", lr=0.05), dict(schedule="cosine")])
def test_the_variants_run_and_reach_the_targets(variant):
    cfg = CakeConfig(**{"batch_size": 9, "groups": 3, "steps": 40, "decay_decades": 1.0, "w_tv": 1.0, **variant})
    seen = []
    x = torch.cat([b["x"] for b in synthesise(Linear(), (1, 4, 4), 3, 18, cfg, progress=seen.append)])
    assert x.shape == (18, 1, 4, 4) and bool(torch.isfinite(x).all())
    assert seen[0].info["on target"] > 0.8


def test_a_teacher_with_batch_norm_and_dropout_is_used_in_eval_mode_and_left_unchanged():
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                            nn.Linear(64, 3))
    teacher.train()
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    a = torch.cat([b["x"] for b in synthesise(teacher, (1, 4, 4), 3, 9, CakeConfig(batch_size=9, groups=3, steps=5))])
    assert not teacher.training
    assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items())  # running stats untouched
    b = torch.cat([b["x"] for b in synthesise(teacher, (1, 4, 4), 3, 9, CakeConfig(batch_size=9, groups=3, steps=5))])
    assert torch.equal(a, b)  # no dropout noise: eval mode


def test_the_normalisation_a_kdtools_teacher_records_is_found():
    one = ImageClassifier("mlp", (3, 4, 4), 3, {}, [0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert recorded_normalization(one) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert recorded_normalization(Ensemble([one, one])) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    other = ImageClassifier("mlp", (3, 4, 4), 3, {}, [0.5] * 3, [0.5] * 3)
    assert recorded_normalization(Ensemble([one, other])) is None  # members disagree: nothing to choose
    assert recorded_normalization(Linear()) is None
    # per-channel values are used per channel: the box keeps each channel's pixels in [0, 1]
    cfg = CakeConfig(batch_size=3, groups=3, steps=3, pixel_mean=(0.1, 0.5, 0.9), pixel_std=(0.2, 0.5, 0.05))
    x = next(synthesise(one, (3, 4, 4), 3, 3, cfg))["x"]
    assert x.shape == (3, 3, 4, 4) and float(x.min()) >= 0 and float(x.max()) <= 1


def test_the_contrastive_term_pulls_a_rows_logits_together():
    teacher = Linear()
    spread = []
    for w_contr in (0.0, 10.0):
        cfg = CakeConfig(batch_size=30, groups=3, steps=80, lr=0.05, decay_decades=0.0, w_cls=1.0, w_contr=w_contr, w_tv=0.0)
        x = torch.cat([b["x"] for b in synthesise(teacher, (1, 4, 4), 3, 30, cfg)])
        with torch.no_grad():
            logits = teacher(x).reshape(10, 3, 3)
        spread.append(float((logits.unsqueeze(1) - logits.unsqueeze(2)).pow(2).mean()))
    assert spread[1] < 0.5 * spread[0]


@pytest.mark.parametrize("bad", [dict(groups=4), dict(batch_size=10, groups=3), dict(schedule="step"),
                                 dict(optimizer="rmsprop"), dict(lr=0.0), dict(w_tv=-1.0), dict(steps=0),
                                 dict(lr=math.inf), dict(w_cls=math.nan), dict(decay_decades=math.nan),
                                 dict(pixel_mean=(math.nan,)), dict(pixel_std=(0.0,)), dict(seed=-1), dict(seed=2 ** 40),
                                 dict(pixel_mean=(0.5, 0.5))])
def test_bad_configurations_are_usage_errors(bad):
    with pytest.raises(KdUsageError):
        next(synthesise(Linear(), (1, 4, 4), 3, 10, CakeConfig(**{"batch_size": 9, "groups": 3, **bad})))


def test_cake_through_a_pipe_into_kd_query_and_kd_distill(victim_path, tmp_path):
    gen = subprocess.Popen(kd_cmd("kd-gen-queries") + ["cake", "--teacher", str(victim_path), "-n", "60", "--batch-size", "20",
                                                        "--steps", "20", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    query = subprocess.Popen(kd_cmd("kd-query") + [str(victim_path), "--mode", "probs", "--log", str(tmp_path / "q.h5")],
                             stdin=gen.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    gen.stdout.close()
    student = tmp_path / "s.safetensors"
    distill = subprocess.run(kd_cmd("kd-distill") + ["--arch", "lenet5-half", "--epochs", "2", "-q", "-o", str(student)],
                             stdin=query.stdout, capture_output=True, timeout=300)
    query.stdout.close()
    assert gen.wait(timeout=300) == 0, gen.stderr.read().decode()
    assert query.wait(timeout=300) == 0, query.stderr.read().decode()
    assert distill.returncode == 0, distill.stderr.decode()
    assert student.exists()
    # the stream records how it was made
    out = kd("kd-gen-queries", "cake", "--teacher", victim_path, "-n", "10", "--batch-size", "10", "--steps", "2",
             "-o", tmp_path / "c.kds", check=True)
    with open(tmp_path / "c.kds", "rb") as f:
        reader = StreamReader(f)
        source = reader.header.extra["generator"]
        rows = sum(b["x"].shape[0] for b in reader)
    assert source["method"] == "cake" and source["steps"] == 2 and source["w_tv"] == 1e5 and rows == 10
    assert b"wrote 10 queries" in out.stderr
    # without --pixel-mean/--pixel-std, the normalisation the teacher file records
    mean, std = recorded_normalization(load_model(victim_path).module)
    assert source["pixel_mean"] == pytest.approx(list(mean)) and source["pixel_std"] == pytest.approx(list(std))


def test_cake_refuses_black_box_teachers_and_impossible_groups(victim_path, tmp_path):
    for spec in ("http://127.0.0.1:9/", "exec:cat", "replay:log.h5"):
        p = kd("kd-gen-queries", "cake", "--teacher", spec, "-n", "5", "-o", tmp_path / "x.kds")
        assert p.returncode == 2 and b"gradients" in p.stderr, p.stderr
    p = kd("kd-gen-queries", "cake", "--teacher", victim_path, "-n", "5", "--groups", "11", "--batch-size", "11",
           "-o", tmp_path / "x.kds")
    assert p.returncode == 2 and b"--groups 11" in p.stderr and not (tmp_path / "x.kds").exists()
    p = kd("kd-gen-queries", "cake", "--teacher", tmp_path / "missing.safetensors", "-n", "5", "-o", tmp_path / "x.kds")
    assert p.returncode == 1 and b"Traceback" not in p.stderr
    p = kd("kd-gen-queries", "cake", "--teacher", victim_path, "-n", "5", "--pixel-mean", "0.5", "-o", tmp_path / "x.kds")
    assert p.returncode == 2 and b"both --pixel-mean and --pixel-std" in p.stderr
    p = kd("kd-gen-queries", "cake", "--teacher", victim_path, "-n", "5", "--pixel-mean", "a", "--pixel-std", "1",
           "-o", tmp_path / "x.kds")
    assert p.returncode == 2 and b"--pixel-mean 'a'" in p.stderr
    # a terminal on stdout is refused before any work (the teacher need not even exist)
    master, slave = pty.openpty()
    try:
        p = subprocess.run(kd_cmd("kd-gen-queries") + ["cake", "--teacher", str(tmp_path / "none"), "-n", "5"], stdout=slave,
                           stderr=subprocess.PIPE, timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    finally:
        os.close(slave)
        os.close(master)
    assert p.returncode == 2 and b"refusing to write a binary stream to a terminal" in p.stderr


def test_write_through_partial_keeps_finished_batches_and_resumes_exactly(tmp_path):
    batches = [{"x": torch.full((3, 1, 2, 2), float(i) / 10)} for i in range(4)]
    options = {"method": "test", "seed": 0, "pixel_mean": (0.5,)}

    def stopped_after(k):  # a run killed while making batch k
        for i, b in enumerate(batches):
            if i == k:
                raise KeyboardInterrupt
            yield b

    out = tmp_path / "q.kds"
    with pytest.raises(KeyboardInterrupt):
        write_through_partial(stopped_after(2), out, options, "v", 3)
    partial = partial_path(out)
    assert not out.exists() and partial.exists()  # the output appears only complete; the two finished batches are kept
    with pytest.raises(KdUsageError, match="--resume"):
        partial_rows(partial, options, resume=False)  # never silently thrown away
    with pytest.raises(KdUsageError, match="other options \\(seed\\)"):
        partial_rows(partial, {**options, "seed": 1}, resume=True)
    kept = partial_rows(partial, options, resume=True)  # (0.5,) compares equal to the stored [0.5]
    assert kept == 6
    assert write_through_partial(iter(batches[kept // 3:]), out, options, "v", 3) == 12
    assert not partial.exists()
    got = open_samples(out)
    assert got.header.extra == {"generator": {"method": "test", "seed": 0, "pixel_mean": [0.5]}, "kdtools": "v"}
    frames = list(got)
    assert [f["x"].shape[0] for f in frames] == [3, 3, 3, 3]  # re-framed as the generator framed it
    assert torch.equal(torch.cat([f["x"] for f in frames]), torch.cat([b["x"] for b in batches]))
    assert partial_rows(partial, options, resume=True) == 0  # nothing left to resume


def test_write_through_partial_refuses_a_directory_that_takes_no_file_before_the_first_batch():
    # /proc exists but takes no new file, even for root (chmod would not stop a root test run)
    made = []

    def batches():
        made.append(1)  # a CAKE set: minutes of work that must not be spent before the refusal
        yield {"x": torch.zeros(1, 1, 2, 2)}

    # no reason given: here TemporaryFile's last attempt fails with "No such file or directory", which would mislead
    with pytest.raises(KdError, match="cannot create a file in /proc$"):
        write_through_partial(batches(), "/proc/kdtools-test.kds", {"method": "test"}, "v", 1)
    assert made == [] and not Path("/proc/kdtools-test.kds.partial.h5").exists()


def test_write_through_partial_names_a_file_standing_where_the_directory_should_be(tmp_path):
    (tmp_path / "runs").write_text("a file, not a directory")
    with pytest.raises(KdError, match="cannot make the directory .*runs/cake"):
        write_through_partial(iter([{"x": torch.zeros(1, 1, 2, 2)}]), tmp_path / "runs/cake/q.kds", {"method": "test"},
                              "v", 1)
    assert (tmp_path / "runs").read_text() == "a file, not a directory"


def test_a_stopped_cake_run_resumes_to_the_uninterrupted_file(victim_path, tmp_path):
    # 20 sets of 40 steps: a few seconds on an idle machine, so a stop one second after the first set lands mid-run
    args = ["cake", "--teacher", str(victim_path), "-n", "1000", "--batch-size", "50", "--steps", "40", "-q"]
    kd("kd-gen-queries", *args, "-o", tmp_path / "whole.h5", check=True)
    part, partial = tmp_path / "part.h5", tmp_path / "part.h5.partial.h5"
    proc = subprocess.Popen(kd_cmd("kd-gen-queries") + args + ["-o", str(part)], stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not partial.exists():
        time.sleep(0.05)
    time.sleep(1.0)  # a few more sets (each well under a second here)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 143
    assert err.strip() == (f"error: terminated (SIGTERM); the sets finished so far are kept in {partial}; the same "
                           "command with --resume continues from them")
    kept = log_info(partial)["rows"]
    assert 0 < kept < 1000 and kept % 50 == 0 and not part.exists()
    before = partial.read_bytes()
    # running over it without --resume, or resuming with other options, is refused and leaves it intact
    p = kd("kd-gen-queries", *args, "-o", part)
    assert p.returncode == 2 and b"--resume continues it" in p.stderr
    p = kd("kd-gen-queries", *args, "-o", part, "--seed", "1", "--resume")
    assert p.returncode == 2 and b"other options (seed)" in p.stderr
    assert partial.read_bytes() == before
    kd("kd-gen-queries", *args, "-o", part, "--resume", check=True)
    assert not partial.exists() and read_header(part).extra == read_header(tmp_path / "whole.h5").extra
    a, b = (np.concatenate([t["x"].numpy() for t in open_samples(f)]) for f in (tmp_path / "whole.h5", part))
    assert a.shape == (1000, 1, 28, 28) and np.array_equal(a, b)
    # a stream on stdout keeps nothing to resume from
    p = subprocess.run(kd_cmd("kd-gen-queries") + args + ["--resume"], capture_output=True)
    assert p.returncode == 2 and b"--resume needs -o FILE" in p.stderr
    assert read_header(part).extra["generator"]["teacher_identity"].startswith("sha256:")


def test_a_resume_after_every_set_was_made_makes_none_again(victim_path, tmp_path):
    # stopped while the output was being made from a full partial, with a short last set (250 = 100 + 100 + 50):
    # the resumed output holds the 250 samples once, in a stream file here
    args = ["cake", "--teacher", str(victim_path), "-n", "250", "--batch-size", "100", "--steps", "3", "-q"]
    kd("kd-gen-queries", *args, "-o", tmp_path / "whole.h5", check=True)  # an .h5 output is its partial renamed
    (tmp_path / "sub").mkdir()
    copy = tmp_path / "sub" / "victim.safetensors"
    copy.write_bytes(Path(victim_path).read_bytes())
    partial = tmp_path / "out" / "q.kds.partial.h5"
    partial.parent.mkdir()
    partial.write_bytes((tmp_path / "whole.h5").read_bytes())
    moved = [a if a != str(victim_path) else str(copy) for a in args]  # the same file under another name
    p = kd("kd-gen-queries", *moved[:-1], "-o", tmp_path / "out" / "q.kds", "--resume", check=True)
    assert b"250 of 250 samples kept" in p.stderr and not partial.exists()
    a, b = (np.concatenate([t["x"].numpy() for t in open_samples(f)]) for f in (tmp_path / "whole.h5", tmp_path / "out" / "q.kds"))
    assert b.shape == (250, 1, 28, 28) and np.array_equal(a, b)
    # a different teacher file (one weight's last byte changed) is another run
    other = tmp_path / "sub" / "other.safetensors"
    other.write_bytes(copy.read_bytes()[:-1] + bytes([copy.read_bytes()[-1] ^ 1]))
    partial.write_bytes((tmp_path / "whole.h5").read_bytes())
    p = kd("kd-gen-queries", *[a if a != str(victim_path) else str(other) for a in args], "-o", tmp_path / "out" / "q.kds", "--resume")
    assert p.returncode == 2 and b"other options (teacher_identity)" in p.stderr and partial.exists()
    # a missing output directory is made, before any set is computed
    kd("kd-gen-queries", *args, "-o", tmp_path / "new" / "dir" / "q.kds", check=True)
    assert (tmp_path / "new" / "dir" / "q.kds").exists()
