import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

# `make test` runs two pytest workers (pytest-xdist) on CI's two cores. Each worker, and every kd- command
# it starts, then uses one torch thread: two workers with two threads each would fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("OMP_NUM_THREADS", "").isdigit():
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402  (after the thread count is fixed)

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]


def kd(tool: str, *args, input: bytes | None = None, check: bool = False, env: dict | None = None, **kw):
    """Run a kd- command as a user would, through `python -m` of its CLI module."""
    module = "kdtools.cli." + tool.removeprefix("kd-").replace("-", "_")
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    p = subprocess.run([sys.executable, "-m", module, *map(str, args)], input=input, capture_output=True, env=e, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{tool} {args} failed ({p.returncode}):\n{p.stderr.decode()}")
    return p


def kd_cmd(tool: str) -> list[str]:
    return [sys.executable, "-m", "kdtools.cli." + tool.removeprefix("kd-").replace("-", "_")]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def victim_path(tmp_path_factory) -> Path:
    """A small but real victim: LeNet-5 trained for a few epochs on the digits train split."""
    from kdtools.data import load_dataset
    from kdtools.models import ImageClassifier
    from kdtools.train import TrainConfig, data_normalization, targets_from, train
    from kdtools.weights import save_model

    ds = load_dataset("digits", "train")
    mean, std = data_normalization(ds.x)
    model = ImageClassifier("lenet5", ds.shape, 10, {}, mean, std)
    train(model, ds.x, targets_from({"label": ds.y}, 10), TrainConfig(epochs=8, optimizer="adam", lr=0.003), torch.device("cpu"))
    path = tmp_path_factory.mktemp("victim") / "victim.safetensors"
    save_model(model, path, {"made_by": "tests"})
    return path


@pytest.fixture(scope="session")
def queries_path(tmp_path_factory) -> Path:
    """600 digits 'public' images as a query stream file."""
    path = tmp_path_factory.mktemp("queries") / "queries.kds"
    kd("kd-gen-queries", "dataset", "--data", "digits", "--split", "public", "-n", 600, "--batch-size", 100, "-o", path, check=True)
    return path


def kd_data() -> Path | None:
    v = os.environ.get("KD_DATA")
    return Path(v) if v and Path(v).is_dir() else None


COUNTING_CHILD = """
# An exec: oracle that answers with a model file's probabilities and, before answering each batch, appends
# its row count to a file: an independent count of what the oracle was really sent (tests compare it
# with the budget and with the query log the caller keeps).
import sys
sys.path.insert(0, {root!r})
from kdtools.oracle import ModelOracle
from kdtools.stream import StreamHeader, StreamReader, StreamWriter
from kdtools.weights import load_model

oracle = ModelOracle(load_model({victim!r}))
reader = StreamReader(sys.stdin.buffer, "stdin")
out = StreamWriter(sys.stdout.buffer, StreamHeader("samples", {{"probs": {{"dtype": "float32", "shape": [oracle.num_classes]}}}},
                                                   oracle.num_classes, mode="probs"))
for batch in reader:
    with open({count!r}, "a") as f:
        f.write(f"{{batch['x'].shape[0]}}\\n")
    out.write(oracle.answer(batch["x"].float(), "probs"))
out.close()
"""


def counting_exec_oracle(directory: Path, victim: Path) -> tuple[str, Path]:
    """(oracle spec, count file): an exec: oracle over ``victim`` that records every batch it receives."""
    script, count = directory / "counting_oracle.py", directory / "received.txt"
    script.write_text(COUNTING_CHILD.format(root=str(ROOT), victim=str(victim), count=str(count)))
    return f"exec:{sys.executable} {script}", count


def rows_received(count: Path) -> int:
    return sum(int(line) for line in count.read_text().split()) if count.exists() else 0


def write_csv(path, rows, header=("task", "worker", "label")):
    """A crowd label CSV (header, then one row per label)."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def one_error_line(r, code, *needles):
    """A failed command: exit ``code``, exactly one stderr line, an 'error:' line holding every needle, no traceback."""
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    return lines[0]


def through_fifo(fifo: Path, write) -> bytes:
    """Make ``fifo`` a named pipe, run ``write(fifo)`` while a thread reads it, and return what arrived. Asserts
    that the path is still a FIFO afterwards (a writer that renames a temporary file over its output replaces it)."""
    import stat
    import threading

    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo, "rb").read()))
    reader.start()
    write(fifo)
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), f"{fifo} is no longer a FIFO"
    assert received, f"nothing was read from {fifo}"
    return received[0]


def torchrun_failure(stderr: bytes) -> str:
    """What a failed torchrun run said, for an assertion message: the ranks' own lines first (a gloo abort's
    "terminate called ... what(): ..." or a traceback's last line), then the tail of torchrun's summary, which
    alone says only which rank died of which signal."""
    text = stderr.decode(errors="replace")
    own = [line for line in text.splitlines() if "torch/distributed/elastic" not in line and "ChildFailedError" not in line]
    return "\n".join(own[:40])[-3000:] + "\n...\n" + text[-1200:]
