"""A flavor whose implementation needs a library that is not installed.

Registering the flavor and a deployer of it must work; only loading the
deployer may fail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from deployers.base import BaseModelDeployerConfig, BaseModelDeployerFlavor

if TYPE_CHECKING:
    from deployers.base import BaseModelDeployer


class BrokenModelDeployerConfig(BaseModelDeployerConfig):
    endpoint: str
    replicas: int = Field(1, ge=1)


class BrokenModelDeployerFlavor(BaseModelDeployerFlavor):
    @property
    def name(self) -> str:
        return "broken"

    @property
    def config_class(self) -> type[BrokenModelDeployerConfig]:
        return BrokenModelDeployerConfig

    @property
    def implementation_class(self) -> type[BaseModelDeployer]:
        from tests.flavor_fixtures.broken_impl import BrokenModelDeployer  # type: ignore[attr-defined]

        return BrokenModelDeployer  # type: ignore[no-any-return]
