"""kd-eval: measure what distillation produced (accuracy and fidelity today; curves, label error, FID later)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..data import load_dataset
from ..device import resolve_device
from ..evaluate import evaluate_accuracy
from ..weights import load_model, parse_shape
from ._common import DataRootOption, DebugOption, DeviceOption, data_root, make_app, not_yet, run_app

app = make_app("Evaluate models: accuracy on a labelled split and fidelity to a reference (the victim).")


@app.command()
def accuracy(
    model: str = typer.Argument(..., help="Model file (kdtools weights, TorchScript, torch.export)."),
    data: str = typer.Option(..., "--data", help="digits | mnist | fashion-mnist | cifar10 | ... | FILE.h5"),
    split: str = typer.Option("test", "--split"),
    reference: Optional[str] = typer.Option(None, "--reference", help="Also measure agreement with this model (e.g. the victim)."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="CxHxW, for model files that do not record it."),
    data_root_opt: Optional[str] = DataRootOption,
    download: bool = typer.Option(False, "--download"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout instead of a table."),
    device: str = DeviceOption,
    debug: bool = DebugOption,
):
    """Accuracy of MODEL on a split, and with --reference its fidelity (agreement) with that model."""
    dev = resolve_device(device)
    shape = parse_shape(input_shape) if input_shape else None
    m = load_model(model, input_shape=shape)
    mshape = m.input_shape or shape
    ds = load_dataset(data, split, data_root(data_root_opt), download,
                      image_size=mshape[1] if mshape else None, channels=mshape[0] if mshape else None)
    ref = load_model(reference, input_shape=shape) if reference else None
    report = evaluate_accuracy(m.module.to(dev), model, mshape or ds.shape, ds, dev,
                               ref.module.to(dev) if ref else None, reference, ref.input_shape if ref else None)
    if as_json:
        sys.stdout.write(json.dumps(asdict(report)) + "\n")
        return
    table = Table(title="kd-eval accuracy", show_header=False)
    for k, v in report.rows():
        table.add_row(k, v)
    Console().print(table)


@app.command()
def log(
    path: str = typer.Argument(..., help="A query log or sample file (.h5)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout instead of a table."),
    debug: bool = DebugOption,
):
    """Accounting of a query log: rows answered, queries spent (probes included), budget, oracle, mode."""
    from ..h5store import log_info

    facts = log_info(path)
    if as_json:
        sys.stdout.write(json.dumps(facts) + "\n")
        return
    table = Table(title=f"kd-eval log {path}", show_header=False)
    for k, v in facts.items():
        table.add_row(k.replace("_", " "), "unlimited" if k == "budget" and v < 0 else str(v))
    Console().print(table)


def _later(name: str, issue: int, what: str):
    @app.command(name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
    def _cmd(ctx: typer.Context):
        not_yet(f"kd-eval {name}", issue, what)

    _cmd.__doc__ = f"(not yet: issue #{issue})"


_later("curve", 4, "accuracy-vs-queries curves")
_later("fid", 5, "FID")


def main() -> None:
    run_app(app, "kd-eval")


if __name__ == "__main__":
    main()
