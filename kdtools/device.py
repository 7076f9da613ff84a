"""The one device choice every command shares: ``--device auto|cpu|cuda[:N]``."""

from __future__ import annotations

import torch

from .errors import KdUsageError


def resolve_device(spec: str = "auto") -> torch.device:
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise KdUsageError(f"--device {spec}: no CUDA device is available on this machine (use --device cpu or auto)")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise KdUsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    raise KdUsageError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
