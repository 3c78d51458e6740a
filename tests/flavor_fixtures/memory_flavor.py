"""A working flavor whose deployer keeps services in memory (a fake for tests)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from deployers.base import BaseModelDeployerConfig, BaseModelDeployerFlavor

if TYPE_CHECKING:
    from tests.flavor_fixtures.memory_deployer import InMemoryModelDeployer


class InMemoryModelDeployerConfig(BaseModelDeployerConfig):
    capacity: int = 10
    label: str = "memory"
    strict: bool = False


class InMemoryModelDeployerFlavor(BaseModelDeployerFlavor):
    @property
    def name(self) -> str:
        return "memory"

    @property
    def config_class(self) -> type[InMemoryModelDeployerConfig]:
        return InMemoryModelDeployerConfig

    @property
    def implementation_class(self) -> type[InMemoryModelDeployer]:
        from tests.flavor_fixtures.memory_deployer import InMemoryModelDeployer

        return InMemoryModelDeployer
