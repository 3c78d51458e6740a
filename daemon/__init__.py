"""modeld's engine: the service model, the on-disk store, supervision, the socket API and its client.

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
        Conflict, DaemonError, DaemonNotRunning, DaemonStartError, DeployError, InvalidRequest,
        ModeldError, ServiceNotFound, StopError,
    )
    from .models import (
        SERVICE_REGISTRY, BaseService, DesiredState, LocalModelService, RestartPolicy, ServiceConfig,
        ServiceEndpoint, ServiceRegistry, ServiceState, ServiceStatus, ServiceType,
    )
    from .paths import Paths, default_home

_EXPORTS = {
    "BaseService": "models",
    "Conflict": "exceptions",
    "DaemonClient": "client",
    "DaemonError": "exceptions",
    "DaemonNotRunning": "exceptions",
    "DaemonStartError": "exceptions",
    "DeployError": "exceptions",
    "DesiredState": "models",
    "InvalidRequest": "exceptions",
    "LocalModelService": "models",
    "ModeldError": "exceptions",
    "Paths": "paths",
    "RestartPolicy": "models",
    "SERVICE_REGISTRY": "models",
    "ServiceConfig": "models",
    "ServiceEndpoint": "models",
    "ServiceNotFound": "exceptions",
    "ServiceRegistry": "models",
    "ServiceState": "models",
    "ServiceStatus": "models",
    "ServiceType": "models",
    "StopError": "exceptions",
    "VersionMismatchWarning": "client",
    "default_home": "paths",
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
