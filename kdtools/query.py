"""kd-query's work: answer a source of queries with an oracle, under a hard budget, logging everything.

Order of operations per batch (why: a kill at any point must neither lose a paid answer nor overspend):
  1. rows the log already holds for these exact queries are answered from the log (a rerun after a
     crash or a resumed pipeline pays nothing twice);
  2. the new rows are cut to what the budget still allows, and that count is *reserved* in the log
     (persisted) before the oracle is called;
  3. the answers are appended to the log and flushed, and only then written downstream.
An oracle that fails part-way through a batch (an HTTP oracle whose second request fails, a server
that rejects a query, Ctrl-C or SIGTERM between two requests) raises an error carrying the answers it
did get (``partial``): those are logged and written downstream before the error propagates.

Budget: ``budget`` caps the oracle calls, the log's spent count included. Without one (None), the
budget recorded in the log (``SampleWriter.budget``) holds, so a rerun that forgets ``--budget`` does
not overspend; a new budget must be given explicitly. ``budget=0`` answers from the log alone.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from .data import to_float
from .errors import BudgetExhausted, KdError, counted
from .h5store import SampleWriter
from .oracle import Oracle, QueryStats, answer_rows, response_fields
from .progress import ProgressCallback, ProgressEvent, no_progress
from .sources import SampleSource
from .stream import StreamHeader


def check_queries(x: torch.Tensor, input_shape: Optional[tuple], where: str) -> None:
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        shape = "x".join(map(str, x.shape[1:]))
        want = "x".join(map(str, input_shape))
        raise KdError(f"{where}: queries are {shape} but the oracle takes {want} "
                      f"(make them with kd-gen-queries --like VICTIM, or --image-size/--channels)")
    if x.dtype.is_floating_point:
        bad = ~torch.isfinite(x)
        if bad.any():
            raise KdError(f"{where}: queries contain NaN or infinite values ({counted(int(bad.flatten(1).any(1).sum()), 'row')})")


def output_header(source_header: StreamHeader, oracle: Oracle, mode: str, options: dict) -> StreamHeader:
    fields = {"x": source_header.fields["x"], **response_fields(mode, oracle.num_classes)}
    extra = {"oracle": oracle.identity, "oracle_kind": oracle.kind, "source": source_header.extra, "options": options}
    return StreamHeader("samples", fields, oracle.num_classes, source_header.value_range, mode, extra)


def run_queries(source: SampleSource, oracle: Oracle, mode: str, budget: Optional[int] = None,
                log: Optional[SampleWriter] = None, emit: Optional[Callable[[dict], None]] = None,
                progress: ProgressCallback = no_progress, total_hint: Optional[int] = None) -> QueryStats:
    """Answer every batch of ``source``; ``emit`` receives each answered batch (x + answer fields).

    Raises BudgetExhausted after answering, logging and emitting what fitted. ``budget`` None: the
    budget recorded in ``log`` (if any) applies.
    """
    if "x" not in source.header.fields:
        raise KdError(f"{source.where}: the input has no queries (field x)")
    t0 = time.perf_counter()
    budget_from_log = budget is None and log is not None and log.budget is not None
    if budget_from_log:
        budget = log.budget
    stats = QueryStats(budget=budget)
    spent = log.spent if log else 0
    replay_upto = log.rows if log else 0  # rows of the log that may answer this run's first queries
    cursor = 0  # position of the next incoming row
    replaying = replay_upto > 0

    for batch in source:
        x = batch["x"]
        check_queries(x, oracle.input_shape, source.where)
        n = x.shape[0]
        answered: list[dict] = []
        start = 0
        if replaying and cursor < replay_upto:
            k = min(n, replay_upto - cursor)
            logged = log.read_rows(cursor, cursor + k)
            same = (logged["x"] == x[:k]).flatten(1).all(1)
            j = k if bool(same.all()) else int((~same).nonzero()[0])
            if j:
                answered.append({k: v[:j] for k, v in logged.items()} | {"x": x[:j]})
                stats.replayed += j
            if j < k:
                replaying = False  # the input went another way: from here on every query is new
            start = j
        cursor += n
        rest = n - start
        paid_rows = rest
        if budget is not None:
            paid_rows = max(0, min(rest, budget - spent))
        error = None
        if paid_rows:
            xq = x[start:start + paid_rows]
            if log:
                log.reserve(paid_rows)
            spent += paid_rows
            stats.paid += paid_rows
            try:
                answer = oracle.answer(to_float(xq), mode)
            except BaseException as e:
                # a remote oracle that failed (or was stopped) part-way, or a query defence, hands back what it
                # answered before: those rows were paid for, so they are logged and passed on before the error
                error, answer = e, getattr(e, "partial", None) or {}
            got = answer_rows(answer)
            if error is None and got != paid_rows:
                raise KdError(f"{getattr(oracle, 'url', oracle.identity)}: answered {counted(got, 'row')} for {counted(paid_rows, 'query', 'queries')}")
            if error is not None and oracle.free_on_failure and got < paid_rows:
                # nothing left this machine: the rows not answered are not spent (the log stays rows == spent)
                if log:
                    log.release(paid_rows - got)
                spent -= paid_rows - got
                stats.paid -= paid_rows - got
            if got:
                new = {"x": xq[:got], **answer}
                if log:
                    log.append(new)
                answered.append(new)
        if answered:
            out = {k: torch.cat([a[k] for a in answered]) for k in answered[0]}
            stats.answered += out["x"].shape[0]
            if emit:
                emit(out)
        if error is not None:
            raise error
        progress(ProgressEvent("querying", stats.answered, total_hint, {"spent": spent, "replayed": stats.replayed}))
        if paid_rows < rest:
            stats.status = "budget_exhausted"
            stats.spent_total = spent
            stats.seconds = time.perf_counter() - t0
            if budget == 0:
                raise BudgetExhausted(f"--budget 0 pays for nothing: answered {counted(stats.answered, 'query', 'queries')} from the log; the other "
                                      f"{rest - paid_rows} of the current batch and any input after it are not in the log "
                                      "(in this order) and were not asked; everything answered is kept; a --budget above the "
                                      f"{spent} queries the log spent pays for them")
            where = f" (recorded in {log.path}; --budget N sets a new one)" if budget_from_log else ""
            raise BudgetExhausted(f"query budget of {budget}{where} reached: answered {counted(stats.answered, 'query', 'queries')} in this run "
                                  f"({stats.paid} paid, {stats.replayed} from the log); the other {rest - paid_rows} of the "
                                  "current batch and any input after it are unanswered; everything answered is kept"
                                  + ("; a larger --budget with the same --log goes on without paying twice" if log else ""))
    stats.spent_total = spent
    stats.seconds = time.perf_counter() - t0
    progress(ProgressEvent("querying", stats.answered, stats.answered, {"spent": spent}, done=True))
    return stats
