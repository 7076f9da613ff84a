import pickle

import pytest
import torch

from kdtools.errors import KdError, KdUsageError
from kdtools.models import ARCHITECTURES, ImageClassifier, count_parameters
from kdtools.weights import Ensemble, load_model, read_metadata, save_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_zoo_architecture_takes_grey_and_colour_images(arch, shape):
    if arch in ("resnet34", "vgg19", "vgg16") and shape[0] == 1:
        pytest.skip("covered by the colour case; keeps the suite fast")
    m = ImageClassifier(arch, shape, 7).eval()
    with torch.no_grad():
        assert m(torch.rand(2, *shape)).shape == (2, 7)


def test_lenet5_half_is_the_halved_lenet5():
    full = ImageClassifier("lenet5", (1, 28, 28), 10)
    half = ImageClassifier("lenet5-half", (1, 28, 28), 10)
    assert full.net.features[0].out_channels == 6 and half.net.features[0].out_channels == 3
    assert count_parameters(half) < count_parameters(full) / 3


def test_torchvision_models_and_unknown_names():
    m = ImageClassifier("torchvision:resnet18", (1, 32, 32), 5).eval()
    with torch.no_grad():
        assert m(torch.rand(1, 1, 32, 32)).shape == (1, 5)
    with pytest.raises(KdUsageError, match="unknown architecture"):
        ImageClassifier("lenet7", (1, 28, 28), 10)


def test_weights_round_trip_rebuilds_the_model_from_the_file_alone(tmp_path):
    m = ImageClassifier("vgg11", (3, 32, 32), 4, {}, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]).eval()
    p = tmp_path / "m.safetensors"
    save_model(m, p, {"lr": 0.1}, {"eval_accuracy": 0.5})
    loaded = load_model(p)
    assert loaded.input_shape == (3, 32, 32) and loaded.num_classes == 4 and loaded.source == "kdtools"
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m(x), loaded.module(x))
    meta = read_metadata(p)
    assert meta["arch"] == "vgg11" and '"lr": 0.1' in meta["options"] and meta["kdtools.version"]
    assert loaded.identity.startswith("sha256:")


def test_torchscript_and_export_victims_are_imported(tmp_path):
    m = ImageClassifier("lenet5-half", (1, 28, 28), 10).eval()
    x = torch.rand(2, 1, 28, 28)
    ts = tmp_path / "victim.pt"
    torch.jit.save(torch.jit.trace(m, x), str(ts))
    loaded = load_model(ts, input_shape=(1, 28, 28))
    assert loaded.source == "torchscript"
    ep = tmp_path / "victim.pt2"  # exported with a dynamic batch, as an oracle needs
    torch.export.save(torch.export.export(m, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}), str(ep))
    loaded2 = load_model(ep, input_shape=(1, 28, 28))
    assert loaded2.source == "export"
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), m(x), atol=1e-5) and torch.allclose(loaded2.module(x), m(x), atol=1e-5)
    # kdtools sets a model's mode before running it, which torch refuses on an exported program's module
    # ("Calling eval() is not supported yet"); an oracle over the .pt2 file must answer all the same
    from kdtools.oracle import open_oracle

    assert loaded2.module.eval() is loaded2.module and not loaded2.module.training
    orc = open_oracle(str(ep), torch.device("cpu"), input_shape=(1, 28, 28))
    assert orc.num_classes == 10
    assert torch.equal(orc.answer(x, "label")["label"], m(x).argmax(1))
    # a program traced for batches of exactly one (the usual export) cannot answer a round: refused at load
    fixed = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(m, (x[:1],)), str(fixed))
    with pytest.raises(KdError, match="exported for a batch size of exactly 1; export it with a dynamic batch"):
        open_oracle(str(fixed), torch.device("cpu"), input_shape=(1, 28, 28))


class WithDropoutAndConstant(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(4 * 6 * 6, 3)
        # a plain tensor attribute, not a buffer: a constant of the exported program. Not 0-dim: a 0-dim CPU
        # tensor mixes with tensors on any device and would hide a constant left behind
        self.scale = torch.tensor([2.0, 1.0, 0.5])

    def forward(self, x):
        return self.fc(self.drop(self.bn(self.conv(x))).flatten(1)) * self.scale


def test_export_victims_traced_in_training_mode_are_refused_and_move_whole(tmp_path):
    m = WithDropoutAndConstant()
    x = torch.rand(3, 1, 8, 8)
    batch = {"x": {0: torch.export.Dim("batch")}}
    trained = tmp_path / "train.pt2"  # dropout on, batch norm on batch statistics: answers change call to call
    torch.export.save(torch.export.export(m.train(), (x,), dynamic_shapes=batch), str(trained))
    with pytest.raises(KdError, match="exported in training mode .*call model.eval\\(\\) before torch.export.export"):
        load_model(trained, input_shape=(1, 8, 8))
    spatial = torch.nn.Sequential(torch.nn.Dropout2d(0.5), torch.nn.Flatten(), torch.nn.Linear(64, 3)).train()
    torch.export.save(torch.export.export(spatial, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(trained))
    with pytest.raises(KdError, match="exported in training mode"):
        load_model(trained, input_shape=(1, 8, 8))
    bounded = tmp_path / "bounded.pt2"  # a batch dimension capped below what kdtools sends at a time
    torch.export.save(torch.export.export(m.eval(), (x,), dynamic_shapes={"x": {0: torch.export.Dim("b", max=4)}}), str(bounded))
    with pytest.raises(KdError, match="exported for batch sizes 0 to 4, and kdtools sends 1 to 1024"):
        load_model(bounded, input_shape=(1, 8, 8))
    good = tmp_path / "eval.pt2"
    torch.export.save(torch.export.export(m.eval(), (x,), dynamic_shapes=batch), str(good))
    loaded = load_model(good, input_shape=(1, 8, 8))
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), m(x), atol=1e-5)
        # moved with torch.export's pass: the constant goes along (nn.Module.to alone would leave it on the CPU),
        # also inside an ensemble; moving to where it is changes nothing
        assert loaded.module.to("cpu").exported is loaded.module.exported
        out = loaded.module.to("meta")(x.to("meta"))
        assert out.device.type == "meta" and out.shape == (3, 3)
        ens = Ensemble([load_model(good, input_shape=(1, 8, 8)).module]).to("meta")
        assert ens(x.to("meta")).device.type == "meta"


def test_short_error_takes_torchscripts_last_line():
    from kdtools.weights import short_error

    trace = "The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript:\n  a\n\nRuntimeError: bad shape\n"
    assert short_error(RuntimeError(trace)) == "RuntimeError: bad shape"
    assert short_error(ValueError("first\nsecond")) == "first" and short_error(KeyError()) == "KeyError"


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_are_refused_unless_trusted(tmp_path):
    m = ImageClassifier("mlp", (1, 8, 8), 3).eval()
    p = tmp_path / "victim.pth"
    torch.save(m, p)
    with pytest.raises(KdError, match="pickled model.*--trust-pickle"):
        load_model(p)
    assert load_model(p, trust_pickle=True).source == "pickle"
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(KdError, match="--trust-pickle"):
        load_model(raw)


def test_state_dict_needs_an_architecture(tmp_path):
    m = ImageClassifier("mlp", (1, 8, 8), 3)
    p = tmp_path / "sd.pt"
    torch.save(m.net.state_dict(), p)
    with pytest.raises(KdUsageError, match="--arch"):
        load_model(p)
    assert load_model(p, arch="mlp", input_shape=(1, 8, 8), num_classes=3).source == "state_dict"


def test_truncated_weights_file(tmp_path):
    p = tmp_path / "m.safetensors"
    save_model(ImageClassifier("lenet5", (1, 28, 28), 10), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(KdError):
        load_model(p)


@pytest.mark.parametrize("field, value, message", [
    ("arch", "nosuch", "field 'arch with its arch_args' is unusable (unknown architecture 'nosuch'"),
    ("input_shape", "[1, 4]", "field 'input_shape' is unusable ('[1, 4]' is not [channels, height, width])"),
    ("input_shape", "[1, 4, 4", "field 'input_shape' is unusable (Expecting ',' delimiter"),
    ("num_classes", "x", "field 'num_classes' is unusable (invalid literal"),
    ("arch_args", '{"hidden": "x"}', "field 'arch with its arch_args' is unusable (architecture mlp cannot be built"),
    ("normalization", "[1]", "field 'normalization' is unusable ('[1]' is not a JSON object)"),
    ("normalization", '{"mean": "x", "std": [1]}', "field 'normalization' is unusable (its mean 'x' is not 1 number, one per channel)"),
    ("normalization", '{"mean": [0.5, 0.5], "std": [1]}', "field 'normalization' is unusable (its mean [0.5, 0.5] is not 1 number"),
    ("input_shape", "[true, 4, 4]", "field 'input_shape' is unusable"),
    ("num_classes", None, "weights metadata lacks 'num_classes'"),
])
def test_bad_weights_metadata_is_a_data_error_naming_the_file_and_field(tmp_path, field, value, message):
    """Every builder error, whatever its type (IndexError, AttributeError, KdUsageError before), is the file's fault:
    KdError (exit 1), one line naming the file and the field."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = tmp_path / "ok.safetensors"
    save_model(ImageClassifier("mlp", (1, 4, 4), 3, {"hidden": [5]}), good)
    with safe_open(str(good), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if value is None:
        del meta[field]
    else:
        meta[field] = value
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(KdError) as info:
        load_model(bad)
    assert type(info.value) is KdError and str(info.value).startswith(f"{bad}: ")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_argument_the_architecture_does_not_take_is_named():
    from kdtools.models import build_network

    with pytest.raises(KdUsageError, match=r"architecture mlp takes no argument 'nosuch' \(its arguments: hidden\)"):
        build_network("mlp", 1, 10, (8, 8), nosuch=1)
    with pytest.raises(KdUsageError, match="lenet5-half takes no argument 'width'"):
        build_network("lenet5-half", 1, 10, (28, 28), width=2)
    assert build_network("lenet5", 1, 10, (28, 28), width=2) is not None


# ------------------------------------------------------------------------------------------------
# Every safetensors writer goes through kdtools' atomic writer: safetensors' own save_file renames a temporary
# file of its own over the path, which replaced -o /dev/null (as root, the machine's) or a FIFO with a regular file


def _into_fifo(tmp_path, write):
    from safetensors.torch import load

    from conftest import through_fifo

    tmp_path.mkdir()
    received = through_fifo(tmp_path / "out.safetensors", write)
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    return load(received)


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs")
def test_weights_generators_and_states_write_into_a_fifo_and_leave_it_a_fifo(tmp_path):
    from kdtools.aggregate.online import Aggregator
    from kdtools.aggregate.state import save_state
    from kdtools.extract.genweights import save_generator
    from kdtools.extract.generators import build_generator

    model = ImageClassifier("mlp", (1, 8, 8), 3)
    assert set(_into_fifo(tmp_path / "w", lambda p: save_model(model, p))) == set(model.net.state_dict())
    gen = build_generator("ideal", (1, 8, 8), 16)
    assert _into_fifo(tmp_path / "g", lambda p: save_generator(gen, p, "ideal", (1, 8, 8), 16))
    agg = Aggregator("mv")
    agg.process([("t1", "w1", "0"), ("t1", "w2", "1")])
    assert _into_fifo(tmp_path / "s", lambda p: save_state(p, agg))
