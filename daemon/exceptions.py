"""One exception hierarchy for everything modeld raises at its boundaries.

    ModeldError                      base; ``.type`` names it on the wire
    ├── DaemonError                  talking to the daemon failed (503)
    │   ├── DaemonNotRunning         no daemon answers and auto-start is off
    │   ├── DaemonStartError         auto-start tried and the daemon did not come up
    │   ├── DaemonAlreadyRunning     a second daemon on the same home (409)
    │   └── ProtocolError            the daemon answered something unreadable (502)
    ├── RequestError                 the request itself is wrong (4xx)
    │   ├── InvalidRequest           400: bad JSON, wrong types, unknown fields, unparsable HTTP
    │   ├── Forbidden                403: a peer of another uid
    │   ├── ServiceNotFound          404: no such service
    │   ├── NotFound                 404: no such route
    │   ├── MethodNotAllowed         405: the route exists, not with this method
    │   ├── Conflict                 409: e.g. uuid already taken
    │   └── PayloadTooLarge          413
    ├── ServiceError                 the model server did not do what was asked (5xx)
    │   ├── DeployError              failed to start or to become healthy
    │   │   └── StillStarting        the caller's timeout ran out; it may still become healthy
    │   ├── StopError                could not be stopped in time
    │   ├── AdmissionRefused         503: no room under max_active/memory_budget in time (names the cap and what holds it)
    │   └── ForkServerError          the fork server cannot start a server now (also an OSError)
    ├── InternalError                500: the daemon hit a bug; it logged it and goes on
    ├── StorageError                 the state on disk could not be read or written (507)
    └── FlavorError                  a flavor or deployer could not be registered/loaded

OS and library errors are converted once, at the boundary of the unit that called the helper, with
``raise … from exc``: the low-level helpers (``sockets.py``, ``process.py``, ``forkservers.py``,
``paths.py``) raise ``OSError`` subclasses whose text is the sentence a client reads, and the
Launcher, the Supervisor, the daemon process or the client decides which class it is. The Store
is a unit of its own: its public reads and writes raise StorageError themselves.

Wire format (the daemon's ``api.py`` and ``daemon_process.py`` write it, the client's
transport reads it)::

    {"error": {"type": "<class name>", "message": "<text>", "log_excerpt": "<lines>"}}

Invariants:

* every class here has a distinct ``type`` and is in :data:`ERRORS`, so the
  client raises the very class the daemon raised (a ``type`` it does not know,
  from a newer daemon, falls back to ``RequestError`` for a 4xx status and
  ``ServiceError`` otherwise);
* ``message`` is the whole text, as older clients read it: it still holds
  the log excerpt after ``; last log lines:`` (:data:`LOG_EXCERPT_MARKER`);
* ``log_excerpt`` (a server's last log lines, secrets masked) is present only
  when there is one; ``headline`` is the message without it.
"""

from __future__ import annotations

from typing import Any

LOG_EXCERPT_MARKER = "; last log lines:\n"


class ModeldError(Exception):
    """Base of every error modeld raises on purpose."""

    status_code = 500

    def __init__(self, message: str | None = None, *, log_excerpt: str | None = None) -> None:
        super().__init__(*(() if message is None else (message,)))
        if log_excerpt is None and message is not None:
            # An error made from its text alone (the manager appends the excerpt to the message,
            # and errors are re-raised with their text): the excerpt is what follows the marker.
            _, found, rest = message.partition(LOG_EXCERPT_MARKER)
            log_excerpt = rest if found else None
        self.log_excerpt: str | None = log_excerpt or None

    @property
    def type(self) -> str:
        return type(self).__name__

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.type

    @property
    def headline(self) -> str:
        """The message without the log excerpt it may carry."""
        return self.message.partition(LOG_EXCERPT_MARKER)[0]

    def to_dict(self) -> dict[str, str]:
        data = {"type": self.type, "message": self.message}
        if self.log_excerpt is not None:
            data["log_excerpt"] = self.log_excerpt
        return data


def with_log_excerpt(message: str, lines: str) -> str:
    """``message`` followed by a server's last log lines, as every error message has carried them."""
    return f"{message}{LOG_EXCERPT_MARKER}{lines}" if lines.strip() else message


class DaemonError(ModeldError):
    status_code = 503


class DaemonNotRunning(DaemonError):
    pass


class DaemonStartError(DaemonError):
    pass


class DaemonAlreadyRunning(DaemonError):
    status_code = 409


class ProtocolError(DaemonError):
    status_code = 502


class RequestError(ModeldError):
    status_code = 400


class InvalidRequest(RequestError):
    status_code = 400


class Forbidden(RequestError):
    status_code = 403


class ServiceNotFound(RequestError):
    status_code = 404


class NotFound(RequestError):
    """No route has this path (a service that does not exist is ``ServiceNotFound``)."""

    status_code = 404


class MethodNotAllowed(RequestError):
    status_code = 405


class Conflict(RequestError):
    status_code = 409


class PayloadTooLarge(RequestError):
    status_code = 413


class ServiceError(ModeldError):
    status_code = 500


class DeployError(ServiceError):
    status_code = 500


class StillStarting(DeployError):
    """The caller's timeout ran out while the server may still become healthy within its startup_timeout."""


class StopError(ServiceError):
    status_code = 500


class AdmissionRefused(ServiceError):
    """An on-demand service could not be loaded: a cap (``max_active``, ``memory_budget``) stayed held by
    servers that could not be unloaded until the wait ran out (``admission.py``). The message says which."""

    status_code = 503


class ForkServerError(ServiceError, OSError):
    """The fork server cannot start a server now (not started, gone, or not answering); spawn cold instead.

    Also an ``OSError``, as it was before it joined the tree, so handlers of OS errors still take it.
    """


class InternalError(ModeldError):
    """The daemon failed on something it did not expect (a bug): it answered, logged it and goes on."""

    status_code = 500


class StorageError(ModeldError):
    status_code = 507


class FlavorError(ModeldError):
    status_code = 400


ERRORS: dict[str, type[ModeldError]] = {
    cls.__name__: cls
    for cls in (
        ModeldError,
        DaemonError,
        DaemonNotRunning,
        DaemonStartError,
        DaemonAlreadyRunning,
        ProtocolError,
        RequestError,
        InvalidRequest,
        Forbidden,
        ServiceNotFound,
        NotFound,
        MethodNotAllowed,
        Conflict,
        PayloadTooLarge,
        ServiceError,
        DeployError,
        StillStarting,
        StopError,
        AdmissionRefused,
        ForkServerError,
        InternalError,
        StorageError,
        FlavorError,
    )
}


def error_from_dict(status: int, data: object) -> ModeldError:
    """Rebuild the daemon's JSON error as the matching exception class."""
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err: dict[str, Any] = data["error"]
        cls = ERRORS.get(str(err.get("type")), RequestError if 400 <= status < 500 else ServiceError)
        excerpt = err.get("log_excerpt")
        return cls(str(err.get("message", "")), log_excerpt=excerpt if isinstance(excerpt, str) else None)
    return ProtocolError(f"daemon answered {status} with no error body")
