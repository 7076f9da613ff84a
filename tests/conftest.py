import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
