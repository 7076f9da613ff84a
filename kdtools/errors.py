"""Exceptions that the command-line layer turns into exit codes.

Library code raises these with a message meant for a person; the CLI prints the message on one
line of stderr and exits with the matching code (no traceback unless ``--debug``).
"""


class KdError(Exception):
    """A data or runtime problem: bad file, budget spent, oracle failure. Exit code 1."""

    exit_code = 1


class KdUsageError(KdError):
    """The command line itself is wrong (bad option value, incompatible flags). Exit code 2."""

    exit_code = 2


class BudgetExhausted(KdError):
    """The query budget ran out; everything answered before that point has been recorded."""


class UnanswerableQueries(KdError):
    """A server answered HTTP 422: it cannot answer these queries and would fail the same way if asked again.
    Callers should not retry, and a kd-serve proxying that server passes the 422 on (as it does for its own model
    file or replayed log failing, which raise plain KdError from oracles marked ``free_on_failure``)."""


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and the noun in the number it takes, for messages: ``counted(1, "row")`` is "1 row",
    ``counted(3, "query", "queries")`` is "3 queries" (the plural defaults to the noun plus "s")."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
