"""One flavor per way a flavor can be wrong; none may touch implementation_class."""

from __future__ import annotations

from typing import Any

from deployers.base import BaseModelDeployerFlavor, StackComponentConfig, StackComponentType


class _Base(BaseModelDeployerFlavor):
    @property
    def name(self) -> str:
        return "bad"

    @property
    def implementation_class(self) -> Any:
        raise AssertionError("implementation_class must not be read while registering")


class NotAFlavor:
    pass



class AbstractFlavor(BaseModelDeployerFlavor):
    """Forgets both abstract properties."""


class RaisingInitFlavor(_Base):
    def __init__(self) -> None:
        raise RuntimeError("cannot build me")


class EmptyNameFlavor(_Base):
    @property
    def name(self) -> str:
        return ""


class SpacedNameFlavor(_Base):
    @property
    def name(self) -> str:
        return "my flavor"


class RaisingNameFlavor(_Base):
    @property
    def name(self) -> str:
        raise KeyError("no name today")


class WrongTypeFlavor(_Base):
    @property
    def type(self) -> Any:
        return "orchestrator"


class NotAConfig:
    pass


class BadConfigFlavor(_Base):
    @property
    def config_class(self) -> Any:
        return NotAConfig


class PlainComponentConfigFlavor(_Base):
    @property
    def config_class(self) -> Any:
        return StackComponentConfig  # a config, but not a model deployer's


class LocalImpostorFlavor(_Base):
    @property
    def name(self) -> str:
        return "local"


class GoodTypeFlavor(_Base):
    """Valid: registering it must not read implementation_class (which asserts)."""

    @property
    def name(self) -> str:
        return "good"

    @property
    def type(self) -> StackComponentType:
        return StackComponentType.MODEL_DEPLOYER


# an instance where a class is expected
not_a_class = GoodTypeFlavor()


# Valid flavors whose implementation is wrong: found only by get_deployer.


class ImplNotADeployerFlavor(GoodTypeFlavor):
    @property
    def name(self) -> str:
        return "impl-not-a-deployer"

    @property
    def implementation_class(self) -> Any:
        return dict


class ImplAbstractFlavor(GoodTypeFlavor):
    @property
    def name(self) -> str:
        return "impl-abstract"

    @property
    def implementation_class(self) -> Any:
        from deployers.base import BaseModelDeployer

        return BaseModelDeployer


class ImplRaisingInitFlavor(GoodTypeFlavor):
    @property
    def name(self) -> str:
        return "impl-raising-init"

    @property
    def implementation_class(self) -> Any:
        from tests.flavor_fixtures.memory_deployer import InMemoryModelDeployer

        class Raising(InMemoryModelDeployer):
            def __init__(self, config: Any, name: str = "x") -> None:
                raise ValueError("no capacity left")

        return Raising
