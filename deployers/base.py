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
from typing import ClassVar, Dict, Iterator, List, Optional, Type
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from daemon.config import ServiceConfig
from daemon.exceptions import DeployError, FlavorError
from daemon.models import BaseService

DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT = 300


class NotSupported(FlavorError):
    """A deployer was asked for something its flavor does not implement (exit code 2 on the command line)."""


class RedeployError(DeployError):
    """``redeploy_all`` started some services and failed others: ``started`` and ``failed`` (uuid -> error) say which."""

    def __init__(self, message: str, started: List[BaseService], failed: Dict[str, Exception]) -> None:
        super().__init__(message)
        self.started = started
        self.failed = failed


class StackComponentType(str, enum.Enum):
    """Kinds of stack component; modeld only has model deployers (ZenML has more)."""

    MODEL_DEPLOYER = "model_deployer"  # deploys model servers and finds them again

    def __str__(self) -> str:
        return self.value


class StackComponentConfig(BaseModel):
    """Settings of a stack component, validated when the component is registered.

    Unknown keys are refused so that a typo in ``key=value`` settings fails
    at registration instead of being silently ignored; so are infinite and
    NaN numbers, which validate as floats but cannot be stored as JSON.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


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

    # Not in ZenML's guide, and not abstract, so that a flavor written for it keeps working: a
    # flavor that lacks them says so (NotSupported) when they are called.

    def get_logs(
        self,
        uuid: UUID,
        follow: bool = False,
        tail: Optional[int] = None,
    ) -> Iterator[str]:
        """A model server's log, line by line, each with its newline (the last one without, if the log
        ends mid-line), so that writing them out as they come gives the log as it is. ``tail``: only the
        last lines; ``follow``: keep yielding new lines as they are written, until the server is gone
        or the caller stops iterating."""
        raise self._lacks("get_logs", "logs")

    def redeploy_all(
        self,
        timeout: int = DEFAULT_DEPLOYMENT_START_STOP_TIMEOUT,
    ) -> List[BaseService]:
        """Start again every model server whose desired state is running but that is not serving
        (after a reboot, or a cluster that lost its state); return them, now running. ``timeout`` bounds
        the whole call. When some fail, the others are still started, and :class:`RedeployError`
        names the failed ones and carries both lists."""
        raise self._lacks("redeploy_all", "redeploy")

    def _lacks(self, method: str, what: str) -> NotSupported:
        flavor_class = getattr(type(self), "FLAVOR", None)
        try:
            flavor = repr(flavor_class().name) if flavor_class is not None else "unknown"
        except Exception:  # noqa: BLE001  (a flavor class that cannot be made: name the class instead)
            flavor = getattr(flavor_class, "__name__", "unknown")
        return NotSupported(
            f"deployer {self.name!r} (flavor {flavor}, {type(self).__name__}) has no {what}: "
            f"its flavor does not implement BaseModelDeployer.{method}"
        )


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
