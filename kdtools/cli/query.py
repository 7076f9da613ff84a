"""kd-query: send queries to an oracle under a hard budget, log every answer to HDF5, stream them on."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from ..device import resolve_device
from ..errors import BudgetExhausted, KdUsageError
from ..h5store import SampleWriter
from ..oracle import open_oracle, parse_mode
from ..query import output_header, run_queries
from ..sources import open_samples
from ..weights import parse_shape
from ._common import DebugOption, DeviceOption, info, make_app, open_sink, progress_bars, run_app, stdin_if

app = make_app("Answer queries with an oracle (a model file) under a hard budget.\n\n"
               "Reads a query stream on stdin (or INPUT: stream file or HDF5), writes queries + answers as a stream "
               "on stdout (or -o FILE), and appends everything to --log. Rerunning with the same --log resumes: "
               "queries it already answered are replayed from the log, never paid twice.")


@app.command()
def query(
    oracle: str = typer.Argument(..., help="The victim: kdtools weights (.safetensors), TorchScript (.pt), torch.export (.pt2)."),
    input: Optional[str] = typer.Argument(None, help="Queries: stream file or HDF5; default '-' (stdin)."),
    mode: str = typer.Option("label", "--mode", help="label | probs | logits | topk:K"),
    budget: Optional[int] = typer.Option(None, "--budget", help="Hard cap on oracle calls, counting those the log already spent."),
    log: Optional[str] = typer.Option(None, "--log", help="HDF5 query log to append to (created, or resumed if it exists)."),
    output: str = typer.Option("-", "-o", "--output", help="Where queries + answers go; '-' = stdout."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="CxHxW, for model files that do not record it."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a pickled model file (runs code from it!)."),
    device: str = DeviceOption,
    no_progress: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    debug: bool = DebugOption,
):
    parse_mode(mode)
    if budget is not None and budget < 0:
        raise KdUsageError("--budget must be >= 0")
    orc = open_oracle(oracle, resolve_device(device), trust_pickle, parse_shape(input_shape) if input_shape else None)
    source = open_samples(input, stdin_if(input))
    options = {"oracle": oracle, "mode": mode, "budget": budget, "log": log}
    header = output_header(source.header, orc, mode, options)
    # With a log and a terminal on stdout the answers live in the log alone; without a log they must go somewhere.
    to_stdout = output == "-"
    if to_stdout and sys.stdout.isatty() and log:
        sink = None
    else:
        sink = open_sink(header, output)
    writer = SampleWriter(log, header, oracle=orc.identity, budget=budget) if log else None
    if writer and writer.spent:
        info(f"kd-query: resuming {log}: {writer.rows} answers logged, {writer.spent} queries spent"
             + (f" of {budget}" if budget is not None else ""))
    status, message = "complete", ""
    try:
        with progress_bars(not no_progress) as progress:
            stats = run_queries(source, orc, mode, budget, writer, sink.write if sink else None, progress)
    except BudgetExhausted as e:
        status, message = "budget_exhausted", str(e)
        if sink:
            sink.close(status, message)
        raise
    except BaseException:
        if sink:
            sink.abort()
        raise
    finally:
        if writer:
            writer.close()
    if sink:
        sink.close(status, message)
    info(f"kd-query: answered {stats.answered} queries ({stats.paid} paid, {stats.replayed} replayed from the log) "
         f"in {stats.seconds:.1f} s; spent {stats.spent_total}" + (f" of {budget}" if budget is not None else ""))


def main() -> None:
    run_app(app, "kd-query")


if __name__ == "__main__":
    main()
