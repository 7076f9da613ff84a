"""kd-query: send queries to an oracle under a hard budget, log every answer to HDF5, stream them on."""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Optional

import typer

from ..device import resolve_device
from ..errors import BudgetExhausted, KdError, KdUsageError, counted
from ..h5store import SampleWriter
from ..oracle import RemoteOptions, open_oracle, parse_mode, safe_spec
from ..query import output_header, run_queries
from ..sources import open_samples
from ..weights import parse_shape
from ._common import (STOP_HINT, DebugOption, DeviceOption, check_paths, info, make_app, open_sink, oracle_files, progress_bars,
                      run_app, stdin_if, warn)

app = make_app("Answer queries with an oracle under a hard budget: a model file, ensemble:F1,F2,... (their mean softmax), "
               "http(s)://HOST:PORT (e.g. kd-serve), "
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
    oracle: str = typer.Argument(..., help="The victim: a model file (.safetensors, TorchScript .pt, torch.export .pt2), ensemble:F1,F2,... (mean of the files' softmax outputs), http(s)://HOST:PORT, exec:CMD or replay:LOG.h5."),
    input: Optional[str] = typer.Argument(None, help="Queries: stream file or HDF5; default '-' (stdin)."),
    mode: str = typer.Option("label", "--mode", help="label | probs | logits | topk:K"),
    budget: Optional[int] = typer.Option(None, "--budget", help="Hard cap on oracle calls, counting those the log already spent "
                                         "(default: the budget recorded in --log, else none). 0: answer from --log alone, pay nothing."),
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
    if budget == 0 and not os.path.exists(log):
        raise KdUsageError(f"--budget 0 answers from the log alone, and {log} does not exist")
    # before the oracle is opened (and anything paid): -o and --log are new files, not the oracle or the queries
    check_paths({"-o": output, "--log": log}, {"the oracle file": oracle_files(oracle), "the query file": [input]})
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
    new_log = bool(log) and not os.path.exists(log)
    # --budget N > 0 is recorded in the log (and refused below what it already spent); --budget 0 pays for nothing
    # and leaves the recorded budget as it was; no --budget keeps to the recorded one (run_queries)
    writer = SampleWriter(log, header, oracle=orc.identity, budget=budget or None, oracle_aliases=orc.aliases) if log else None
    limit = budget if budget is not None else (writer.budget if writer else None)
    spent_before = writer.spent if writer else 0
    sink = None
    try:
        # With a log and a terminal on stdout the answers live in the log alone; without a log they must go somewhere.
        if not (output == "-" and sys.stdout.isatty() and log):
            sink = open_sink(header, output)
    except BaseException:
        _close_log(writer, log, new_log, failed=True)
        raise
    if writer and writer.spent:
        info(f"kd-query: resuming {log}: {counted(writer.rows, 'answer')} logged, {counted(writer.spent, 'query', 'queries')} spent"
             + (f" of {limit}" if limit is not None else "")
             + (" (the budget recorded in the log)" if budget is None and limit is not None else ""))
    if writer:
        STOP_HINT["text"] = f"every answer paid for is in {log}; rerun with the same --log and nothing is paid twice"
    elif sink is not None and sink.path is not None:
        STOP_HINT["text"] = f"what was answered is kept in {output}"
    failed = False
    try:
        with progress_bars(not no_progress) as progress:
            stats = run_queries(source, orc, mode, budget, writer, (lambda b: _write_whole(sink, b)) if sink else None, progress)
    except BudgetExhausted as e:
        if sink and sink.path is None:
            sink.close("budget_exhausted", str(e))
        elif sink:
            kept = _finish_early(sink, "budget_exhausted", str(e).splitlines()[0][:300], output)
            e.args = (f"{e}; {kept}" if kept else f"{e}; no query was answered, so {output} was not written",)
        raise
    except BaseException as e:
        failed = True
        kept = _keep_answered(sink, e, output)
        paid = writer is not None and writer.spent > spent_before
        where = ([f"every answer paid for is in {log}"] if paid else []) + ([kept] if kept else [])
        if where and isinstance(e, KdError):
            e.args = (f"{e}; {'; '.join(where)}",)
        elif not isinstance(e, KdError):
            # Ctrl-C, SIGTERM: run_app appends the hint to its "interrupted" / "terminated" line; with nothing
            # kept the hint set before the run would point at a file that was not written
            STOP_HINT["text"] = "; ".join(where + (["rerun with the same --log and nothing is paid twice"] if paid else []))
        raise
    finally:
        _close_log(writer, log, new_log, failed)
    # an input that stopped early (the kd-query before this one reached its budget) is passed on as such, so the
    # end of the pipeline (kd-distill) still warns that it trains on less than was asked for
    upstream = source.end or {}
    status = upstream.get("status", "complete")
    if status != "complete":
        warn(f"{source.where}: the input stopped early ({status}): {upstream.get('message', '')}; "
             f"answered the {counted(stats.answered, 'query', 'queries')} it held")
    if sink:
        sink.close(status, upstream.get("message", "") if status != "complete" else "")
    info(f"kd-query: answered {counted(stats.answered, 'query', 'queries')} ({stats.paid} paid, {stats.replayed} replayed from the log) "
         f"in {stats.seconds:.1f} s; spent {stats.spent_total}" + (f" of {stats.budget}" if stats.budget is not None else ""))
    places = ([f"the log {log}"] if writer else []) + ([output if sink.path is not None else "stdout"] if sink else [])
    report_remote(orc, " and ".join(places))


def _close_log(writer, log, new_log: bool, failed: bool) -> None:
    if writer:
        writer.close()
        if failed and new_log and writer.spent == 0:
            # a run that failed before paying anything (wrong query shape, a refused first request) must not
            # leave an empty log behind: its header (query shape, answer mode) would refuse the corrected rerun
            os.unlink(log)


@contextmanager
def _signals_deferred():
    """Hold Ctrl-C and SIGTERM while a batch is written to a file, so a stop never leaves half a record in it:
    a signal that arrives meanwhile is only noted, and acted on (the command's own handler) right after.
    Done in Python, not with pthread_sigmask: a mask holds only this thread's signals, and with any other
    thread alive (rich's refresh, an exec oracle's stderr reader) the kernel hands the signal to that one,
    while Python still runs the handler here, mid-write."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if noted:
            handler = previous[noted[0]]
            if callable(handler):
                handler(noted[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), noted[0])


def _write_whole(sink, batch: dict) -> None:
    if sink.path is None:  # a pipe: holding SIGTERM while a stalled reader blocks the write would ignore it
        sink.write(batch)
        return
    with _signals_deferred():
        sink.write(batch)


def _keep_answered(sink, error: BaseException, output: str) -> str:
    """After a failure (an oracle error, a refused query, Ctrl-C, SIGTERM): answers already written to an
    output file were paid for, so they are kept (``_finish_early``); a file with no row is dropped (any
    previous one stays). Returns what to tell about it."""
    if sink is None:
        return ""
    if isinstance(error, KdError):
        why = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
    else:
        why = {"KeyboardInterrupt": "interrupted", "Terminated": "terminated (SIGTERM)"}.get(type(error).__name__, type(error).__name__)
    if sink.path is None:  # stdout: the stream ends with an error record; what was written went downstream
        sink.abort(why)
        return f"the {counted(sink.rows, 'query', 'queries')} answered in this run were written to stdout" if sink.rows else ""
    return _finish_early(sink, "error", why, output)


def _finish_early(sink, status: str, why: str, output: str) -> str:
    """Finish the -o file of a run that stopped before its input ended (a failure, a stop, the budget).

    Its rows were paid for, so they are kept, but never in place of an earlier file: when OUTPUT exists
    they go to a free OUTPUT-stem.partial[-N].suffix beside it. An HDF5 output has no end record (its attributes
    say why it stopped, end_status and end_message), so it always gets the .partial name too, which a reader sees
    without opening it. A run with no row leaves no file."""
    if not sink.rows:
        sink.abort(why)
        return ""
    # a device or a pipe (-o /dev/null, a FIFO) got its rows as they came: nothing to keep apart
    previous = sink.path.exists() and not sink.in_place()
    if not sink.in_place() and (previous or sink.path.suffix.lower() in (".h5", ".hdf5")):
        base, n = sink.path, 1
        partial = base.with_name(f"{base.stem}.partial{base.suffix}")
        while partial.exists():  # an earlier failed run's answers were paid for too
            n += 1
            partial = base.with_name(f"{base.stem}.partial-{n}{base.suffix}")
        sink.retarget(partial)
    try:
        sink.close(status, why)
    except OSError as e:  # the output itself failed (a full disk): say so, the original error stays the one reported
        return f"{sink.path} could not be finished ({e.strerror or e})"
    return (f"the {counted(sink.rows, 'query', 'queries')} answered in this run are kept in {sink.path}"
            + (" (its end record says why it stopped)" if sink.path.suffix.lower() not in (".h5", ".hdf5")
               else " (its end_status attribute says why it stopped)")
            + (f"; {output}, from before, is left as it was" if previous else ""))


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
    # checked whatever the oracle: a typo is a usage error even where the flag does not apply (warn_http_only)
    if wire not in ("json", "stream"):
        raise KdUsageError(f"--wire {wire!r}: expected json or stream")
    if on_rejected not in ("error", "flag"):
        raise KdUsageError(f"--on-rejected {on_rejected!r}: expected error or flag")
    return RemoteOptions(api_key=os.environ.get(api_key_env) or None, timeout=timeout, retries=retries,
                         rate_limit=rate_limit, wire=wire, on_rejected=on_rejected, max_batch=max_batch,
                         api_key_env=api_key_env)


def warn_http_only(orc, remote: RemoteOptions) -> None:
    """--rate-limit, --max-batch, --wire and --on-rejected concern HTTP requests; say so rather than ignore them
    silently elsewhere (--wire and --on-rejected when not left at their defaults)."""
    if orc.kind == "http":
        return
    given = [flag for flag, value in (("--rate-limit", remote.rate_limit), ("--max-batch", remote.max_batch)) if value]
    if given:
        warn(f"{' and '.join(given)} only {'shapes' if len(given) == 1 else 'shape'} requests to an HTTP oracle; ignored for this {orc.kind} oracle")
    given = [f"{flag} {value}" for flag, value, default in (("--wire", remote.wire, "json"), ("--on-rejected", remote.on_rejected, "error"))
             if value != default]
    if given:
        warn(f"{' and '.join(given)} only {'applies' if len(given) == 1 else 'apply'} to an HTTP oracle; ignored for this {orc.kind} oracle"
             + ("; a replay answers queries the recorded server refused as refused (label -1 / empty scores)"
                if orc.kind == "replay" and remote.on_rejected != "error" else ""))


def report_remote(orc, where: str) -> None:
    """What a remote oracle did beyond answering: retries and rejected queries (on stderr). ``where`` names
    the places the answers went (the log, the output file, stdout)."""
    if getattr(orc, "retried_rows", 0):
        warn(f"{getattr(orc, 'url', orc.identity)}: {orc.retried_rows} query rows were re-sent after transient errors "
             "(counted once in the budget; a server that bills failed requests may have charged them)")
    if getattr(orc, "rejected_total", 0):
        warn(f"{getattr(orc, 'url', orc.identity)}: the server's defence rejected {counted(orc.rejected_total, 'query', 'queries')} "
             f"(written as label -1 / empty scores to {where})")
    if getattr(orc, "relayed_rejected", 0):
        warn(f"{getattr(orc, 'url', orc.identity)}: the oracle process answered {counted(orc.relayed_rejected, 'query', 'queries')} as refused "
             f"(written as label -1 / empty scores to {where})")
    if getattr(orc, "replayed_rejected", 0):
        warn(f"replay:{orc.path}: {orc.replayed_rejected} of the replayed queries were refused by the recorded server's defence "
             f"(written as refused, label -1 / empty scores, to {where})")


def main() -> None:
    run_app(app, "kd-query")


if __name__ == "__main__":
    main()
