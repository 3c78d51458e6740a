"""The ``modeld`` model-deployer flavor for ZenML: its name, its config, where its implementation is.

ZenML imports this module when the flavor is registered
(``zenml model-deployer flavor register modeld_zenml.ModeldModelDeployerFlavor``)
and when it validates a deployer's settings; the implementation, which talks
to the daemon, is imported only when the deployer is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field
from zenml.model_deployers.base_model_deployer import BaseModelDeployerConfig, BaseModelDeployerFlavor

if TYPE_CHECKING:
    from modeld_zenml.deployer import ModeldModelDeployer

MODELD_FLAVOR = "modeld"


class ModeldModelDeployerConfig(BaseModelDeployerConfig):
    """Which modeld daemon the deployer talks to (it starts by itself on first use)."""

    home: str | None = Field(
        default=None,
        description="The daemon's state folder (MODELD_HOME). Default: $MODELD_HOME of the process that "
        "deploys, else ~/.local/state/modeld. Each deployed service records the resolved folder, so the "
        "ZenML CLI finds its daemon from any shell.",
    )
    socket: str | None = Field(
        default=None,
        description="The daemon's control socket. Default: <home>/modeld.sock (or $MODELD_SOCKET).",
    )

    @property
    def is_local(self) -> bool:
        """Model servers run on this machine."""
        return True


class ModeldModelDeployerFlavor(BaseModelDeployerFlavor):
    """Deploys model servers as processes supervised by the local modeld daemon."""

    @property
    def name(self) -> str:
        return MODELD_FLAVOR

    @property
    def display_name(self) -> str:
        return "modeld"

    @property
    def config_class(self) -> type[ModeldModelDeployerConfig]:
        return ModeldModelDeployerConfig

    @property
    def implementation_class(self) -> type[ModeldModelDeployer]:
        from modeld_zenml.deployer import ModeldModelDeployer

        return ModeldModelDeployer
