"""Fréchet distances between sample sets in a feature space (FID).

  inception:PATH   the standard FID: Inception-v3 pool3 features (2048), the TF-ported weights
                   ``pt_inception-2015-12-05-*.pth`` given by path (torchmetrics' / torch-fidelity's port,
                   bilinear resizing to 299 px as TF 1.x did). Grey images are repeated to RGB.
  lenet:PATH       any kdtools classifier weights file (e.g. an MNIST LeNet-5): the features entering its
  classifier:PATH  last linear layer (the penultimate layer). Images are resized to the model's input.
  PATH             the same, for a kdtools weights file
  raw              the flattened values themselves (e.g. 2-D points); no network

FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) (Heusel et al. 2017), in float64.
Only FIDs in the same feature space over the same numbers of samples are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .data import convert_channels, resize, to_float
from .errors import KdError, KdUsageError
from .progress import ProgressCallback, ProgressEvent, no_progress

FEATURE_KINDS = ("inception:PATH", "lenet:PATH", "classifier:PATH", "PATH (kdtools weights)", "raw")


@dataclass
class FeatureStats:
    mu: np.ndarray  # (d,)
    sigma: np.ndarray  # (d, d)
    n: int


def feature_stats(features: torch.Tensor | np.ndarray) -> FeatureStats:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise KdError(f"need at least 2 feature vectors to estimate a covariance, got {f.shape[0] if f.ndim else 0}")
    return FeatureStats(f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]), f.shape[0])


def frechet_distance(a: FeatureStats, b: FeatureStats, eps: float = 1e-6, notes: Optional[list] = None) -> float:
    """The Fréchet distance between two Gaussians N(mu_a, S_a), N(mu_b, S_b); numerical trouble (a singular
    covariance product) is appended to ``notes`` as text."""
    from scipy import linalg

    if a.mu.shape != b.mu.shape:
        raise KdError(f"feature dimensions differ ({a.mu.shape[0]} vs {b.mu.shape[0]})")
    import warnings

    diff = a.mu - b.mu
    # scipy warns (LinAlgWarning, with its source path) whenever the product is ill-conditioned, which it is
    # with fewer samples than features and often with dead ReLU feature units, where the result is still
    # fine; like the reference FID code, only a product whose square root is not finite is reported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(a.sigma @ b.sigma)
        nudged = not np.isfinite(covmean).all()
        if nudged:  # singular product: nudge both covariances (as the reference code does)
            offset = np.eye(a.sigma.shape[0]) * eps
            covmean = linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if notes is not None and nudged:
        notes.append(f"the covariance product is singular (offset {eps} added to both covariances)")
    covmean = np.real(covmean)  # tiny imaginary parts are numerical noise
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


class RawFeatures:
    """The values themselves, flattened."""

    name = "raw"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return to_float(x).flatten(1).double() if x.dtype == torch.uint8 else x.double().flatten(1)


class ClassifierFeatures:
    """Penultimate-layer features of a classifier: the input of its last nn.Linear."""

    def __init__(self, path: str, device: torch.device = torch.device("cpu")):
        from .weights import load_model

        loaded = load_model(path)
        self.module = loaded.module.to(device).eval()
        self.input_shape = loaded.input_shape
        self.device = device
        self.name = f"classifier:{Path(path).name}"
        linears = [m for m in self.module.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise KdError(f"{path}: the model has no linear layer to take penultimate features from")
        self.last = linears[-1]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_shape:
            c, h, w = self.input_shape
            if x.shape[1] != c:
                x = convert_channels(x, c)
            if x.shape[2] != h or x.shape[3] != w:
                x = resize(x, h)
        box = {}
        handle = self.last.register_forward_hook(lambda m, inp, out: box.__setitem__("f", inp[0]))
        try:
            self.module(to_float(x).to(self.device))
        finally:
            handle.remove()
        return box["f"].flatten(1).double().cpu()


class InceptionFeatures:
    """Inception-v3 pool3 (2048) through torchmetrics' port of the TF FID network, weights by path."""

    name = "inception-v3-pool3"

    def __init__(self, path: str, device: torch.device = torch.device("cpu")):
        if not Path(path).is_file():
            raise KdError(f"{path}: no such Inception weights file (the TF-ported pt_inception-2015-12-05 .pth; "
                          "it cannot be downloaded here)")
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError:
            raise KdError("standard FID needs torchmetrics and torch-fidelity (pip install torchmetrics torch-fidelity)") from None
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=str(path), antialias=False).to(device)
        except Exception as e:
            raise KdError(f"{path}: not usable Inception weights ({str(e).strip().splitlines()[0][:160]})") from None
        self.device = device

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.net(x.to(self.device)).reshape(x.shape[0], -1).double().cpu()


def open_features(spec: str, device: torch.device = torch.device("cpu")):
    """A feature extractor from a --features value (see the module docstring)."""
    if spec == "raw":
        return RawFeatures()
    kind, _, path = spec.partition(":")
    if kind == "inception" and path:
        return InceptionFeatures(path, device)
    if kind in ("lenet", "classifier") and path:
        return ClassifierFeatures(path, device)
    if Path(spec).is_file():
        return ClassifierFeatures(spec, device)
    raise KdUsageError(f"--features {spec!r}: expected one of {', '.join(FEATURE_KINDS)} (an existing file)")


def extract(extractor, x: torch.Tensor, batch_size: int = 256, progress: ProgressCallback = no_progress,
            task: str = "features") -> torch.Tensor:
    out = []
    for i in range(0, x.shape[0], batch_size):
        out.append(extractor(x[i:i + batch_size]))
        progress(ProgressEvent(task, min(i + batch_size, x.shape[0]), x.shape[0]))
    progress(ProgressEvent(task, x.shape[0], x.shape[0], done=True))
    return torch.cat(out)


def fid(samples: torch.Tensor, reference: torch.Tensor, extractor, batch_size: int = 256,
        progress: ProgressCallback = no_progress) -> dict:
    """FID between two sample sets of the same row shape (uint8 images, float images or points)."""
    if tuple(samples.shape[1:]) != tuple(reference.shape[1:]):
        raise KdError(f"samples have shape {tuple(samples.shape[1:])} but the reference has {tuple(reference.shape[1:])}")
    if samples.dim() == 2 and not isinstance(extractor, RawFeatures):
        raise KdUsageError("these samples are points, not images; use --features raw")
    from .data import check_finite_rows

    for what, x in (("the samples", samples), ("the reference", reference)):
        check_finite_rows(x, what)  # a NaN would otherwise surface as a linear-algebra error in sqrtm
    fs = extract(extractor, samples, batch_size, progress, "sample features")
    fr = extract(extractor, reference, batch_size, progress, "reference features")
    notes: list = []
    value = frechet_distance(feature_stats(fs), feature_stats(fr), notes=notes)
    # with no more rows than feature dimensions a covariance estimate is singular: the number is biased upward
    # and not comparable with published FIDs (those use 10 000 or 50 000 samples)
    few = min(fs.shape[0], fr.shape[0]) <= fs.shape[1]
    return {"fid": value, "samples": int(samples.shape[0]), "reference": int(reference.shape[0]),
            "features": getattr(extractor, "name", "?"), "feature_dim": int(fs.shape[1]), "few_samples": bool(few),
            "singular": bool(few or notes)}


def limit_rows(x: torch.Tensor, n: Optional[int]) -> torch.Tensor:
    if n is None:
        return x
    if n < 2:
        raise KdUsageError("FID needs at least 2 samples on each side")
    return x[:n]
