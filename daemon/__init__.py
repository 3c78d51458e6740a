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

from ._version import __version__ as __version__

if TYPE_CHECKING:
    # "X as X": an explicit re-export (mypy --strict re-exports no plain import; see __all__).
    from .client import (
        AsyncDaemonClient as AsyncDaemonClient,
        DaemonClient as DaemonClient,
        VersionMismatchWarning as VersionMismatchWarning,
    )
    from .config import (
        RestartPolicy as RestartPolicy,
        ServiceConfig as ServiceConfig,
    )
    from .exceptions import (
        AdmissionRefused as AdmissionRefused,
        Conflict as Conflict,
        DaemonAlreadyRunning as DaemonAlreadyRunning,
        DaemonError as DaemonError,
        DaemonNotRunning as DaemonNotRunning,
        DaemonStartError as DaemonStartError,
        DeployError as DeployError,
        FlavorError as FlavorError,
        Forbidden as Forbidden,
        ForkServerError as ForkServerError,
        InternalError as InternalError,
        InvalidRequest as InvalidRequest,
        MethodNotAllowed as MethodNotAllowed,
        ModeldError as ModeldError,
        NotFound as NotFound,
        PayloadTooLarge as PayloadTooLarge,
        ProtocolError as ProtocolError,
        RequestError as RequestError,
        ServiceError as ServiceError,
        ServiceNotFound as ServiceNotFound,
        StillStarting as StillStarting,
        StopError as StopError,
        StorageError as StorageError,
    )
    from .models import (
        SERVICE_REGISTRY as SERVICE_REGISTRY,
        BaseService as BaseService,
        DesiredState as DesiredState,
        LocalModelService as LocalModelService,
        ServiceEndpoint as ServiceEndpoint,
        ServiceRegistry as ServiceRegistry,
        ServiceState as ServiceState,
        ServiceStatus as ServiceStatus,
        ServiceType as ServiceType,
    )

_EXPORTS = {
    "AdmissionRefused": "exceptions",
    "AsyncDaemonClient": "client",
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
    "RestartPolicy": "config",
    "SERVICE_REGISTRY": "models",
    "ServiceConfig": "config",
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
