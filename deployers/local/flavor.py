"""The ``local`` flavor: model servers supervised by the modeld daemon on this machine.

This module holds only the flavor and its config, and imports the
implementation (``deployers.local.deployer``) inside
``implementation_class``, so registering a ``local`` deployer validates its
settings without loading the daemon client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from deployers.base import BaseModelDeployerConfig, BaseModelDeployerFlavor

if TYPE_CHECKING:
    from deployers.local.deployer import LocalDaemonModelDeployer

LOCAL_FLAVOR = "local"


class LocalDaemonModelDeployerConfig(BaseModelDeployerConfig):
    """How to reach the daemon; the defaults are those of the ``modeld`` command."""

    home: str | None = Field(None, description="modeld home; default: $MODELD_HOME or $XDG_STATE_HOME/modeld")
    socket: str | None = Field(None, description="control socket; default: $MODELD_SOCKET or <home>/modeld.sock")
    auto_start: bool = Field(True, description="start the daemon when none answers")


class LocalDaemonModelDeployerFlavor(BaseModelDeployerFlavor):
    """The flavor that ships with modeld; it cannot be overridden by a registered one."""

    @property
    def name(self) -> str:
        return LOCAL_FLAVOR

    @property
    def config_class(self) -> type[LocalDaemonModelDeployerConfig]:
        return LocalDaemonModelDeployerConfig

    @property
    def implementation_class(self) -> type[LocalDaemonModelDeployer]:
        from deployers.local.deployer import LocalDaemonModelDeployer

        return LocalDaemonModelDeployer
