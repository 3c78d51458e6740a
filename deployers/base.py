"""The model-deployer abstraction, in the shape of ZenML's.

ZenML's custom-model-deployer guide (``/work/shared/seeds``) is the
contract: the six abstract methods of :class:`BaseModelDeployer`, their
parameter names, defaults and return types are copied from it verbatim
(including its ``typing`` spelling), so a deployer written for ZenML ports
by changing its imports. ZenML itself is not imported: ``StackComponent``,
``StackComponentConfig`` and ``Flavor`` below are the minimal shapes those
methods need, without ZenML's stacks, store and users.

A flavor ties three things together, each imported only when needed:

* the flavor class — imported when the flavor is registered;
* its config class — imported when a deployer of that flavor is registered,
  to validate the values the user gave;
* its implementation class — imported only when a deployer is used, so
  flavors and deployers can be registered on a machine that lacks the
  implementation's heavy dependencies.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import ClassVar, Dict, List, Optional, Type
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from daemon.config import ServiceConfig
from daemon.models import BaseService

DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT = 300


class StackComponentType(str, enum.Enum):
    """Kinds of stack component; modeld only has model deployers (ZenML has more)."""

    MODEL_DEPLOYER = "model_deployer"  # deploys model servers and finds them again

    def __str__(self) -> str:
        return self.value


class StackComponentConfig(BaseModel):
    """Settings of a stack component, validated when the component is registered.

    Unknown keys are refused so that a typo in ``key=value`` settings fails
    at registration instead of being silently ignored.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class StackComponent:
    """A configured, named component (ZenML's shape, minus stacks and users)."""

    def __init__(self, config: StackComponentConfig, name: str = "default") -> None:
        self.config = config
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, config={self.config!r})"


class Flavor(ABC):
    """Names a kind of component and where its config and implementation live.

    All four are properties so that ``implementation_class`` can import its
    module lazily, inside the property.
    """

    @property
    @abstractmethod
    def name(self) -> str:
        """The name users refer to the flavor by."""

    @property
    @abstractmethod
    def type(self) -> StackComponentType:
        """The kind of component this flavor makes."""

    @property
    @abstractmethod
    def config_class(self) -> Type[StackComponentConfig]:
        """The pydantic class that validates a component's settings."""

    @property
    @abstractmethod
    def implementation_class(self) -> Type[StackComponent]:
        """The class that does the work; import its module here, not at the top."""


class BaseModelDeployerConfig(StackComponentConfig):
    """Base class for all model deployer configurations."""


class BaseModelDeployer(StackComponent, ABC):
    """Base class for all model deployers.

    A model deployer deploys model servers, updates them in place on
    ``replace`` (continuous deployment), and acts as a registry of the
    servers it manages: ``find_model_server`` rebuilds their
    :class:`~daemon.models.BaseService` from wherever they are persisted.
    """

    TYPE: ClassVar[StackComponentType] = StackComponentType.MODEL_DEPLOYER
    # Subclasses name their flavor (ZenML's guide asks for it).
    FLAVOR: ClassVar[Type[BaseModelDeployerFlavor]]

    config: BaseModelDeployerConfig

    @abstractmethod
    def deploy_model(
        self,
        config: ServiceConfig,
        replace: bool = False,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
    ) -> BaseService:
        """Deploy a model; with ``replace``, update the server of the same
        pipeline, step and model in place instead of starting a second one."""

    @staticmethod
    @abstractmethod
    def get_model_server_info(
        service: BaseService,
    ) -> Dict[str, Optional[str]]:
        """Give implementation-specific way to extract relevant model server
        properties for the user."""

    @abstractmethod
    def find_model_server(
        self,
        running: bool = False,
        service_uuid: Optional[UUID] = None,
        pipeline_name: Optional[str] = None,
        pipeline_run_id: Optional[str] = None,
        pipeline_step_name: Optional[str] = None,
        model_name: Optional[str] = None,
        model_uri: Optional[str] = None,
        model_type: Optional[str] = None,
    ) -> List[BaseService]:
        """Find the model servers that match all the given criteria
        (``None`` matches anything; ``running`` keeps only active ones)."""

    @abstractmethod
    def stop_model_server(
        self,
        uuid: UUID,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
        force: bool = False,
    ) -> None:
        """Stop a model server; ``force`` kills it at once."""

    @abstractmethod
    def start_model_server(
        self,
        uuid: UUID,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
    ) -> None:
        """Start a stopped model server and wait until it answers."""

    @abstractmethod
    def delete_model_server(
        self,
        uuid: UUID,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
        force: bool = False,
    ) -> None:
        """Stop a model server and forget it."""


class BaseModelDeployerFlavor(Flavor):
    """Base class for model deployer flavors."""

    @property
    @abstractmethod
    def name(self) -> str:
        """Returns the name of the flavor."""

    @property
    def type(self) -> StackComponentType:
        return StackComponentType.MODEL_DEPLOYER

    @property
    def config_class(self) -> Type[BaseModelDeployerConfig]:
        return BaseModelDeployerConfig

    @property
    @abstractmethod
    def implementation_class(self) -> Type[BaseModelDeployer]:
        """The class that implements the model deployer."""
