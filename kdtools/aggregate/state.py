"""The kd-aggregate state file: the one module that knows its format.

One safetensors file, written atomically (a temporary file renamed over the old one), holding:

* tensors: the label store (``store.task``, ``store.worker``, ``store.label``: int32 index triples),
  the last label given to each task (``emitted.label`` int32, -1 = none; ``emitted.confidence``),
  per-class label counts, and for BiLA-CM every parameter (``bila.param.*``), the optimiser's
  second moments (``bila.v.*``), its step counter ``bila.t``, the per-element step counts
  ``bila.steps.*`` (int64, shaped like the parameters; only when the configuration's ``step_count``
  is not "global") and the prior counts;
* metadata (strings): ``schema`` = ``kdtools.aggregate.state``, ``schema_version``, the kdtools
  version that wrote it, the method, the resolved options (JSON), the BiLA configuration (JSON),
  the vocabularies of tasks, workers and classes (JSON lists, in index order), whether the classes
  were declared, the chunk and label counts.

Loading checks the schema name and version (a newer version is refused), the shapes against the
vocabularies, and turns a truncated or otherwise unreadable file into a one-line KdError.

Schema versions: 1 had no ``step_count`` in the BiLA configuration and no per-element step counts;
every version-1 state was trained with the global step count, so it is loaded as
``step_count="global"`` and continues exactly as before (it is written back as version 2).
Version 2 added ``step_count`` and ``bila.steps.*``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import KdError
from ..weights import short_error, write_safetensors
from .bila import BilaConfig, BilaModel
from .online import METHODS, Aggregator, Vocab

SCHEMA = "kdtools.aggregate.state"
SCHEMA_VERSION = 2


def save_state(path: str | os.PathLike, agg: Aggregator, options: dict | None = None) -> None:
    t, w, c = agg.store_arrays()
    tensors = {
        "store.task": torch.from_numpy(t.copy()),
        "store.worker": torch.from_numpy(w.copy()),
        "store.label": torch.from_numpy(c.copy()),
        "emitted.label": torch.from_numpy(agg.emitted.astype(np.int32).copy()),
        "emitted.confidence": torch.from_numpy(agg.emitted_conf.astype(np.float32).copy()),
        "class_counts": torch.from_numpy(agg.class_counts.astype(np.int64).copy()),
    }
    if agg.model is not None:
        tensors.update(agg.model.tensors())
    metadata = {
        "schema": SCHEMA,
        "schema_version": str(SCHEMA_VERSION),
        "kdtools_version": __version__,
        "method": agg.method,
        "seed": str(agg.seed),
        "options": json.dumps(options or {}, sort_keys=True, default=str),
        "bila_config": json.dumps(agg.config.to_dict(), sort_keys=True),
        "tasks": json.dumps(agg.tasks.items, ensure_ascii=False),
        "workers": json.dumps(agg.workers.items, ensure_ascii=False),
        "classes": json.dumps(agg.classes.items, ensure_ascii=False),
        "classes_declared": "1" if agg.classes_fixed else "0",
        "chunks": str(agg.chunks),
        "labels_seen": str(agg.labels_seen),
        "model_initialised": "1" if (agg.model is not None and agg.model.initialised) else "0",
    }
    write_safetensors({k: v.contiguous() for k, v in tensors.items()}, path, metadata)


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a state file (raises KdError when it is not a readable kd-aggregate state)."""
    from safetensors import safe_open

    name = str(path)
    if not Path(path).exists():
        raise KdError(f"{name}: no such state file")
    try:
        with safe_open(name, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise KdError(f"{name}: not a readable kd-aggregate state file (truncated or corrupt: {short_error(e)})") from None
    if meta.get("schema") != SCHEMA:
        raise KdError(f"{name}: not a kd-aggregate state file (schema {meta.get('schema')!r})")
    try:
        version = int(meta.get("schema_version", ""))
    except ValueError:
        raise KdError(f"{name}: state file has an unreadable schema version") from None
    if version > SCHEMA_VERSION:
        raise KdError(f"{name}: state file schema version {version} is newer than this kdtools "
                      f"({__version__}) understands (version {SCHEMA_VERSION}); upgrade kdtools")
    if version < 1:
        raise KdError(f"{name}: unknown state file schema version {version}")
    return meta


def load_state(path: str | os.PathLike) -> Aggregator:
    from safetensors.torch import load_file

    name = str(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(name)
    except Exception as e:
        raise KdError(f"{name}: state file is truncated or corrupt ({short_error(e)})") from None
    try:
        method = meta["method"]
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}")
        config_dict = json.loads(meta["bila_config"])
        if int(meta["schema_version"]) < 2:
            # migration from version 1: those states were all trained with one global step count
            config_dict["step_count"] = "global"
        elif "step_count" not in config_dict:
            raise ValueError("BiLA configuration without step_count")
        config = BilaConfig.from_dict(config_dict)
        # labels are read with normalise_label (``1.0`` -> ``1``); a state written before that rule may hold class
        # names in another form, which later chunks would split off as new classes: read them the same way
        from .crowdio import normalise_label

        written = json.loads(meta["classes"])
        classes = [normalise_label(str(c)) for c in written]
        if len(set(classes)) != len(classes):
            raise ValueError(f"its classes {written} name one class twice once whole numbers are read as numbers; "
                             "aggregate again from the labels")
        declared = meta.get("classes_declared") == "1"
        agg = Aggregator(method, classes=classes if declared else None, config=config, seed=int(meta.get("seed", 0)))
        if not declared:
            agg.classes = Vocab(classes)
        agg.tasks = Vocab(json.loads(meta["tasks"]))
        agg.workers = Vocab(json.loads(meta["workers"]))
        agg.chunks = int(meta["chunks"])
        agg.labels_seen = int(meta["labels_seen"])
        T, K, C = len(agg.tasks), len(agg.workers), len(agg.classes)
        t = tensors["store.task"].numpy().astype(np.int64)
        w = tensors["store.worker"].numpy().astype(np.int64)
        c = tensors["store.label"].numpy().astype(np.int64)
        if not (len(t) == len(w) == len(c)):
            raise ValueError("label store arrays differ in length")
        if len(t) and (t.min() < 0 or t.max() >= T or w.min() < 0 or w.max() >= K or c.min() < 0 or c.max() >= C):
            raise ValueError("label store refers to unknown tasks, workers or classes")
        store: dict[int, dict[int, int]] = {}
        for ti, wi, ci in zip(t.tolist(), w.tolist(), c.tolist()):
            store.setdefault(ti, {})[wi] = ci
        agg.store = store
        agg.emitted = tensors["emitted.label"].numpy().astype(np.int32).copy()
        agg.emitted_conf = tensors["emitted.confidence"].numpy().astype(np.float32).copy()
        if len(agg.emitted) != T or len(agg.emitted_conf) != T:
            raise ValueError("emitted labels do not match the task vocabulary")
        if len(agg.emitted) and agg.emitted.max() >= C:
            raise ValueError("emitted labels refer to unknown classes")
        agg.class_counts = tensors["class_counts"].numpy().astype(np.int64).copy()
        if len(agg.class_counts) != C:
            raise ValueError("class counts do not match the class vocabulary")
        if "bila.param.omega" in tensors:
            agg.model = BilaModel.from_tensors(tensors, config, initialised=meta.get("model_initialised") == "1")
            if agg.model.K != K or agg.model.C != C:
                raise ValueError(f"model has {agg.model.K} workers x {agg.model.C} classes, vocabularies "
                                 f"{K} x {C}")
        elif method == "bila" and agg.chunks > 0:
            raise ValueError("BiLA-CM state without model parameters")
    except KdError:
        raise
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
        raise KdError(f"{name}: inconsistent state file ({short_error(e)})") from None
    return agg


