"""kd-eval fid and kdtools.fid: the Fréchet distance by hand, classifier features, the command and its bad inputs."""

import json

import numpy as np
import pytest
import torch

from conftest import kd
from kdtools.fid import ClassifierFeatures, FeatureStats, feature_stats, fid, frechet_distance, RawFeatures


def test_frechet_distance_by_hand():
    a = FeatureStats(np.array([0.0]), np.array([[1.0]]), 10)
    b = FeatureStats(np.array([1.0]), np.array([[4.0]]), 10)
    assert frechet_distance(a, b) == pytest.approx(1 + 1 + 4 - 2 * 2)  # (m1-m2)^2 + s1 + s2 - 2 sqrt(s1 s2)
    c = FeatureStats(np.array([0.0, 0.0]), np.diag([1.0, 4.0]), 10)
    d = FeatureStats(np.array([3.0, 4.0]), np.diag([4.0, 1.0]), 10)
    assert frechet_distance(c, d) == pytest.approx(25 + 10 - 2 * (2 + 2))
    f = torch.randn(500, 6, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(feature_stats(f), feature_stats(f)) == pytest.approx(0.0, abs=1e-8)
    assert fid(f, f + 1.0, RawFeatures())["fid"] == pytest.approx(6.0, rel=1e-6)  # a shift of 1 in 6 dimensions


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    from kdtools.models import ImageClassifier
    from kdtools.weights import save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lenet") / "lenet.safetensors"
    save_model(ImageClassifier("lenet5", (1, 28, 28), 10), path, {"made_by": "tests"})
    return path


def _write(path, x):
    from kdtools.h5store import write_samples
    from kdtools.stream import StreamHeader, dtype_name

    header = StreamHeader(kind="samples", fields={"x": {"dtype": dtype_name(x.dtype), "shape": list(x.shape[1:])}})
    write_samples(path, header, [{"x": x}])
    return path


def test_classifier_features_are_the_penultimate_layer(lenet):
    f = ClassifierFeatures(str(lenet))
    x = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8)  # resized to the model's 28x28
    assert f(x).shape == (5, 84)


def test_kd_eval_fid_command(lenet, tmp_path):
    from kdtools.data import load_dataset

    ds = load_dataset("digits", "train")
    a = _write(tmp_path / "a.h5", ds.x[:300])
    b = _write(tmp_path / "b.h5", ds.x[300:600])
    noise = _write(tmp_path / "noise.h5", torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8))
    same = kd("kd-eval", "fid", a, "--ref", a, "--features", f"lenet:{lenet}", "--json")
    assert same.returncode == 0, same.stderr.decode()
    assert json.loads(same.stdout)["fid"] == pytest.approx(0.0, abs=1e-3)
    close = json.loads(kd("kd-eval", "fid", a, "--ref", b, "--features", f"lenet:{lenet}", "--json", check=True).stdout)
    far = json.loads(kd("kd-eval", "fid", noise, "--ref", b, "--features", str(lenet), "--json", check=True).stdout)
    assert 0 < close["fid"] < far["fid"] and close["feature_dim"] == 84 and close["samples"] == 300
    assert not close["few_samples"] and b"singular" not in same.stderr
    # 40 rows for 84 features: a number still comes out, with one plain warning and no scipy noise
    few = kd("kd-eval", "fid", a, "--ref", b, "-n", "40", "--features", f"lenet:{lenet}", "--json", check=True)
    assert json.loads(few.stdout)["few_samples"] is True
    assert b"FID from 40 rows with 84 features" in few.stderr and b"LinAlgWarning" not in few.stderr
    # a dataset name as the reference
    p = kd("kd-eval", "fid", a, "--ref", "digits", "--ref-split", "test", "--features", f"lenet:{lenet}", "--json")
    assert p.returncode == 0, p.stderr.decode()
    assert json.loads(p.stdout)["reference"] == 300


def test_kd_eval_fid_bad_inputs(lenet, tmp_path):
    a = _write(tmp_path / "a.h5", torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8))
    small = _write(tmp_path / "small.h5", torch.randint(0, 256, (20, 1, 16, 16), dtype=torch.uint8))
    p = kd("kd-eval", "fid", small, "--ref", a, "--features", f"lenet:{lenet}")
    assert p.returncode == 1 and b"shape" in p.stderr and len(p.stderr.decode().strip().splitlines()) == 1
    rgb = _write(tmp_path / "rgb.h5", torch.randint(0, 256, (20, 3, 28, 28), dtype=torch.uint8))
    p = kd("kd-eval", "fid", rgb, "--ref", a, "--features", "raw")
    assert p.returncode == 1 and b"but the reference has" in p.stderr and len(p.stderr.decode().strip().splitlines()) == 1
    pts = _write(tmp_path / "pts.h5", torch.randn(50, 2))
    p = kd("kd-eval", "fid", pts, "--ref", a, "--features", "raw")
    assert p.returncode == 1 and b"but the reference has" in p.stderr and len(p.stderr.decode().strip().splitlines()) == 1
    p = kd("kd-eval", "fid", a, "--ref", a, "--features", f"inception:{tmp_path / 'missing.pth'}")
    assert p.returncode == 1 and b"Inception weights" in p.stderr
    p = kd("kd-eval", "fid", a, "--ref", a, "--features", "nonsense")
    assert p.returncode == 2
    pts = _write(tmp_path / "pts.h5", torch.randn(50, 2))
    p = kd("kd-eval", "fid", pts, "--ref", pts, "--features", "raw", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["fid"] == pytest.approx(0.0, abs=1e-9)
    # an empty sample file (a run stopped before its first batch) or reference: one line, not a torch.cat error
    one = _write(tmp_path / "one.h5", torch.randn(1, 2))
    for args in ((one, "--ref", pts), (pts, "--ref", one)):
        p = kd("kd-eval", "fid", *args, "--features", "raw")
        assert p.returncode == 1 and b"FID needs at least 2" in p.stderr and len(p.stderr.decode().strip().splitlines()) == 1


def test_non_finite_samples_are_named_not_a_linear_algebra_error():
    from kdtools.errors import KdError

    x = torch.rand(20, 2)
    bad = x.clone()
    bad[5, 0] = float("nan")
    with pytest.raises(KdError, match=r"the samples: NaN or infinite values in 1 row \(first at row 5\)"):
        fid(bad, x, RawFeatures())
    with pytest.raises(KdError, match="the reference"):
        fid(x, bad, RawFeatures())
