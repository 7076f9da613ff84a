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
    """The oracle cannot answer these queries and would fail the same way if asked again (a server's HTTP 422,
    a replayed log that does not hold them): callers should not retry, and a server passing it on says 422."""
