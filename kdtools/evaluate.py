"""kd-eval's measures on classifiers: accuracy on a labelled split and fidelity to a reference model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .data import ImageSet
from .errors import KdError
from .train import predict


@dataclass
class AccuracyReport:
    model: str
    data: str
    samples: int
    accuracy: float
    reference: Optional[str] = None
    reference_accuracy: Optional[float] = None
    fidelity: Optional[float] = None  # fraction of inputs where model and reference agree
    # one entry per true class: {"class", "name", "samples", "accuracy"[, "reference_accuracy", "fidelity"]}.
    # A stolen model's average hides where it fails (e.g. one garment class of Fashion-MNIST at a third of
    # the victim's accuracy); this shows it.
    per_class: list = field(default_factory=list)

    def rows(self) -> list[tuple[str, str]]:
        rows = [("model", self.model), ("data", self.data), ("samples", str(self.samples)),
                ("accuracy", f"{100 * self.accuracy:.2f} %")]
        if self.reference is not None:
            rows += [("reference", self.reference), ("reference accuracy", f"{100 * self.reference_accuracy:.2f} %"),
                     ("fidelity (agreement)", f"{100 * self.fidelity:.2f} %")]
        return rows


def check_input(shape: tuple, data: ImageSet, who: str) -> None:
    if tuple(data.shape) != tuple(shape):
        raise KdError(f"{who} takes {'x'.join(map(str, shape))} images but {data.name} has {'x'.join(map(str, data.shape))} "
                      "(a model takes one image size; resize the data or use a model made for it)")


def evaluate_accuracy(model: torch.nn.Module, model_name: str, input_shape: tuple, data: ImageSet, device: torch.device,
                      reference: Optional[torch.nn.Module] = None, reference_name: Optional[str] = None,
                      reference_shape: Optional[tuple] = None) -> AccuracyReport:
    if data.y is None:
        raise KdError(f"{data.name}: no labels to measure accuracy against")
    from .data import adapt_images

    # each model sees the data at its own size, resized from the data as given (never twice)
    original = data
    if input_shape is not None and tuple(input_shape) != tuple(data.shape):
        data = adapt_images(original, image_size=input_shape[1], channels=input_shape[0])
    check_input(input_shape, data, model_name)
    pred = predict(model, data.x, device).argmax(1)
    report = AccuracyReport(model_name, f"{data.title}", len(data), (pred == data.y).float().mean().item())
    if reference is not None:
        ref_data = data
        if reference_shape is not None and tuple(reference_shape) != tuple(data.shape):
            # the same images at the reference's size, so that a 16x16 substitute and its 28x28 victim are
            # compared image for image
            ref_data = adapt_images(original, image_size=reference_shape[1], channels=reference_shape[0])
        check_input(reference_shape or input_shape, ref_data, reference_name or "reference")
        ref = predict(reference, ref_data.x, device).argmax(1)
        report.reference = reference_name
        report.reference_accuracy = (ref == data.y).float().mean().item()
        report.fidelity = (ref == pred).float().mean().item()
    report.per_class = per_class(pred, data.y, data.num_classes or int(data.y.max()) + 1, data.classes,
                                 ref if reference is not None else None)
    return report


def per_class(pred: torch.Tensor, y: torch.Tensor, num_classes: int, names: list,
              ref: Optional[torch.Tensor] = None) -> list[dict]:
    """Accuracy (and, with the reference's predictions, its accuracy and the agreement) per true class."""
    out = []
    for c in range(num_classes):
        on = y == c
        n = int(on.sum())
        row = {"class": c, "name": names[c] if c < len(names) else str(c), "samples": n,
               "accuracy": (pred[on] == c).float().mean().item() if n else None}  # None (JSON null): no sample
        if ref is not None:
            row["reference_accuracy"] = (ref[on] == c).float().mean().item() if n else None
            row["fidelity"] = (ref[on] == pred[on]).float().mean().item() if n else None
        out.append(row)
    return out
