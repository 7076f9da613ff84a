"""The weights file format: safetensors with everything needed to rebuild the model in its metadata.

A kdtools weights file is a plain safetensors file whose ``__metadata__`` holds (all values are strings,
JSON where structured):

  kdtools.format   "weights"            kdtools.schema   "1"
  kdtools.version  the package version  arch             e.g. "lenet5"
  arch_args        JSON dict            input_shape      JSON [C, H, W]
  num_classes      e.g. "10"            normalization    JSON {"mean": [...], "std": [...]}
  options          JSON of the resolved options of the run that made it
  (and free-form extras such as "train_accuracy")

so ``load_model(path)`` needs nothing else. Foreign victims are imported too: TorchScript archives
(``torch.jit.save``, usually ``.pt``) and ``torch.export`` programs (``.pt2``). Plain pickles (``torch.save``
of a module) can run arbitrary code when loaded, so they are refused unless the caller passes
``trust_pickle=True``; a pickled *state dict* is loaded with ``weights_only=True`` (safe) when an
architecture is given.

Where a model *answers* (kd-query and kd-serve oracles, kd-eval accuracy) an ensemble of files is accepted
too: ``ensemble:A.safetensors,B.safetensors,...`` (``load_classifier``) answers with the mean of its members'
softmax probabilities. It is a spec, not a file format: nothing new is written, the members stay the files.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes

from . import __version__
from .errors import KdError, KdUsageError, counted
from .fileio import atomic_path, sniff
from .models import ImageClassifier

WEIGHTS_SCHEMA = "1"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(model: ImageClassifier, path: str | Path, options: dict | None = None, extra: dict | None = None) -> None:
    """Write ``model`` atomically as a self-describing safetensors file."""
    model = unwrap(model)
    if not isinstance(model, ImageClassifier):
        raise KdError("only kdtools ImageClassifier models can be saved as weights files")
    spec = model.spec()
    meta = {
        "kdtools.format": "weights",
        "kdtools.schema": WEIGHTS_SCHEMA,
        "kdtools.version": __version__,
        "arch": spec["arch"],
        "arch_args": json.dumps(spec["arch_args"]),
        "input_shape": json.dumps(spec["input_shape"]),
        "num_classes": str(spec["num_classes"]),
        "normalization": json.dumps({"mean": spec["mean"], "std": spec["std"]}),
        "options": json.dumps(options or {}, default=str),
    }
    for k, v in (extra or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v, default=str)
    # safetensors refuses shared storage; contiguous clones keep tied or viewed tensors safe
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.net.state_dict().items()}
    write_safetensors(tensors, path, meta)


def write_safetensors(tensors: dict, path: str | Path, metadata: dict) -> None:
    """A safetensors file written by kdtools' atomic writer. Not ``safetensors.torch.save_file``: it writes
    a temporary file of its own and renames it over the path, which replaces a device (-o /dev/null: as root,
    the machine's) or a FIFO with a regular file."""
    with atomic_path(path) as tmp:
        if Path(tmp).is_file() and not Path(tmp).is_symlink():
            save_file(tensors, str(tmp), metadata=metadata)  # our own temporary file: its rename over it is harmless
        else:  # a device or a FIFO, written as it is: serialised here (the whole file in memory once)
            with open(tmp, "wb") as f:
                f.write(safetensors_bytes(tensors, metadata=metadata))


def read_metadata(path: str | Path) -> dict:
    """The metadata of a kdtools weights file (raises KdError if it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise KdError(f"{path}: no such file")
    if sniff(path) != "safetensors":
        raise KdError(f"{path}: not a safetensors weights file")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise KdError(f"{path}: unreadable safetensors file ({e})") from None
    if meta.get("kdtools.format") != "weights":
        raise KdError(f"{path}: safetensors file without kdtools model metadata (arch, input_shape, num_classes)")
    return meta


@dataclass
class LoadedModel:
    """A model ready to answer queries, with what is known about it."""

    module: nn.Module
    input_shape: Optional[tuple]  # (C, H, W) or None when the file does not say
    num_classes: Optional[int]
    source: str  # "kdtools", "torchscript", "export", "state_dict", "pickle", "ensemble"
    identity: str  # "sha256:<hex>" of the file; for an ensemble, "ensemble:" and its members' identities
    metadata: dict = field(default_factory=dict)


class ExportedModule(nn.Module):
    """A torch.export program answering as a module.

    * torch refuses train() and eval() on a program's module (its mode was fixed when it was traced), while
      every kdtools caller sets a model's mode before running it: train() keeps the flag and leaves the
      program alone (``check_exported`` refuses programs traced in training mode);
    * moving it to a device (.to, .cuda, .cpu, also as a member of an Ensemble) moves the program with
      torch.export's own pass, which also reaches tensors the program holds as constants (nn.Module's
      move would leave those behind). Other conversions (dtype) are ignored.
    """

    def __init__(self, program: "torch.export.ExportedProgram"):
        super().__init__()
        self.exported = program  # not a module: kept to move it to another device
        self.program = program.module()
        tensors = [*program.state_dict.values(), *getattr(program, "constants", {}).values()]  # constants: torch >= 2.3
        self.device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), torch.device("cpu"))

    def train(self, mode: bool = True) -> "ExportedModule":
        self.training = mode
        return self

    def _apply(self, fn, recurse: bool = True) -> "ExportedModule":
        # nn.Module.to / cuda / cpu all come here with a per-tensor function: where it sends an empty tensor
        # is where the program must go
        target = fn(torch.empty(0, device=self.device)).device
        if target == self.device:
            return self
        try:
            from torch.export.passes import move_to_device_pass
        except ImportError:  # torch < 2.5: parameters and buffers move, constants stay where they are
            return super()._apply(fn, recurse)
        self.exported = move_to_device_pass(self.exported, target)
        self.program = self.exported.module()
        self.device = target
        return self

    def forward(self, *args):
        return self.program(*args)


# ops whose "training" argument (at this position) makes every answer depend on chance or on the batch. Not
# every op with such an argument: instance norm decomposes into batch norm with training on, and is fine.
_TRAINING_ARGUMENT = {"aten.dropout.default": 2, "aten.native_dropout.default": 2, "aten.feature_dropout.default": 2,
                      "aten.alpha_dropout.default": 2, "aten.feature_alpha_dropout.default": 2,
                      "aten.batch_norm.default": 5, "aten.native_batch_norm.default": 5,
                      "aten._native_batch_norm_legit.default": 5, "aten._native_batch_norm_legit_functional.default": 5}
# kdtools sends between 1 and this many images at a time (ModelOracle's and predict's batch)
LARGEST_MODEL_BATCH = 1024


def check_exported(program: "torch.export.ExportedProgram", path) -> None:
    """Refuse what a torch.export victim cannot do as an oracle: answer batches of any size (kdtools sends
    whatever a round holds), and answer the same way twice (dropout off, batch norm on its running statistics)."""
    from torch.export.graph_signature import InputKind

    placeholders = {n.name: n for n in program.graph_module.graph.nodes if n.op == "placeholder"}
    for spec in program.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT or spec.arg.name not in placeholders:
            continue
        val = placeholders[spec.arg.name].meta.get("val")
        shape = getattr(val, "shape", None)
        if shape is None or len(shape) < 4:  # not the image batch (a scalar or a side input)
            continue
        how = ("export it with a dynamic batch dimension: torch.export.export(model, (x,), "
               "dynamic_shapes={'x': {0: torch.export.Dim('batch')}})")
        if not isinstance(shape[0], torch.SymInt):
            raise KdError(f"{path}: exported for a batch size of exactly {int(shape[0])}; {how}")
        bounds = program.range_constraints.get(shape[0].node.expr)
        if bounds is not None and (bounds.lower > 1 or bounds.upper < LARGEST_MODEL_BATCH):
            raise KdError(f"{path}: exported for batch sizes {bounds.lower} to {bounds.upper}, and kdtools sends 1 to "
                          f"{LARGEST_MODEL_BATCH} images at a time; {how}")
    graphs = [m for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]  # with submodules
    for node in (n for g in graphs for n in g.graph.nodes):
        at = _TRAINING_ARGUMENT.get(str(node.target)) if node.op == "call_function" else None
        if at is not None and len(node.args) > at and node.args[at] is True:
            raise KdError(f"{path}: exported in training mode or with batch statistics ({node.target} with training on: "
                          "its answers would change from call to call); call model.eval() before torch.export.export and "
                          "keep batch norm's running statistics")


def model_from_metadata(meta: dict, where: str | Path = "the weights file") -> ImageClassifier:
    """Rebuild the network a weights file describes. Anything wrong in its metadata is the file's fault, not
    the command line's: a KdError (exit 1) naming the file and the field, whatever the builder raised."""
    field = "arch"
    try:
        arch = meta["arch"]
        field = "input_shape"
        shape = json.loads(meta["input_shape"])
        if not (isinstance(shape, list) and len(shape) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
            raise ValueError(f"{meta['input_shape']!r} is not [channels, height, width]")
        field = "num_classes"
        num_classes = int(meta["num_classes"])
        if num_classes < 1:
            raise ValueError(f"{num_classes} classes")
        field = "arch_args"
        args = json.loads(meta.get("arch_args", "{}"))
        if not isinstance(args, dict):
            raise ValueError(f"{meta['arch_args']!r} is not a JSON object")
        field = "normalization"
        norm = json.loads(meta.get("normalization", "{}"))
        if not isinstance(norm, dict):
            raise ValueError(f"{meta['normalization']!r} is not a JSON object")
        for key in ("mean", "std"):
            v = norm.get(key)
            if v is not None and not (isinstance(v, list) and len(v) == shape[0]
                                      and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v)):
                raise ValueError(f"its {key} {v!r} is not {counted(shape[0], 'number')}, one per channel")
        field = "arch with its arch_args"
        return ImageClassifier(arch, shape, num_classes, args, norm.get("mean"), norm.get("std"))
    except KeyError as e:
        raise KdError(f"{where}: weights metadata lacks {e.args[0]!r} (kdtools files record arch, input_shape and num_classes)") from None
    except Exception as e:  # the builders raise many types; the message is the useful part
        raise KdError(f"{where}: weights metadata field {field!r} is unusable ({short_error(e)})") from None


def load_model(path: str | Path, trust_pickle: bool = False, arch: Optional[str] = None,
               input_shape: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
               map_location: str | torch.device = "cpu") -> LoadedModel:
    """Load any supported model file; see the module docstring for the formats."""
    if str(path).startswith(ENSEMBLE_PREFIX):
        # Training, --init and feature extraction need one network; only answering averages several.
        raise KdUsageError(f"{path}: an ensemble answers queries (an oracle, kd-eval accuracy, --reference) but is "
                           "not one model file; give a single weights file here")
    path = Path(path)
    if not path.is_file():
        raise KdError(f"{path}: no such model file")
    kind = sniff(path)
    identity = "sha256:" + file_sha256(path)
    if kind == "safetensors":
        meta = read_metadata(path)
        if meta.get("kdtools.schema", "1") != WEIGHTS_SCHEMA:
            raise KdError(f"{path}: weights schema {meta.get('kdtools.schema')} is not supported by kdtools {__version__}")
        model = model_from_metadata(meta, path)
        try:
            state = load_file(str(path))
            model.net.load_state_dict(state)
        except (SafetensorError, RuntimeError, OSError) as e:
            raise KdError(f"{path}: weights do not match architecture {meta.get('arch')!r} ({short_error(e)})") from None
        model.to(map_location).eval()
        return LoadedModel(model, model.input_shape, model.num_classes, "kdtools", identity, meta)
    if kind == "zip":
        names = _zip_names(path)
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            try:
                with warnings.catch_warnings():
                    # torch deprecates TorchScript, but victims still come as TorchScript files: no need to
                    # tell the user about torch's plans on every load
                    warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.load.*")
                    module = torch.jit.load(str(path), map_location=map_location)
            except RuntimeError as e:
                raise KdError(f"{path}: unreadable TorchScript archive ({short_error(e)})") from None
            return LoadedModel(module.eval(), _shape(input_shape), num_classes, "torchscript", identity)
        if any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names) or path.suffix == ".pt2":
            try:
                program = torch.export.load(str(path))
            except Exception as e:  # torch.export raises many types
                raise KdError(f"{path}: unreadable torch.export program ({short_error(e)})") from None
            check_exported(program, path)
            return LoadedModel(ExportedModule(program), _shape(input_shape), num_classes, "export", identity)
        return _load_torch_save(path, kind, trust_pickle, arch, input_shape, num_classes, identity, map_location)
    if kind == "pickle":
        return _load_torch_save(path, kind, trust_pickle, arch, input_shape, num_classes, identity, map_location)
    raise KdError(f"{path}: not a model file kdtools can read (safetensors, TorchScript .pt, torch.export .pt2)")


def probe_num_classes(module: nn.Module, shape: Sequence[int], device, name: str) -> int:
    """The class count of a model that does not record it (TorchScript, torch.export, pickle): one forward pass
    on one blank image. A model that cannot take that image is a KdError naming it, not a long trace."""
    try:
        with torch.no_grad():
            return int(module(torch.zeros(1, *shape, device=device)).shape[1])
    except Exception as e:  # TorchScript and torch.export raise many types, with long traces
        raise KdError(f"{name}: does not run on one {'x'.join(map(str, shape))} image ({short_error(e)}); "
                      "check --input-shape") from None


ENSEMBLE_PREFIX = "ensemble:"


class Ensemble(nn.Module):
    """Several classifiers answering as one: the mean of their softmax probabilities.

    ``forward`` returns the *log* of that mean, so everything that reads logits (argmax, softmax, the
    probs / logits / topk answer modes, KL losses) sees the averaged distribution itself:
    softmax(log p) = p because p sums to 1. Averaging probabilities rather than logits is the usual
    ensemble of classifiers; a member that is sure of a class cannot outvote the others by its scale.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).float().softmax(1) for m in self.members]).mean(0)
        # clamp: a class every member rules out would otherwise be log 0 = -inf, and -inf - -inf is NaN
        # in a later log_softmax; the smallest normal float32 keeps it finite (about -87).
        return probs.clamp_min(torch.finfo(torch.float32).tiny).log()


def load_classifier(spec: str | Path, trust_pickle: bool = False, input_shape: Optional[Sequence[int]] = None,
                    num_classes: Optional[int] = None, map_location: str | torch.device = "cpu") -> LoadedModel:
    """A model file (``load_model``) or ``ensemble:A,B,...``: files whose softmax outputs are averaged.

    Members must take the same input shape and answer the same number of classes. The identity lists the
    members' identities in order, so a query log records exactly which files answered.
    """
    text = str(spec)
    if not text.startswith(ENSEMBLE_PREFIX):
        return load_model(spec, trust_pickle=trust_pickle, input_shape=input_shape, num_classes=num_classes,
                          map_location=map_location)
    paths = [p.strip() for p in text[len(ENSEMBLE_PREFIX):].split(",")]
    if any(not p for p in paths):
        raise KdUsageError(f"{text}: expected ensemble:FILE,FILE,... (comma-separated model files, none empty)")
    if any(p.startswith(ENSEMBLE_PREFIX) for p in paths):
        raise KdUsageError(f"{text}: an ensemble member cannot itself be an ensemble")
    loaded = [(p, load_model(p, trust_pickle=trust_pickle, input_shape=input_shape, num_classes=num_classes,
                             map_location=map_location)) for p in paths]
    # the input shape: the first member whose file records one, else --input-shape
    # (a TorchScript or torch.export member's shape is --input-shape itself: say so when it disagrees)
    foreign = ("torchscript", "export", "pickle")
    recorded = [(p + (" (--input-shape)" if m.source in foreign else ""), tuple(m.input_shape))
                for p, m in sorted(loaded, key=lambda pm: pm[1].source in foreign) if m.input_shape is not None]
    shape_from, shape = recorded[0] if recorded else ("--input-shape", _shape(input_shape))
    if shape is None:
        raise KdUsageError(f"{text}: no member records its input shape; pass --input-shape CxHxW")
    fmt = lambda sh: "x".join(map(str, sh))  # noqa: E731
    for p, sh in recorded:  # before any forward pass, so a wrong shape is named rather than traced
        if sh != shape:
            raise KdError(f"{text}: members take different inputs ({shape_from}: {fmt(shape)}, {p}: {fmt(sh)})")
    classes_of = []
    for p, m in loaded:
        classes = m.num_classes if m.num_classes is not None else probe_num_classes(m.module, shape, map_location, p)
        if classes_of and classes != classes_of[0][1]:
            raise KdError(f"{text}: members answer different numbers of classes ({classes_of[0][0]}: {classes_of[0][1]}, "
                          f"{p}: {classes})")
        classes_of.append((p, classes))
    module = Ensemble([m.module for _, m in loaded]).to(map_location).eval()
    identity = ENSEMBLE_PREFIX + ",".join(m.identity for _, m in loaded)
    meta = {"ensemble": json.dumps([{"path": p, "identity": m.identity} for p, m in loaded])}
    return LoadedModel(module, shape, classes_of[0][1], "ensemble", identity, meta)


def _load_torch_save(path, kind, trust_pickle, arch, input_shape, num_classes, identity, map_location) -> LoadedModel:
    # A state dict of plain tensors is safe to read with weights_only=True; try that first.
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception:
        obj = None
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if not (arch and input_shape and num_classes):
            raise KdUsageError(f"{path}: a bare state dict; give --arch, --input-shape and --num-classes to rebuild the model")
        model = ImageClassifier(arch, input_shape, num_classes)
        try:
            model.net.load_state_dict(obj)
        except RuntimeError as e:
            raise KdError(f"{path}: state dict does not match {arch} ({short_error(e)})") from None
        return LoadedModel(model.eval(), model.input_shape, model.num_classes, "state_dict", identity)
    if isinstance(obj, dict) and {"model", "optimizer", "epoch"} <= set(obj):
        beside = str(path)[:-5] if str(path).endswith(".ckpt") else "the weights file it was saved with"
        raise KdError(f"{path}: a kd-distill training checkpoint (for --resume), not a model: use {beside}")
    if not trust_pickle:
        raise KdError(f"{path}: a pickled model; loading it can run arbitrary code. Convert it to safetensors, "
                      "TorchScript or torch.export, or, if you trust its origin, pass --trust-pickle (kd-query, kd-serve and "
                      "kd-gen-queries take it, to use the file as an oracle)")
    # The user vouched for this file with --trust-pickle: a full module pickle needs the unrestricted loader.
    module = torch.load(str(path), map_location=map_location, weights_only=False)  # noqa: S614 (explicit opt-in)
    if not isinstance(module, nn.Module):
        raise KdError(f"{path}: the pickle holds a {type(module).__name__}, not a torch module")
    return LoadedModel(module.eval(), _shape(input_shape), num_classes, "pickle", identity)


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except zipfile.BadZipFile:
        raise KdError(f"{path}: damaged archive") from None


def _shape(s):
    return tuple(int(v) for v in s) if s else None


def short_error(e: Exception) -> str:
    """One line of an exception's message, at most 200 characters: the first, or for TorchScript, which puts
    a whole trace in the message under a fixed heading, the last (the actual error)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return (lines[-1] if lines[0].startswith("The following operation failed in the TorchScript interpreter") else lines[0])[:200]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel wrappers."""
    return model.module if hasattr(model, "module") and isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def parse_shape(text: str) -> tuple[int, ...]:
    """'1x28x28' -> (1, 28, 28)."""
    try:
        shape = tuple(int(p) for p in text.lower().replace(",", "x").split("x") if p)
    except ValueError:
        raise KdUsageError(f"bad shape {text!r}: expected e.g. 1x28x28") from None
    if len(shape) != 3 or min(shape) <= 0:
        raise KdUsageError(f"bad shape {text!r}: expected channels x height x width, e.g. 1x28x28")
    return shape
