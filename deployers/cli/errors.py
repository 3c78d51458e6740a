"""Errors on the command line: each one line on stderr, with its exit code chosen in one place
(:data:`EXIT_CODES`, the first class the error is an instance of), never a traceback."""

from __future__ import annotations

from daemon import exceptions as exc
from deployers.cli.output import printable

EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (exc.ServiceNotFound, 4),
    (exc.InvalidRequest, 2),  # (first: a refusal that is also a DeployError, as a flavor's may be, is a 400)
    (exc.DeployError, 5),
    (exc.StopError, 5),
    (exc.DaemonNotRunning, 3),
    (exc.DaemonStartError, 3),
    (exc.DaemonAlreadyRunning, 3),
    (exc.RequestError, 2),
    (exc.FlavorError, 2),
    (exc.ModeldError, 1),
]


class UsageError(exc.RequestError):
    pass


def one_line(error: exc.ModeldError | str) -> str:
    """An error on one line: of the server's log excerpt it carries (``log_excerpt``), only the last line.

    A service's ``last_error`` is text (the status records no excerpt apart): read as the error it was.
    """
    if isinstance(error, str):
        error = exc.ModeldError(error)
    lines = [line.strip() for line in (error.log_excerpt or "").splitlines() if line.strip()]
    head = error.headline
    # (a server's log, quoted in an error, may hold escapes and control characters: not for a terminal)
    return printable(f"{head} (last log line: {lines[-1]})" if lines else " ".join(head.split()))
