"""One exception hierarchy for everything modeld raises at its boundaries.

    ModeldError                      base; ``.type`` names it on the wire
    ├── DaemonError                  talking to the daemon failed
    │   ├── DaemonNotRunning         no daemon answers and auto-start is off
    │   ├── DaemonStartError         auto-start tried and the daemon did not come up
    │   ├── DaemonAlreadyRunning     a second daemon on the same home
    │   └── ProtocolError            the daemon answered something unreadable
    ├── RequestError                 the request itself is wrong (4xx)
    │   ├── InvalidRequest           400: bad JSON, wrong types, unknown fields
    │   ├── ServiceNotFound          404
    │   ├── Conflict                 409: e.g. uuid already taken
    │   └── PayloadTooLarge          413
    ├── ServiceError                 the model server did not do what was asked (5xx)
    │   ├── DeployError              failed to start or to become healthy
    │   └── StopError                could not be stopped in time
    ├── StorageError                 the state on disk could not be read or written
    └── FlavorError                  a flavor or deployer could not be registered/loaded

OS and library errors are converted where they are caught, with ``raise … from exc``.
The daemon serialises an error as ``{"error": {"type": ..., "message": ...}}``;
the client turns it back into the same class.
"""

from __future__ import annotations


class ModeldError(Exception):
    """Base of every error modeld raises on purpose."""

    status_code = 500

    @property
    def type(self) -> str:
        return type(self).__name__

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.type

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message}


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


class ServiceNotFound(RequestError):
    status_code = 404


class Conflict(RequestError):
    status_code = 409


class PayloadTooLarge(RequestError):
    status_code = 413


class ServiceError(ModeldError):
    status_code = 500


class DeployError(ServiceError):
    status_code = 500


class StopError(ServiceError):
    status_code = 500


class StorageError(ModeldError):
    status_code = 507


class FlavorError(ModeldError):
    status_code = 400


ERRORS: dict[str, type[ModeldError]] = {
    cls.__name__: cls
    for cls in (
        ModeldError, DaemonError, DaemonNotRunning, DaemonStartError, DaemonAlreadyRunning,
        ProtocolError, RequestError, InvalidRequest, ServiceNotFound, Conflict, PayloadTooLarge,
        ServiceError, DeployError, StopError, StorageError, FlavorError,
    )
}


def error_from_dict(status: int, data: object) -> ModeldError:
    """Rebuild the daemon's JSON error as the matching exception class."""
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
        cls = ERRORS.get(str(err.get("type")), RequestError if 400 <= status < 500 else ServiceError)
        return cls(str(err.get("message", "")))
    return ProtocolError(f"daemon answered {status} with no error body")
