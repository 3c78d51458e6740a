"""The model-deployer abstraction (ZenML's interface) and the flavors modeld ships.

``deployers`` imports ``daemon``, never the reverse. The ``local`` deployer
is loaded on first access to ``LocalDaemonModelDeployer`` (PEP 562), so
importing a flavor module never imports an implementation, as the flavor
design promises; the deployer in turn builds the daemon client on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deployers.base import (
    DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
    BaseModelDeployer,
    BaseModelDeployerConfig,
    BaseModelDeployerFlavor,
    StackComponentType,
)
from deployers.local.flavor import LocalDaemonModelDeployerConfig, LocalDaemonModelDeployerFlavor
from deployers.registry import FlavorRegistry, get_deployer

if TYPE_CHECKING:
    from deployers.local.deployer import LocalDaemonModelDeployer

__all__ = [
    "BaseModelDeployer",
    "BaseModelDeployerConfig",
    "BaseModelDeployerFlavor",
    "DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT",
    "FlavorRegistry",
    "LocalDaemonModelDeployer",
    "LocalDaemonModelDeployerConfig",
    "LocalDaemonModelDeployerFlavor",
    "StackComponentType",
    "get_deployer",
]


def __getattr__(name: str) -> Any:
    if name == "LocalDaemonModelDeployer":
        from deployers.local.deployer import LocalDaemonModelDeployer

        return LocalDaemonModelDeployer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
