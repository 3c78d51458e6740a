"""The ``local`` flavor. Only the flavor and config are imported here; the
deployer lives in :mod:`deployers.local.deployer` and is loaded on use."""

from __future__ import annotations

from deployers.local.flavor import LocalDaemonModelDeployerConfig, LocalDaemonModelDeployerFlavor

__all__ = ["LocalDaemonModelDeployerConfig", "LocalDaemonModelDeployerFlavor"]
