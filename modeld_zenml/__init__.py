"""modeld as a ZenML model-deployer flavor (``pip install 'modeld[zenml]'``).

Nothing in modeld's core imports this package or ZenML. Register it with::

    zenml model-deployer flavor register modeld_zenml.ModeldModelDeployerFlavor
    zenml model-deployer register modeld --flavor=modeld

Names are imported on first use, so registering the flavor does not import
the deployer and its service.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # "X as X": an explicit re-export (mypy --strict re-exports no plain import; see __all__).
    from .deployer import ModeldModelDeployer as ModeldModelDeployer
    from .flavor import (
        MODELD_FLAVOR as MODELD_FLAVOR,
        ModeldModelDeployerConfig as ModeldModelDeployerConfig,
        ModeldModelDeployerFlavor as ModeldModelDeployerFlavor,
    )
    from .service import (
        ModeldDeploymentConfig as ModeldDeploymentConfig,
        ModeldDeploymentEndpoint as ModeldDeploymentEndpoint,
        ModeldDeploymentService as ModeldDeploymentService,
        ModeldDeploymentServiceStatus as ModeldDeploymentServiceStatus,
    )

_EXPORTS = {
    "MODELD_FLAVOR": "flavor",
    "ModeldDeploymentConfig": "service",
    "ModeldDeploymentEndpoint": "service",
    "ModeldDeploymentService": "service",
    "ModeldDeploymentServiceStatus": "service",
    "ModeldModelDeployer": "deployer",
    "ModeldModelDeployerConfig": "flavor",
    "ModeldModelDeployerFlavor": "flavor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'modeld_zenml' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
