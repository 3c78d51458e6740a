"""modeld's engine: the service model, the on-disk store, supervision, the socket API and its client.

The public names are the service model, the client and the whole exception
tree of ``daemon.exceptions`` (every class under ``ModeldError``). Plumbing
(``daemon.paths.Paths``, ``default_home``, the store, the manager) is imported
from its own module.

Names are imported on first use (PEP 562), so ``python -m daemon`` and the
built-in model server do not pay for pydantic until they need it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .client import DaemonClient, VersionMismatchWarning
    from .exceptions import (
        Conflict, DaemonAlreadyRunning, DaemonError, DaemonNotRunning, DaemonStartError, DeployError, FlavorError,
        Forbidden, ForkServerError, InternalError, InvalidRequest, MethodNotAllowed, ModeldError, NotFound,
        PayloadTooLarge, ProtocolError, RequestError, ServiceError, ServiceNotFound, StillStarting, StopError,
        StorageError,
    )
    from .models import (
        SERVICE_REGISTRY, BaseService, DesiredState, LocalModelService, RestartPolicy, ServiceConfig,
        ServiceEndpoint, ServiceRegistry, ServiceState, ServiceStatus, ServiceType,
    )

_EXPORTS = {
    "BaseService": "models",
    "Conflict": "exceptions",
    "DaemonAlreadyRunning": "exceptions",
    "DaemonClient": "client",
    "DaemonError": "exceptions",
    "DaemonNotRunning": "exceptions",
    "DaemonStartError": "exceptions",
    "DeployError": "exceptions",
    "DesiredState": "models",
    "FlavorError": "exceptions",
    "Forbidden": "exceptions",
    "ForkServerError": "exceptions",
    "InternalError": "exceptions",
    "InvalidRequest": "exceptions",
    "LocalModelService": "models",
    "MethodNotAllowed": "exceptions",
    "ModeldError": "exceptions",
    "NotFound": "exceptions",
    "PayloadTooLarge": "exceptions",
    "ProtocolError": "exceptions",
    "RequestError": "exceptions",
    "RestartPolicy": "models",
    "SERVICE_REGISTRY": "models",
    "ServiceConfig": "models",
    "ServiceEndpoint": "models",
    "ServiceError": "exceptions",
    "ServiceNotFound": "exceptions",
    "ServiceRegistry": "models",
    "ServiceState": "models",
    "ServiceStatus": "models",
    "ServiceType": "models",
    "StillStarting": "exceptions",
    "StopError": "exceptions",
    "StorageError": "exceptions",
    "VersionMismatchWarning": "client",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'daemon' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
