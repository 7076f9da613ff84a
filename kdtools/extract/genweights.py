"""Generator weights files: safetensors with what is needed to rebuild the generator in its metadata.

kdtools/weights.py owns classifier files (``kdtools.format`` "weights"); generators of the data-free
attacks are saved the same way with ``kdtools.format`` "generator":

  kdtools.format   "generator"          kdtools.schema   "1"
  kdtools.version  the package version  arch             tandem | dfme | ideal
  arch_args        JSON {"image_shape": [C, H, W], "z_dim": N, "pixel_mean": m|null, "pixel_std": s|null}
  options          JSON of the resolved options of the attack that made it
  (and free-form extras such as "queries_spent", "method")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from .. import __version__
from ..errors import KdError
from ..fileio import sniff
from ..weights import write_safetensors
from .generators import build_generator

GENERATOR_SCHEMA = "1"


def save_generator(generator: nn.Module, path, arch: str, image_shape, z_dim: int, options: dict | None = None,
                   extra: dict | None = None, pixel_mean: float | None = None, pixel_std: float | None = None) -> None:
    """Write ``generator`` atomically (temporary file + rename)."""
    meta = {
        "kdtools.format": "generator",
        "kdtools.schema": GENERATOR_SCHEMA,
        "kdtools.version": __version__,
        "arch": arch,
        "arch_args": json.dumps({"image_shape": [int(v) for v in image_shape], "z_dim": int(z_dim),
                                 "pixel_mean": pixel_mean, "pixel_std": pixel_std}),
        "options": json.dumps(options or {}, default=str),
    }
    for k, v in (extra or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v, default=str)
    # batch-norm running statistics are part of the state: generator mode samples in eval mode
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in generator.state_dict().items()}
    write_safetensors(tensors, path, meta)


def load_generator(path) -> tuple[nn.Module, dict]:
    """(generator in eval mode, metadata with arch_args decoded) from a generator weights file."""
    path = Path(path)
    if not path.is_file():
        raise KdError(f"{path}: no such generator file")
    if sniff(path) != "safetensors":
        raise KdError(f"{path}: not a safetensors generator file")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise KdError(f"{path}: unreadable safetensors file ({e})") from None
    if meta.get("kdtools.format") != "generator":
        what = "a classifier weights file" if meta.get("kdtools.format") == "weights" else "not a kdtools generator file"
        raise KdError(f"{path}: {what} (expected the generator.safetensors an attack writes)")
    if meta.get("kdtools.schema") != GENERATOR_SCHEMA:
        raise KdError(f"{path}: generator schema {meta.get('kdtools.schema')} is not supported by kdtools {__version__}")
    try:
        args = json.loads(meta["arch_args"])
        gen = build_generator(meta["arch"], args["image_shape"], args["z_dim"], args.get("pixel_mean"), args.get("pixel_std"))
        gen.load_state_dict(state)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise KdError(f"{path}: generator metadata or tensors do not match ({str(e).splitlines()[0][:200]})") from None
    meta["arch_args"] = args
    return gen.eval(), meta
