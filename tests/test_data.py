import pytest
import torch

from conftest import kd_data
from kdtools.data import adapt_images, convert_channels, load_dataset
from kdtools.errors import KdError, KdUsageError
from kdtools.queries import dataset_batches, noise_batches


def test_digits_splits_are_fixed_disjoint_and_mnist_shaped():
    parts = {s: load_dataset("digits", s) for s in ("train", "public", "test")}
    assert [len(p) for p in parts.values()] == [1000, 400, 397]
    assert all(p.shape == (1, 28, 28) and p.x.dtype == torch.uint8 for p in parts.values())
    rows = {s: {bytes(x.numpy()) for x in p.x} for s, p in parts.items()}
    assert not rows["train"] & rows["test"] and not rows["public"] & rows["test"]
    assert torch.equal(load_dataset("digits", "test").x, parts["test"].x)  # same split every time
    with pytest.raises(KdUsageError, match="splits"):
        load_dataset("digits", "validation")


def test_channels_and_resizing():
    grey = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    rgb = convert_channels(grey, 3)
    assert rgb.shape == (2, 3, 8, 8) and torch.equal(convert_channels(rgb, 1), grey)
    ds = adapt_images(load_dataset("digits", "public"), image_size=32, channels=3)
    assert ds.shape == (3, 32, 32) and ds.x.dtype == torch.uint8


def test_image_folder(tmp_path):
    from PIL import Image

    for cls, value in (("cat", 30), ("dog", 220)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 10), (value, value, value)).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(f"folder:{tmp_path}", image_size=16)
    assert ds.shape == (3, 16, 16) and ds.classes == ["cat", "dog"] and ds.y.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(KdUsageError, match="--image-size"):
        load_dataset(f"folder:{tmp_path}")


def test_torchvision_sets_need_a_root_and_say_how_to_get_one(tmp_path):
    with pytest.raises(KdUsageError, match="KD_DATA"):
        load_dataset("mnist", "train", None)
    with pytest.raises(KdError, match="--download") as e:
        load_dataset("mnist", "train", tmp_path)
    assert f"looked in {tmp_path / 'MNIST'}" in str(e.value) and "download=True" not in str(e.value)
    with pytest.raises(KdError, match="cifar-10-batches-py"):
        load_dataset("cifar10", "test", tmp_path)


@pytest.mark.skipif(kd_data() is None, reason="KD_DATA not set")
def test_shared_mnist_and_fashion_mnist_load():
    for name in ("mnist", "fashion-mnist"):
        ds = load_dataset(name, "test", kd_data() / "vision")
        assert len(ds) == 10000 and ds.shape == (1, 28, 28) and ds.num_classes == 10


def test_query_sources_count_and_range():
    batches = list(noise_batches((1, 4, 4), 10, batch_size=4, distribution="gaussian"))
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    assert all(0 <= b["x"].min() and b["x"].max() <= 1 for b in batches)
    ds = load_dataset("digits", "public")
    got = list(dataset_batches(ds, 1000, batch_size=256, augment=True))
    assert sum(b["x"].shape[0] for b in got) == 1000 and got[0]["x"].dtype == torch.uint8


def _labelled_file(path, labels):
    from kdtools.h5store import SampleWriter
    from kdtools.stream import StreamHeader

    header = StreamHeader("samples", {"x": {"dtype": "uint8", "shape": [1, 4, 4]}, "label": {"dtype": "int64", "shape": []}},
                          num_classes=3, mode="label")
    with SampleWriter(path, header, resume=False) as w:
        if labels:
            w.append({"x": torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8), "label": torch.tensor(labels)})


def test_sample_files_that_hold_nothing_to_score_are_one_clear_error(tmp_path):
    # a missing file is named as such (not an "unknown dataset"), an empty log and one whose every row a defence
    # refused say so (they gave IndexError / RuntimeError from kd-eval accuracy)
    with pytest.raises(KdError, match="no such file"):
        load_dataset(str(tmp_path / "nosuch.h5"))
    _labelled_file(tmp_path / "empty.h5", [])
    with pytest.raises(KdError, match="holds no samples"):
        load_dataset(str(tmp_path / "empty.h5"))
    _labelled_file(tmp_path / "refused.h5", [-1, -1])
    with pytest.raises(KdError, match="all 2 rows are queries a defence refused"):
        load_dataset(str(tmp_path / "refused.h5"))
    _labelled_file(tmp_path / "ok.h5", [-1, 2])
    ok = load_dataset(str(tmp_path / "ok.h5"), "test")
    assert ok.y.tolist() == [2]
    # a file has no splits: reports name the file alone (they said "ok.h5 (test)")
    assert ok.title == str(tmp_path / "ok.h5") and load_dataset("digits", "test").title == "digits (test)"


def test_a_labelled_stream_on_stdin(tmp_path):
    import io

    from kdtools.stream import StreamHeader, StreamWriter

    buf = io.BytesIO()
    w = StreamWriter(buf, StreamHeader("samples", {"x": {"dtype": "uint8", "shape": [1, 4, 4]},
                                                   "label": {"dtype": "int64", "shape": []}}, num_classes=3, mode="label"))
    w.write({"x": torch.zeros(2, 1, 4, 4, dtype=torch.uint8), "label": torch.tensor([0, 1])})
    w.close()
    ds = load_dataset("-", stdin=io.BytesIO(buf.getvalue()))
    assert ds.name == "stdin" and ds.y.tolist() == [0, 1]
