"""kd-query: send queries to an oracle under a hard budget, log every answer to HDF5, stream them on."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from ..device import resolve_device
from ..errors import BudgetExhausted, KdUsageError
from ..h5store import SampleWriter
from ..oracle import RemoteOptions, open_oracle, parse_mode, safe_spec
from ..query import output_header, run_queries
from ..sources import open_samples
from ..weights import parse_shape
from ._common import STOP_HINT, DebugOption, DeviceOption, info, make_app, open_sink, progress_bars, run_app, stdin_if, warn

app = make_app("Answer queries with an oracle under a hard budget: a model file, http(s)://HOST:PORT (e.g. kd-serve), "
               "exec:CMD (a subprocess speaking kdtools streams) or replay:LOG.h5 (answers from a recorded log).\n\n"
               "Reads a query stream on stdin (or INPUT: stream file or HDF5), writes queries + answers as a stream "
               "on stdout (or -o FILE), and appends everything to --log. Rerunning with the same --log resumes: "
               "queries it already answered are replayed from the log, never paid twice.")


# Options for remote oracles (http(s)://, exec:), shared with the attack commands (kd-gen-queries).
ApiKeyEnvOption = typer.Option("KD_API_KEY", "--api-key-env", help="Environment variable holding the HTTP oracle's API key (never logged).")
TimeoutOption = typer.Option(60.0, "--timeout", help="Seconds to wait for each HTTP answer (or exec: read).")
RetriesOption = typer.Option(3, "--retries", help="Retries after HTTP 5xx, timeouts and connection errors (exponential backoff).")
RateLimitOption = typer.Option(None, "--rate-limit", help="At most this many queries per second to an HTTP oracle.")
WireOption = typer.Option("json", "--wire", help="HTTP body: json (base64 arrays) or stream (binary kdtools stream).")
MaxBatchOption = typer.Option(None, "--max-batch", help="At most this many query rows per HTTP request (default: the server's max_batch); "
                               "lower it when a per-key quota is smaller than a request.")
OnRejectedOption = typer.Option("error", "--on-rejected", help="Queries a server's defence rejects: error (stop) or flag (log them as label -1 and go on).")



@app.command(help=app.info.help)  # one-command app: show the app's help
def query(
    oracle: str = typer.Argument(..., help="The victim: a model file (.safetensors, TorchScript .pt, torch.export .pt2), http(s)://HOST:PORT, exec:CMD or replay:LOG.h5."),
    input: Optional[str] = typer.Argument(None, help="Queries: stream file or HDF5; default '-' (stdin)."),
    mode: str = typer.Option("label", "--mode", help="label | probs | logits | topk:K"),
    budget: Optional[int] = typer.Option(None, "--budget", help="Hard cap on oracle calls, counting those the log already spent."),
    log: Optional[str] = typer.Option(None, "--log", help="HDF5 query log to append to (created, or resumed if it exists)."),
    output: str = typer.Option("-", "-o", "--output", help="Where queries + answers go; '-' = stdout."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="CxHxW, for model files that do not record it."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a pickled model file (runs code from it!)."),
    api_key_env: str = ApiKeyEnvOption,
    timeout: float = TimeoutOption,
    retries: int = RetriesOption,
    rate_limit: Optional[float] = RateLimitOption,
    wire: str = WireOption,
    on_rejected: str = OnRejectedOption,
    max_batch: Optional[int] = MaxBatchOption,
    device: str = DeviceOption,
    no_progress: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    debug: bool = DebugOption,
):
    parse_mode(mode)
    if budget is not None and budget < 0:
        raise KdUsageError("--budget must be >= 0")
    if budget == 0 and not log:
        # with a log, --budget 0 is meaningful: answer from the log only, pay for nothing
        raise KdUsageError("--budget 0 pays for no query: it only makes sense with a --log to replay answers from")
    remote = remote_options(api_key_env, timeout, retries, rate_limit, wire, on_rejected, max_batch)
    orc = open_oracle(oracle, resolve_device(device), trust_pickle, parse_shape(input_shape) if input_shape else None, remote=remote)
    warn_http_only(orc, remote)
    try:
        _run(orc, oracle, input, mode, budget, log, output, remote, no_progress)
    finally:
        orc.close()


def _run(orc, oracle: str, input, mode, budget, log, output, remote: RemoteOptions, no_progress: bool) -> None:
    source = open_samples(input, stdin_if(input))
    options = {"oracle": safe_spec(oracle), "mode": mode, "budget": budget, "log": log}
    if orc.kind in ("http", "exec"):
        options["remote"] = remote.public()  # never the key itself
    header = output_header(source.header, orc, mode, options)
    # With a log and a terminal on stdout the answers live in the log alone; without a log they must go somewhere.
    to_stdout = output == "-"
    if to_stdout and sys.stdout.isatty() and log:
        sink = None
    else:
        sink = open_sink(header, output)
    new_log = bool(log) and not os.path.exists(log)
    writer = SampleWriter(log, header, oracle=orc.identity, budget=budget) if log else None
    if writer and writer.spent:
        info(f"kd-query: resuming {log}: {writer.rows} answers logged, {writer.spent} queries spent"
             + (f" of {budget}" if budget is not None else ""))
    if writer:
        STOP_HINT["text"] = f"every answer paid for is in {log}; rerun with the same --log and nothing is paid twice"
    status, message, failed = "complete", "", False
    try:
        with progress_bars(not no_progress) as progress:
            stats = run_queries(source, orc, mode, budget, writer, sink.write if sink else None, progress)
    except BudgetExhausted as e:
        status, message = "budget_exhausted", str(e)
        if sink:
            sink.close(status, message)
        raise
    except BaseException as e:
        failed = True
        if sink:
            sink.abort(str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
        raise
    finally:
        if writer:
            writer.close()
            if failed and new_log and writer.spent == 0:
                # a run that failed before paying anything (wrong query shape, a refused first request) must not
                # leave an empty log behind: its header (query shape, answer mode) would refuse the corrected rerun
                os.unlink(log)
    if sink:
        sink.close(status, message)
    info(f"kd-query: answered {stats.answered} queries ({stats.paid} paid, {stats.replayed} replayed from the log) "
         f"in {stats.seconds:.1f} s; spent {stats.spent_total}" + (f" of {budget}" if budget is not None else ""))
    report_remote(orc)


def remote_options(api_key_env: str, timeout: float, retries: int, rate_limit: Optional[float], wire: str, on_rejected: str,
                   max_batch: Optional[int] = None) -> RemoteOptions:
    """RemoteOptions from the command line; the API key's value comes from the environment (CLI only)."""
    if timeout <= 0:
        raise KdUsageError("--timeout must be positive")
    if retries < 0:
        raise KdUsageError("--retries must be >= 0")
    if rate_limit is not None and rate_limit <= 0:
        raise KdUsageError("--rate-limit must be positive")
    if max_batch is not None and max_batch < 1:
        raise KdUsageError("--max-batch must be >= 1")
    if not api_key_env or not api_key_env.replace("_", "").isalnum():
        raise KdUsageError("--api-key-env takes the NAME of an environment variable, not the key")
    return RemoteOptions(api_key=os.environ.get(api_key_env) or None, timeout=timeout, retries=retries,
                         rate_limit=rate_limit, wire=wire, on_rejected=on_rejected, max_batch=max_batch)


def warn_http_only(orc, remote: RemoteOptions) -> None:
    """--rate-limit and --max-batch shape HTTP requests; say so rather than ignore them silently elsewhere."""
    given = [flag for flag, value in (("--rate-limit", remote.rate_limit), ("--max-batch", remote.max_batch)) if value]
    if given and orc.kind != "http":
        warn(f"{' and '.join(given)} only {'shapes' if len(given) == 1 else 'shape'} requests to an HTTP oracle; ignored for this {orc.kind} oracle")


def report_remote(orc) -> None:
    """What a remote oracle did beyond answering: retries and rejected queries (on stderr)."""
    if getattr(orc, "retried_rows", 0):
        warn(f"{orc.identity}: {orc.retried_rows} query rows were re-sent after transient errors "
             "(counted once in the budget; a server that bills failed requests may have charged them)")
    if getattr(orc, "rejected_total", 0):
        warn(f"{orc.identity}: the server's defence rejected {orc.rejected_total} queries (logged with label -1 / empty scores)")


def main() -> None:
    run_app(app, "kd-query")


if __name__ == "__main__":
    main()
